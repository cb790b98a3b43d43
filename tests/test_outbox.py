"""results/outbox.py and daemon/send.py: objects committed before they are sent, retried with backoff,
given up after the configured time, each sent once; the PACS is a real Orthanc."""

from __future__ import annotations

import io
import json
import threading

import pydicom
import pytest
from dicom_net import Orthanc, free_port

from xr.core import dicom_results as dr
from xr.core.config import DicomSendConfig
from xr.daemon.send import ObjectStage, SendStage
from xr.results import cli, outbox
from xr.results.engine import make_engine, session_factory
from xr.results.schema import OutboxItem, Result, Status, utcnow


class Log:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def _add(self, event, **kw):
        self.events.append((event, kw))

    info = warning = error = debug = _add

    def named(self, event):
        return [kw for e, kw in self.events if e == event]


@pytest.fixture()
def sessions(any_db):
    engine = make_engine(any_db)
    yield session_factory(engine)
    engine.dispose()


def add_result(sessions, film_path, *, probability=0.8, flagged=True, **extra) -> int:
    ds = pydicom.dcmread(film_path, stop_before_pixels=True)
    now = utcnow()
    row = Result(
        path=str(film_path),
        filename=film_path.name,
        size_bytes=film_path.stat().st_size,
        mtime_ns=film_path.stat().st_mtime_ns,
        status=Status.OK,
        probability=probability,
        threshold=0.5,
        label="PNEUMONIA" if flagged else "NORMAL",
        flagged=flagged,
        model_id="efficientnet_lite0-test",
        calibration_id="cal-test",
        received_at=now,
        claimed_at=now,
        processed_at=now,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        **extra,
    )
    with sessions.begin() as s:
        s.add(row)
        s.flush()
        return row.id


def enqueue_one(s, rid: int, uid: str, destination: str = "PACS@127.0.0.1:104", give_up_after_s: float = 60):
    return outbox.enqueue(
        s,
        result_id=rid,
        kind="sr",
        destination=destination,
        data=b"object " + uid.encode(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
        sop_instance_uid=uid,
        study_instance_uid="1.2.3",
        give_up_after_s=give_up_after_s,
    )


def test_enqueue_once_claim_hold_and_mark_sent(sessions, dicom_dir):
    rid = add_result(sessions, dicom_dir["native"])
    with sessions.begin() as s:
        assert enqueue_one(s, rid, "2.25.1")
        assert not enqueue_one(s, rid, "2.25.1")  # the same UID for the same destination: never a second copy
        assert enqueue_one(s, rid, "2.25.1", destination="OTHER@127.0.0.1:104")
    with sessions.begin() as s:
        got = outbox.claim_due(s, "w1", 10, hold_s=60)
    assert sorted(c.destination for c in got) == ["OTHER@127.0.0.1:104", "PACS@127.0.0.1:104"]
    assert all(c.attempts == 1 and c.data == b"object 2.25.1" for c in got)
    with sessions.begin() as s:
        assert outbox.claim_due(s, "w2", 10, hold_s=60) == []  # held by w1
        outbox.mark_sent(s, got[0].id)
    with sessions() as s:
        item = s.get(OutboxItem, got[0].id)
        assert item.status == "sent" and item.data is None and item.sent_at is not None
        assert outbox.counts(s) == {(got[0].destination, "sent"): 1, (got[1].destination, "pending"): 1}
        assert outbox.state_by_result(s, [rid]) == {rid: "pending"}


def test_backoff_then_give_up(sessions, dicom_dir, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(outbox, "db_time", lambda s: clock[0])
    rid = add_result(sessions, dicom_dir["native"])
    with sessions.begin() as s:
        enqueue_one(s, rid, "2.25.2", give_up_after_s=100)
    waits = []
    for _ in range(4):
        with sessions.begin() as s:
            (item,) = outbox.claim_due(s, "w1", 10, hold_s=60)
            assert outbox.mark_attempt_failed(s, item.id, "w1", "refused", initial_s=5, max_s=30) == "pending"
            nxt = s.get(OutboxItem, item.id).next_attempt_at
        waits.append(nxt - clock[0])
        with sessions.begin() as s:
            clock[0] = nxt - 0.01
            assert outbox.claim_due(s, "w1", 10, hold_s=60) == []  # not due yet
        clock[0] = nxt
    assert waits == [5, 10, 20, 30]  # doubling, capped at retry_max_s
    clock[0] = 1100.0
    with sessions.begin() as s:
        (item,) = outbox.claim_due(s, "w1", 10, hold_s=60)
        assert outbox.mark_attempt_failed(s, item.id, "w1", "refused again", initial_s=5, max_s=30) == "failed"
    with sessions.begin() as s:
        assert outbox.claim_due(s, "w1", 10, hold_s=60) == []
        row = s.get(OutboxItem, item.id)
        assert row.status == "failed" and row.last_error == "refused again" and row.attempts == 5
        assert outbox.state_by_result(s, [rid]) == {rid: "failed"}
        assert outbox.retry_failed(s, give_up_after_s=100) == 1  # the operator puts it back
    with sessions.begin() as s:
        assert len(outbox.claim_due(s, "w1", 10, hold_s=60)) == 1


def test_a_late_failure_does_not_undo_a_send(sessions, dicom_dir):
    """A sender whose hold ran out while another sent the item must not put it back in the queue."""
    rid = add_result(sessions, dicom_dir["native"])
    with sessions.begin() as s:
        enqueue_one(s, rid, "2.25.3")
        (item,) = outbox.claim_due(s, "slow", 10, hold_s=0)
    with sessions.begin() as s:
        (again,) = outbox.claim_due(s, "fast", 10, hold_s=60)
        outbox.mark_sent(s, again.id)
    with sessions.begin() as s:
        assert outbox.mark_attempt_failed(s, item.id, "slow", "timeout", initial_s=1, max_s=1) is None
        assert s.get(OutboxItem, item.id).status == "sent"


def test_two_senders_claim_each_item_once(any_db, dicom_dir):
    engines = [make_engine(any_db) for _ in range(2)]
    sessions = [session_factory(e) for e in engines]
    rid = add_result(sessions[0], dicom_dir["native"])
    n = 60
    with sessions[0].begin() as s:
        for i in range(n):
            enqueue_one(s, rid, f"2.25.9{i}")
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def sender(k: int) -> None:
        start.wait()
        while True:
            with sessions[k].begin() as s:
                batch = outbox.claim_due(s, f"w{k}", 3, hold_s=600)
            if not batch:
                return
            with sessions[k].begin() as s:
                for it in batch:
                    outbox.mark_sent(s, it.id)
            got[k].extend(it.id for it in batch)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not set(got[0]) & set(got[1])
        assert len(got[0]) + len(got[1]) == n
        with sessions[0]() as s:
            assert outbox.counts(s) == {("PACS@127.0.0.1:104", "sent"): n}
    finally:
        for e in engines:
            e.dispose()


# -- the send stage against a real PACS -----------------------------------------------------------------
class Stages:
    """The two send stages of the daemon, stepped here on the test's thread."""

    def __init__(self, sessions, destination: str, log: Log, metrics=None, **cfg):
        settings = DicomSendConfig(**{"destinations": [destination], "retry_initial_s": 0.2, "retry_max_s": 0.5, **cfg})
        self.objects = ObjectStage(sessions, settings, worker_id="w1", log=log, heatmaps="none")
        self.send = SendStage(sessions, settings, ae_title="XRTRIAGE", worker_id="w1", log=log, metrics=metrics)

    def step(self, now: float) -> bool:
        built = self.objects.step(now)
        return self.send.step(now) or built

    def __getattr__(self, name: str):  # built on the one, sent / retried / failed on the other
        return getattr(self.objects if name == "built" else self.send, name)


def stage_for(sessions, destination: str, log: Log, metrics=None, **cfg) -> Stages:
    return Stages(sessions, destination, log, metrics, **cfg)


def run_until(stage: Stages, done, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the send stage did not get there in time")
        if not stage.step(time.monotonic()):
            time.sleep(0.05)


def test_sr_and_sc_reach_orthanc_in_the_films_study(tmp_path, sessions, dicom_dir, any_db):
    log = Log()
    film = pydicom.dcmread(dicom_dir["native"])
    flagged = add_result(sessions, dicom_dir["native"], probability=0.91, flagged=True)
    normal = add_result(sessions, dicom_dir["mono2"], probability=0.12, flagged=False)
    with Orthanc(tmp_path / "orthanc", {"xr": "XRTRIAGE"}) as pacs:
        stage = stage_for(sessions, pacs.destination, log)
        run_until(stage, lambda: stage.sent == 3)
        for _ in range(5):
            stage.step(1e12)  # later passes find nothing new to build or send
        assert stage.sent == 3 and stage.built == 3
        srs = pacs.find(Modality="SR")
        assert len(srs) == 2
        by_source = {}
        for oid in srs:
            got = dr.read_sr(pacs.file(oid))
            by_source[got["source_sop_instance_uid"]] = got
        assert by_source[film.SOPInstanceUID]["study_instance_uid"] == film.StudyInstanceUID
        assert by_source[film.SOPInstanceUID]["probability"] == pytest.approx(0.91)
        assert by_source[film.SOPInstanceUID]["flagged"] is True
        (sc,) = pacs.find(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
        tags = pacs.tags(sc)
        assert tags["StudyInstanceUID"] == film.StudyInstanceUID and tags["BurnedInAnnotation"] == "YES"
    with sessions() as s:
        assert outbox.state_by_result(s, [flagged, normal]) == {flagged: "sent", normal: "sent"}
    assert len(log.named("dicom_sent")) == 3
    out = io.StringIO()
    assert cli.main(["--db", any_db, "list", "--format", "json"], out=out) == 0
    assert {r["id"]: r["pacs"] for r in json.loads(out.getvalue())} == {flagged: "sent", normal: "sent"}


def test_pacs_down_then_back_every_object_once(tmp_path, sessions, dicom_dir):
    log = Log()
    add_result(sessions, dicom_dir["native"], probability=0.3, flagged=False)
    add_result(sessions, dicom_dir["rle"], probability=0.3, flagged=False)
    pacs = Orthanc(tmp_path / "orthanc", {"xr": "XRTRIAGE"})
    stage = stage_for(sessions, pacs.destination, log)  # Orthanc not started: nothing listens there
    run_until(stage, lambda: stage.retried >= 4)
    assert stage.sent == 0
    with sessions() as s:
        assert {i.status for i in outbox.items(s)} == {"pending"}
        assert all("connection refused" in (i.last_error or "") for i in outbox.items(s))  # said plainly
    with pacs:
        run_until(stage, lambda: stage.sent == 2)
        assert len(pacs.find(Modality="SR")) == 2
    sent = [kw["sop_instance_uid"] for kw in log.named("dicom_sent")]
    assert len(sent) == len(set(sent)) == 2


def test_given_up_after_the_configured_time(tmp_path, sessions, dicom_dir, any_db, capsys):
    log = Log()
    add_result(sessions, dicom_dir["native"], probability=0.3, flagged=False)
    from xr.daemon.metrics import Metrics

    metrics = Metrics(backlog=lambda: 0)
    stage = stage_for(sessions, f"NOBODY@127.0.0.1:{free_port()}", log, metrics, give_up_after_s=0.5)
    run_until(stage, lambda: stage.failed == 1)
    text = metrics.exposition().decode()
    assert 'xr_dicom_send_failed_total{kind="sr"} 1.0' in text and 'xr_dicom_sent_total{kind="sr"} 0.0' in text
    assert f'xr_dicom_send_retried_total{{kind="sr"}} {float(stage.retried)}' in text
    (event,) = log.named("dicom_send_failed")
    assert "gave up after" in event["reason"] and event["kind"] == "sr"
    with sessions() as s:
        (item,) = outbox.items(s)
        assert item.status == "failed" and item.data is not None  # kept: xr-results outbox retry can resend it

    out = io.StringIO()
    assert cli.main(["--db", any_db, "outbox"], out=out) == 0
    text = out.getvalue()
    assert "NOBODY@127.0.0.1" in text and "failed" in text and "no association" in text
    assert "did not reach the PACS" in capsys.readouterr().err
    out = io.StringIO()
    assert cli.main(["--db", any_db, "outbox", "--retry-failed", "--format", "json"], out=out) == 0
    got = json.loads(out.getvalue())
    assert [c["status"] for c in got["counts"]] == ["pending"] and got["items"][0]["attempts"] == 0


def test_a_stopping_sender_releases_what_it_did_not_try(sessions, dicom_dir):
    rid = add_result(sessions, dicom_dir["native"])
    with sessions.begin() as s:
        enqueue_one(s, rid, "2.25.4")
        (item,) = outbox.claim_due(s, "w1", 10, hold_s=600)
        outbox.release(s, [item.id], "w1")
    with sessions.begin() as s:
        (again,) = outbox.claim_due(s, "w2", 10, hold_s=600)  # due at once, not after the hold
        assert again.id == item.id and again.attempts == 1


def test_recent_films_every_pass_older_ones_on_full_passes(sessions, dicom_dir):
    import datetime as dt

    from xr.daemon import send

    old = add_result(sessions, dicom_dir["native"], probability=0.2, flagged=False)
    with sessions.begin() as s:  # scored 20 minutes ago, after sending was enabled
        s.get(Result, old).processed_at = utcnow() - dt.timedelta(minutes=20)
    settings = DicomSendConfig(destinations=["PACS@127.0.0.1:104"])
    stage = ObjectStage(sessions, settings, worker_id="w1", log=Log(), heatmaps="none")
    stage._since = utcnow() - dt.timedelta(hours=1)
    stage._full = False  # a pass between full passes sees the last 10 minutes only
    stage._full_at = 100.0
    assert stage.step(100.0 + send.FULL_SCAN_S - 1) is False
    assert stage.step(100.0 + send.FULL_SCAN_S) is True  # the full pass finds it
    with sessions() as s:
        assert [i.result_id for i in outbox.items(s)] == [old]
