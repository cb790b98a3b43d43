"""What the daemon's stages share: one frozen :class:`Runtime` built once at start from the settings, and
the two small pieces of state that do change while it runs, each in an object of its own (the model
scoring now, the work slots; the reserved destinations are daemon/moves.py's ``Destinations``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from xr.core.config import DaemonConfig, Settings
from xr.core.intake import DecodeLimits
from xr.daemon.stage import POLL_S
from xr.results.journal import Lease


@dataclass(frozen=True)
class Runtime:
    """The settings and the handles every stage reads; never changed once built (``Service.run``).

    Settings are read from ``cfg`` where they are used, not copied field by field; what the start decides
    (the batch size and decoder count of the thread plan, whether this worker is alone on its database) is
    held here.
    """

    cfg: Settings
    inbox: Path
    output: Path
    sessions: sessionmaker[Session]
    log: Any
    limits: DecodeLimits
    worker_id: str = "local"  # this daemon, in results.worker_id and the leases
    exclusive: bool = True  # the only daemon on its database (SQLite): every earlier claim is a dead run's
    batch_size: int = 4
    decode_workers: int = 1
    metrics: Any = None  # daemon/metrics.py Metrics, when --metrics-port is set

    @property
    def daemon(self) -> DaemonConfig:
        return self.cfg.daemon

    @property
    def lease(self) -> Lease:
        return Lease(self.worker_id, self.cfg.daemon.lease_s, self.exclusive)


class CurrentModel:
    """The predictor scoring now. The inferer switches it between two batches (a reload); decoders and the
    heatmap stage read it. One attribute, read and written whole: no lock needed."""

    def __init__(self, predictor: Any):
        self.predictor = predictor


class WorkSlots:
    """The files between their claim and their batch commit, bounded: a burst stalls discovery instead of
    filling memory with read bytes. The claimer takes a slot per file read; each file gives its slot back in
    one place, when it leaves the pipeline (the claimer for files it did not admit, the inferer for a batch)."""

    def __init__(self, n: int):
        self.capacity = n
        self._sem = threading.BoundedSemaphore(n)

    def take(self, timeout: float = POLL_S) -> bool:
        return self._sem.acquire(timeout=timeout)

    def take_now(self) -> bool:
        return self._sem.acquire(blocking=False)

    def give_back(self, n: int = 1) -> None:
        if n > 0:
            self._sem.release(n)
