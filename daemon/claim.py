"""Stage ``xr-claim``: read each ready file once (core/intake.py), claim its row in the journal, and hand it
to the decoders (threads ``xr-decode-N``), which put it on the inferer's queue.

A file's bytes are read and hashed before its claim's transaction (whose locks hold the other writers up),
and kept until the batch commit: a new model with another preset decodes the same bytes again. Nothing is
parsed before the claim: a DICOM header is read under it, and every parse and decode is marked in
:class:`ReadingMarks`, so a file that kills the process is known at the next start.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import fcntl
import itertools
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xr.core.dicom import is_dicom
from xr.core.errors import ImageError
from xr.core.files import apply_mode, file_mode
from xr.core.intake import (
    DecodeLimits,
    Input,
    InputChanged,
    InputError,
    InputUnavailable,
    InputVanished,
    dicom_facts,
    read_input,
)
from xr.daemon.discovery import Discovery, FileItem
from xr.daemon.finish import PendingMove
from xr.daemon.runtime import CurrentModel, Runtime, WorkSlots
from xr.daemon.stage import POLL_S, Stage
from xr.results import journal, rows
from xr.results.journal import Claim, Claimed, FileClaim
from xr.results.schema import DICOM_COLUMNS, storable, utcnow

UNAVAILABLE_RETRY_S = 5.0  # a file on a share that went away is read again this much later


@dataclass
class ClaimedFile:
    """A file between its claim and its batch commit: its row and fencing token, what was read, what the
    decode made of it, and why it gets no score (``error``, ``skip``) or someone else's (``duplicate_of``)."""

    row_id: int
    token: int
    item: FileItem
    received_at: dt.datetime
    data: bytes | None = None  # the bytes read, kept until the commit (a new preset decodes them again)
    sha256: str | None = None
    sop: str | None = None  # a DICOM instance's SOPInstanceUID: the same instance is a duplicate whatever its bytes
    error: str | None = None
    incomplete: bool = False  # the bytes read end too early (``error`` says how)
    skip: str | None = None  # a DICOM object out of scope: why
    duplicate_of: int | None = None
    pixels: torch.Tensor | None = None  # uint8 pixels, decoded with ``preset``
    preset: Any = None
    decode_ms: float = 0.0


def decode(f: ClaimedFile, predictor: Any, limits: DecodeLimits) -> None:
    """``f``'s bytes to pixels with ``predictor``'s preset, within the operator's ``limits``; a bad file sets
    ``f.error``, never raises."""
    t0 = time.perf_counter()
    try:
        f.pixels, f.preset = predictor.pixels(f.data, limits, name=f.item.path), predictor.preset
    except ImageError as exc:
        f.error, f.incomplete = exc.reason, exc.incomplete
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the daemon
        f.error = f"cannot decode image: {exc.__class__.__name__}: {exc}"
    f.decode_ms = (time.perf_counter() - t0) * 1000


class ReadingMarks:
    """The claimed rows this process is parsing or decoding right now: one 8-byte slot per thread in a
    small file of the output folder, written without fsync (a process that dies leaves its page cache).
    What a killed run (out of memory, a decoder's segfault) left there is read at the next start, and each
    of those rows counts one crash (``settle.settle_at_start``)."""

    SLOT = struct.Struct("<q")

    def __init__(self, output: Path, exclusive: bool = True, worker: str | None = None):
        # one daemon per output folder on SQLite; with several workers sharing it, one file per host and
        # worker number (the first this process can lock: a restarted worker finds a dead one's file)
        names = (
            [".xr-daemon.reading"]
            if exclusive
            else [f".xr-reading-{worker or socket.gethostname()}-{n}" for n in range(16)]
        )
        self.fd: int | None = None
        for name in names:
            try:
                fd = os.open(output / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
            except OSError:
                continue  # no marks (a read-only output folder): crashes are then not counted
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            apply_mode(output / name, fd=fd)
            self.fd = fd
            break
        self._slots = itertools.count()
        self._local = threading.local()

    def take_left(self) -> set[int]:
        """The rows a previous run was reading when it stopped; the file is cleared for this run."""
        if self.fd is None:
            return set()
        data = os.pread(self.fd, 1 << 16, 0)
        os.ftruncate(self.fd, 0)
        n = len(data) // self.SLOT.size
        return {v for (v,) in self.SLOT.iter_unpack(data[: n * self.SLOT.size]) if v > 0}

    @contextlib.contextmanager
    def reading(self, row_id: int):
        if self.fd is None:
            yield
            return
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = next(self._slots)
        offset = slot * self.SLOT.size
        os.pwrite(self.fd, self.SLOT.pack(row_id), offset)
        yield
        # not in a ``finally``: an exception out of a parse or decode (one that stops the stage, and so the
        # daemon, at every start) leaves the mark and counts like a crash; the next mark in this slot clears it
        os.pwrite(self.fd, self.SLOT.pack(0), offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


NO_MARKS = contextlib.nullcontext


def still_there(item: FileItem) -> bool:
    """Whether the inbox still holds ``item`` as it was listed."""
    try:
        st = os.lstat(item.path)
    except OSError:
        return False
    return item.is_symlink or (st.st_size, st.st_mtime_ns) == item.identity


class Claimer(Stage):
    """Takes up to a batch of ready files per step, one work slot each; reads, claims, submits the decode."""

    name = "xr-claim"
    idle_s = 0.0  # a step waits on the ready queue itself

    def __init__(
        self,
        rt: Runtime,
        discovery: Discovery,
        model: CurrentModel,
        slots: WorkSlots,
        ready: queue.Queue[FileItem],
        decoded: queue.Queue[ClaimedFile],
        finish: queue.Queue[list[PendingMove]],
        marks: ReadingMarks | None = None,
    ):
        super().__init__()
        self.rt, self.discovery, self.model, self.slots = rt, discovery, model, slots
        self.marks = marks
        self.ready, self.decoded, self.finish = ready, decoded, finish
        self._carry: FileItem | None = None  # taken from the queue while no slot was free: it goes first
        self.pool = cf.ThreadPoolExecutor(max_workers=max(1, rt.decode_workers), thread_name_prefix="xr-decode")

    def step(self, now: float) -> bool:
        items = self.take_ready()
        if items:
            self.claim(items)
        return self._carry is not None or bool(items)

    def close(self) -> None:
        if self._carry is not None:
            self.discovery.release(self._carry.path)
            self._carry = None
        self.pool.shutdown(wait=True, cancel_futures=True)

    def take_ready(self) -> list[FileItem]:
        """Up to a batch of ready files, each holding a work slot."""
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            try:
                first = self.ready.get(timeout=POLL_S)
            except queue.Empty:
                return []
        if not self.slots.take():
            self._carry = first  # no room downstream yet
            return []
        items = [first]
        while len(items) < self.rt.batch_size:
            try:
                nxt = self.ready.get_nowait()
            except queue.Empty:
                break
            if not self.slots.take_now():
                self._carry = nxt
                break
            items.append(nxt)
        return items

    def claim(self, items: list[FileItem]) -> None:
        """Claim ``items`` (each holding a work slot); the slots of files that go no further are given back
        here, the others' when their batch leaves the inferer."""
        admitted: list[ClaimedFile] = []
        try:
            admitted = self._claim(items)
        finally:
            self.slots.give_back(len(items) - len(admitted))
        for f in admitted:
            if f.error is not None or f.skip is not None or f.duplicate_of is not None:
                self.decoded.put(f)
            else:
                self.pool.submit(self._decode, f).add_done_callback(lambda fut, f=f: self._decoded(fut, f))

    def _claim(self, items: list[FileItem]) -> list[ClaimedFile]:
        rt, log = self.rt, self.rt.log
        reads: list[tuple[FileItem, Input | None, str | None]] = []
        for item in items:
            try:
                film = read_input(
                    item.path, rt.limits, inbox=rt.inbox, is_symlink=item.is_symlink, read_dicom=False, inode=item.inode
                )
            except InputVanished:
                self.discovery.release(item.path)
                continue
            except InputChanged:  # swapped since it was listed: settles again as the file it is now
                self.discovery.release(item.path)
                self.discovery.note(item.path)
                continue
            except InputUnavailable:  # a share that went away: no row, try again once it may be back
                self.discovery.retry_later(item, time.monotonic() + UNAVAILABLE_RETRY_S)
                continue
            except InputError as exc:
                reads.append((item, None, exc.reason))
                continue
            if film.changed(item.identity):
                # written again after it looked complete: back to discovery to settle again
                self.discovery.release(item.path)
                self.discovery.note(item.path)
                continue
            reads.append((item, film, None))
        if not reads:
            return []
        reads.sort(key=lambda r: r[0].path)  # every worker claims in one order: two claim batches never deadlock
        requests = [
            FileClaim(
                storable(item.path),
                item.size,
                item.mtime_ns,
                item.received_at,
                {
                    "sha256": film.sha256 if film else None,
                    **(film.identifiers if film else dict.fromkeys(DICOM_COLUMNS)),
                },
                still_there=lambda item=item: still_there(item),
            )
            for item, film, _ in reads
        ]
        with rt.sessions.begin() as s:
            claims = journal.claim_files(s, requests, rt.lease, utcnow())
            admitted = [
                self._admit(item, film, err, c)
                for (item, film, err), c in zip(reads, claims)
                if c.outcome in (Claim.NEW, Claim.REDO)
            ]
            plain: list[ClaimedFile] = []
            dicom: list[ClaimedFile] = []
            for f in admitted:
                if f.error is None:
                    (dicom if f.data and is_dicom(f.data) else plain).append(f)
            self._dedupe(s, plain)
        if dicom:  # headers parsed under their claims (a crash in the parse is then counted), then recorded
            facts = {f.row_id: self._parse(f) for f in dicom}
            with rt.sessions.begin() as s:
                journal.record_facts(s, facts)
                self._dedupe(s, dicom)
        for (item, _, _), c in zip(reads, claims):
            self._route(item, c, log)
        return admitted

    def _parse(self, f: ClaimedFile) -> dict[str, Any]:
        """Read ``f``'s DICOM header: its scope, cut-short hint and SOP instance; its identifier columns."""
        with self.marks.reading(f.row_id) if self.marks else NO_MARKS():
            facts = dicom_facts(f.data, self.rt.limits)
        f.skip, f.incomplete = facts.out_of_scope, facts.maybe_cut
        f.sop = facts.identifiers.get("sop_instance_uid")
        return {column: facts.identifiers.get(column) for column in DICOM_COLUMNS}

    def _dedupe(self, s: Any, admitted: list[ClaimedFile]) -> None:
        scorable = [f for f in admitted if f.error is None and f.skip is None]
        if self.rt.daemon.dedupe and scorable:
            by_sha = rows.first_ok_by_sha(s, [f.sha256 for f in scorable if f.sha256])
            by_sop = rows.first_ok_by_sop(s, [f.sop for f in scorable if f.sop])
            for f in scorable:
                f.duplicate_of = by_sha.get(f.sha256) or by_sop.get(f.sop)

    def _admit(self, item: FileItem, film: Input | None, err: str | None, c: Claimed) -> ClaimedFile:
        # an image without pixels waits out the grace period like any file cut short, then is skipped
        f = ClaimedFile(c.row_id, c.token, item, c.received_at, error=err)
        if film is not None:
            f.data, f.sha256 = film.data, film.sha256
        return f

    def _route(self, item: FileItem, c: Claimed, log: Any) -> None:
        """What a claim that is not scored now comes to; and the takeover warning."""
        if c.taken_from is not None:
            log.warning(
                "lease_taken_over",
                file=storable(item.path),
                id=c.row_id,
                from_worker=c.taken_from,
                reason=f"its lease ran out {c.overdue_s:.1f} s ago",
            )
        if c.outcome == Claim.MOVED_AWAY:
            log.info(
                "claim_dropped", file=storable(item.path), reason="another worker moved the file since it was read"
            )
            self.discovery.release(item.path)
        elif c.outcome == Claim.HELD:  # held by a live worker: look again when its lease runs out
            self.discovery.retry_later(item, time.monotonic() + c.retry_in_s)
        elif c.outcome == Claim.COMMITTED:  # scored before: only the move is left
            self.finish.put([PendingMove(c.row_id, item.path, item.identity, c.moved_to, c.token)])

    def _decode(self, f: ClaimedFile) -> None:
        with self.marks.reading(f.row_id) if self.marks else NO_MARKS():
            decode(f, self.model.predictor, self.rt.limits)

    def _decoded(self, fut: cf.Future, f: ClaimedFile) -> None:
        if fut.cancelled():
            return  # shutting down: the row stays claimed and is redone on the next start
        if fut.exception() is not None and f.error is None:
            f.error = f"cannot decode image: {fut.exception()}"
        self.decoded.put(f)
