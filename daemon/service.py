"""Wiring: open the DB, load and warm the model, reconcile, start the stages on one supervisor, watch them,
and stop them all when told to."""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update

from xr.core.calibration import CALIBRATION_FILE
from xr.core.config import Settings
from xr.core.errors import XRError
from xr.core.files import make_dirs, use_group_named
from xr.core.intake import DecodeLimits
from xr.core.logs import get_logger
from xr.core.paths import model_path, output_dir, results_db
from xr.core.predict import Predictor
from xr.daemon.claim import Claimer, ReadingMarks
from xr.daemon.config_reload import ConfigReload
from xr.daemon.discovery import Discovery, inside
from xr.daemon.finish import Finisher
from xr.daemon.heatmaps import HeatmapStage
from xr.daemon.infer import Inferer
from xr.daemon.leases import LeaseKeeper, default_worker_id
from xr.daemon.locks import take_locks
from xr.daemon.metrics import Heartbeat, Metrics, MetricsServer, sd_notify, watchdog_interval
from xr.daemon.moves import Destinations
from xr.daemon.plan import plan_run
from xr.daemon.reload import ModelReloader, open_predictor, prepare
from xr.daemon.retention import RetentionStage
from xr.daemon.runtime import CurrentModel, Runtime, WorkSlots
from xr.daemon.send import dicom_stages
from xr.daemon.settle_start import reconcile
from xr.daemon.stage import Supervisor
from xr.results import rows
from xr.results.engine import make_engine, session_factory, shown_url
from xr.results.export import CsvExporter, csv_columns
from xr.results.schema import Meta


def excluded_dirs(inbox: Path, output: Path) -> tuple[Path, ...]:
    """What discovery must not read: the output folder when it lies inside the inbox, else the daemon's
    own sub-folders (an inbox may be the output folder or sit inside it).

    An inbox inside processed/ or failed/ is refused: every file would be moved into its own inbox.
    """
    own = tuple(output / d for d in ("processed", "failed", "skipped", "csv", "heatmaps", "thumbnails"))
    for d in own:
        if inside(inbox, d):
            raise XRError(
                f"watch folder {inbox} lies inside the output folder's {d.name}/; choose another --watch or --output"
            )
    return (output,) if output != inbox and inside(output, inbox) else own


class Service:
    """One daemon instance. ``run()`` blocks until a stop (signal, ``--once`` done, limits) and returns
    the exit code; everything it started is stopped and joined before it returns."""

    def __init__(
        self,
        cfg: Settings,
        *,
        watch: str | Path | None = None,
        output: str | Path | None = None,
        db: str | None = None,
        model: str | Path | None = None,
        once: bool = False,
        log: Any = None,
        predictor: Predictor | None = None,
        reload_settings: Callable[[], Settings] | None = None,
    ):
        """``reload_settings``: the settings read again on SIGHUP (config.yaml and the command line's overrides)."""
        d = cfg.daemon
        self.cfg = cfg
        inbox = watch or d.watch
        self.inbox = Path(inbox).expanduser().resolve() if inbox else None
        self.output = output_dir(cfg, output)
        self.db = results_db(cfg, self.output, db)
        self.model_path = model_path(cfg, model)
        self.calibration = (
            Path(d.calibration).expanduser().resolve() if d.calibration else None
        )  # None: beside the model
        # SQLite: one daemon per database (file locks). A server database: any number, through leases.
        self.exclusive = "://" not in str(self.db) or str(self.db).startswith("sqlite")  # the URL is checked at start
        self.worker_id = d.worker_id or default_worker_id()
        self.once = once
        self.log = log or get_logger()
        self._predictor = predictor
        self._stop = threading.Event()
        self.signals = 0
        self.exit_code = 0
        self.supervisor: Supervisor | None = None
        self._reported: set[str] = set()  # stages whose failure is logged
        self.heatmaps: HeatmapStage | None = None
        self.inferer: Inferer | None = None
        self.exporter: CsvExporter | None = None
        self.discovery: Discovery | None = None  # set once every stage runs
        self.metrics_server: MetricsServer | None = None
        self.sessions = None
        self._lock_fds: list[int] = []
        self.marks: ReadingMarks | None = None
        self._signal_reason: str | None = None
        flags = (("daemon.watch", watch), ("daemon.output", output), ("daemon.db", db), ("daemon.model", model))
        self.config_reload = ConfigReload(reload_settings, [k for k, flag in flags if flag])
        self.reloader: ModelReloader | None = None

    # -- control ----------------------------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self.log.info("stopping", reason=reason)
        self._stop.set()

    def handle_signal(self, signum: int, _frame: Any = None) -> None:
        """First SIGTERM/SIGINT: finish the batch in flight and exit 0. Second: exit at once."""
        self.signals += 1
        if self.signals > 1:
            os._exit(128 + signum)
        # No logging here: the handler runs between two bytecodes of the main thread, which may hold the
        # log stream's lock. The wait loop logs the stop.
        self._signal_reason = f"signal {signum}"
        self._stop.set()

    def handle_reload(self, signum: int = 0, _frame: Any = None) -> None:
        """SIGHUP: read config.yaml again, from the main loop (daemon/config_reload.py)."""
        self.config_reload.request()

    # -- set-up -------------------------------------------------------------------------------------------
    def take_locks(self) -> None:
        """One daemon per output folder, per results database and per inbox: two on one database would
        roll back each other's claims, two on one inbox would score every file twice."""
        try:
            make_dirs(self.output)
        except OSError as exc:
            raise XRError(f"cannot create output folder {self.output}: {exc.strerror or exc}") from None
        if not self.exclusive:
            return  # workers sharing a server database, an inbox and an output folder cooperate through the database
        self._lock_fds = take_locks(self.output, self.db, self.inbox)

    def release_locks(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    def load_predictor(self) -> Predictor:
        """The predictor to score with, warmed up, and ``self.plan`` (threads, batch size) for it."""
        d = self.cfg.daemon
        pred = self._predictor or open_predictor(self.cfg, self.model_path, self.calibration)
        self.plan = plan_run(d, pred.device.type, bf16=pred.bf16)
        if pred.device.type == "cpu":
            torch.set_num_threads(self.plan.torch_threads)
        t0 = time.perf_counter()
        captured = prepare(pred, d, self.plan.batch_size, self.log)
        if not captured:
            # eager kernel launches need the GIL between them: the plan for that, fewer decoders
            self.plan = plan_run(d, pred.device.type, bf16=pred.bf16, cuda_graph=False)
        if not pred.calibration.calibrated:
            # a triage model at T = 1 and threshold 0.5 flags other cases than the one validated
            self.log.warning(
                "uncalibrated_model",
                reason=f"no {CALIBRATION_FILE} beside {self.model_path}: temperature 1, threshold 0.5",
            )
        self.log.info(
            "model_ready",
            model=str(self.model_path),
            model_id=pred.model_id,
            calibration=pred.calibration.source,
            calibration_id=pred.calibration_id,
            device=str(pred.device),
            bf16=pred.bf16,
            threshold=pred.threshold,
            temperature=pred.temperature,
            shift=pred.calibration.shift,
            torch_threads=torch.get_num_threads(),
            decode_workers=self.plan.decode_workers,
            batch_size=self.plan.batch_size,
            cuda_graph=pred.has_cuda_graph,
            cpu_trace=pred.has_trace,
            warmup_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return pred

    # -- run ------------------------------------------------------------------------------------------------
    def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> int:
        d = self.cfg.daemon
        engine = None
        try:
            if self.inbox is None:
                raise XRError("no watch folder: pass --watch DIR or set daemon.watch in config.yaml")
            if not self.inbox.is_dir():
                raise XRError(f"watch folder not found: {self.inbox}")
            use_group_named(self.cfg.output.group)
            self.take_locks()
            engine = make_engine(self.db)
            sessions = self.sessions = session_factory(engine)
            predictor = self.load_predictor()
            plan = self.plan
            ready_q: queue.Queue = queue.Queue(maxsize=max(4, 2 * plan.batch_size))
            decoded_q: queue.Queue = queue.Queue()
            finish_q: queue.Queue = queue.Queue()
            discovery = Discovery(
                self.inbox,
                ready_q,
                stable_ms=d.stable_ms,
                rescan_s=math.inf if self.once else d.rescan_s,
                poll=d.poll,
                watch=not self.once,
                exclude=excluded_dirs(self.inbox, self.output),
                log=self.log,
            )
            rt = Runtime(
                cfg=self.cfg,
                inbox=self.inbox,
                output=self.output,
                sessions=sessions,
                log=self.log,
                limits=DecodeLimits.from_settings(self.cfg),
                worker_id=self.worker_id,
                exclusive=self.exclusive,
                batch_size=plan.batch_size,
                decode_workers=plan.decode_workers,
                metrics=Metrics(backlog=discovery.outstanding) if d.metrics_port else None,
            )
            self.exporter = CsvExporter(
                self.output / "csv",
                sessions,
                self.cfg.csv.rotation,
                self.cfg.csv.max_rows,
                csv_columns(self.cfg.csv.dicom_identifiers),
                elect=not self.exclusive,
            )
            model = CurrentModel(predictor)
            slots = WorkSlots(2 * plan.batch_size + plan.decode_workers)
            destinations = Destinations(self.inbox, self.output, d.on_success, d.on_error, d.on_skipped)
            reloader = None
            if not self.once and self._predictor is None:
                reloader = ModelReloader(
                    self.cfg, self.model_path, self.calibration, predictor, plan.batch_size, self.log
                )
            self.reloader = reloader
            if d.heatmaps != "none":
                self.heatmaps = HeatmapStage.from_runtime(rt, model)
            finisher = Finisher(rt, discovery, destinations, self.exporter, finish_q)
            inferer = Inferer(
                rt,
                discovery,
                model,
                slots,
                destinations,
                decoded_q,
                finish_q,
                reloader=reloader,
                heatmaps=self.heatmaps,
                on_batch=self._stop_after(max_batches),
            )
            self.marks = ReadingMarks(self.output, self.exclusive, d.worker_id)
            claimer = Claimer(rt, discovery, model, slots, ready_q, decoded_q, finish_q, self.marks)
            leases = LeaseKeeper(rt, discovery) if not self.exclusive else None
            node, objects, sender = dicom_stages(
                self.cfg,
                self.inbox,
                sessions,
                worker_id=self.worker_id,
                exclusive=self.exclusive,
                log=self.log,
                metrics=rt.metrics,
            )
            self.inferer = inferer
            rec = reconcile(rt, discovery, destinations, finisher, self.marks, self.log)
            self.log.info(
                "daemon_started",
                watch=str(self.inbox),
                output=str(self.output),
                db=shown_url(self.db),
                worker_id=self.worker_id,
                once=self.once,
                batch_size=plan.batch_size,
                max_wait_ms=d.max_wait_ms,
                stable_ms=d.stable_ms,
                decode_workers=plan.decode_workers,
                **rec,
            )
            with sessions.begin() as s:
                rows.record_calibration(s, predictor)
            if rt.metrics is not None:
                rt.metrics.model_in_use(predictor.model_id, predictor.calibration_id)
                try:
                    self.metrics_server = MetricsServer(rt.metrics, self.health, d.metrics_host, d.metrics_port)
                except OSError as exc:
                    raise XRError(
                        f"cannot serve metrics on {d.metrics_host}:{d.metrics_port}: {exc.strerror or exc}"
                    ) from None
                self.metrics_server.start()
            fallback = discovery.watch_events()
            if fallback:
                self.log.warning("watch_polling", reason=fallback)
            # Started downstream first; stopped in the reverse order (upstream first), so each stage finishes
            # what is in flight (the inferer its batch, the finisher its moves), and the leases are kept to the end.
            # retries linked and retention applied (daemon/retention.py; a --once run ends before its first pass)
            housekeeping = RetentionStage(sessions, self.output, self.cfg.retention, self.log, start=time.monotonic())
            if node is not None:  # the DICOM node feeds the inbox; stopped first: no film acknowledged mid-shutdown
                node.open()
            started = [
                housekeeping,
                leases,
                finisher,
                sender,
                objects,
                self.heatmaps,
                inferer,
                claimer,
                reloader,
                discovery,
                node,
            ]
            self.supervisor = Supervisor(st for st in started if st is not None)
            self.supervisor.start()
            self.discovery = discovery
            self.log.debug("threads", native_ids={t.name: t.native_id for t in threading.enumerate()})
            sd_notify("READY=1\nSTATUS=watching " + str(self.inbox))
            self._wait(discovery, idle_timeout)
        except XRError as exc:
            self.log.error("daemon_error", reason=str(exc))
            self.exit_code = 2
        except Exception as exc:
            self.log.exception("daemon_crashed", reason=f"{exc.__class__.__name__}: {exc}")
            self.exit_code = 1
        finally:
            self._shutdown()
            if self.exporter is not None:
                self.exporter.release()
            if engine is not None:
                engine.dispose()
            if self.marks is not None:
                self.marks.close()
            self.release_locks()
        return self.exit_code

    def _stop_after(self, max_batches: int | None):
        if max_batches is None:
            return None

        def on_batch(n: int) -> None:
            if n >= max_batches:
                self.inferer.halt.set()  # exactly max_batches batches are committed
                self.request_stop("max_batches")

        return on_batch

    def _wait(self, discovery: Discovery, idle_timeout: float | None) -> None:
        idle_since = time.monotonic()
        beat = Heartbeat(self.log, self.cfg.daemon.heartbeat_s, discovery, self.inferer)
        watchdog, last_pet = watchdog_interval(), 0.0
        while not self._stop.wait(0.05):
            self.config_reload.apply(self, beat)
            beat.tick()
            running = self.supervisor.dead() is None and not self.supervisor.failed()
            if watchdog is not None and time.monotonic() - last_pet >= watchdog and running:
                sd_notify("WATCHDOG=1")  # only while every stage runs: a stuck daemon is restarted
                last_pet = time.monotonic()
            for name in self._report_failures():
                self.request_stop(f"{name} failed")
            busy = discovery.outstanding() > 0 or not discovery.first_scan_done.is_set()
            if self.once and self.heatmaps is not None:  # --once draws the heatmaps too
                busy = busy or self.heatmaps.outstanding() > 0
            if busy:
                idle_since = time.monotonic()
            if self.once and not busy:
                self.request_stop("once: inbox done")
            elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                self.request_stop("idle_timeout")
        if self._signal_reason:
            self.log.info("stopping", reason=self._signal_reason)

    def health(self) -> tuple[bool, str]:
        """For /healthz: every stage runs and the database takes a write."""
        if self._stop.is_set():
            return False, "stopping"
        dead = self.supervisor.dead() if self.supervisor is not None else "not started"
        if dead:
            return False, dead
        try:
            with self.sessions.begin() as s:  # a write that changes nothing: the lock and the disk answer
                s.execute(update(Meta).where(Meta.key == "schema_version").values(value=Meta.value))
        except Exception as exc:  # noqa: BLE001 - any database failure is unhealthy, said plainly
            return False, f"database not writable: {type(exc).__name__}: {exc}"
        return True, "pipeline running, database writable"

    def _report_failures(self) -> list[str]:
        """Log each stage that ended with an error, once; any makes the exit code 1."""
        new = [(name, err) for name, err in self.supervisor.failed() if name not in self._reported]
        for name, err in new:
            self._reported.add(name)
            self.log.error("stage_failed", stage=name, reason=f"{err.__class__.__name__}: {err}")
            self.exit_code = 1
        return [name for name, _ in new]

    def _shutdown(self) -> None:
        t0 = time.perf_counter()
        sd_notify("STOPPING=1")
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.supervisor is not None:
            self.supervisor.stop(self.supervisor.stages[::-1])  # in the reverse of the start order
            self._report_failures()  # a stage that failed while finishing its work (its last moves, the CSVs)
        if self.inferer is not None:
            self.log.info(
                "daemon_stopped",
                batches=self.inferer.batches,
                files=self.inferer.files,
                shutdown_ms=round((time.perf_counter() - t0) * 1000, 1),
                exit_code=self.exit_code,
            )
