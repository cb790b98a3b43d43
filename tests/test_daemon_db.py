"""daemon/db.py: schema, pragmas, versioning and the journal queries."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import text

from xr.core.errors import XRError
from xr.daemon import db as dbm
from xr.daemon.db import Meta, Result, make_engine, session_factory


def _row(path="/in/a.png", size=10, mtime=1, status=dbm.CLAIMED, sha="s1", **kw) -> Result:
    now = dt.datetime(2026, 1, 1)
    return Result(path=path, filename=path.rsplit("/", 1)[-1], size_bytes=size, mtime_ns=mtime, sha256=sha,
                  status=status, received_at=now, claimed_at=now, **kw)  # fmt: skip


def test_created_on_first_start_with_wal_and_version(tmp_path):
    eng = make_engine(tmp_path / "sub" / "r.sqlite")
    with eng.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        cols = {r[1] for r in c.exec_driver_sql("PRAGMA table_info(results)")}
    required = {"id", "path", "filename", "sha256", "size_bytes", "status", "error", "logit", "probability",
                "threshold", "label", "flagged", "model_id", "temperature", "batch_id", "received_at",
                "processed_at", "latency_ms"}  # fmt: skip
    assert required <= cols
    with session_factory(eng)() as s:
        assert s.get(Meta, "schema_version").value == str(dbm.SCHEMA_VERSION)
    eng.dispose()
    make_engine(tmp_path / "sub" / "r.sqlite").dispose()  # reopening is fine


def test_newer_schema_is_refused(tmp_path):
    eng = make_engine(tmp_path / "r.sqlite")
    with session_factory(eng).begin() as s:
        dbm.set_meta(s, "schema_version", dbm.SCHEMA_VERSION + 1)
    eng.dispose()
    with pytest.raises(XRError, match="newer"):
        make_engine(tmp_path / "r.sqlite")


def test_not_a_results_db(tmp_path):
    import sqlite3

    sqlite3.connect(tmp_path / "other.sqlite").execute("create table x(a)").connection.close()
    with pytest.raises(XRError, match="not an xr-triage results database"):
        make_engine(tmp_path / "other.sqlite", create=False)


def test_db_url():
    assert dbm.db_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert dbm.db_url("rel.sqlite").startswith("sqlite:////")


def test_owning_rows_rows_by_id_and_first_ok(tmp_path):
    eng = make_engine(tmp_path / "r.sqlite")
    sessions = session_factory(eng)
    with sessions.begin() as s:
        s.add(_row(status=dbm.OK, sha="x", moved_at=dt.datetime(2026, 1, 1)))  # moved away: owns nothing
        s.add(_row(status=dbm.OK, sha="x", path="/in/b.png"))
        s.add(_row(status=dbm.ERROR, sha="y", path="/in/c.png"))
        s.add(_row(status=dbm.CLAIMED, sha="y", path="/in/c.png"))  # a later claim of the same file
    with sessions() as s:
        a, b, b11, c = ("/in/a.png", 10, 1), ("/in/b.png", 10, 1), ("/in/b.png", 11, 1), ("/in/c.png", 10, 1)
        owners = dbm.owning_rows(s, [a, b, b11, c])
        assert set(owners) == {b, c}  # a: moved away; b11: other size, another file
        assert owners[b].status == dbm.OK
        assert (owners[c].id, owners[c].status) == (4, dbm.CLAIMED)  # the newest row of an identity owns it
        assert dbm.owning_rows(s, []) == {}
        assert set(dbm.rows_by_id(s, [2, 4, 99])) == {2, 4}
        assert dbm.first_ok_by_sha(s, ["x", "y", "z"]) == {"x": 1}  # errors are never a first result
    eng.dispose()


def test_concurrent_writers_wait_instead_of_failing(tmp_path):
    import threading

    eng = make_engine(tmp_path / "r.sqlite")
    sessions = session_factory(eng)
    errors = []

    def writer(k):
        try:
            for i in range(20):
                with sessions.begin() as s:
                    s.add(_row(path=f"/in/{k}-{i}.png"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,), name=f"w{k}") for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with eng.connect() as c:
        assert c.execute(text("select count(*) from results")).scalar() == 60
    eng.dispose()
