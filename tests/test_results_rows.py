"""results/rows.py: the one shape of a final row, bulk inserts and updates by id, calibrations recorded once."""

from __future__ import annotations

import datetime as dt

import pytest
from result_rows import result_row as _row
from sqlalchemy import select

from xr.results import rows, schema
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status

NOW = dt.datetime(2026, 1, 1, 12)


class _Model:
    model_id, threshold, temperature, calibration_id = "m-1", 0.5, 1.5, "cal-1"


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
        ids = rows.insert_rows(s, new)
        assert rows.insert_rows(s, []) == []
    with sessions() as s:
        got = [(s.get(Result, i).path, s.get(Result, i).sha256) for i in ids]
    assert got == [("/in/5.png", "a"), ("/in/3.png", None), ("/in/9.png", "b"), ("/in/1.png", None), ("/in/7.png", "c")]
    with sessions.begin() as s:
        rows.update_rows(
            s,
            [{"id": ids[1], "status": Status.OK, "logit": 1.5}, {"id": ids[2], "status": Status.ERROR, "error": "bad"}],
        )
        rows.update_rows(s, [])
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
                rows.record_calibration(s, predictor)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with sessions.begin() as s:
        rows.record_calibration(s, predictor)
        other = threading.Thread(target=second_worker)
        other.start()
        other.join(0.5)  # still waiting on this transaction
    other.join(30)
    assert not other.is_alive() and errors == []
    with sessions.begin() as s:
        rows.record_calibration(s, predictor)  # a restart records nothing new
        assert s.scalars(select(schema.CalibrationRecord.id)).all() == ["validation-abc"]
    eng.dispose()


def test_final_row_is_the_one_shape_of_a_result():
    row = rows.final_row(
        Status.OK,
        now=NOW,
        received_at=NOW - dt.timedelta(seconds=2),
        model=_Model(),
        score={"logit": 1.0, "probability": 0.9, "label": "PNEUMONIA", "flagged": True},
        worker="w",
    )
    assert row["latency_ms"] == pytest.approx(2000.0) and row["label"] == "PNEUMONIA" and row["threshold"] == 0.5
    gone = rows.final_row(Status.ERROR, now=NOW, received_at=NOW + dt.timedelta(seconds=1), error="x\udce9")
    assert gone["latency_ms"] == 0.0 and gone["model_id"] is None and gone["error"] == "x\\xe9"  # storable
