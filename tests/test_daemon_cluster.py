"""Several ``xr-daemon`` processes on one inbox, one output folder and one PostgreSQL database.

Real processes against the real server ($XR_TEST_PG, default 127.0.0.1:5432; skipped where none answers):
every file is scored once and moved once, whatever worker dies or freezes."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.test_daemon_e2e import (
    csv_rows,
    drop,
    log_events,
    run_once,
    start_daemon,
    stop,
    wait_for,
    wait_started,
    xr_results,
)

pytestmark = pytest.mark.slow
LEASE_S = 4
# How psycopg reports a session the server ended while its worker was frozen inside a transaction.
SESSION_ENDED = re.compile(r"IdleInTransactionSessionTimeout|server closed the connection|terminating connection")


def _workers(tmp: Path, model: Path, pg_url: str, names: list[str]) -> dict:
    workers = {}
    for name in names:
        workers[name] = start_daemon(
            tmp,
            model,
            "--db",
            pg_url,
            "--worker-id",
            name,
            "--batch-size",
            "8",
            "--set",
            f"daemon.lease_s={LEASE_S}",
            log_name=f"{name}.log",
        )
    for proc, log in workers.values():
        wait_started(proc, log)
    return workers


def _rows(eng, where: str = "true") -> list[dict]:
    with eng.connect() as c:
        return [dict(r) for r in c.execute(text(f"select * from results where {where} order by id")).mappings()]


def _drop_burst(inbox: Path, xray_paths: list[Path], start: int, n: int) -> list[str]:
    names = []
    for i in range(start, start + n):
        name = f"f{i:03d}.jpeg"
        drop(xray_paths[i % len(xray_paths)].read_bytes() + f"xr-tag-{i}".encode(), inbox, name)
        names.append(name)
    return names


def _freeze_holding_claims(proc, eng, worker: str) -> list[dict]:
    """SIGSTOP ``worker`` at a moment it holds files (claimed, or scored and not yet moved): those rows."""
    for _ in range(1000):
        os.kill(proc.pid, signal.SIGSTOP)
        held = _rows(eng, f"lease_holder = '{worker}' and moved_at is null")
        if held:
            return held
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"{worker} never held a file")


def _all_done(eng, inbox: Path, n: int) -> bool:
    rows = _rows(eng)
    left = [p for p in inbox.iterdir() if not p.name.startswith(".")]
    return len(rows) == n and all(r["moved_at"] is not None for r in rows) and not left


def _check_exactly_once(tmp: Path, eng, names: list[str]) -> list[dict]:
    rows = _rows(eng)
    assert sorted(r["filename"] for r in rows) == sorted(names)  # one row per file
    assert {r["status"] for r in rows} == {"ok"}
    processed = sorted(p.name for p in (tmp / "out" / "processed").iterdir())
    assert processed == sorted(names)  # each moved once: no second copy with a -1 suffix
    wait_for(lambda: len(csv_rows(tmp)) >= len(rows), 60, what="the CSVs to catch up")
    assert sorted(int(r["id"]) for r in csv_rows(tmp)) == [r["id"] for r in rows]  # each row once across workers
    return rows


def test_a_killed_workers_files_are_finished_by_the_others(tmp_path, pg_url, tiny_checkpoint, xray_paths):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    eng = create_engine(pg_url)
    workers = _workers(tmp_path, tiny_checkpoint, pg_url, ["w1", "w2", "w3"])
    try:
        names = _drop_burst(inbox, xray_paths, 0, 240)
        w1 = workers["w1"][0]
        held = _freeze_holding_claims(w1, eng, "w1")
        w1.kill()  # kill -9, never restarted
        w1.wait(30)
        wait_for(lambda: _all_done(eng, inbox, len(names)), 300, workers["w2"][0], "the survivors to drain the burst")
        rows = _check_exactly_once(tmp_path, eng, names)
        assert workers["w2"][0].poll() is None and workers["w3"][0].poll() is None
    finally:
        for proc, _ in workers.values():
            stop(proc)
        eng.dispose()

    by_id = {r["id"]: r for r in rows}
    assert {r["worker_id"] for r in rows} <= {"w1", "w2", "w3"} and {"w2", "w3"} <= {r["worker_id"] for r in rows}
    for h in held:  # what w1 held when it died: finished by the others after its lease ran out
        row = by_id[h["id"]]
        assert row["lease_holder"] in {"w2", "w3"} and row["lease_token"] > h["lease_token"]
        assert row["moved_at"] is not None
        # claimed when it died: scored by a survivor; already scored (not moved): w1's score stands, moved by another
        scorer = {"w2", "w3"} if h["status"] == "claimed" else {"w1"}
        assert h["status"] in ("claimed", "ok") and row["worker_id"] in scorer, (h, row)
        if h["status"] == "ok":
            assert (row["probability"], row["processed_at"]) == (h["probability"], h["processed_at"])  # not redone
    taken = {
        e["id"]
        for w in ("w2", "w3")
        for e in log_events(workers[w][1])
        if e["event"] == "lease_taken_over" and e["from_worker"] == "w1"
    }
    assert {h["id"] for h in held} <= taken


def test_a_worker_presumed_dead_that_comes_back_writes_nothing_twice(tmp_path, pg_url, tiny_checkpoint, xray_paths):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    eng = create_engine(pg_url)
    workers = _workers(tmp_path, tiny_checkpoint, pg_url, ["w1", "w2"])
    (w1, log1), (w2, _) = workers["w1"], workers["w2"]
    try:
        names = _drop_burst(inbox, xray_paths, 0, 80)
        held = _freeze_holding_claims(w1, eng, "w1")  # frozen (a VM paused, a stalled NFS client) ...
        wait_for(lambda: _all_done(eng, inbox, len(names)), 300, w2, "w2 to take w1's files over")
        os.kill(w1.pid, signal.SIGCONT)  # ... and back: its in-flight work is fenced off
        # It finds its rows taken or its files gone, or (frozen inside a transaction) its session ended by
        # the server: exit 1.
        noticed = {"lease_lost", "claim_dropped"}
        wait_for(
            lambda: (
                w1.poll() is not None
                or noticed & {e["event"] for e in log_events(log1)}
                or any(e["event"] == "move_recorded" for e in log_events(workers["w2"][1]))
            ),
            120,
            what="w1 to notice it lost its leases",
        )
        names += _drop_burst(inbox, xray_paths, 80, 20)  # the cluster goes on
        wait_for(lambda: _all_done(eng, inbox, len(names)), 300, w2, "the second burst")
        rows = _check_exactly_once(tmp_path, eng, names)
        for proc in (w1, w2):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        assert w2.returncode == 0, workers["w2"][1].read_text()[-3000:]
        # w1 fails only for the session the server ended (frozen inside a transaction), never for anything
        # else: no failed stage and exit 0, or failed stages that each name the ended session and exit 1 (our
        # SIGTERM may land while it exits with 1)
        failed = [e for e in log_events(log1) if e["event"] == "stage_failed"]
        assert all(SESSION_ENDED.search(e["reason"]) for e in failed), log1.read_text()[-3000:]
        assert w1.returncode in ((1, -signal.SIGTERM) if failed else (0,)), (w1.returncode, log1.read_text()[-3000:])
    finally:
        stop(w1)
        stop(w2)
        eng.dispose()
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[h["id"]]["lease_holder"] == "w2" for h in held)


def test_xr_results_and_the_review_app_read_postgresql(tmp_path, pg_url, tiny_checkpoint, xray_paths, capsys):
    from fastapi.testclient import TestClient

    from xr.results.engine import make_engine, session_factory
    from xr.review import users
    from xr.review.app import create_app

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop_burst(inbox, xray_paths, 0, 6)
    rc, log = run_once(tmp_path, tiny_checkpoint, capsys, "--db", pg_url)
    assert rc == 0, log.read_text()[-3000:]
    listed = xr_results(capsys, "--db", pg_url, "list")
    assert len(listed) == 6 and all(r["worker_id"] for r in listed)
    eng = make_engine(pg_url, create=False)
    try:
        with session_factory(eng).begin() as s:
            users.add(s, "rita", "reader", "correct horse battery", by="test")
        with TestClient(create_app(eng, tmp_path / "out"), base_url="http://localhost") as client:
            assert client.get("/healthz").status_code == 200
            form = client.get("/login").text
            nonce = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            signed_in = client.post(
                "/login", data={"username": "rita", "password": "correct horse battery", "csrf": nonce}
            )
            assert signed_in.status_code == 200
            page = client.get(f"/cases/{listed[0]['id']}")
            assert page.status_code == 200 and listed[0]["filename"] in page.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            posted = client.post(
                f"/cases/{listed[0]['id']}/review", data={"decision": "normal", "note": "on pg", "csrf": csrf}
            )
            assert posted.status_code in (200, 303)
    finally:
        eng.dispose()
    assert [(r["result_id"], r["decision"], r["note"]) for r in xr_results(capsys, "--db", pg_url, "reviews")] == [
        (listed[0]["id"], "normal", "on pg")
    ]
