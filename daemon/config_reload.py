"""SIGHUP: read config.yaml again while the daemon runs (``systemctl reload xr-daemon``).

The stages run on settings frozen at start (daemon/runtime.py), so only what already changes while the
daemon runs is applied: the heartbeat interval, and the model and calibration files (handed to the
ModelReloader, which loads and switches to them between two batches, as it does when a file changes).
Every other changed key is named in ``restart_needed``. A file that does not validate, or names a model or
calibration file that is not there, is refused whole (``config_reload_failed``): the running settings stay.
The command line still wins: its overrides are applied again, and keys given by a flag keep their value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xr.core.config import Settings
from xr.core.errors import XRError
from xr.core.paths import model_path

LIVE = ("daemon.calibration", "daemon.heartbeat_s", "daemon.model")


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The dotted keys whose values differ, sorted."""
    a, b = old.to_dict(), new.to_dict()
    return sorted(f"{sec}.{k}" for sec, keys in b.items() for k, v in keys.items() if a.get(sec, {}).get(k) != v)


def _get(cfg: Settings, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return cfg.to_dict()[section][key]


class ConfigReload:
    """A reload asked for by a signal, done from the service's main loop (never in the handler)."""

    def __init__(self, load: Callable[[], Settings] | None, pinned: list[str]):
        self.load = load  # config.yaml and the command line's overrides, as at start; None: nothing to read
        self.pinned = pinned  # keys a flag set outside the overrides (--watch, --output, --db, --model)
        self._wanted = threading.Event()

    def request(self) -> None:
        self._wanted.set()  # async-signal-safe enough: no lock the main thread may hold

    def apply(self, svc: Any, beat: Any) -> None:
        """If a reload was asked for: read, compare with ``svc.cfg``, apply the live keys, log the outcome."""
        if not self._wanted.is_set():
            return
        self._wanted.clear()
        try:
            if self.load is None:
                raise XRError("this daemon was not started with a configuration to read again")
            new = self.load()
            new = new.replace({k: _get(svc.cfg, k) for k in self.pinned})
            changed = changed_keys(svc.cfg, new)
            files = [k for k in ("daemon.model", "daemon.calibration") if k in changed]
            if files and svc.reloader is not None:
                # what did not change stays as running (a --model flag pins daemon.model, above)
                model = model_path(new) if "daemon.model" in files else svc.model_path
                calibration = svc.calibration
                if "daemon.calibration" in files:
                    cal = new.daemon.calibration
                    calibration = Path(cal).expanduser().resolve() if cal else None
                for key, path in (("daemon.model", model), ("daemon.calibration", calibration)):
                    if key in files and path is not None and not path.is_file():
                        raise XRError(f"{key}: file not found: {path}")
        except XRError as exc:
            svc.log.error("config_reload_failed", reason=str(exc))
            return
        applied = []
        if "daemon.heartbeat_s" in changed:
            beat.interval_s = new.daemon.heartbeat_s
            applied.append("daemon.heartbeat_s")
        if files and svc.reloader is not None:  # --once has no reloader: a new model waits for the next run
            svc.reloader.retarget(model, calibration)
            svc.model_path, svc.calibration = model, calibration
            applied += files
        applied.sort()
        if applied:
            svc.cfg = svc.cfg.replace({k: _get(new, k) for k in applied})
        restart = [k for k in changed if k not in applied]
        (svc.log.warning if restart else svc.log.info)("config_reloaded", applied=applied, restart_needed=restart)
