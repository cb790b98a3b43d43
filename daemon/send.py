"""Results back to the PACS: threads ``xr-dicom-objects`` and ``xr-send`` (docs/dicom.md).

The database is the queue twice over. :class:`ObjectStage` looks for scored DICOM films (rows with a SOP
Instance UID, whether they came over the network or through the folder) that lack their objects for a
destination, builds them (core/dicom_results.py: an SR for each, an SC with the heatmap for flagged ones
once their heatmap is drawn; reports first) and commits them to the outbox. :class:`SendStage` claims the
outbox items whose time has come (SRs first) and sends them by C-STORE (pynetdicom SCU), one association
per destination and pass, marking each ``sent`` on Success, to be retried with a growing backoff
otherwise, ``failed`` once ``give_up_after_s`` has passed (a ``dicom_send_failed`` error in the log,
``xr-results outbox``, ``xr_dicom_send_failed_total``). Two threads: building (CPU) overlaps the
network and the PACS's own work.

An object is committed before it is sent, and its UID is derived from the result: a crash before the mark
re-sends the same instance, which a PACS stores once; a crash before the commit rebuilds the same object.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, or_, select

from xr.core.config import DicomSendConfig, parse_destination
from xr.core.dicom_results import Finding, build, encode, read_film
from xr.daemon.stage import Stage
from xr.results import outbox
from xr.results.engine import get_meta, set_meta
from xr.results.schema import OutboxItem, Result, Status, fs_path, utcnow

SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33",)  # Comprehensive SR
SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",)  # Secondary Capture Image Storage
SEND_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, then implicit VR little endian
# C-STORE statuses that mean stored: Success, and the warnings (coercion, elements discarded, not checked)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
PER_PASS = 16  # objects built per pass: a stop is seen within a second or two
PER_SEND = 16  # items sent per pass
BACKFILL_S = 3600.0  # films scored this long before sending was first enabled still get their objects
SINCE_KEY = "dicom_send_since"
RECENT_S = 600.0  # most passes look at films scored in the last 10 minutes (a cheap query on a big table)
FULL_SCAN_S = 300.0  # and every 5 minutes at all films since the mark


@dataclass
class Outcome:
    ok: bool
    error: str | None = None


class DicomSender:
    """C-STORE SCU: one association per call, every item on it; an outcome per item id."""

    def __init__(self, ae_title: str, timeout_s: float):
        from pynetdicom import AE

        self.ae = AE(ae_title=ae_title)
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = timeout_s
        self.ae.connection_timeout = timeout_s
        for uid in (*SR_CLASSES, *SC_CLASSES):
            self.ae.add_requested_context(uid, list(SEND_SYNTAXES))

    def send(self, destination: str, items: list[outbox.Claimed], halt: Any = None) -> dict[int, Outcome]:
        import pydicom

        aet, host, port = parse_destination(destination)
        assoc = self.ae.associate(host, port, ae_title=aet)
        if not assoc.is_established:
            why = (
                f"association rejected (is {aet} the right AE title, and is {self.ae.ae_title} known to it?)"
                if assoc.is_rejected
                else "no association: connection refused, unreachable, timed out or aborted"
            )
            return {it.id: Outcome(False, f"{destination}: {why}") for it in items}
        out: dict[int, Outcome] = {}
        halted = False
        try:
            for it in items:
                if halt is not None and halt.is_set():
                    halted = True  # the rest get no outcome: released, sent after the restart (same UIDs)
                    break
                ds = pydicom.dcmread(io.BytesIO(it.data))
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError) as exc:  # no accepted context for its SOP class
                    out[it.id] = Outcome(False, f"{destination}: {exc}")
                    continue
                code = getattr(status, "Status", None) if status else None
                if code in STORED:
                    out[it.id] = Outcome(True)
                elif code is None:
                    out[it.id] = Outcome(False, f"{destination}: no C-STORE response (connection lost or timed out)")
                    if not assoc.is_established:
                        break
                else:
                    out[it.id] = Outcome(False, f"{destination}: C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        if not halted:
            for it in items:  # the association ended before these were sent
                out.setdefault(it.id, Outcome(False, f"{destination}: association ended before the C-STORE"))
        return out


class ObjectStage(Stage):
    """Builds the objects scored films lack and commits them to the outbox (thread ``xr-dicom-objects``)."""

    name = "xr-dicom-objects"
    idle_s = 0.5

    def __init__(
        self,
        sessions: Any,
        cfg: DicomSendConfig,
        *,
        worker_id: str,
        log: Any,
        heatmaps: str = "flagged",
        exclusive: bool = True,
        lease_s: float = 60.0,
    ):
        super().__init__()
        self.sessions, self.cfg, self.log = sessions, cfg, log
        self.destinations = list(cfg.destinations)
        self.worker_id, self.heatmaps, self.exclusive, self.lease_s = worker_id, heatmaps, exclusive, lease_s
        self._skip: set[tuple[int, str]] = set()  # (result id, kind) that cannot be built: tried once per run
        self._since: dt.datetime | None = None
        self._full_at = 0.0  # when the last pass over every film since the mark began (0: due now)
        self._full = True
        self.built = 0

    def step(self, now: float) -> bool:
        if not self._full and now - self._full_at >= FULL_SCAN_S:
            self._full = True
        if self._full:
            self._full_at = now
        handled = self.enqueue_new()
        if handled < PER_PASS:
            self._full = False  # caught up: recent films only, until the next full pass
        return handled > 0

    def _from(self) -> dt.datetime:
        """Where a pass looks from: recent films, and every film since the mark on a full pass (at start,
        then every FULL_SCAN_S: films a stopped worker or a failed heatmap left behind)."""
        if self._full:
            return self.since()
        return max(self.since(), utcnow() - dt.timedelta(seconds=RECENT_S))

    def since(self) -> dt.datetime:
        """Films scored from here on get objects: when sending was first enabled on this database."""
        if self._since is None:
            with self.sessions.begin() as s:
                value = get_meta(s, SINCE_KEY)
                if value is None:
                    value = (utcnow() - dt.timedelta(seconds=BACKFILL_S)).isoformat()
                    set_meta(s, SINCE_KEY, value)
            self._since = dt.datetime.fromisoformat(value)
        return self._since

    def _wanted(self, kind: str) -> list[Any]:
        """Rows that lack their ``kind`` object for some destination (and can have it now)."""
        missing = [
            ~exists().where(
                and_(OutboxItem.result_id == Result.id, OutboxItem.kind == kind, OutboxItem.destination == d)
            )
            for d in self.destinations
        ]
        want = [
            Result.status == Status.OK,
            Result.sop_instance_uid.is_not(None),
            Result.probability.is_not(None),
            Result.processed_at >= self._from(),
            (Result.moved_at.is_not(None)) | (Result.moved_to.is_(None)),  # the film is where it stays
            or_(*missing),
        ]
        if kind == "sc":
            want.append(Result.flagged.is_(True))
            if self.heatmaps != "none":
                want.append(Result.heatmap_path.is_not(None))
        if not self.exclusive:  # each worker its own films, and those a stopped worker left
            orphaned = utcnow() - dt.timedelta(seconds=2 * self.lease_s)
            want.append((Result.worker_id == self.worker_id) | (Result.processed_at < orphaned))
        skip = [rid for rid, k in self._skip if k == kind]
        if skip:
            want.append(Result.id.not_in(skip))
        with self.sessions() as s:
            return list(s.scalars(select(Result).where(*want).order_by(Result.id).limit(PER_PASS)))

    def enqueue_new(self) -> int:
        """Build and commit the objects films lack; how many were handled. Reports first: a pass builds
        secondary captures only when no film waits for its SR."""
        handled = 0
        for kind in ("sr", "sc") if self.cfg.secondary_capture else ("sr",):
            if handled >= PER_PASS:
                break
            for row in self._wanted(kind):
                if self.halt.is_set():
                    return handled
                handled += 1
                self._enqueue(row, kind)
        return handled

    def _enqueue(self, row: Any, kind: str) -> None:
        source = fs_path(row.moved_to or row.path)
        t0 = time.perf_counter()
        try:
            film = read_film(source)
            picture = self._picture(row, source) if kind == "sc" else None
            ds = build(kind, film, Finding.from_row(row), picture)
            data = encode(ds)
        except Exception as exc:  # noqa: BLE001 - a film that cannot become an object is reported, not a crash
            self._skip.add((row.id, kind))
            self.log.warning(
                "dicom_object_failed", id=row.id, kind=kind, file=source, reason=f"{type(exc).__name__}: {exc}"
            )
            return
        added = []
        with self.sessions.begin() as s:
            for d in self.destinations:
                if outbox.has_item(s, row.id, kind, d):
                    continue
                if outbox.enqueue(
                    s,
                    result_id=row.id,
                    kind=kind,
                    destination=d,
                    data=data,
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    give_up_after_s=self.cfg.give_up_after_s,
                ):
                    added.append(d)
        if not added:  # another result already queued this UID (the same film scored twice): nothing new
            self._skip.add((row.id, kind))
        self.built += 1
        self.log.info(
            "dicom_object_queued",
            id=row.id,
            kind=kind,
            sop_instance_uid=str(ds.SOPInstanceUID),
            destinations=added,
            bytes=len(data),
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )

    def _picture(self, row: Any, source: str):
        from PIL import Image

        if row.heatmap_path:
            with Image.open(fs_path(row.heatmap_path)) as im:
                return im.convert("RGB")
        from xr.core.imaging import load_image

        return load_image(source).convert("RGB")  # heatmaps off: the film alone, with the legend


class SendStage(Stage):
    """Sends due outbox items by C-STORE and marks them (thread ``xr-send``)."""

    name = "xr-send"
    idle_s = 0.2

    def __init__(
        self, sessions: Any, cfg: DicomSendConfig, *, ae_title: str, worker_id: str, log: Any, metrics: Any = None
    ):
        super().__init__()
        self.sessions, self.cfg, self.log, self.worker_id = sessions, cfg, log, worker_id
        self.sender = DicomSender(ae_title, cfg.timeout_s)
        self.hold_s = max(60.0, 4 * cfg.timeout_s)  # a claimed item is another sender's again after this
        self.sent = self.retried = self.failed = 0
        self._m = _metrics(metrics)

    def step(self, now: float) -> bool:
        return self.send_due() > 0

    def send_due(self) -> int:
        with self.sessions.begin() as s:
            claimed = outbox.claim_due(s, self.worker_id, PER_SEND, self.hold_s)
        if not claimed:
            return 0
        by_dest: dict[str, list[outbox.Claimed]] = {}
        for it in claimed:
            by_dest.setdefault(it.destination, []).append(it)
        for dest, batch in by_dest.items():
            t0 = time.perf_counter()
            outcomes = self.sender.send(dest, batch, self.halt)
            ms = round((time.perf_counter() - t0) * 1000, 1)
            after: dict[int, str | None] = {}  # item -> its status after a failed send
            with self.sessions.begin() as s:
                outbox.release(s, [it.id for it in batch if it.id not in outcomes], self.worker_id)
                batch = [it for it in batch if it.id in outcomes]
                for it in batch:
                    res = outcomes[it.id]
                    if res.ok:
                        outbox.mark_sent(s, it.id)
                        continue
                    after[it.id] = outbox.mark_attempt_failed(
                        s,
                        it.id,
                        self.worker_id,
                        res.error or "unknown error",
                        initial_s=self.cfg.retry_initial_s,
                        max_s=self.cfg.retry_max_s,
                    )
            for it in batch:
                res = outcomes[it.id]
                fields = dict(
                    id=it.id,
                    result_id=it.result_id,
                    kind=it.kind,
                    destination=dest,
                    sop_instance_uid=it.sop_instance_uid,
                )
                if res.ok:
                    self.sent += 1
                    self._inc("sent", it.kind)
                    self.log.info("dicom_sent", attempts=it.attempts, ms=ms, **fields)
                    continue
                error, status = res.error, after.get(it.id)
                if status == outbox.FAILED:
                    self.failed += 1
                    self._inc("failed", it.kind)
                    self.log.error(
                        "dicom_send_failed",
                        reason=f"gave up after {it.attempts} attempts: {error}",
                        give_up_after_s=self.cfg.give_up_after_s,
                        **fields,
                    )
                elif status == outbox.PENDING:
                    self.retried += 1
                    self._inc("retried", it.kind)
                    self.log.warning("dicom_send_retry", reason=error, attempts=it.attempts, **fields)
        return len(claimed)

    def _inc(self, what: str, kind: str) -> None:
        if self._m is not None:
            self._m[what].labels(kind).inc()


def _metrics(metrics: Any) -> dict[str, Any] | None:
    """Counters on the daemon's registry (daemon/metrics.py), when it serves /metrics."""
    registry = getattr(metrics, "registry", None)
    if registry is None:
        return None
    from prometheus_client import Counter

    out = {
        "sent": Counter("xr_dicom_sent", "Objects the PACS accepted, by kind (sr, sc)", ["kind"], registry=registry),
        "retried": Counter(
            "xr_dicom_send_retried", "Sends that failed and will be retried", ["kind"], registry=registry
        ),
        "failed": Counter(
            "xr_dicom_send_failed", "Objects given up after dicom_send.give_up_after_s", ["kind"], registry=registry
        ),
    }
    for c in out.values():
        for kind in ("sr", "sc"):
            c.labels(kind)
    return out


def dicom_stages(
    cfg: Any, inbox: Any, sessions: Any, *, worker_id: str, exclusive: bool, log: Any, metrics: Any = None
) -> tuple[Any, ObjectStage | None, SendStage | None]:
    """The daemon's DICOM stages, where ``cfg`` (Settings) asks for them: the node (``dicom_node.port``)
    and the two stages that build and send results (``dicom_send.destinations``)."""
    from xr.daemon.dicom_node import DicomNode

    node_cfg, send_cfg, d = cfg.dicom_node, cfg.dicom_send, cfg.daemon
    node = DicomNode(node_cfg, inbox, log=log, metrics=metrics) if node_cfg.port else None
    if not send_cfg.destinations:
        return node, None, None
    objects = ObjectStage(
        sessions,
        send_cfg,
        worker_id=worker_id,
        log=log,
        heatmaps=d.heatmaps,
        exclusive=exclusive,
        lease_s=d.lease_s,
    )
    sender = SendStage(sessions, send_cfg, ae_title=node_cfg.ae_title, worker_id=worker_id, log=log, metrics=metrics)
    return node, objects, sender
