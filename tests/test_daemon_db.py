"""daemon/db.py: schema, pragmas, versioning and the journal queries."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text, update

from xr.core.errors import XRError
from xr.results import engine, journal, schema
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Meta, Result, Status


def _row(path="/in/a.png", size=10, mtime=1, status=Status.CLAIMED, sha="s1", **kw) -> Result:
    now = dt.datetime(2026, 1, 1)
    return Result(
        path=path,
        filename=path.rsplit("/", 1)[-1],
        size_bytes=size,
        mtime_ns=mtime,
        sha256=sha,
        status=status,
        received_at=now,
        claimed_at=now,
        **kw,
    )


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


@pytest.mark.parametrize("returning", [True, False], ids=["bulk-returning", "row-by-row"])
def test_insert_rows_returns_ids_in_order_and_update_rows_sets_by_id(tmp_path, monkeypatch, returning):
    # The claim thread maps each new id back to its file by position: a wrong order would score one
    # file under another file's row. Rows without a sha256 (read errors) form another parameter set,
    # which a bulk insert runs apart from the others.
    eng = make_engine(tmp_path / "r.sqlite")
    if not returning:  # a database that cannot return ids in parameter order (MySQL, SQLite < 3.35)
        monkeypatch.setattr(eng.dialect, "insert_executemany_returning_sort_by_parameter_order", False)
    sessions = session_factory(eng)
    now = dt.datetime(2026, 1, 1)
    with sessions.begin() as s:
        s.add(_row(path="/in/older.png"))  # ids of the new rows do not start at 1
    new = [
        dict(
            path=f"/in/{n}.png",
            filename=f"{n}.png",
            size_bytes=n,
            mtime_ns=1,
            sha256=sha,
            status=Status.CLAIMED,
            received_at=now,
            claimed_at=now,
        )
        for n, sha in ((5, "a"), (3, None), (9, "b"), (1, None), (7, "c"))
    ]
    with sessions.begin() as s:
        ids = journal.insert_rows(s, new)
        assert journal.insert_rows(s, []) == []
    with sessions() as s:
        got = [(s.get(Result, i).path, s.get(Result, i).sha256) for i in ids]
    assert got == [("/in/5.png", "a"), ("/in/3.png", None), ("/in/9.png", "b"), ("/in/1.png", None), ("/in/7.png", "c")]
    with sessions.begin() as s:
        journal.update_rows(
            s,
            [{"id": ids[1], "status": Status.OK, "logit": 1.5}, {"id": ids[2], "status": Status.ERROR, "error": "bad"}],
        )
        journal.update_rows(s, [])
    with sessions() as s:
        got = {r.path: (r.status, r.logit, r.error) for r in s.scalars(select(Result))}
    assert got == {
        "/in/older.png": (Status.CLAIMED, None, None),
        "/in/5.png": (Status.CLAIMED, None, None),
        "/in/3.png": (Status.OK, 1.5, None),
        "/in/9.png": (Status.ERROR, None, "bad"),
        "/in/1.png": (Status.CLAIMED, None, None),
        "/in/7.png": (Status.CLAIMED, None, None),
    }
    eng.dispose()


def test_a_database_made_by_the_previous_release_is_upgraded_in_place(tmp_path, fixtures_dir):
    """tests/fixtures/db/results-v1.sqlite was written by xr-daemon before the migrations existed."""
    import shutil
    import sqlite3

    db = tmp_path / "results.sqlite"
    shutil.copy(fixtures_dir / "db" / "results-v1.sqlite", db)
    before = sqlite3.connect(db).execute("select id, filename, status, probability from results order by id").fetchall()
    with pytest.raises(XRError, match=f"has schema version 1, this version reads {schema.SCHEMA_VERSION}: start xr-daemon on it once"):
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


# -- claims and leases, on SQLite and PostgreSQL ----------------------------------------------------------
def _claim_row(path="/in/a.png", size=10, mtime=1, worker="w1", expires=100.0, **kw) -> dict:
    now = dt.datetime(2026, 1, 1)
    return {
        "path": path,
        "filename": path.rsplit("/", 1)[-1],
        "size_bytes": size,
        "mtime_ns": mtime,
        "status": Status.CLAIMED,
        "received_at": now,
        "claimed_at": now,
        "lease_holder": worker,
        "lease_token": 0,
        "lease_expires_at": expires,
        **kw,
    }


def test_one_claim_per_inbox_file(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        first = journal.try_claim(s, _claim_row(worker="w1"))
        assert first is not None
        assert journal.try_claim(s, _claim_row(worker="w2")) is None  # the same file: the database says no
        assert journal.try_claim(s, _claim_row(size=11, worker="w2")) is not None  # another file under the name
        owner = journal.owner_of(s, ("/in/a.png", 10, 1))
        assert (owner.id, owner.lease_holder, owner.lease_token) == (first, "w1", 0)
    with sessions.begin() as s:  # once moved, the name is free for a new file of the same identity
        s.execute(update(Result).where(Result.id == first).values(status=Status.OK, moved_at=dt.datetime(2026, 1, 2)))
    with sessions.begin() as s:
        assert journal.try_claim(s, _claim_row(worker="w2")) not in (None, first)
    eng.dispose()


def test_a_takeover_raises_the_token_and_fences_the_old_holder(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        rid = journal.try_claim(s, _claim_row(worker="w1", expires=50.0))
        assert journal.still_held(s, {rid: 0}, "w1") == {rid}
    with sessions.begin() as s:  # w1's lease ran out; w2 takes the file
        assert journal.take_over(s, rid, 0, "w2", 200.0)
        assert not journal.take_over(s, rid, 0, "w3", 200.0)  # a third that read the old token loses the race
    with sessions.begin() as s:
        assert journal.still_held(s, {rid: 0}, "w1") == set()  # w1, back, holds nothing: it writes nothing
        assert journal.still_held(s, {rid: 1}, "w2") == {rid}
        assert journal.renew_leases(s, "w2", 300.0) == 1 and journal.renew_leases(s, "w1", 300.0) == 0
        assert s.get(Result, rid).lease_expires_at == 300.0
        assert journal.db_time(s) > 1.7e9  # epoch seconds on the database's clock
    eng.dispose()


def test_committed_but_unmoved_rows_keep_their_lease_moved_ones_do_not(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        waiting = journal.try_claim(s, _claim_row(path="/in/w.png"))
        done = journal.try_claim(s, _claim_row(path="/in/d.png"))
        left = journal.try_claim(s, _claim_row(path="/in/l.png"))
        s.execute(update(Result).where(Result.id == waiting).values(status=Status.OK, moved_to="/out/w.png"))
        s.execute(
            update(Result)
            .where(Result.id == done)
            .values(status=Status.OK, moved_to="/out/d.png", moved_at=dt.datetime(2026, 1, 2))
        )
        s.execute(update(Result).where(Result.id == left).values(status=Status.OK))  # left in place: done
        assert journal.renew_leases(s, "w1", 500.0) == 1
        assert s.get(Result, waiting).lease_expires_at == 500.0
    eng.dispose()


def test_workers_starting_together_record_their_calibration_once(any_db):
    """Two workers record the same calibration at once: neither fails, one row stays."""
    import threading
    from types import SimpleNamespace

    cal = SimpleNamespace(
        id="validation-abc",
        kind="validation",
        source="/m/calibration_threshold.json",
        temperature=1.5,
        shift=0.0,
        threshold=0.3,
        reference=None,
    )
    predictor = SimpleNamespace(calibration=cal, model_id="efficientnet_lite0-abc")
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    errors = []

    def second_worker():
        try:
            with sessions.begin() as s:  # waits for the first worker's transaction, then finds its row
                journal.record_calibration(s, predictor)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with sessions.begin() as s:
        journal.record_calibration(s, predictor)
        other = threading.Thread(target=second_worker)
        other.start()
        other.join(0.5)  # still waiting on this transaction
    other.join(30)
    assert not other.is_alive() and errors == []
    with sessions.begin() as s:
        journal.record_calibration(s, predictor)  # a restart records nothing new
        assert s.scalars(select(schema.CalibrationRecord.id)).all() == ["validation-abc"]
    eng.dispose()
