"""Stage ``xr-heatmap``: heatmaps for the reading list, drawn off the scoring path.

After a batch commits, the inferer hands over each film that gets one (``daemon.heatmaps``: flagged ones, or
all) with the pixels it scored and the class activation map of that same forward (:meth:`HeatmapStage.submit`).
The stage draws it (core/heatmap.py: no decode, no forward) and records ``results.heatmap_path``; a duplicate
gets its first result's. The queue is bounded: when drawing falls behind, a film is left to the database.

The database stays the record of what is owed. A pass looks for committed rows that should have a heatmap
and have none (a job dropped from a full queue, a crash or a restart, another worker that died) and whose
film has reached its final place, and draws them the slow way: decode the film again and one forward with
class activation maps, no backward. It runs at start, then every ``daemon.heatmap_every_s`` while anything
may be owed or other workers share the database, else every :data:`IDLE_PASS_S`: its query scans the
results table. Only the model that scored a row may say where it looked: a row scored by another model
(before a reload) gets none.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from xr.core.errors import ImageError
from xr.core.heatmap import write_heatmap
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits
from xr.daemon.stage import Stage
from xr.results.rows import update_rows
from xr.results.schema import Result, Status, fs_path, utcnow

PER_STEP = 16  # queued films drawn per step, recorded in one transaction
LINGER_S = 0.5  # a step waits this long for PER_STEP films to queue up: fewer commits, a heatmap is not urgent
PER_PASS = 4  # films per database pass (each a decode and a forward), so a stop is seen within a second
MAX_QUEUED = 128  # ~50 KB of pixels each: a few MB at most however far drawing falls behind
SETTLE_S = 5.0  # a pass leaves rows younger than this to the queue: the inferer submits them just after commit
DUPS_S = 5.0  # this often between passes, re-exports committed in the last RECENT_S get their first's heatmap
RECENT_S = 60.0  # (a range of the processed_at index, not a scan of every duplicate)
IDLE_PASS_S = 30.0  # the only worker and nothing owed: a full pass this often (a safety net)


@dataclass(frozen=True)
class HeatmapJob:
    row_id: int
    pixels: torch.Tensor  # uint8 [1, S, S] or [3, S, S]: what the model saw
    cam: np.ndarray  # the class activation map of the forward that scored it, in [0, 1]
    model_id: str
    queued_at: float  # time.monotonic()


class HeatmapStage(Stage):
    name = "xr-heatmap"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        folder: Path,
        mode: str,
        *,
        worker_id: str,
        exclusive: bool,
        lease_s: float,
        log: Any,
        predictor: Callable[[], Any],
        limits: DecodeLimits = DEFAULT_LIMITS,
        every_s: float = 1.0,
        max_queued: int = MAX_QUEUED,
    ):
        """``folder``: where the PNGs go (``<output>/heatmaps``); ``mode``: ``flagged`` or ``all``;
        ``exclusive``: the only worker on its database (else it draws its own rows and those a worker that
        stopped 2 leases ago left); ``predictor``: returns the model scoring now (the fallback's);
        ``limits``: the operator's decode limits, for the fallback's decode."""
        super().__init__()
        if mode not in ("flagged", "all"):
            raise ValueError(f"heatmap mode {mode!r}: flagged or all (none: no stage)")
        self.sessions, self.folder, self.mode = sessions, Path(folder), mode
        self.worker_id, self.exclusive, self.lease_s = worker_id, exclusive, lease_s
        self.log, self.predictor, self.limits = log, predictor, limits
        self.every_s, self.max_queued = every_s, max_queued
        self._jobs: collections.deque[HeatmapJob] = collections.deque()
        self._lock = threading.Lock()  # submit runs on the inferer's thread
        self._in_hand = 0  # taken from the queue, not yet recorded
        self._failed: set[int] = set()  # rows whose film could not be drawn: tried once per run
        self._last_pass = -math.inf  # the first step looks for rows an earlier run left
        self._more = False  # the last pass drew PER_PASS films: more may wait
        self._owed = 0  # rows the last pass found owed that the queue does not hold (dropped, left, not moved)
        self._drops_seen = -1  # self.dropped when the last pass began: -1, none yet
        self._last_drop = -math.inf  # time.monotonic() of the last dropped job
        self._last_dups = -math.inf  # the last look for re-exports committed after their first was drawn
        self.written = 0
        self.dropped = 0
        self.passes = 0
        self.cpu_s = 0.0  # this stage's thread CPU time: what heatmaps cost the host (heatmaps_stopped)

    @classmethod
    def from_runtime(cls, rt: Any, model: Any) -> HeatmapStage:
        """The daemon's stage: settings from ``rt`` (daemon/runtime.py), the predictor from ``model``."""
        d = rt.daemon
        return cls(
            rt.sessions,
            rt.output / "heatmaps",
            d.heatmaps,
            worker_id=rt.worker_id,
            exclusive=rt.exclusive,
            lease_s=d.lease_s,
            log=rt.log,
            predictor=lambda: model.predictor,
            limits=rt.limits,
            every_s=d.heatmap_every_s,
        )

    # -- from the inferer ---------------------------------------------------------------------------------
    def submit(self, row_id: int, pixels: torch.Tensor, cam: np.ndarray | None, model_id: str) -> bool:
        """Queue the heatmap of a committed film. False when the queue is full (or there is no map): a
        database pass draws it later."""
        with self._lock:
            if cam is None or len(self._jobs) >= self.max_queued:
                self.dropped += 1
                self._last_drop = time.monotonic()
                return False
            self._jobs.append(HeatmapJob(row_id, pixels, cam, model_id, time.monotonic()))
            return True

    def outstanding(self) -> int:
        """Heatmaps still owed, as far as this stage knows: queued, being drawn, found owed by the last
        database pass, plus one while a dropped job may not have been seen by a pass (``--once`` waits for 0)."""
        with self._lock:
            queued = len(self._jobs) + self._in_hand
        return queued + self._owed + int(self._drops_unseen(time.monotonic()))

    def _drops_unseen(self, now: float) -> bool:
        """A job was dropped since the last pass began, or so recently that its row is not yet settled."""
        return self.dropped != self._drops_seen or now - self._last_drop < SETTLE_S + self.every_s

    def _pass_due(self, now: float) -> bool:
        """Every ``every_s`` while something may be owed (a drop, rows an earlier run or a dead worker left),
        else every :data:`IDLE_PASS_S`: when the queue brings every film, a pass only costs database time."""
        if self._more:
            return True
        recovering = self._owed > 0 or self._drops_unseen(now) or not self.exclusive
        return now >= self._last_pass + (self.every_s if recovering else max(self.every_s, IDLE_PASS_S))

    # -- the stage ----------------------------------------------------------------------------------------
    def step(self, now: float) -> bool:
        t0 = time.thread_time()
        try:
            with self._lock:
                due = len(self._jobs) >= PER_STEP or (self._jobs and now - self._jobs[0].queued_at >= LINGER_S)
            if due and self.draw_queued():
                return True
            if not self._pass_due(now):
                if now >= self._last_dups + max(self.every_s, DUPS_S):  # re-exports of films drawn before
                    self._last_dups = now
                    self._record({}, dups_since=utcnow() - dt.timedelta(seconds=RECENT_S))
                return False
            self._last_pass = self._last_dups = now
            drawn = self.database_pass()
            self._more = drawn == PER_PASS
            return drawn > 0
        finally:
            self.cpu_s += time.thread_time() - t0

    def draw_queued(self) -> int:
        """Draw up to :data:`PER_STEP` queued films and record them in one transaction; returns how many."""
        with self._lock:
            jobs = [self._jobs.popleft() for _ in range(min(PER_STEP, len(self._jobs)))]
            self._in_hand = len(jobs)
        try:
            if jobs:
                self._record({j.row_id: self._draw(j.row_id, j.pixels, j.cam, "forward") for j in jobs})
        finally:
            with self._lock:
                self._in_hand = 0
        return len(jobs)

    def close(self) -> None:
        """Draw what is queued: cheap, and a stop (``--once`` included) then leaves no map it holds."""
        try:
            while self.draw_queued():
                pass
            self._record({}, dups_since=True)  # re-exports committed after their first was drawn
        except Exception as exc:  # noqa: BLE001 - the database pass on the next start draws them
            self.log.warning("heatmaps_left", reason=f"{exc.__class__.__name__}: {exc}", queued=len(self._jobs))
        self.log.info(
            "heatmaps_stopped",
            written=self.written,
            dropped=self.dropped,
            passes=self.passes,
            cpu_ms=round(self.cpu_s * 1000, 1),
        )

    # -- the database pass --------------------------------------------------------------------------------
    def _owed_rows(self, predictor: Any) -> list[Any]:
        """Conditions of a row that should have a heatmap from ``predictor`` and has none."""
        want = [
            Result.status == Status.OK,
            Result.heatmap_path.is_(None),
            Result.pruned_at.is_(None),  # retention deleted it (results/retention.py): not drawn again
            Result.model_id == predictor.model_id,
        ]
        if self.mode == "flagged":
            want.append(Result.flagged.is_(True))
        if self._failed:
            want.append(Result.id.not_in(self._failed))
        if not self.exclusive:  # several workers: each draws its own films, and those a stopped one left
            orphaned = utcnow() - dt.timedelta(seconds=2 * self.lease_s)
            want.append((Result.worker_id == self.worker_id) | (Result.processed_at < orphaned))
        return want

    def database_pass(self) -> int:
        """Draw up to :data:`PER_PASS` owed heatmaps the queue did not bring; returns how many were drawn."""
        with self._lock:
            drops = self.dropped
            queued = {j.row_id for j in self._jobs}
        pred = self.predictor()
        # rows the queue holds, or will (committed a moment ago), are the queue's
        want = [*self._owed_rows(pred), Result.id.not_in(queued or {-1})]
        want.append(Result.processed_at < utcnow() - dt.timedelta(seconds=SETTLE_S))
        in_place = Result.moved_at.is_not(None) | Result.moved_to.is_(None)
        with self.sessions() as s:
            rows = s.execute(
                select(Result.id, Result.path, Result.moved_to)
                .where(*want, in_place)
                .order_by(Result.id)
                .limit(PER_PASS)
            ).all()
        written = self._fallback(rows, pred) if rows else {}
        self._record(written, dups_since=True)
        with self.sessions() as s:  # still owed: not yet moved, more than PER_PASS, or not drawable
            self._owed = s.execute(select(func.count()).select_from(Result).where(*want)).scalar_one()
        with self._lock:
            self._drops_seen = drops
        self.passes += 1
        return len(rows)

    def _fallback(self, rows: list[Any], pred: Any) -> dict[int, str | None]:
        """Decode the moved films again and score them in one forward with class activation maps."""
        pixels: dict[int, torch.Tensor] = {}
        for row in rows:
            source = fs_path(row.moved_to or row.path)
            try:
                pixels[row.id] = pred.pixels(Path(source).read_bytes(), self.limits, name=source)
            except (OSError, ImageError) as exc:
                self._failed.add(row.id)
                reason = str(getattr(exc, "reason", None) or exc)
                self.log.warning("heatmap_failed", id=row.id, file=source, reason=reason)
        if not pixels:
            return {}
        preds = pred.predict_batch(torch.stack(list(pixels.values())), cams=True)
        return {rid: self._draw(rid, px, p.cam, "fallback") for (rid, px), p in zip(pixels.items(), preds)}

    # -- drawing and recording ----------------------------------------------------------------------------
    def _draw(self, row_id: int, pixels: torch.Tensor, cam: np.ndarray, source: str) -> str | None:
        t0 = time.perf_counter()
        try:
            out = write_heatmap(self.folder, str(row_id), pixels, cam)
        except (OSError, ValueError) as exc:
            self._failed.add(row_id)
            self.log.warning("heatmap_failed", id=row_id, reason=f"{exc.__class__.__name__}: {exc}")
            return None
        ms = round((time.perf_counter() - t0) * 1000, 1)
        self.log.info("heatmap", id=row_id, path=str(out), ms=ms, source=source)
        return os.fspath(out)

    def _record(self, written: dict[int, str | None], dups_since: dt.datetime | bool = False) -> None:
        """``results.heatmap_path`` of the films drawn and of their duplicates; with ``dups_since``, also of
        the duplicates committed since then (True: ever) whose first has one: re-exports that came after
        their first was drawn."""
        paths = {rid: p for rid, p in written.items() if p is not None}
        if not paths and dups_since is False:
            return
        with self.sessions.begin() as s:
            update_rows(s, [{"id": rid, "heatmap_path": p} for rid, p in paths.items()])
            owed = [Result.status == Status.DUPLICATE, Result.heatmap_path.is_(None)]
            dups = []
            if paths:
                stmt = select(Result.id, Result.duplicate_of).where(*owed, Result.duplicate_of.in_(list(paths)))
                dups = [(dup_id, paths[first_id]) for dup_id, first_id in s.execute(stmt)]
            if dups_since is not False:
                if dups_since is not True:
                    owed.append(Result.processed_at >= dups_since)
                first = aliased(Result)
                stmt = select(Result.id, first.heatmap_path).join(first, Result.duplicate_of == first.id)
                dups += s.execute(stmt.where(*owed, first.heatmap_path.is_not(None))).all()
            update_rows(s, [{"id": dup_id, "heatmap_path": path} for dup_id, path in dups])
        self.written += len(paths)
