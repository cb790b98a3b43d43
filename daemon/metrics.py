"""The operator's view of a running daemon: Prometheus metrics, a health check, and systemd's notify protocol.

``xr-daemon --metrics-port N`` serves, on ``daemon.metrics_host`` (127.0.0.1):

- ``GET /metrics``: Prometheus text (prometheus_client): ``xr_files_total{status}`` (one per final row),
  ``xr_flagged_total``, ``xr_batch_seconds`` (histogram, model and commit of a batch), ``xr_inbox_backlog``
  (files seen and not yet final), ``xr_model_info{model_id, calibration_id}``, ``xr_site_alarm{alarm, subject}``
  (1 while a review-based alarm of :class:`SiteWatch` stands: ``ppv``, ``sensitivity``, ``scanner_flag_rate``);
- ``GET /healthz``: 200 while every stage runs and the database takes a write; 503 with
  the reason otherwise.

Under systemd (``Type=notify``) the daemon says READY=1 once it watches the inbox, and WATCHDOG=1 from its
main loop while every stage runs, so a stuck daemon is restarted. A ``heartbeat`` log event every
``daemon.heartbeat_s`` (:class:`Heartbeat`) shows an idle daemon alive and a stuck one stuck; every
``SiteWatch.interval_s`` it also checks the site's alarms (results/drift.py), a ``site_alarm`` warning each.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from xr.results.schema import FINAL_STATUSES


class Metrics:
    def __init__(self, backlog: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.files = Counter("xr_files", "Files with a final result, by status", ["status"], registry=self.registry)
        for status in FINAL_STATUSES:
            self.files.labels(status)  # every status from the start, at 0
        self.flagged = Counter(
            "xr_flagged", "Flagged films (duplicates of flagged films included)", registry=self.registry
        )
        self.batch_seconds = Histogram(
            "xr_batch_seconds",
            "Time to score and commit one batch",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.backlog = Gauge("xr_inbox_backlog", "Files seen in the inbox and not yet final", registry=self.registry)
        self.backlog.set_function(backlog)
        self.model = Gauge(
            "xr_model_info",
            "The model and calibration scoring now (value 1)",
            ["model_id", "calibration_id"],
            registry=self.registry,
        )
        self.alarm = Gauge(
            "xr_site_alarm",
            "1 while a review-based alarm stands (PPV or sensitivity off calibration, a scanner's flag rate)",
            ["alarm", "subject"],
            registry=self.registry,
        )

    def batch(self, counts: dict[str, int], flagged: int, seconds: float) -> None:
        for status, n in counts.items():
            if n:
                self.files.labels(status).inc(n)
        if flagged:
            self.flagged.inc(flagged)
        self.batch_seconds.observe(seconds)

    def site_alarms(self, alarms: list[dict]) -> None:
        self.alarm.clear()
        for a in alarms:
            self.alarm.labels(a["alarm"], a["subject"]).set(1)

    def model_in_use(self, model_id: str, calibration_id: str) -> None:
        self.model.clear()
        self.model.labels(model_id, calibration_id).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a thread of its own (``xr-metrics``)."""

    def __init__(self, metrics: Metrics, health: Callable[[], tuple[bool, str]], host: str, port: int):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok, reason = outer.health()
                    body = json.dumps({"status": "ok" if ok else "unhealthy", "reason": reason}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # the daemon's own log says what matters
                pass

        self.metrics, self.health = metrics, health
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="xr-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd (``$NOTIFY_SOCKET``); False where there is none (not under systemd)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half systemd's WatchdogSec), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or (os.environ.get("WATCHDOG_PID") and os.environ["WATCHDOG_PID"] != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Heartbeat:
    """A periodic ``heartbeat`` log event, so an idle daemon is seen to be alive and a stuck one to be stuck."""

    def __init__(self, log: Any, interval_s: float, discovery: Any, inferer: Any):
        self.log, self.interval_s, self.discovery, self.inferer = log, interval_s, discovery, inferer
        self.started = self.last = time.monotonic()
        self.files_at_last = inferer.files
        rt = getattr(inferer, "rt", None)
        self.watch = SiteWatch(rt.sessions, log, rt.metrics) if rt is not None else None

    def tick(self) -> None:
        if self.watch is not None:
            self.watch.tick()
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        files = self.inferer.files
        self.log.info(
            "heartbeat",
            backlog=self.discovery.outstanding(),
            waiting_incomplete=self.discovery.deferred(),
            rows=files - self.files_at_last,
            interval_s=round(now - self.last, 1),
            uptime_s=round(now - self.started),
        )
        self.last, self.files_at_last = now, files


class SiteWatch:
    """The review-based alarms (results/reviewed.py ``site_alarms``: PPV or estimated sensitivity outside
    what the calibration measured, a scanner's flag rate off the site's) over the last ``window_days``, every
    ``interval_s``: a ``site_alarm`` warning per alarm and the ``xr_site_alarm`` gauges. A failed check is
    logged and tried again next time: it never stops the daemon."""

    def __init__(
        self, sessions: Any, log: Any, metrics: Metrics | None, interval_s: float = 600.0, window_days: float = 30
    ):
        self.sessions, self.log, self.metrics = sessions, log, metrics
        self.interval_s, self.window_days = interval_s, window_days
        self.last = time.monotonic()

    def tick(self) -> list[dict] | None:
        if time.monotonic() - self.last < self.interval_s:
            return None
        self.last = time.monotonic()
        return self.check()

    def check(self) -> list[dict] | None:
        import datetime as dt

        from xr.results.reviewed import site_alarms
        from xr.results.schema import utcnow

        try:
            with self.sessions() as s:
                alarms = site_alarms(s, utcnow() - dt.timedelta(days=self.window_days))
        except Exception as exc:  # noqa: BLE001 - a monitoring query must not take the daemon down
            self.log.warning("site_watch_failed", reason=f"{type(exc).__name__}: {exc}")
            return None
        for a in alarms:
            self.log.warning("site_alarm", **a)
        if self.metrics is not None:
            self.metrics.site_alarms(alarms)
        return alarms
