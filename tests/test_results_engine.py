"""results/engine.py: URLs, SQLite pragmas, schema creation, versioning and upgrades through the migrations."""

from __future__ import annotations

import pytest
from result_rows import result_row as _row
from sqlalchemy import text

from xr.core.errors import XRError
from xr.results import engine, schema
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Meta


def test_created_on_first_start_with_wal_and_version(tmp_path):
    eng = make_engine(tmp_path / "sub" / "r.sqlite")
    with eng.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        cols = {r[1] for r in c.exec_driver_sql("PRAGMA table_info(results)")}
    required = {
        "id",
        "path",
        "filename",
        "sha256",
        "size_bytes",
        "status",
        "error",
        "logit",
        "probability",
        "threshold",
        "label",
        "flagged",
        "model_id",
        "temperature",
        "batch_id",
        "received_at",
        "processed_at",
        "latency_ms",
    }
    assert required <= cols
    with session_factory(eng)() as s:
        assert s.get(Meta, "schema_version").value == str(schema.SCHEMA_VERSION)
    eng.dispose()
    make_engine(tmp_path / "sub" / "r.sqlite").dispose()  # reopening is fine


def test_newer_schema_is_refused(tmp_path):
    eng = make_engine(tmp_path / "r.sqlite")
    with session_factory(eng).begin() as s:
        engine.set_meta(s, "schema_version", schema.SCHEMA_VERSION + 1)
    eng.dispose()
    with pytest.raises(XRError, match="newer"):
        make_engine(tmp_path / "r.sqlite")


def test_not_a_results_db(tmp_path):
    import sqlite3

    sqlite3.connect(tmp_path / "other.sqlite").execute("create table x(a)").connection.close()
    with pytest.raises(XRError, match="not an xr-triage results database"):
        make_engine(tmp_path / "other.sqlite", create=False)


def test_db_url():
    assert engine.db_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine.db_url("postgresql+psycopg://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    with pytest.raises(XRError, match="mysql://u@h/db.*SQLite file path or a postgresql"):
        engine.db_url("mysql://u@h/db")
    assert engine.db_url("rel.sqlite").startswith("sqlite:////")


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


def test_a_database_made_by_the_previous_release_is_upgraded_in_place(tmp_path, fixtures_dir):
    """tests/fixtures/db/results-v1.sqlite was written by xr-daemon before the migrations existed."""
    import shutil
    import sqlite3

    db = tmp_path / "results.sqlite"
    shutil.copy(fixtures_dir / "db" / "results-v1.sqlite", db)
    before = sqlite3.connect(db).execute("select id, filename, status, probability from results order by id").fetchall()
    with pytest.raises(
        XRError, match=f"has schema version 1, this version reads {schema.SCHEMA_VERSION}: start xr-daemon on it once"
    ):
        make_engine(db, create=False)  # a reader never migrates
    make_engine(db).dispose()
    make_engine(db).dispose()  # upgrading twice changes nothing
    con = sqlite3.connect(db)
    assert con.execute("select id, filename, status, probability from results order by id").fetchall() == before
    assert len(before) == 4 and {r[2] for r in before} == {"ok", "error", "duplicate"}
    assert con.execute("select version_num from alembic_version").fetchall() == [(f"{schema.SCHEMA_VERSION:04d}",)]
    columns = {r[1] for r in con.execute("pragma table_info(results)")}
    assert {"calibration_id", "accession_number", "sop_instance_uid", "patient_id"} <= columns
    assert con.execute("select count(*) from calibrations").fetchone() == (0,)
    assert dict(con.execute("select key, value from meta").fetchall()) == {
        "schema_version": str(schema.SCHEMA_VERSION),
        "last_exported_id": "4",
    }
    con.close()
    make_engine(db, create=False).dispose()  # now readable


def test_fresh_and_upgraded_schemas_are_the_same(tmp_path, fixtures_dir):
    import shutil

    from sqlalchemy import inspect

    shutil.copy(fixtures_dir / "db" / "results-v1.sqlite", tmp_path / "old.sqlite")
    shapes = []
    for name in ("old.sqlite", "new.sqlite"):
        eng = make_engine(tmp_path / name)
        insp = inspect(eng)
        shapes.append(
            {
                t: ({c["name"] for c in insp.get_columns(t)}, {i["name"] for i in insp.get_indexes(t)})
                for t in insp.get_table_names()
            }
        )
        eng.dispose()
    assert shapes[0] == shapes[1]
    assert {"results", "batches", "meta", "calibrations", "reviews", "alembic_version"} <= set(shapes[1])
