"""Stage ``xr-finish``: move committed files to processed/, failed/ or skipped/, record each move in the
journal, and bring the CSVs up to date.

A file is moved only by the worker that still holds its row (its fencing token), and never over another
file (core/moves.py). A move that fails (a share gone, a lock) is tried again later; the row keeps
``moved_at`` empty meanwhile, so a restart finishes it too.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import time
from dataclasses import dataclass

from xr.core.moves import move_no_overwrite
from xr.daemon.discovery import Discovery
from xr.daemon.moves import Destinations
from xr.daemon.runtime import Runtime
from xr.daemon.stage import POLL_S, Stage
from xr.results import journal
from xr.results.export import CsvExporter
from xr.results.schema import utcnow

EXPORT_EVERY_S = 1.0  # under a steady stream of batches, CSVs are updated at most this often
MOVE_RETRY_S = 5.0  # a move that failed is tried again this much later


@dataclass(frozen=True)
class PendingMove:
    """A committed row whose file still has to be moved (``moved_to``), or released where it is left (None)."""

    row_id: int
    src: str  # the file in the inbox
    identity: tuple[int, int]  # (size, mtime_ns) of the file as scored
    moved_to: str | None
    token: int = 0  # the lease's fencing token the move is made under


class Finisher(Stage):
    name = "xr-finish"
    idle_s = 0.0  # a step waits on its queue itself

    def __init__(
        self,
        rt: Runtime,
        discovery: Discovery,
        destinations: Destinations,
        exporter: CsvExporter,
        finish: queue.Queue[list[PendingMove]],
    ):
        super().__init__()
        self.rt, self.discovery, self.destinations, self.exporter, self.finish = (
            rt,
            discovery,
            destinations,
            exporter,
            finish,
        )
        self._retry: list[tuple[float, PendingMove]] = []  # (when, move) that failed and is tried again
        self._exported_at = time.monotonic()

    def step(self, now: float) -> bool:
        due = [m for when, m in self._retry if when <= now]
        if due:
            self._retry = [(w, m) for w, m in self._retry if m not in due]
            self.move(due)
        try:
            moves = self.finish.get(timeout=POLL_S)
        except queue.Empty:
            # Several workers: rows the others commit reach the CSVs through this one while it is the
            # elected exporter, so it exports while idle too (and, if not elected, tries to become it).
            if self.exporter.elect and time.monotonic() - self._exported_at >= EXPORT_EVERY_S:
                self.export()
            return bool(due)
        self.move(moves)
        # In a stream of batches the CSVs are updated at most once per EXPORT_EVERY_S; as soon as the
        # queue is empty they catch up.
        if self.finish.empty() or time.monotonic() - self._exported_at >= EXPORT_EVERY_S:
            self.export()
        return True

    def close(self) -> None:
        """After a stop (the stages upstream are stopped first): what is queued is moved, and the CSVs
        catch up. After a failure nothing more is tried: the next start finishes it from the journal."""
        if self.error is not None:
            return
        while True:
            try:
                self.move(self.finish.get_nowait())
            except queue.Empty:
                break
        self.export()

    def export(self) -> None:
        self.exporter.export()
        self._exported_at = time.monotonic()

    def move(self, moves: list[PendingMove]) -> None:
        rt, log = self.rt, self.rt.log
        tokens = {m.row_id: m.token for m in moves if m.moved_to is not None}
        held: set[int] = set()
        if tokens:
            with rt.sessions.begin() as s:  # a file is moved only by the worker that still holds its row
                held = journal.still_held(s, tokens, rt.worker_id)
        done: dict[int, tuple[int, str | None, dt.datetime]] = {}
        for m in moves:
            if m.moved_to is None:
                self.discovery.release(m.src, settled=m.identity)
                continue
            if m.row_id not in held:
                log.warning("lease_lost", file=m.src, id=m.row_id, reason="another worker took over moving this file")
                self.destinations.release(m.moved_to)
                self.discovery.release(m.src)
                continue
            settled = None
            try:
                done[m.row_id] = (m.token, self._move(m), utcnow())
            except OSError as exc:
                log.error("move_failed", file=m.src, destination=m.moved_to, reason=str(exc))
                # Scored and committed: a rescan must not pick it up again; the move is tried again later
                # (a share that went away comes back) and at the next start (its row keeps moved_at empty).
                settled = m.identity
                self._retry.append((time.monotonic() + MOVE_RETRY_S, m))
            finally:
                self.destinations.release(m.moved_to)
            self.discovery.release(m.src, settled=settled)
        if done:
            with rt.sessions.begin() as s:
                journal.record_moves(s, done, rt.worker_id)

    def _move(self, m: PendingMove) -> str | None:
        """Where the file is now: moved there, or already there, or None when it went elsewhere."""
        try:
            st = os.lstat(m.src)
        except FileNotFoundError:
            return m.moved_to  # already moved (or removed by someone else)
        if (st.st_size, st.st_mtime_ns) != m.identity:
            # Another file has this name now: the scored one was moved before a crash and a new one dropped,
            # or it was rewritten in place after it was read. That file is new work for discovery, never
            # moved under this row.
            self.rt.log.info("move_skipped", file=m.src, id=m.row_id, reason="the inbox file changed since it was read")
            return m.moved_to if os.path.lexists(m.moved_to) else None
        return str(move_no_overwrite(m.src, m.moved_to))
