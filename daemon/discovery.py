"""Finding files in the inbox and deciding when they are complete.

Watchdog events (created, modified, moved-in) are hints; the start-up scan and the periodic rescan are
what guarantee nothing is missed (inotify overflow, coalesced events, network shares without events).

Readiness: a file renamed/moved into the inbox is complete when it appears. A file written in place is
ready once its size and mtime have not changed for ``stable_ms``. The first observation takes the
file's mtime age into account (a file whose mtime is older than ``stable_ms`` has not been written for
that long), so an old file found by a scan is ready at once while a file being copied waits.

A file the pipeline read as cut short comes back with :meth:`Discovery.defer`: it is watched until its
grace period after its last change ends, and handed on again (``final``) unless it changed before.
Files under names the daemon does not read are reported once each (``file_ignored``) and left alone.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xr.core.intake import (
    IMAGE_SUFFIXES,
    is_candidate_name,
    is_extensionless,
    is_hidden_or_temporary,
    is_image_name,
    is_read,
    sniff_dicom,
)
from xr.daemon.stage import Stage
from xr.daemon.watch import start_observer
from xr.results.schema import storable


def ignored_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    kind = f"extension {suffix}" if suffix else "no extension"
    return (
        f"{kind} is not read (the daemon reads {', '.join(IMAGE_SUFFIXES)} and DICOM files without an extension); "
        "the file is left where it is"
    )


@dataclass
class FileItem:
    """A file handed from discovery to the pipeline."""

    path: str  # absolute
    size: int
    mtime_ns: int
    received_at: dt.datetime  # first seen (UTC, naive)
    received_mono: float
    is_symlink: bool = False
    changed_mono: float = 0.0  # when its size or mtime last changed (from its mtime age when first seen)
    final: bool = False  # its grace period for reading as cut short is over: a failure now is an error
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) as listed (a symlink's target's): checked on the open file

    @property
    def identity(self) -> tuple[int, int]:
        """(size, mtime_ns) as listed: what a later lstat is compared with (core/intake.py ``Input.identity``)."""
        return self.size, self.mtime_ns


@dataclass
class _Deferred:
    item: FileItem
    until: float  # monotonic: hand it on again then, unless it changes before
    final: bool = True  # a cut-short file's grace period: when it comes back, a failure is an error


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    last_change: float  # monotonic
    received_at: dt.datetime
    received_mono: float
    moved: bool = False
    is_symlink: bool = False
    inode: tuple[int, int] | None = None


def _inode(path: str, st: os.stat_result, is_symlink: bool) -> tuple[int, int] | None:
    """The (device, inode) the file will be read from: the file's, or a symlink's target's (None: none)."""
    if is_symlink:
        try:
            st = os.stat(path)
        except OSError:
            return None
    return st.st_dev, st.st_ino


@dataclass
class DiscoveryStats:
    scans: int = 0
    events: int = 0
    handed: int = 0


class Discovery(Stage):
    """The stage ``xr-discovery`` (and the watchdog observer it starts); feeds ``out`` with ready files.

    ``out`` is bounded: when the pipeline is busy, ready files wait here as names only.
    """

    name = "xr-discovery"

    def __init__(
        self,
        inbox: str | Path,
        out: queue.Queue[FileItem],
        *,
        stable_ms: int = 500,
        rescan_s: float = 5.0,
        poll: bool = False,
        watch: bool = True,
        exclude: tuple[str | Path, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        log=None,
    ):
        super().__init__()
        self.inbox = Path(inbox).resolve()
        self.out = out
        self.stable_s = stable_ms / 1000.0
        self.idle_s = max(0.01, min(0.05, self.stable_s / 5))  # a step's pause: a fraction of stable_ms
        self.rescan_s = rescan_s
        self.poll = poll
        self.watch = watch
        self.exclude = tuple(str(Path(p).resolve()) for p in exclude)
        self.clock = clock
        self.stats = DiscoveryStats()
        self._events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._ready: deque[FileItem] = deque()
        self._ready_paths: set[str] = set()
        self._lock = threading.Lock()
        self._handed: dict[str, tuple[int, int]] = {}  # path -> identity, until released
        self._settled: set[tuple[str, int, int]] = set()  # identities left in place after processing
        self._deferred: dict[str, _Deferred] = {}  # read as cut short: waiting out their grace period
        self._ignored: set[str] = set()  # reported once as a name the daemon does not read
        self.log = log
        self.available = True  # the inbox was there at the last scan
        self._observer = None
        self._next_scan = 0.0
        self.first_scan_done = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------
    def watch_events(self) -> str | None:
        """Start the file-event observer (before the stage runs). Returns why file events fell back to
        polling, if they did."""
        if not self.watch:
            return None
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        try:
            self._observer = start_observer(PollingObserver if self.poll else Observer, self.inbox, self._events)
        except OSError as exc:
            # inotify's per-user watch or instance limit (ENOSPC, EMFILE) is a host setting, not a
            # reason to stop: polling sees the same files, later
            self._observer = start_observer(PollingObserver, self.inbox, self._events)
            return f"file events unavailable ({exc.strerror or exc}); polling instead"
        return None

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)
            self._observer = None

    # -- bookkeeping the pipeline reports back --------------------------------------------------------
    def release(self, path: str, settled: tuple[int, int] | None = None) -> None:
        """The pipeline is done with ``path``. ``settled`` (size, mtime_ns): the file stays in the inbox
        and must not be picked up again while it has that identity."""
        with self._lock:
            self._handed.pop(path, None)
            if settled is not None:
                self._settled.add((path, *settled))

    def defer(self, item: FileItem, until: float) -> None:
        """The pipeline read ``item`` as cut short: watch it until ``until`` (monotonic). If its size or mtime
        changes before, it waits to be stable as a new file would; else it comes back with ``final`` set."""
        with self._lock:
            self._handed.pop(item.path, None)
            self._deferred[item.path] = _Deferred(item, until)

    def retry_later(self, item: FileItem, until: float) -> None:
        """Another worker holds ``item``: hand it on again at ``until`` (monotonic), when that worker's lease
        would have run out, unless it is gone by then (that worker moved it)."""
        with self._lock:
            self._handed.pop(item.path, None)
            self._deferred[item.path] = _Deferred(item, until, final=False)

    def deferred(self) -> int:
        with self._lock:
            return len(self._deferred)

    def outstanding(self) -> int:
        """Files seen but not yet released by the pipeline (files waiting out a grace period included)."""
        with self._lock:
            return len(self._pending) + len(self._ready) + len(self._handed) + len(self._deferred)

    # -- the stage -------------------------------------------------------------------------------------
    def step(self, now: float) -> bool:
        """Events in, a scan when one is due, then hand on what is ready; always pauses ``idle_s`` after."""
        self._drain_events()
        if self.clock() >= self._next_scan:
            if self._inbox_there():
                self.scan()
            self._next_scan = self.clock() + self.rescan_s
            self.first_scan_done.set()
        self._check_deferred()
        self._check_pending()
        self._push_ready()
        return False

    def _inbox_there(self) -> bool:
        """Whether the inbox can be read now. A network share can go away and come back: that is logged,
        the files waiting are kept, and file events start again (a fresh observer) when it is back."""
        there = self.inbox.is_dir()
        if there != self.available:
            self.available = there
            if self.log is not None:
                if there:
                    self.log.warning("inbox_available", watch=str(self.inbox))
                else:
                    self.log.error(
                        "inbox_unavailable",
                        watch=str(self.inbox),
                        reason="the watch folder is not there (a share away?)",
                    )
        if there and self.watch and (self._observer is None or not self._observer.is_alive()):
            self._restart_observer()
        return there

    def _restart_observer(self) -> None:
        from watchdog.observers.polling import PollingObserver

        if self._observer is not None:
            try:
                self._observer.stop()
            except Exception:  # noqa: BLE001 - it is dead already
                pass
        try:
            self._observer = start_observer(PollingObserver, self.inbox, self._events)
            if self.log is not None:
                self.log.info("watch_restarted", watch=str(self.inbox))
        except OSError:
            self._observer = None  # the scans go on; file events will be tried again at the next one

    def _drain_events(self) -> None:
        while True:
            try:
                kind, path = self._events.get_nowait()
            except queue.Empty:
                return
            self.stats.events += 1
            if kind == "rescan":
                self._next_scan = 0.0
            else:
                self.note(path, moved=kind == "moved")

    def scan(self) -> int:
        """Walk the inbox once; returns how many new files were noted."""
        self.stats.scans += 1
        n = 0
        for root, dirs, files in os.walk(self.inbox, followlinks=False):
            if self.exclude:
                dirs[:] = [d for d in dirs if os.path.join(root, d) not in self.exclude]
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if is_candidate_name(name) or not is_hidden_or_temporary(name):
                    n += self.note(os.path.join(root, name))
            # a symlink to a file shows in ``files``; one to a directory in ``dirs`` (not followed)
        with self._lock:  # a reported name that is gone is reported again if a file comes back under it
            self._ignored = {p for p in self._ignored if os.path.lexists(p)}
        return n

    def _report_ignored(self, path: str) -> None:
        """A file under a name the daemon does not read: a warning, once, and the file is left alone."""
        with self._lock:
            if path in self._ignored:
                return
            self._ignored.add(path)
        if self.log is not None:
            self.log.warning("file_ignored", file=storable(path), reason=ignored_reason(os.path.basename(path)))

    def is_excluded(self, path: str) -> bool:
        path = str(Path(path))
        return any(path.startswith(ex + os.sep) for ex in self.exclude)

    def would_read(self, path: str) -> bool:
        """Whether ``path`` is a file this discovery hands on: an image name (or an extensionless DICOM file)
        inside the inbox, in no hidden sub-folder, outside the excluded folders."""
        p = Path(path)
        if not is_read(path) or not inside(p, self.inbox):
            return False
        if any(part.startswith(".") for part in p.relative_to(self.inbox).parts[:-1]):
            return False
        return not self.is_excluded(path)

    def note(self, path: str, moved: bool = False) -> bool:
        """A hint that ``path`` exists (event or scan). Returns True when it is newly pending."""
        if not self.would_read(path):
            name = os.path.basename(path)
            undecided = is_extensionless(name) and sniff_dicom(path) is None  # a DICOM file may still be arriving
            if (
                not is_hidden_or_temporary(name)
                and not is_image_name(name)
                and not undecided
                and self._reportable(path)
            ):
                self._report_ignored(path)
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        ident = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if path in self._handed or path in self._deferred or (path, *ident) in self._settled:
                return False
            pend = self._pending.get(path)
            if pend is not None:
                if moved:
                    pend.moved = True
                return False
            if path in self._ready_paths:
                return False
            now = self.clock()
            age = max(0.0, time.time() - st.st_mtime_ns / 1e9)
            link = stat.S_ISLNK(st.st_mode)
            self._pending[path] = _Pending(
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                last_change=now - age,
                received_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
                received_mono=now,
                moved=moved,
                is_symlink=link,
                inode=_inode(path, st, link),
            )
        return True

    def _reportable(self, path: str) -> bool:
        """A plain file in the watched part of the inbox (not a folder, not the daemon's own output)."""
        p = Path(path)
        if not inside(p, self.inbox) or self.is_excluded(path) or not os.path.isfile(path):
            return False
        return not any(part.startswith(".") for part in p.relative_to(self.inbox).parts[:-1])

    def _check_deferred(self) -> None:
        now = self.clock()
        with self._lock:
            for path, d in list(self._deferred.items()):
                try:
                    st = os.lstat(path)
                except OSError:
                    del self._deferred[path]  # gone: nothing left to score
                    continue
                item = d.item
                if (st.st_size, st.st_mtime_ns) != item.identity:
                    # still being written: settle like any file written in place; a new grace period
                    del self._deferred[path]
                    self._pending[path] = _Pending(
                        st.st_size,
                        st.st_mtime_ns,
                        now,
                        item.received_at,
                        item.received_mono,
                        is_symlink=item.is_symlink,
                    )
                elif now >= d.until:
                    del self._deferred[path]
                    item.final = d.final
                    self._ready.append(item)
                    self._ready_paths.add(path)

    def _check_pending(self) -> None:
        now = self.clock()
        ready: list[FileItem] = []
        with self._lock:
            for path, pend in list(self._pending.items()):
                try:
                    st = os.lstat(path)
                except OSError:
                    del self._pending[path]  # vanished (renamed away or deleted) before it was ready
                    continue
                inode = _inode(path, st, pend.is_symlink)
                pend.inode = pend.inode or inode
                if (st.st_size, st.st_mtime_ns) != (pend.size, pend.mtime_ns) or pend.inode != inode:
                    pend.size, pend.mtime_ns, pend.last_change = st.st_size, st.st_mtime_ns, now
                    pend.inode = inode  # another file under this name (same size and time) settles again too
                    pend.moved = False  # written after it appeared: wait for it to settle
                    continue
                if pend.moved or pend.is_symlink or now - pend.last_change >= self.stable_s:
                    del self._pending[path]
                    ready.append(
                        FileItem(
                            path,
                            pend.size,
                            pend.mtime_ns,
                            pend.received_at,
                            pend.received_mono,
                            pend.is_symlink,
                            changed_mono=pend.last_change,
                            inode=inode,
                        )
                    )
            ready.sort(key=lambda i: i.received_mono)
            self._ready.extend(ready)
            self._ready_paths.update(i.path for i in ready)

    def _push_ready(self) -> None:
        while not self.halt.is_set():
            # Recorded as handed before it is queued: the pipeline may take and release it before put()
            # returns, and a release that came first would leave it outstanding for ever.
            with self._lock:
                if not self._ready:
                    return
                item = self._ready.popleft()
                self._ready_paths.discard(item.path)
                self._handed[item.path] = item.identity
            try:
                self.out.put(item, timeout=0.05)
            except queue.Full:
                with self._lock:  # back-pressure: undo, keep it first in line, look again next tick
                    self._handed.pop(item.path, None)
                    self._ready.appendleft(item)
                    self._ready_paths.add(item.path)
                return
            self.stats.handed += 1


def inside(p: Path, root: Path) -> bool:
    """``p`` is ``root`` or lies below it."""
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False
