"""Daemon behaviours an operator counts on, in process: a failed move tried again 5 s later under the same
claim, a share that goes away for a moment, a reloaded model with another preset, a claim counted stale only
after a whole lease, /healthz answering 503, the watchdog going quiet when a stage dies, a metrics port in
use (exit 2). Expectations come from the documented numbers (MOVE_RETRY_S, daemon.lease_s) and from the
product's own predictor run on its own, never from the stage under test."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from unittest import mock

import daemon_parts
import pytest
import torch
from daemon_parts import film, item
from sqlalchemy import func, select

from xr.core.config import load_settings
from xr.core.logs import configure_logging
from xr.core.predict import Predictor
from xr.results import journal
from xr.results.schema import Result, Status, utcnow


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture()
def parts(tmp_path, predictor):
    p = daemon_parts.parts(tmp_path, predictor)
    yield p
    p.close()


def _rows(p) -> list[Result]:
    with p.rt.sessions() as s:
        return list(s.scalars(select(Result).order_by(Result.id)))


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# -- a failed move ------------------------------------------------------------------------------------------
class _Exporter:
    elect = False

    def export(self):
        pass


def test_a_failed_move_is_tried_again_5_s_later_under_the_same_claim(parts, tmp_path, monkeypatch):
    """docs/operations.md: a move that fails (a share gone, a lock) is tried again every 5 s; meanwhile the
    file is not offered for a new claim, and the retry moves it under the row and token it was scored with."""
    from xr.daemon import finish
    from xr.daemon.finish import Finisher, PendingMove

    p = parts
    a = film(tmp_path / "inbox" / "a.png", 1)
    st = a.stat()
    with p.rt.sessions.begin() as s:
        [c] = journal.claim_files(
            s, [journal.FileClaim(str(a), st.st_size, st.st_mtime_ns, utcnow(), {})], p.rt.lease, utcnow()
        )
    dest = tmp_path / "out" / "processed" / "a.png"
    from xr.results import rows

    with p.rt.sessions.begin() as s:
        rows.update_rows(s, [{"id": c.row_id, "status": Status.OK, "moved_to": str(dest)}])
    m = PendingMove(c.row_id, str(a), (st.st_size, st.st_mtime_ns), str(dest), c.token)

    tries = []
    real = finish.move_no_overwrite

    def share_gone(src, dst):
        tries.append(time.monotonic())
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(finish, "move_no_overwrite", share_gone)
    fin = Finisher(p.rt, p.discovery, p.destinations, _Exporter(), p.finish)
    fin.move([m])
    after = time.monotonic()  # the retry is due 5 s after the failure: between tries[0] + 5 and after + 5
    assert p.discovery.released == [(str(a), m.identity)]  # settled as scored: a rescan does not claim it again
    fin.step(tries[0] + 4.9)  # not yet due
    assert len(tries) == 1
    fin.step(after + 5.0)  # due: tried again, the share still away
    assert len(tries) == 2 and a.exists()
    after = time.monotonic()
    monkeypatch.setattr(finish, "move_no_overwrite", real)
    fin.step(tries[1] + 4.9)
    assert a.exists()
    fin.step(after + 5.0)  # the share is back
    assert not a.exists() and dest.is_file()
    [row] = _rows(p)  # one row: no second claim of the file
    assert row.id == c.row_id and row.lease_token == c.token and row.moved_at is not None
    assert row.moved_to == str(dest) and len(p.log.named("move_failed")) == 2


# -- a share that goes away for a moment ---------------------------------------------------------------------
def test_a_transient_share_error_leaves_no_row_and_the_file_is_scored_when_it_is_back(tmp_path, predictor, monkeypatch):
    """Reading the file fails as an unmounted share does (ESTALE): no row, no error, no move; it is read
    again once its retry is due (UNAVAILABLE_RETRY_S, 0.5 s here instead of 5) and scored once."""
    from xr.core.intake import InputUnavailable
    from xr.daemon import claim

    monkeypatch.setattr(claim, "UNAVAILABLE_RETRY_S", 0.5)
    inbox = tmp_path / "inbox"
    away = film(inbox / "away.png", 1)
    film(inbox / "here.png", 2)
    read, attempts = claim.read_input, []

    def share(path, *a, **kw):
        if str(path) == str(away):
            attempts.append(time.monotonic())
            if len(attempts) <= 2:
                raise InputUnavailable(str(path), "share unavailable (Stale file handle)")
        return read(path, *a, **kw)

    monkeypatch.setattr(claim, "read_input", share)
    rc, events = _service_once(tmp_path, predictor)
    assert rc == 0
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as con:
        got = con.execute("select filename, status from results order by filename").fetchall()
    assert got == [("away.png", "ok"), ("here.png", "ok")]  # one row each: none for the failed reads
    assert len(attempts) == 3 and all(b - a >= 0.5 for a, b in zip(attempts, attempts[1:]))
    assert (tmp_path / "out" / "processed" / "away.png").is_file()
    assert not [e for e in events if e["event"] in ("file_error", "stage_failed")]


def _service_once(tmp_path, predictor, **overrides) -> tuple[int, list[dict]]:
    from xr.daemon.service import Service

    cfg = load_settings(overrides={"daemon.heatmaps": "none", "daemon.stable_ms": 0, **overrides})
    buf = io.StringIO()
    svc = Service(
        cfg,
        watch=tmp_path / "inbox",
        output=tmp_path / "out",
        once=True,
        predictor=predictor,
        log=configure_logging("json", stream=buf),
    )
    rc = svc.run()
    return rc, [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]


# -- a reloaded model with another preset --------------------------------------------------------------------
def test_films_decoded_for_the_old_model_are_decoded_again_for_a_new_preset(tmp_path, tiny_checkpoint, predictor):
    """A model reload between a film's decode and its batch: the new model's preset (192 px here, the old one
    224) decodes the film again, so each logit is what the new model gives that file on its own."""
    from xr.daemon.claim import Claimer
    from xr.daemon.infer import Inferer
    from xr.daemon.runtime import WorkSlots

    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["meta"]["preprocess"] |= {"img_size": 192, "resize_size": 220}
    raw["meta"]["img_size"] = 192
    torch.save(raw, tmp_path / "other.pt")
    (tmp_path / "calibration_threshold.json").write_text(
        (tiny_checkpoint.parent / "calibration_threshold.json").read_text()
    )
    new = Predictor.from_checkpoint(tmp_path / "other.pt", device="cpu")
    assert new.preset != predictor.preset and new.pixel_shape != predictor.pixel_shape

    p = daemon_parts.parts(tmp_path, predictor)
    try:
        p.slots = WorkSlots(8)
        claimer = Claimer(p.rt, p.discovery, p.model, p.slots, p.ready, p.decoded, p.finish)
        inferer = Inferer(p.rt, p.discovery, p.model, p.slots, p.destinations, p.decoded, p.finish)
        paths = [film(tmp_path / "inbox" / f"{n}.png", n, side=96) for n in range(3)]
        for path in paths:
            p.ready.put(item(path))
        claimer.step(time.monotonic())
        _wait(lambda: p.decoded.qsize() == 3, 30, "the decodes")
        p.model.predictor = new  # the reload lands between the decode and the batch
        assert inferer.step(time.monotonic())
        claimer.close()
        rows = {r.filename: r for r in _rows(p)}
        for path in paths:
            want = float(new.logits(new.pixels(path)[None])[0])  # the new model on the file, on its own
            stale = float(new.logits(predictor.pixels(path)[None])[0])  # the new model on the old pixels
            assert rows[path.name].logit == want != stale
            assert rows[path.name].model_id == new.model_id
    finally:
        p.close()


# -- a claim counted stale only after a whole lease ------------------------------------------------------------
def test_another_workers_claim_is_taken_over_only_after_its_whole_lease(tmp_path, any_db, monkeypatch):
    """Worker A claims a file with a 30 s lease; worker B finds it held (and when to look again) until the
    lease has run out on the database clock, and only then takes it over with a new fencing token."""
    from xr.results.engine import make_engine, session_factory

    clock = [1_000_000.0]
    monkeypatch.setattr(journal, "db_time", lambda s: clock[0])
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    a_lease, b_lease = journal.Lease("a", 30.0, exclusive=False), journal.Lease("b", 30.0, exclusive=False)
    f = journal.FileClaim("/in/x.png", 10, 1, utcnow(), {})
    try:
        with sessions.begin() as s:
            [first] = journal.claim_files(s, [f], a_lease, utcnow())
        assert first.outcome == journal.Claim.NEW
        for waited in (0.0, 15.0, 29.9):
            clock[0] = 1_000_000.0 + waited
            with sessions.begin() as s:
                [held] = journal.claim_files(s, [f], b_lease, utcnow())
            assert held.outcome == journal.Claim.HELD, waited
            assert held.retry_in_s >= 30.0 - waited  # looked at again no sooner than the lease runs out
        clock[0] = 1_000_000.0 + 30.1
        with sessions.begin() as s:
            [taken] = journal.claim_files(s, [f], b_lease, utcnow())
        assert taken.outcome == journal.Claim.REDO and taken.taken_from == "a"
        assert taken.row_id == first.row_id and taken.token == first.token + 1
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(Result)) == 1
            assert s.get(Result, first.row_id).lease_holder == "b"
    finally:
        eng.dispose()


# -- a running service: /healthz, the watchdog, the metrics port --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running(tmp_path, predictor, **overrides):
    """The Service on tmp/inbox in a thread of this test (ended and joined when the block ends): (service,
    its JSON log lines as a list that grows)."""
    from xr.daemon.service import Service

    (tmp_path / "inbox").mkdir(exist_ok=True)
    cfg = load_settings(overrides={"daemon.heatmaps": "none", **overrides})
    lines: list[str] = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    svc = Service(
        cfg,
        watch=tmp_path / "inbox",
        output=tmp_path / "out",
        predictor=predictor,
        log=configure_logging("json", stream=Stream()),
    )
    t = threading.Thread(target=svc.run, name="svc")
    t.start()
    try:
        _wait(lambda: svc.discovery is not None or not t.is_alive(), 120, "the service to start")
        yield svc, lines
    finally:
        svc.request_stop("test over")
        t.join(120)
        assert not t.is_alive()


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(x) for x in list(lines) if x.startswith("{")]


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_healthz_answers_503_with_the_reason(tmp_path, predictor):
    port = _free_port()
    with _running(tmp_path, predictor, **{"daemon.metrics_port": port}) as (svc, _):
        assert _get(port, "/healthz") == (200, {"status": "ok", "reason": "pipeline running, database writable"})
        con = sqlite3.connect(tmp_path / "out" / "results.sqlite")  # someone breaks the database under it
        con.execute("alter table meta rename to meta_gone")
        con.commit()
        con.close()
        code, body = _get(port, "/healthz")
        assert code == 503 and body["status"] == "unhealthy"
        assert body["reason"].startswith("database not writable: OperationalError"), body


def test_the_watchdog_goes_quiet_when_a_stage_dies(tmp_path, predictor, monkeypatch):
    """Under systemd's watchdog the daemon sends WATCHDOG=1 while every stage runs. When one dies and the
    shutdown then hangs (a stage stuck on a dead share), no WATCHDOG=1 follows: systemd kills and restarts it."""
    from xr.daemon.claim import Claimer
    from xr.daemon.finish import Finisher

    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a WATCHDOG=1 every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    die, unstick = threading.Event(), threading.Event()
    step, close = Claimer.step, Finisher.close

    def dying_step(self, now):
        if die.is_set():
            raise RuntimeError("the decoder pool broke")
        return step(self, now)

    def stuck_close(self):
        unstick.wait(60)
        close(self)

    monkeypatch.setattr(Claimer, "step", dying_step)
    monkeypatch.setattr(Finisher, "close", stuck_close)
    heard: list[tuple[float, str]] = []

    def listen(until: float) -> None:
        while time.monotonic() < until:
            try:
                heard.append((time.monotonic(), notify.recv(1024).decode()))
            except OSError:
                pass

    def said(word: str) -> list[float]:
        return [t for t, m in heard if word in m]

    try:
        with _running(tmp_path, predictor) as (svc, lines):
            listen(time.monotonic() + 1.0)
            assert said("READY=1") and len(said("WATCHDOG=1")) >= 5  # petted while every stage runs
            die.set()
            deadline = time.monotonic() + 30
            while not said("STOPPING=1"):
                assert time.monotonic() < deadline, "no STOPPING=1 after the stage died"
                listen(time.monotonic() + 0.1)
            stopping = said("STOPPING=1")[0]
            listen(time.monotonic() + 1.5)  # the shutdown hangs on the stuck stage meanwhile
            assert not [t for t in said("WATCHDOG=1") if t > stopping], "WATCHDOG=1 after a stage died"
            assert [e for e in _events(lines) if e["event"] == "stage_failed" and e["stage"] == "xr-claim"]
            unstick.set()
        assert svc.exit_code == 1
    finally:
        unstick.set()
        notify.close()


def test_a_metrics_port_in_use_is_exit_2_with_the_reason(tmp_path, tiny_checkpoint, capsys):
    from xr.daemon.cli import main

    (tmp_path / "inbox").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        capsys.readouterr()
        switch = sys.getswitchinterval()
        with mock.patch("xr.core.predict.tune_malloc", lambda: False):  # this test process's malloc stays
            rc = main(
                [
                    *("--watch", str(tmp_path / "inbox"), "--output", str(tmp_path / "out")),
                    *("--model", str(tiny_checkpoint), "--device", "cpu", "--metrics-port", str(port), "--once"),
                    *("--set", "daemon.heatmaps=none", "--set", "daemon.cpu_trace=false"),
                ]
            )
    sys.setswitchinterval(switch)
    assert rc == 2
    events = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    [error] = [e for e in events if e["event"] == "daemon_error"]
    assert error["reason"] == f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
