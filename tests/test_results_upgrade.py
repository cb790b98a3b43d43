"""Upgrading a 0.2.0 results database: a database at the 0.2.0 schema (migrations up to 0005) with rows of
every kind, opened by the current code (``make_engine``), keeps every row and column and ends at the head
revision, on SQLite and PostgreSQL. Later migrations (0006 users/audit, 0007 outbox, ...) need no change here:
the rows are written at 0005 and read back by reflecting whatever the head schema is."""

from __future__ import annotations

import datetime as dt

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, select, text

from xr.results.engine import _alembic, make_engine, session_factory
from xr.results.schema import SCHEMA_VERSION, Result, Review, Status

PREVIOUS_RELEASE = "0005"  # xr-triage 0.2.0's head revision (CHANGELOG.md)
T0 = dt.datetime(2026, 11, 30, 8, 15, 1, 123456)


def _t(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


DICOM = {
    "patient_id": "PAT-0001",
    "accession_number": "ACC-7781",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "sop_instance_uid": "1.2.826.0.1.3680043.8.498.3",
    "modality": "CR",
    "body_part": "CHEST",
    "view_position": "PA",
    "study_date": "20261130",
}


def _rows() -> dict[str, list[dict]]:
    """Rows as xr-daemon 0.2.0 wrote them, one per status and kind, every 0005 column set somewhere."""
    calibrations = [
        {
            "id": "c" * 64,
            "model_id": "m" * 64,
            "kind": "validation",
            "path": "/opt/xr/models/calibration_threshold.json",
            "temperature": 1.37,
            "shift": 0.0,
            "threshold": 0.62,
            "reference": '{"flagged_rate": 0.41, "bins": [0.1, 0.2]}',
            "first_used_at": _t(0),
        },
        {
            "id": "d" * 64,
            "model_id": "m" * 64,
            "kind": "site",
            "path": "/etc/xr-triage/site.json",
            "temperature": 1.21,
            "shift": -0.35,
            "threshold": 0.55,
            "reference": None,
            "first_used_at": _t(50),
        },
    ]
    batches = [
        {
            "id": 1,
            "created_at": _t(1),
            "size": 3,
            "n_ok": 1,
            "n_error": 1,
            "n_duplicate": 1,
            "wait_ms": 12.5,
            "model_ms": 80.25,
            "model_id": "m" * 64,
        },
        {
            "id": 2,
            "created_at": _t(60),
            "size": 1,
            "n_ok": 1,
            "n_error": 0,
            "n_duplicate": 0,
            "wait_ms": 0.0,
            "model_ms": 77.0,
            "model_id": "m" * 64,
        },
    ]
    base = {
        "size_bytes": 123_456,
        "threshold": 0.62,
        "model_id": "m" * 64,
        "temperature": 1.37,
        "calibration_id": "c" * 64,
        "worker_id": "host-a-4242",
        "lease_token": 0,
    }
    results = [
        {  # a flagged DICOM film, scored, moved, with a heatmap and two reviews
            **base,
            **DICOM,
            "id": 1,
            "path": "/srv/xr/inbox/IM-1.dcm",
            "filename": "IM-1.dcm",
            "mtime_ns": 1_764_000_000_000_000_001,
            "sha256": "a" * 64,
            "status": Status.OK.value,
            "logit": 2.5,
            "probability": 0.8641,
            "label": "PNEUMONIA",
            "flagged": True,
            "batch_id": 1,
            "received_at": _t(0.5),
            "claimed_at": _t(0.6),
            "processed_at": _t(1),
            "latency_ms": 500.0,
            "moved_to": "/srv/xr/output/processed/IM-1.dcm",
            "moved_at": _t(1.1),
            "heatmap_path": "/srv/xr/output/heatmaps/1.png",
        },
        {
            **base,
            "id": 2,
            "path": "/srv/xr/inbox/IM-2.png",
            "filename": "IM-2.png",
            "mtime_ns": 2,
            "sha256": "b" * 64,
            "status": Status.ERROR.value,
            "error": "cannot decode: truncated PNG",
            "batch_id": 1,
            "received_at": _t(0.7),
            "claimed_at": _t(0.7),
            "processed_at": _t(1),
            "latency_ms": 300.0,
            "moved_to": "/srv/xr/output/failed/IM-2.png",
            "moved_at": _t(1.2),
        },
        {  # the same bytes as row 1 under another name: carries its score
            **base,
            **DICOM,
            "id": 3,
            "path": "/srv/xr/inbox/IM-1-copy.dcm",
            "filename": "IM-1-copy.dcm",
            "mtime_ns": 3,
            "sha256": "a" * 64,
            "status": Status.DUPLICATE.value,
            "duplicate_of": 1,
            "logit": 2.5,
            "probability": 0.8641,
            "label": "PNEUMONIA",
            "flagged": True,
            "batch_id": 1,
            "received_at": _t(0.8),
            "claimed_at": _t(0.8),
            "processed_at": _t(1),
            "latency_ms": 200.0,
            "moved_to": "/srv/xr/output/processed/IM-1-copy.dcm",
            "moved_at": _t(1.3),
        },
        {  # a DICOM object out of scope (not a chest CR/DX)
            **base,
            "id": 4,
            "path": "/srv/xr/inbox/CT-1.dcm",
            "filename": "CT-1.dcm",
            "mtime_ns": 4,
            "sha256": "e" * 64,
            "status": Status.SKIPPED.value,
            "error": "modality CT is not scored",
            "modality": "CT",
            "body_part": "HEAD",
            "received_at": _t(2),
            "claimed_at": _t(2),
            "processed_at": _t(2),
            "moved_to": "/srv/xr/output/skipped/CT-1.dcm",
            "moved_at": _t(2.1),
        },
        {  # a normal film scored with the site calibration, left in place (daemon.on_success: leave)
            **base,
            "id": 5,
            "path": "/srv/xr/inbox/IM-5.jpeg",
            "filename": "IM-5.jpeg",
            "mtime_ns": 5,
            "sha256": "f" * 64,
            "status": Status.OK.value,
            "logit": -3.0,
            "probability": 0.0474,
            "label": "NORMAL",
            "flagged": False,
            "calibration_id": "d" * 64,
            "threshold": 0.55,
            "temperature": 1.21,
            "batch_id": 2,
            "received_at": _t(59),
            "claimed_at": _t(59.5),
            "processed_at": _t(60),
            "latency_ms": 1000.0,
        },
        {  # claimed by a worker that stopped before its batch: redone on the next start
            **base,
            "id": 6,
            "path": "/srv/xr/inbox/IM-6.png",
            "filename": "IM-6.png",
            "mtime_ns": 6,
            "status": Status.CLAIMED.value,
            "received_at": _t(61),
            "claimed_at": _t(61),
            "lease_holder": "host-b-77",
            "lease_token": 3,
            "lease_expires_at": 1_764_490_000.5,
        },
    ]
    reviews = [
        {
            "id": 1,
            "result_id": 1,
            "decision": "confirm",
            "note": "RLL consolidation",
            "reviewer": "dr-a",
            "reviewed_at": _t(600),
        },
        {"id": 2, "result_id": 1, "decision": "dismiss", "note": None, "reviewer": "dr-b", "reviewed_at": _t(700)},
    ]
    meta = [{"key": "schema_version", "value": "5"}, {"key": "last_exported_id", "value": "5"}]
    return {
        "calibrations": calibrations,
        "batches": batches,
        "results": results,
        "reviews": reviews,
        "meta": meta,
    }


KEYS = {"calibrations": "id", "batches": "id", "results": "id", "reviews": "id", "meta": "key"}


def _tables(conn) -> dict:
    md = MetaData()
    md.reflect(conn)
    return md.tables


def _make_previous_release(url: str) -> dict[str, list[dict]]:
    """The 0.2.0 database: migrations up to 0005 only, then 0.2.0's rows, written through the 0005 tables."""
    rows = _rows()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic(conn), PREVIOUS_RELEASE)
            tables = _tables(conn)
            for name in ("calibrations", "batches", "results", "reviews", "meta"):
                cols = list(tables[name].c.keys())
                extra = {k for row in rows[name] for k in row} - set(cols)
                assert not extra, f"{name}: {extra} not in the 0005 schema"
                rows[name] = [{c: row.get(c) for c in cols} for row in rows[name]]  # every column, NULLs too
                conn.execute(tables[name].insert(), rows[name])
            if conn.dialect.name == "postgresql":  # explicit ids: move the sequences on as 0.2.0's inserts did
                for name in ("batches", "results", "reviews"):
                    conn.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
                    )
            assert MigrationContext.configure(conn).get_current_revision() == PREVIOUS_RELEASE
    finally:
        engine.dispose()
    return rows


def test_a_0_2_0_database_upgrades_with_every_row_and_column(any_db):
    from xr.results.engine import db_url

    url = db_url(any_db)
    before = _make_previous_release(url)

    engine = make_engine(any_db)  # what xr-daemon does at start: migrate to the head in one transaction
    try:
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(_alembic(conn)).get_current_head()
            assert MigrationContext.configure(conn).get_current_revision() == head
            tables = _tables(conn)
            for name, rows in before.items():
                key = tables[name].c[KEYS[name]]
                got = {r[KEYS[name]]: r for r in conn.execute(select(tables[name])).mappings()}
                if name == "meta":
                    assert got["schema_version"]["value"] == str(SCHEMA_VERSION)
                    rows = [r for r in rows if r["key"] != "schema_version"]
                else:
                    assert len(got) == len(rows), f"{name}: {len(got)} rows after the upgrade, {len(rows)} before"
                for row in rows:
                    have = got.get(row[KEYS[name]])
                    assert have is not None, f"{name} {key.name}={row[KEYS[name]]} is gone"
                    for col, value in row.items():
                        if (name, col) == ("reviews", "decision"):  # 0008: one vocabulary
                            value = {"confirm": "pneumonia", "dismiss": "normal"}[value]
                        assert have[col] == value, f"{name} {row[KEYS[name]]}.{col}: {have[col]!r} != {value!r}"

        # and the current models read them, every status among them
        with session_factory(engine)() as s:
            statuses = {r.status for r in s.scalars(select(Result))}
            assert statuses == {st.value for st in Status}
            flagged = s.get(Result, 1)
            assert flagged.accession_number == "ACC-7781" and flagged.flagged is True
            assert [r.decision for r in s.scalars(select(Review).order_by(Review.id))] == ["pneumonia", "normal"]
            assert flagged.audit is False and flagged.manufacturer is None
            new = Result(
                path="/srv/xr/inbox/new.png",
                filename="new.png",
                size_bytes=1,
                mtime_ns=7,
                status=Status.CLAIMED,
                received_at=_t(900),
                claimed_at=_t(900),
            )
            s.add(new)
            s.commit()
            assert new.id == 7  # ids carry on after the old rows
    finally:
        engine.dispose()
    make_engine(any_db).dispose()  # a second start finds nothing left to do


def test_0008_renames_old_decisions_and_adds_audit_and_scanner_columns(any_db):
    """A 0007 database with confirm/dismiss reviews: 0008 makes them pneumonia/normal, every result row an
    unsampled film (audit false), and its downgrade gives the old words back."""
    from xr.results.engine import db_url

    url = db_url(any_db)
    engine = create_engine(url)
    rows = _rows()
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic(conn), "0007")
            tables = _tables(conn)
            for name in ("calibrations", "batches", "results", "reviews"):
                for row in rows[name]:  # one at a time: the rows set different columns
                    conn.execute(tables[name].insert().values(**row))
            conn.execute(tables["reviews"].insert().values(**{**rows["reviews"][1], "id": 3, "decision": "confirm"}))
            conn.execute(tables["meta"].insert(), [{"key": "schema_version", "value": "7"}])
            if conn.dialect.name == "postgresql":
                for name in ("batches", "results", "reviews"):
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), 100)"))
    finally:
        engine.dispose()
    engine = make_engine(any_db)
    try:
        with session_factory(engine)() as s:
            decisions = [r.decision for r in s.scalars(select(Review).order_by(Review.id))]
            assert decisions == ["pneumonia", "normal", "pneumonia"]
            assert {r.audit for r in s.scalars(select(Result))} == {False}
            assert {(r.manufacturer, r.station_name) for r in s.scalars(select(Result))} == {(None, None)}
        with engine.begin() as conn:
            command.downgrade(_alembic(conn), "0007")
            back = conn.execute(text("SELECT decision FROM reviews ORDER BY id")).scalars().all()
            assert back == ["confirm", "dismiss", "confirm"]
            assert "audit" not in _tables(conn)["results"].c
    finally:
        engine.dispose()
