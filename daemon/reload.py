"""The model and calibration the daemon scores with: loading them ready to run, and picking up new files.

``ModelReloader`` (stage ``xr-reload``) checks the checkpoint and the calibration file every
``daemon.reload_s``. When one has changed and then stayed the same for one more check (a file still being
copied is not read), it loads it off the pipeline's threads: a new calibration alone, or a new model with
its fast forward prepared. The inferer switches to it between two batches, so every row is scored
by exactly one model and calibration and no file is lost or scored twice. A file that fails to load (half
written, corrupt, a calibration fitted for another model) is logged and the current model stays.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any

from xr.core.calibration import CALIBRATION_FILE, Calibration
from xr.core.config import DaemonConfig, Settings
from xr.core.errors import XRError
from xr.core.predict import Predictor, load_calibration, trim_malloc
from xr.daemon.stage import Stage


def open_predictor(cfg: Settings, model: Path, calibration: Path | None) -> Predictor:
    """Load ``model`` with ``calibration`` (None: the file beside it) for the daemon's device."""
    if not model.exists():
        raise XRError(f"model checkpoint not found: {model} (set --model or daemon.model)")
    return Predictor.from_checkpoint(model, calibration, device=cfg.daemon.device)


def prepare(pred: Predictor, d: DaemonConfig, batch_size: int, log: Any) -> bool:
    """The fast forward for this device, warmed up. False where a CUDA graph was wanted and not captured."""
    captured = True
    if pred.device.type == "cpu" and d.cpu_trace:
        try:  # its checks run the eager and the traced forward at both batch sizes: a warm-up of its own
            pred.trace_forward(batch_size)
        except RuntimeError as exc:  # a trace that fails or scores differently: the eager forward stays
            log.warning("cpu_trace_unavailable", reason=str(exc))
    if not pred.has_trace:
        pred.warmup(batch_size)
        pred.warmup(1)
    if pred.device.type == "cuda" and d.cuda_graphs:
        try:
            pred.capture_cuda_graph(batch_size)
        except RuntimeError as exc:  # a GPU or driver that cannot capture: the eager forward still works
            log.warning("cuda_graph_unavailable", reason=str(exc))
            captured = False
    if pred.device.type == "cpu":
        trim_malloc()
    return captured


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class ModelUpdate:
    """What the reloader has ready for the inferer: a new predictor, or a new calibration for the current one."""

    predictor: Predictor | None = None
    calibration: Calibration | None = None


class ModelReloader(Stage):
    name = "xr-reload"

    def __init__(
        self, cfg: Settings, model: Path, calibration: Path | None, current: Predictor, batch_size: int, log: Any
    ):
        """``calibration``: an explicit calibration file, or None for the one beside ``model``."""
        super().__init__()
        self.idle_s = cfg.daemon.reload_s  # one check per step
        self.cfg, self.d, self.model, self.calibration = cfg, cfg.daemon, model, calibration
        self.batch_size, self.log = batch_size, log
        self.model_sha256 = current.model_sha256
        self._lock = threading.Lock()
        self._update: ModelUpdate | None = None
        self._model_sig, self._cal_sig = self._last = self._signatures()  # in use now; seen by the last check
        self._failed: tuple | None = None  # files that failed to load: tried again once they change
        self._retarget: tuple[Path, Path | None] | None = None  # other files to score with (SIGHUP)

    def _signatures(self) -> tuple:
        cal = self.calibration or self.model.parent / CALIBRATION_FILE
        return _signature(self.model), _signature(cal)

    def retarget(self, model: Path, calibration: Path | None) -> None:
        """Score with these files from now on (config.yaml changed on SIGHUP): the next checks load them as
        they load a changed file, once settled. Taken up by this stage's own thread, in ``check``."""
        with self._lock:
            self._retarget = (model, calibration)

    def take_update(self) -> ModelUpdate | None:
        """The update ready, once (the inferer calls this between batches)."""
        with self._lock:
            update, self._update = self._update, None
            return update

    def step(self, now: float) -> bool:
        self.check()
        return False

    def check(self) -> None:
        with self._lock:
            target, self._retarget = self._retarget, None
        if target is not None:
            # a changed path is loaded even when its file has the old one's size and time
            if target[0] != self.model:
                self._model_sig = None
            if target[1] != self.calibration:
                self._cal_sig = None
            self.model, self.calibration = target
            self._failed = None
        now = self._signatures()
        settled, self._last = now == self._last, now
        if not settled or now == self._failed or now == (self._model_sig, self._cal_sig):
            return  # still being written (look again next time), known bad, or nothing new
        try:
            if now[0] != self._model_sig:  # a new model, with the calibration that goes with it
                update = ModelUpdate(predictor=self._load_model())
            else:
                update = ModelUpdate(calibration=load_calibration(self.model, self.model_sha256, self.calibration))
        except Exception as exc:  # noqa: BLE001 - a bad file must never stop the daemon: the current one stays
            self._failed = now
            self.log.error(
                "reload_failed",
                model=str(self.model),
                calibration=str(self.calibration or "beside the model"),
                reason=f"{type(exc).__name__}: {exc}",
            )
            return
        self._model_sig, self._cal_sig = now
        self._failed = None
        with self._lock:
            self._update = update

    def _load_model(self) -> Predictor:
        t0 = time.perf_counter()
        pred = open_predictor(self.cfg, self.model, self.calibration)
        prepare(pred, self.d, self.batch_size, self.log)
        self.model_sha256 = pred.model_sha256
        self.log.info(
            "model_loaded",
            model=str(self.model),
            model_id=pred.model_id,
            load_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return pred
