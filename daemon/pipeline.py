"""The daemon's stages: claim -> decode (thread pool) -> micro-batch + predict + commit -> move + export.

Each stage is a thread named ``xr-...`` with a stop event; every blocking call has a timeout so a stop
is seen within ~0.1 s. Queues are bounded (a semaphore of ``capacity`` work slots covers everything
between the claim and the batch commit), so a burst stalls discovery instead of filling memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import errno
import filecmp
import hashlib
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from xr.core.dicom import is_dicom, read_header
from xr.core.errors import ImageError
from xr.daemon.discovery import Discovery, FileItem
from xr.results.export import CsvExporter
from xr.results.journal import (
    claim_fence,
    db_time,
    delete_rows,
    first_ok_by_sha,
    first_ok_by_sop,
    owner_of,
    record_calibration,
    scores_by_id,
    still_held,
    take_over,
    try_claim,
    update_rows,
)
from xr.results.schema import DICOM_COLUMNS, Batch, Status, storable, utcnow

POLL_S = 0.1  # every blocking wait in the stages uses this timeout and re-checks its stop event
EXPORT_EVERY_S = 1.0  # under a steady stream of batches, CSVs are rewritten at most this often
MOVE_RETRY_S = 5.0  # a move that failed (a share gone, a lock) is tried again this much later
VANISHED = "file vanished before it could be read"  # no row: the file is simply not there any more
# Errors a network share gives while it is away: the file is tried again later, with no row.
TRANSIENT = {
    errno.EIO,
    errno.ESTALE,
    errno.ENOTCONN,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ETIMEDOUT,
    errno.ENODEV,
}
UNAVAILABLE = "share unavailable"


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a plain file")


# -- moving files -----------------------------------------------------------------------------------
def candidate_names(dst: Path):
    yield dst
    stem, suffix = dst.stem, dst.suffix
    i = 1
    while True:
        yield dst.with_name(f"{stem}-{i}{suffix}")
        i += 1


def free_name(dst: Path, reserved: set[str] | None = None) -> Path:
    """``dst``, or ``name-1.ext``, ``name-2.ext``... : the first that neither exists nor is reserved."""
    for cand in candidate_names(dst):
        if not os.path.lexists(cand) and (reserved is None or str(cand) not in reserved):
            return cand
    raise AssertionError("unreachable")


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def same_copy(src: str | Path, dst: str | Path) -> bool:
    """``dst`` is a finished copy of ``src`` made by the copy path (copy2 keeps size and mtime)."""
    try:
        ss, sd = os.lstat(src), os.lstat(dst)
    except OSError:
        return False
    if (ss.st_size, ss.st_mtime_ns, stat.S_IFMT(ss.st_mode)) != (sd.st_size, sd.st_mtime_ns, stat.S_IFMT(sd.st_mode)):
        return False
    if stat.S_ISLNK(ss.st_mode):
        return os.readlink(src) == os.readlink(dst)
    return filecmp.cmp(src, dst, shallow=False)


def move_no_overwrite(src: str | Path, dst: str | Path) -> Path:
    """Move ``src`` (a file or a symlink itself) to ``dst`` or, if taken, to ``dst`` with a ``-N`` suffix.

    Never overwrites and never deletes data: a hard link is made first (``link`` fails if the name
    exists), then the inbox name is removed. Across file systems, or where the kernel refuses to link a
    file of another owner, the file is copied to a hidden temp name beside the destination and linked
    from there. If the inbox name cannot be removed (a read-only share, a sticky folder), the new name
    is taken back and the error raised: the file stays where it was, with no second copy.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.moving")  # one name per destination: a crash's leftover is found
    if os.path.lexists(dst) and (same_file(src, dst) or same_copy(src, dst)):
        # A previous run linked or copied it there and died before removing the inbox name. ``dst`` is
        # the name this file's row reserved, so an equal file there is that copy, not another file.
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.unlink(src)
        return dst
    try:
        new = _link_free_name(src, dst)
    except OSError as exc:
        # EXDEV: another file system. EPERM: protected_hardlinks (the default on Linux) refuses a link to
        # a file the daemon does not own, the usual case when an exporter account writes the inbox.
        if exc.errno not in (errno.EXDEV, errno.EPERM):
            raise
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            if os.path.islink(src):
                os.symlink(os.readlink(src), tmp)
            else:
                shutil.copy2(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            new = _link_free_name(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass  # someone else removed or renamed the inbox name meanwhile: ``new`` holds the data
    except OSError:
        os.unlink(new)
        raise
    return new


def _link_free_name(source: Path, dst: Path) -> Path:
    for cand in candidate_names(dst):
        try:
            os.link(source, cand, follow_symlinks=False)
        except FileExistsError:
            continue
        return cand
    raise AssertionError("unreachable")


# -- work items ---------------------------------------------------------------------------------------
@dataclass
class Work:
    row_id: int
    item: FileItem
    received_at: dt.datetime
    sha256: str | None = None
    size: int = 0
    tensor: torch.Tensor | None = None
    data: bytes | None = (
        None  # the bytes read, kept until the commit: a new model with another preset decodes them again
    )
    preset: Any = None  # the preset ``tensor`` was made with
    error: str | None = None
    duplicate_of: int | None = None
    decode_ms: float = 0.0
    incomplete: bool = False  # the bytes read end too early (the error says how)
    skip: str | None = None  # a DICOM object out of scope: why
    sop: str | None = None  # a DICOM instance's SOPInstanceUID: the same instance is a duplicate whatever its bytes
    token: int = 0  # the lease's fencing token this claim holds (results/journal.py still_held)


@dataclass
class Done:
    """A committed row whose file still has to be moved (or released when left in place)."""

    row_id: int
    src: str
    identity: tuple[int, int]
    moved_to: str | None
    token: int = 0  # the lease's fencing token the move is made under


@dataclass
class Context:
    """What the stages share."""

    inbox: Path
    output: Path
    sessions: sessionmaker[Session]
    predictor: Any
    discovery: Discovery
    exporter: CsvExporter
    log: Any
    batch_size: int = 16
    max_wait_ms: int = 50
    decode_workers: int = 2
    on_success: str = "move"
    on_error: str = "move"
    dedupe: bool = True
    max_file_bytes: int = 512 * 1024 * 1024
    incomplete_grace_s: float = 60.0
    on_skipped: str = "move"
    dicom_modalities: tuple[str, ...] = ("CR", "DX")
    dicom_body_parts: tuple[str, ...] = ("CHEST",)
    stop: threading.Event = field(default_factory=threading.Event)  # stop taking new work
    reserved: set[str] = field(default_factory=set)  # destinations chosen but not yet moved to
    reserved_lock: threading.Lock = field(default_factory=threading.Lock)
    on_batch: Callable[[int], None] | None = None
    reloader: Any = None  # offers a new model or calibration between batches (daemon/loading.py)
    worker_id: str = "local"  # this daemon, in results.worker_id and the leases
    lease_s: float = 60.0
    exclusive: bool = True  # the only daemon on its database (SQLite): every earlier claim is a dead run's
    metrics: Any = None  # daemon/metrics.py Metrics, when --metrics-port is set

    @property
    def processed_dir(self) -> Path:
        return self.output / "processed"

    @property
    def failed_dir(self) -> Path:
        return self.output / "failed"

    @property
    def skipped_dir(self) -> Path:
        return self.output / "skipped"

    def destination(self, src: str, status: str) -> str | None:
        """Reserve where a finished file goes (None: left in place)."""
        mode, base = {
            Status.ERROR: (self.on_error, self.failed_dir),
            Status.SKIPPED: (self.on_skipped, self.skipped_dir),
        }.get(status, (self.on_success, self.processed_dir))
        if mode == "leave":
            return None
        try:
            rel = Path(src).relative_to(self.inbox)
        except ValueError:
            rel = Path(Path(src).name)
        rel = Path(storable(str(rel)))  # the row names its destination, so it must be a name the DB can hold
        with self.reserved_lock:
            dst = free_name(base / rel, self.reserved)
            self.reserved.add(str(dst))
        return str(dst)


class Stage:
    name = "xr-stage"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.halt = threading.Event()  # this stage's own stop
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded, name=self.name, daemon=True)
        self._thread.start()

    def _guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.error = exc
            raise

    def run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


# -- claim + decode ---------------------------------------------------------------------------------------
class Claimer(Stage):
    """Reads each ready file once, hashes those bytes, writes its ``claimed`` row, submits the decode."""

    name = "xr-claim"

    def __init__(
        self,
        ctx: Context,
        ready: queue.Queue[FileItem],
        decoded: queue.Queue[Work],
        finish: queue.Queue,
        slots: threading.Semaphore,
    ):
        super().__init__()
        self.ctx, self.ready, self.decoded, self.finish, self.slots = ctx, ready, decoded, finish, slots
        self._carry: FileItem | None = None
        self.pool = cf.ThreadPoolExecutor(max_workers=max(1, ctx.decode_workers), thread_name_prefix="xr-decode")

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                if self._carry is not None:
                    first, self._carry = self._carry, None
                else:
                    try:
                        first = self.ready.get(timeout=POLL_S)
                    except queue.Empty:
                        continue
                if not self._acquire():
                    self.ctx.discovery.release(first.path)
                    break
                items = [first]
                while len(items) < self.ctx.batch_size:
                    try:
                        nxt = self.ready.get_nowait()
                    except queue.Empty:
                        break
                    if not self.slots.acquire(blocking=False):
                        self._carry = nxt  # no room downstream: it goes first next time
                        break
                    items.append(nxt)
                self.claim(items)
        finally:
            if self._carry is not None:
                self.ctx.discovery.release(self._carry.path)
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _acquire(self) -> bool:
        while not self.halt.is_set():
            if self.slots.acquire(timeout=POLL_S):
                return True
        return False

    def read(self, item: FileItem) -> tuple[bytes | None, str | None, tuple[int, int] | None]:
        """(bytes, error reason, identity of what was read)."""
        if item.is_symlink:
            target = os.path.realpath(item.path)
            try:
                Path(target).relative_to(self.ctx.inbox)
            except ValueError:
                return None, f"symlink points outside the inbox (to {target})", None
        try:
            # O_NONBLOCK: a FIFO under an image name must not block the claim thread in open()
            fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            if item.is_symlink and os.path.lexists(item.path):
                return None, f"symlink target not found ({os.readlink(item.path)})", None
            return None, VANISHED, None
        except IsADirectoryError:
            return None, "is a directory, not an image file", None
        except OSError as exc:
            return None, UNAVAILABLE if exc.errno in TRANSIENT else f"cannot read file: {exc.strerror or exc}", None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return None, f"not a regular file ({_file_kind(st.st_mode)})", None
                limit = self.ctx.max_file_bytes
                if st.st_size > limit:
                    return None, f"file is {st.st_size:,} bytes, over the limit of {limit:,} (daemon.max_file_mb)", None
                data = f.read()
        except OSError as exc:
            return None, UNAVAILABLE if exc.errno in TRANSIENT else f"cannot read file: {exc.strerror or exc}", None
        if item.is_symlink:
            return data, None, (item.size, item.mtime_ns)
        return data, None, (st.st_size, st.st_mtime_ns)

    def claim(self, items: list[FileItem]) -> None:
        ctx = self.ctx
        reads = []
        for item in items:
            data, err, ident = self.read(item)
            if ident is not None and ident != (item.size, item.mtime_ns):
                # changed after it looked complete: back to discovery to settle again
                self.slots.release()
                ctx.discovery.release(item.path)
                ctx.discovery.note(item.path)
                continue
            if err == VANISHED:
                self.slots.release()
                ctx.discovery.release(item.path)
                continue
            if err == UNAVAILABLE:  # a share that went away: no row, try again once it may be back
                self.slots.release()
                ctx.discovery.retry_later(item, time.monotonic() + MOVE_RETRY_S)
                continue
            reads.append((item, data, err))
        if not reads:
            return
        reads.sort(key=lambda r: r[0].path)  # every worker claims in one order: two claim batches never deadlock
        # Hashing and header parsing before the transaction: its locks hold the other writers up.
        facts = []
        for item, data, err in reads:
            sha = hashlib.sha256(data).hexdigest() if data is not None else None
            ids, skip, cut = self.dicom(data) if data is not None and err is None else ({}, None, False)
            facts.append((item, data, err, sha, {c: ids.get(c) for c in DICOM_COLUMNS}, skip, cut))
        now = utcnow()
        works: list[Work] = []
        with ctx.sessions.begin() as s:
            claim_fence(s)
            clock = db_time(s)
            expires = clock + ctx.lease_s
            for item, data, err, sha, ids, skip, cut in facts:
                key = (storable(item.path), item.size, item.mtime_ns)  # as the rows hold it
                fields = {
                    "sha256": sha,
                    "claimed_at": now,
                    "lease_holder": ctx.worker_id,
                    "lease_expires_at": expires,
                    **ids,
                }
                row_id = try_claim(
                    s,
                    {
                        "path": key[0],
                        "filename": os.path.basename(key[0]),
                        "size_bytes": item.size,
                        "mtime_ns": item.mtime_ns,
                        "status": Status.CLAIMED,
                        "received_at": item.received_at,
                        "lease_token": 0,
                        **fields,
                    },
                )
                token, received = 0, item.received_at
                if row_id is not None and not ctx.exclusive and not self.still_there(item):
                    # Read before another worker scored and moved it (this one was frozen in between): the
                    # claim is of a file that is gone, and its result is that worker's.
                    delete_rows(s, [row_id])
                    ctx.log.info(
                        "claim_dropped",
                        file=storable(item.path),
                        reason="another worker moved the file since it was read",
                    )
                    self.slots.release()
                    ctx.discovery.release(item.path)
                    continue
                if row_id is None:  # another row owns the file: a run that died, or another worker
                    owner = owner_of(s, key)
                    if (
                        owner is None
                        or not self.takeable(owner, clock)
                        or not take_over(s, owner.id, owner.lease_token, ctx.worker_id, expires)
                    ):
                        self.slots.release()  # held by a live worker: look again when its lease runs out
                        wait = (owner.lease_expires_at or clock) - clock if owner is not None else 0.0
                        ctx.discovery.retry_later(item, time.monotonic() + max(wait, 0.0) + ctx.lease_s / 10)
                        continue
                    row_id, token, received = owner.id, owner.lease_token + 1, owner.received_at
                    if owner.lease_holder != ctx.worker_id and not ctx.exclusive:
                        ctx.log.warning(
                            "lease_taken_over",
                            file=storable(item.path),
                            id=row_id,
                            from_worker=owner.lease_holder,
                            reason=f"its lease ran out {clock - (owner.lease_expires_at or clock):.1f} s ago",
                        )
                    if owner.status != Status.CLAIMED:  # committed before: only the move is left
                        self.slots.release()
                        self.finish.put(Done(row_id, item.path, (item.size, item.mtime_ns), owner.moved_to, token))
                        continue
                    update_rows(s, [{"id": row_id, **fields}])  # redo it
                # an image without pixels waits out the grace period like any file cut short, then is skipped
                works.append(
                    Work(
                        row_id,
                        item,
                        received,
                        sha256=sha,
                        size=item.size,
                        error=err,
                        data=data,
                        sop=ids["sop_instance_uid"],
                        skip=skip,
                        incomplete=cut,
                        token=token,
                    )
                )
            scorable = [w for w in works if w.error is None and w.skip is None]
            dups = first_ok_by_sha(s, [w.sha256 for w in scorable if w.sha256]) if ctx.dedupe else {}
            dup_sops = first_ok_by_sop(s, [w.sop for w in scorable if w.sop]) if ctx.dedupe else {}
        for w in works:
            if w.error is not None or w.skip is not None:
                self.decoded.put(w)
            elif w.sha256 in dups or w.sop in dup_sops:
                w.duplicate_of = dups.get(w.sha256) or dup_sops[w.sop]
                self.decoded.put(w)
            else:
                fut = self.pool.submit(self._decode, w)
                fut.add_done_callback(lambda f, w=w: self._done(f, w))

    @staticmethod
    def still_there(item: FileItem) -> bool:
        """Whether the inbox still holds ``item`` as it was read."""
        try:
            st = os.lstat(item.path)
        except OSError:
            return False
        return item.is_symlink or (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns)

    def takeable(self, owner: Any, clock: float) -> bool:
        """Whether this worker may take a row another claim left: always with a database of its own (one
        daemon per SQLite file), else when it was this worker's or its holder's lease has run out."""
        return self.ctx.exclusive or owner.lease_holder == self.ctx.worker_id or (owner.lease_expires_at or 0.0) < clock

    def dicom(self, data: bytes) -> tuple[dict[str, str | None], str | None, bool]:
        """A DICOM file's identifiers, why it is out of scope (None: score it), and whether it may be cut
        short. A header that cannot be read gives none of them: the decode names what is wrong."""
        if not is_dicom(data):
            return {}, None, False
        try:
            header = read_header(data)
        except ImageError:
            return {}, None, False
        return (
            header.identifiers,
            header.out_of_scope(self.ctx.dicom_modalities, self.ctx.dicom_body_parts),
            header.maybe_cut,
        )

    def _decode(self, w: Work) -> None:
        t0 = time.perf_counter()
        decode(w, self.ctx.predictor)
        w.decode_ms = (time.perf_counter() - t0) * 1000

    def _done(self, fut: cf.Future, w: Work) -> None:
        if fut.cancelled():
            return  # shutting down: the row stays claimed and is redone on the next start
        if fut.exception() is not None and w.error is None:
            w.error = f"cannot decode image: {fut.exception()}"
        self.decoded.put(w)


def decode(w: Work, predictor: Any) -> None:
    """``w``'s bytes to uint8 pixels with ``predictor``'s preset; a bad file sets ``w.error``, never raises."""
    try:
        w.tensor, w.preset = predictor.pixels(w.data, name=w.item.path), predictor.preset
    except ImageError as exc:
        w.error, w.incomplete = exc.reason, exc.incomplete
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the daemon
        w.error = f"cannot decode image: {exc.__class__.__name__}: {exc}"


# -- micro-batch + model + commit -----------------------------------------------------------------------------
class Inferer(Stage):
    """Groups decoded files into batches of up to N or after W ms, runs the model, commits the batch."""

    name = "xr-infer"

    def __init__(self, ctx: Context, decoded: queue.Queue[Work], finish: queue.Queue, slots: threading.Semaphore):
        super().__init__()
        self.ctx, self.decoded, self.finish, self.slots = ctx, decoded, finish, slots
        self.batches = 0
        self.files = 0

    def run(self) -> None:
        while not self.halt.is_set():
            batch, wait_ms = self.collect()
            if batch:
                self.process(batch, wait_ms)
            else:
                self.adopt()  # idle is between batches too: the next film is scored by the new files

    def collect(self) -> tuple[list[Work], float]:
        try:
            first = self.decoded.get(timeout=POLL_S)
        except queue.Empty:
            return [], 0.0
        t0 = time.perf_counter()
        batch = [first]
        deadline = t0 + self.ctx.max_wait_ms / 1000.0
        while len(batch) < self.ctx.batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self.decoded.get(timeout=remaining) if remaining > 0 else self.decoded.get_nowait())
            except queue.Empty:
                break
        return batch, (time.perf_counter() - t0) * 1000

    def still_writing(self, w: Work) -> bool:
        """Read as cut short, and either changed since it was read or still inside its grace period after
        its last change: a writer may have paused, so it is watched again instead of failed."""
        if not w.incomplete or w.item.final:
            return False
        try:
            st = os.lstat(w.item.path)
        except OSError:
            return False  # gone: what was read is all there is
        changed = (st.st_size, st.st_mtime_ns) != (w.item.size, w.item.mtime_ns)
        return changed or time.monotonic() < w.item.changed_mono + self.ctx.incomplete_grace_s

    def defer(self, waiting: list[Work]) -> None:
        """Hand cut-short files back to discovery with no row: the file in the inbox is the only state, so a
        restart finds it as new work and its grace period runs on from its mtime."""
        ctx = self.ctx
        with ctx.sessions.begin() as s:
            delete_rows(s, list(still_held(s, {w.row_id: w.token for w in waiting}, ctx.worker_id)))
        for w in waiting:
            until = w.item.changed_mono + ctx.incomplete_grace_s
            ctx.log.info(
                "file_incomplete",
                file=storable(w.item.path),
                reason=w.error or w.skip,
                watching_s=round(max(0.0, until - time.monotonic()), 1),
            )
            ctx.discovery.defer(w.item, until)
            self.slots.release()

    def adopt(self) -> None:
        """Between two batches: score with what the reloader offers from now on."""
        ctx = self.ctx
        offer = ctx.reloader.take() if ctx.reloader is not None else None
        if offer is None:
            return
        old = ctx.predictor
        previous = {"previous_model_id": old.model_id, "previous_calibration_id": old.calibration_id}
        if offer.predictor is not None:
            ctx.predictor = offer.predictor
        else:
            old.with_calibration(offer.calibration)
        pred = ctx.predictor
        with ctx.sessions.begin() as s:
            record_calibration(s, pred)
        if ctx.metrics is not None:
            ctx.metrics.model_in_use(pred.model_id, pred.calibration_id)
        ctx.log.info(
            "model_reloaded" if offer.predictor is not None else "calibration_reloaded",
            model_id=pred.model_id,
            calibration_id=pred.calibration_id,
            threshold=pred.threshold,
            **previous,
        )

    def process(self, batch: list[Work], wait_ms: float) -> None:
        self.adopt()
        ctx, pred = self.ctx, self.ctx.predictor
        for w in batch:  # decoded before a new model with another preset came in: decode again
            if w.tensor is not None and w.preset != pred.preset:
                w.tensor = None
                decode(w, pred)
        waiting = [w for w in batch if self.still_writing(w)]
        if waiting:
            self.defer(waiting)
            batch = [w for w in batch if w not in waiting]
            if not batch:
                return
        # duplicates first, so the model only sees content it has not scored before
        if ctx.dedupe:
            with ctx.sessions() as s:
                known = first_ok_by_sha(s, [w.sha256 for w in batch if w.tensor is not None and w.sha256])
                known_sops = first_ok_by_sop(s, [w.sop for w in batch if w.tensor is not None and w.sop])
            seen: dict[str, Work] = {}
            for w in batch:
                if w.tensor is None or not w.sha256:
                    continue
                keys = [w.sha256] + ([f"sop:{w.sop}"] if w.sop else [])  # the same bytes, or the same DICOM instance
                first = (
                    known.get(w.sha256)
                    or known_sops.get(w.sop)
                    or next((seen[k].row_id for k in keys if k in seen), None)
                )
                if first is not None:
                    w.duplicate_of, w.tensor = first, None
                else:
                    seen.update({k: w for k in keys})
        to_score = [w for w in batch if w.tensor is not None]
        t0 = time.perf_counter()
        preds = pred.predict_batch(torch.stack([w.tensor for w in to_score])) if to_score else []
        model_ms = (time.perf_counter() - t0) * 1000
        scored = {w.row_id: p for w, p in zip(to_score, preds)}
        t1 = time.perf_counter()
        now = utcnow()
        done: list[Done] = []
        counts = {Status.OK: 0, Status.ERROR: 0, Status.DUPLICATE: 0, Status.SKIPPED: 0}
        lost: list[Work] = []
        with ctx.sessions.begin() as s:
            # Fencing: rows whose lease another worker took (this one was presumed dead) are not written.
            held = still_held(s, {w.row_id: w.token for w in batch}, ctx.worker_id)
            b = Batch(created_at=now, size=len(held), wait_ms=wait_ms, model_ms=model_ms, model_id=pred.model_id)
            s.add(b)
            s.flush()
            # Plain dicts in one executemany, not loaded ORM objects: less GIL held per file, which a GPU
            # host's decode threads need (docs/benchmarks.md).
            firsts = scores_by_id(s, [w.duplicate_of for w in batch if w.duplicate_of is not None])
            rows: dict[int, dict] = {}
            for w in batch:
                first = None if w.duplicate_of is None else rows.get(w.duplicate_of) or firsts.get(w.duplicate_of)
                if w.row_id not in held or (w.duplicate_of is not None and first is None):
                    lost.append(w)
                    continue
                row = {
                    "id": w.row_id,
                    "batch_id": b.id,
                    "processed_at": now,
                    "worker_id": ctx.worker_id,
                    "latency_ms": max(0.0, (now - w.received_at).total_seconds() * 1000),
                    "model_id": pred.model_id,
                    "threshold": pred.threshold,
                    "temperature": pred.temperature,
                    "calibration_id": pred.calibration_id,
                    "error": None,
                    "duplicate_of": None,
                    "logit": None,
                    "probability": None,
                    "label": None,
                    "flagged": None,
                }
                if w.skip is not None:
                    row["status"], row["error"] = Status.SKIPPED, storable(w.skip)
                elif w.error is not None:
                    reason = w.error
                    if w.incomplete and ctx.incomplete_grace_s > 0:
                        reason += f"; the file stayed unchanged for {ctx.incomplete_grace_s:g} s"
                    row["status"], row["error"] = Status.ERROR, storable(reason)
                elif w.duplicate_of is not None:  # the first is earlier in this batch, or committed
                    row["status"], row["duplicate_of"] = Status.DUPLICATE, w.duplicate_of
                    row.update({k: first[k] for k in ("logit", "probability", "label", "flagged")})
                else:
                    p = scored[w.row_id]
                    row["status"] = Status.OK
                    row["logit"], row["probability"], row["label"], row["flagged"] = (
                        p.logit,
                        p.probability,
                        p.label,
                        p.flagged,
                    )
                counts[row["status"]] += 1
                row["moved_to"] = ctx.destination(w.item.path, row["status"])
                rows[w.row_id] = row
                done.append(Done(w.row_id, w.item.path, (w.item.size, w.item.mtime_ns), row["moved_to"], w.token))
                self._log_row(row, w.item.path)
            update_rows(s, list(rows.values()))
            b.n_ok, b.n_error, b.n_duplicate = counts[Status.OK], counts[Status.ERROR], counts[Status.DUPLICATE]
        commit_ms = (time.perf_counter() - t1) * 1000
        for w in lost:
            ctx.log.warning(
                "lease_lost",
                file=storable(w.item.path),
                id=w.row_id,
                reason="another worker took this file over: its result is that worker's",
            )
            ctx.discovery.release(w.item.path)
        if ctx.metrics is not None:
            n_flagged = sum(bool(r["flagged"]) for r in rows.values())
            ctx.metrics.batch(counts, n_flagged, (model_ms + commit_ms) / 1000)
        for _ in batch:
            self.slots.release()
        self.batches += 1
        self.files += len(batch)
        ctx.log.info(
            "batch",
            batch_id=b.id,
            size=len(batch),
            scored=len(to_score),
            ok=counts[Status.OK],
            errors=counts[Status.ERROR],
            duplicates=counts[Status.DUPLICATE],
            skipped=counts[Status.SKIPPED],
            wait_ms=round(wait_ms, 1),
            decode_ms_mean=round(sum(w.decode_ms for w in batch) / len(batch), 1),
            model_ms=round(model_ms, 1),
            commit_ms=round(commit_ms, 1),
        )
        self.finish.put(done)
        if ctx.on_batch is not None:
            ctx.on_batch(self.batches)

    def _log_row(self, row: dict, path: str) -> None:
        log = self.ctx.log
        if row["status"] == Status.ERROR:
            log.error("file_error", file=storable(path), reason=row["error"], id=row["id"])
        elif row["status"] == Status.SKIPPED:
            log.info("file_skipped", file=storable(path), reason=row["error"], id=row["id"])
        elif row["flagged"]:  # a duplicate of a flagged film is flagged under its own name too
            extra = {"duplicate_of": row["duplicate_of"]} if row["status"] == Status.DUPLICATE else {}
            log.warning(
                "flagged",
                file=storable(path),
                id=row["id"],
                probability=round(row["probability"], 4),
                threshold=row["threshold"],
                **extra,
            )


# -- move + export ------------------------------------------------------------------------------------------
class Finisher(Stage):
    """Moves committed files to processed/ or failed/, marks them moved, appends the CSVs."""

    name = "xr-finish"

    def __init__(self, ctx: Context, finish: queue.Queue):
        super().__init__()
        self.ctx, self.finish = ctx, finish
        self._retry: list[tuple[float, Done]] = []  # (when, move) that failed and is tried again

    def run(self) -> None:
        exported_at = time.monotonic()
        while True:
            due = [d for when, d in self._retry if when <= time.monotonic()]
            if due:
                self._retry = [(w, d) for w, d in self._retry if d not in due]
                self.handle(due)
            try:
                job = self.finish.get(timeout=POLL_S)
            except queue.Empty:
                if self.halt.is_set():
                    break
                # Several workers: rows the others commit reach the CSVs through this one while it is the
                # elected exporter, so it exports while idle too (and, if not elected, tries to become it).
                if self.ctx.exporter.elect and time.monotonic() - exported_at >= EXPORT_EVERY_S:
                    self.ctx.exporter.export()
                    exported_at = time.monotonic()
                continue
            self.handle(job if isinstance(job, list) else [job])
            # Each CSV update rewrites the current file, so in a stream of batches it runs at most once
            # per EXPORT_EVERY_S; as soon as the queue is empty the CSVs catch up.
            if self.finish.empty() or time.monotonic() - exported_at >= EXPORT_EVERY_S:
                self.ctx.exporter.export()
                exported_at = time.monotonic()
        self.ctx.exporter.export()

    def handle(self, jobs: list[Done]) -> None:
        ctx = self.ctx
        moved: dict[int, tuple[str | None, dt.datetime]] = {}
        tokens = {d.row_id: d.token for d in jobs if d.moved_to is not None}
        held: set[int] = set()
        if tokens:
            with ctx.sessions.begin() as s:  # a file is moved only by the worker that still holds its row
                held = still_held(s, tokens, ctx.worker_id)
        for d in jobs:
            if d.moved_to is None:
                ctx.discovery.release(d.src, settled=d.identity)
                continue
            if d.row_id not in held:
                ctx.log.warning(
                    "lease_lost", file=d.src, id=d.row_id, reason="another worker took over moving this file"
                )
                with ctx.reserved_lock:
                    ctx.reserved.discard(d.moved_to)
                ctx.discovery.release(d.src)
                continue
            try:
                try:
                    st = os.lstat(d.src)
                except FileNotFoundError:
                    st = None
                if st is None:
                    actual: str | None = d.moved_to  # already moved (or removed by someone else)
                elif (st.st_size, st.st_mtime_ns) != d.identity:
                    # Another file has this name now: the scored one was moved before a crash and a new one
                    # dropped, or it was rewritten in place after it was read. That file is new work for
                    # discovery, never moved under this row.
                    actual = d.moved_to if os.path.lexists(d.moved_to) else None
                    ctx.log.info(
                        "move_skipped", file=d.src, id=d.row_id, reason="the inbox file changed since it was read"
                    )
                else:
                    actual = str(move_no_overwrite(d.src, d.moved_to))
                moved[d.row_id] = (actual, utcnow())
                settled = None
            except OSError as exc:
                ctx.log.error("move_failed", file=d.src, destination=d.moved_to, reason=str(exc))
                # Scored and committed: a rescan must not pick it up again; the move is tried again later
                # (a share that went away comes back) and at the next start (its row keeps moved_at empty).
                settled = d.identity
                self._retry.append((time.monotonic() + MOVE_RETRY_S, d))
            finally:
                with ctx.reserved_lock:
                    ctx.reserved.discard(d.moved_to)
            ctx.discovery.release(d.src, settled=settled)
        if moved:
            with ctx.sessions.begin() as s:
                mine = still_held(s, {d.row_id: d.token for d in jobs if d.row_id in moved}, ctx.worker_id)
                update_rows(
                    s,
                    [
                        {"id": rid, "moved_to": actual, "moved_at": when}
                        for rid, (actual, when) in moved.items()
                        if rid in mine
                    ],
                )
