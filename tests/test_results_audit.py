"""results/audit.py and ``xr-results audit``, on SQLite and PostgreSQL: rows are only ever added, and the
trail reads back as a table, CSV or JSON with its filters."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.exc import DatabaseError

from xr.results import audit
from xr.results.cli import main
from xr.results.engine import make_engine, session_factory
from xr.results.schema import AuditEvent, Result, Status, utcnow


@pytest.fixture()
def trail(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    now = dt.datetime(2026, 12, 1, 9)
    with sessions.begin() as s:
        row = Result(
            path="/in/a.dcm",
            filename="a.dcm",
            size_bytes=1,
            mtime_ns=1,
            status=Status.OK,
            received_at=now,
            claimed_at=now,
            accession_number="ACC-9",
            patient_id="PAT-9",
            study_instance_uid="1.2.3",
        )
        s.add(row)
        s.flush()
        audit.record(s, "login", user="rita", remote_addr="10.0.0.7")
        audit.record(s, "view_case", user="rita", case=row, remote_addr="10.0.0.7")
        audit.record(s, "review", user="rita", case=row, remote_addr="10.0.0.7", detail="confirm")
        audit.record(s, "login_failed", user="=HYPERLINK(1)", outcome="failed", detail="unknown user\x1b[31m")
    yield any_db, eng, sessions
    eng.dispose()


def test_audit_rows_cannot_be_changed_or_deleted(trail):
    _, eng, sessions = trail
    for stmt in (
        update(AuditEvent).values(username="someone else"),
        delete(AuditEvent),
        text("UPDATE audit SET outcome = 'ok'"),
        text("DELETE FROM audit WHERE action = 'login_failed'"),
    ):
        with pytest.raises(DatabaseError, match="append-only"):
            with eng.begin() as conn:
                conn.execute(stmt)
    if eng.dialect.name == "postgresql":
        with pytest.raises(DatabaseError, match="append-only"):
            with eng.begin() as conn:
                conn.execute(text("TRUNCATE audit"))
    with sessions() as s:
        rows = audit.query(s)
    assert [(r["username"], r["action"], r["outcome"]) for r in rows] == [
        ("rita", "login", "ok"),
        ("rita", "view_case", "ok"),
        ("rita", "review", "ok"),
        ("=HYPERLINK(1)", "login_failed", "failed"),
    ]
    assert (rows[1]["accession_number"], rows[1]["patient_id"], rows[1]["study_instance_uid"]) == (
        "ACC-9",
        "PAT-9",
        "1.2.3",
    )
    with pytest.raises(ValueError):
        with sessions.begin() as s:
            audit.record(s, "delete_everything", user="x")


def test_the_trail_filters_by_user_action_and_time(trail):
    _, _, sessions = trail
    with sessions() as s:
        assert [r["action"] for r in audit.query(s, user="rita", action="review")] == ["review"]
        assert len(audit.query(s, since=utcnow() - dt.timedelta(hours=1))) == 4
        assert audit.query(s, since=utcnow() + dt.timedelta(hours=1)) == []
        assert [r["action"] for r in audit.query(s, limit=2)] == ["review", "login_failed"]  # the newest, in order


def run(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    return main(list(argv), out=buf), buf.getvalue()


def test_xr_results_audit_as_table_csv_and_json(trail):
    db, _, _ = trail
    rc, table = run("audit", "--db", db, "--since", "7d")
    assert rc == 0
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["id", "at", "username", "action"] and len(lines) == 5
    assert "\x1b" not in table and "unknown user\\x1b[31m" in table  # no raw escape reaches the terminal
    rc, text_csv = run("audit", "--db", db, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text_csv)))
    assert rc == 0 and [r["action"] for r in rows] == ["login", "view_case", "review", "login_failed"]
    assert rows[3]["username"] == "'=HYPERLINK(1)"  # a spreadsheet shows it, never runs it
    assert rows[2]["accession_number"] == "ACC-9" and rows[2]["remote_addr"] == "10.0.0.7"
    rc, text_json = run("audit", "--db", db, "--user", "rita", "--format", "json")
    got = json.loads(text_json)
    assert rc == 0 and [r["action"] for r in got] == ["login", "view_case", "review"]
    assert set(got[0]) >= {"at", "username", "action", "outcome", "result_id", "remote_addr", "detail"}
    rc, text_json = run("audit", "--db", db, "--action", "review", "--format", "json")
    assert [r["detail"] for r in json.loads(text_json)] == ["confirm"]
    rc, nothing = run("audit", "--db", db, "--since", "2099-01-01", "--format", "json")
    assert rc == 0 and json.loads(nothing) == []


def test_xr_results_audit_refuses_list_options(trail, capsys):
    db, _, _ = trail
    with pytest.raises(SystemExit) as exc:
        run("--flagged", "audit", "--db", db)
    assert exc.value.code == 2 and "only apply to list" in capsys.readouterr().err
