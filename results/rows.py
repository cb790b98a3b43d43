"""Results rows outside the claim/lease state machine: the one shape of a final row (:func:`final_row`, used
by the daemon's batch commit, a claim settled as gone and xr-score's import), and the plain reads and writes
the journal, the CSV export, the heatmaps and xr-score share."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from xr.results.schema import CalibrationRecord, Result, Status, storable, utcnow

SCORE_COLUMNS = ("logit", "probability", "label", "flagged")


def final_row(
    status: Status,
    *,
    now: dt.datetime,
    received_at: dt.datetime,
    model: Any = None,
    score: Any = None,
    error: str | None = None,
    duplicate_of: int | None = None,
    worker: str | None = None,
    batch_id: int | None = None,
) -> dict[str, Any]:
    """The columns a row gets when it turns final: the one place results rows are built (the daemon's
    batch commit, a claim settled as gone, xr-score's import). ``model``: the predictor that scored it
    (model_id, threshold, temperature, calibration_id); ``score``: a prediction or a row with logit,
    probability, label and flagged (an ``ok`` row's, or a duplicate's first)."""
    row: dict[str, Any] = {
        "status": status,
        "error": None if error is None else storable(error),
        "duplicate_of": duplicate_of,
        "processed_at": now,
        "latency_ms": max(0.0, (now - received_at).total_seconds() * 1000),
        "worker_id": worker,
        "batch_id": batch_id,
        "audit": False,  # commit_batch draws the audit sample among the unflagged ok rows
    }
    for col in ("model_id", "threshold", "temperature", "calibration_id"):
        row[col] = getattr(model, col, None)
    for col in SCORE_COLUMNS:
        row[col] = None if score is None else (score[col] if isinstance(score, dict) else getattr(score, col))
    return row


def insert_rows(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert these ``results`` rows; their ids, in the order given.

    INSERT ... RETURNING where the database can return ids in parameter order (SQLAlchemy batches the rows
    on PostgreSQL; on SQLite 3.35+ it is still one statement per row, minus the ORM's per-object work);
    elsewhere (MySQL, older SQLite) one plain INSERT per row, each id read from its cursor.
    """
    if not rows:
        return []
    if s.get_bind().dialect.insert_executemany_returning_sort_by_parameter_order:
        stmt = insert(Result).returning(Result.id, sort_by_parameter_order=True)
        return list(s.scalars(stmt, rows))
    return [s.execute(insert(Result).values(**row)).inserted_primary_key[0] for row in rows]


def insert_or_ignore(s: Session, table: Any):
    """The dialect's INSERT, which has ``on_conflict_do_nothing`` (SQLite and PostgreSQL spell it alike)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table)


def record_calibration(s: Session, predictor: Any) -> None:
    """The predictor's calibration in ``calibrations`` (once per id): rows name it, the drift watch reads
    its reference. Workers starting together may both record it: the first insert wins."""
    cal = predictor.calibration
    stmt = insert_or_ignore(s, CalibrationRecord).values(
        id=cal.id,
        model_id=predictor.model_id,
        kind=cal.kind,
        path=cal.source,
        temperature=cal.temperature,
        shift=cal.shift,
        threshold=cal.threshold,
        first_used_at=utcnow(),
        reference=json.dumps(cal.reference) if cal.reference is not None else None,
    )
    s.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))


def delete_rows(s: Session, ids: list[int]) -> None:
    """Delete these ``results`` rows (claims given back: their files are new work again)."""
    if ids:
        s.execute(delete(Result).where(Result.id.in_(ids)))


def update_rows(s: Session, rows: list[dict[str, Any]]) -> None:
    """Update ``results`` rows by primary key (each dict has ``id``), as one executemany per set of keys."""
    if rows:
        s.execute(update(Result), rows)


def scores_by_id(s: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """id -> {logit, probability, label, flagged} of these rows, in one query."""
    if not ids:
        return {}
    stmt = select(Result.id, Result.logit, Result.probability, Result.label, Result.flagged)
    return {r.id: r._asdict() for r in s.execute(stmt.where(Result.id.in_(set(ids))))}


def _first_ok_by(s: Session, column: Any, keys: list[str]) -> dict[str, int]:
    """``column`` value -> id of the first ``ok`` row with that value, in one query."""
    if not keys:
        return {}
    out: dict[str, int] = {}
    stmt = select(column, Result.id).where(column.in_(set(keys)), Result.status == Status.OK)
    for key, rid in s.execute(stmt.order_by(Result.id)):
        out.setdefault(key, rid)
    return out


def first_ok_by_sop(s: Session, sops: list[str]) -> dict[str, int]:
    """SOPInstanceUID -> id of the first ``ok`` row of that DICOM instance (re-exports differ in bytes)."""
    return _first_ok_by(s, Result.sop_instance_uid, sops)


def first_ok_by_sha(s: Session, shas: list[str]) -> dict[str, int]:
    """sha256 -> id of the first ``ok`` row with that content."""
    return _first_ok_by(s, Result.sha256, shas)
