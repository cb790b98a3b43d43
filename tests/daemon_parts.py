"""In-process parts for the daemon's stage tests: a runtime on a SQLite file, a discovery that records what
the stages hand back to it, a log that records events, tiny synthetic films, and the queues between stages."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from xr.core.config import load_settings
from xr.core.intake import DecodeLimits
from xr.daemon.discovery import FileItem
from xr.daemon.moves import Destinations
from xr.daemon.runtime import CurrentModel, Runtime, WorkSlots
from xr.results.engine import make_engine, session_factory
from xr.results.schema import utcnow


class Log:
    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.events if e == event]


class Discovery:
    """Records what the stages hand back: released (path, settled), deferred and retried items, notes."""

    def __init__(self):
        self.released: list[tuple[str, tuple | None]] = []
        self.deferred: list[FileItem] = []
        self.retried: list[FileItem] = []
        self.noted: list[str] = []

    def release(self, path, settled=None):
        self.released.append((path, settled))

    def defer(self, item, until):
        self.deferred.append(item)

    def retry_later(self, item, until):
        self.retried.append(item)

    def note(self, path, moved=False):
        self.noted.append(path)

    def would_read(self, path):
        return True


def film(path: Path, seed: int, side: int = 64) -> Path:
    """A small grey PNG whose content differs by ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    os.utime(path, (1, 1))  # long settled
    return path


def item(path: Path, **kw) -> FileItem:
    st = os.lstat(path)
    return FileItem(str(path), st.st_size, st.st_mtime_ns, utcnow(), time.monotonic(), os.path.islink(path), **kw)


@dataclass
class Parts:
    """One daemon's shared pieces, as ``Service.run`` builds them."""

    rt: Runtime
    engine: object
    model: CurrentModel
    discovery: Discovery = field(default_factory=Discovery)
    slots: WorkSlots = field(default_factory=lambda: WorkSlots(8))
    ready: queue.Queue = field(default_factory=queue.Queue)
    decoded: queue.Queue = field(default_factory=queue.Queue)
    finish: queue.Queue = field(default_factory=queue.Queue)
    destinations: Destinations | None = None

    @property
    def log(self) -> Log:
        return self.rt.log

    def drain(self, q: queue.Queue, n: int, timeout: float = 30.0) -> list:
        return [q.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.engine.dispose()


def parts(
    tmp_path: Path, predictor, *, db: str | None = None, worker: str = "me", exclusive: bool = True, **daemon
) -> Parts:
    cfg = load_settings(overrides={f"daemon.{k}": v for k, v in daemon.items()})
    engine = make_engine(db or tmp_path / "results.sqlite")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir(exist_ok=True)
    rt = Runtime(
        cfg,
        inbox,
        out,
        session_factory(engine),
        Log(),
        DecodeLimits.from_settings(cfg),
        worker_id=worker,
        exclusive=exclusive,
        batch_size=4,
        decode_workers=1,
    )
    d = cfg.daemon
    return Parts(
        rt,
        engine,
        CurrentModel(predictor),
        destinations=Destinations(inbox, out, d.on_success, d.on_error, d.on_skipped),
    )
