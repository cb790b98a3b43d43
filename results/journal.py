"""The journal: the claim/lease state machine of results rows, and the row writes the pipeline makes.

A row is written ``claimed`` before a file is decoded, the batch commit turns it final in one
transaction, and only then is the file moved (``moved_to`` is chosen in that commit, ``moved_at`` set after
the move). With several workers on one database each claim carries a lease (holder, fencing token, expiry
on the database's clock); every later write re-checks the token (``still_held``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from xr.results.schema import CalibrationRecord, Result, Status, fs_path, utcnow

Identity = tuple[str, int, int]  # (path, size_bytes, mtime_ns) of a file in the inbox


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


def first_ok_by_sop(s: Session, sops: list[str]) -> dict[str, int]:
    """SOPInstanceUID -> id of the first ``ok`` row of that DICOM instance (re-exports differ in bytes)."""
    if not sops:
        return {}
    out: dict[str, int] = {}
    stmt = select(Result.sop_instance_uid, Result.id).where(
        Result.sop_instance_uid.in_(set(sops)), Result.status == Status.OK
    )
    for sop, rid in s.execute(stmt.order_by(Result.id)):
        out.setdefault(sop, rid)
    return out


def first_ok_by_sha(s: Session, shas: list[str]) -> dict[str, int]:
    """sha256 -> id of the first ``ok`` row with that content."""
    if not shas:
        return {}
    out: dict[str, int] = {}
    stmt = select(Result.sha256, Result.id).where(Result.sha256.in_(set(shas)), Result.status == Status.OK)
    for sha, rid in s.execute(stmt.order_by(Result.id)):
        out.setdefault(sha, rid)
    return out


# -- claims and leases: several workers on one database ---------------------------------------------------
def db_time(s: Session) -> float:
    """Now on the database's clock (epoch seconds), which all workers share; the local clock on SQLite."""
    if s.get_bind().dialect.name == "postgresql":
        return float(s.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar())

    return time.time()


# PostgreSQL advisory lock between claims and the CSV exporter. A sequence hands out ids outside any
# transaction, so a claim not yet committed can hold a lower id than rows already final; every claim
# transaction holds this lock shared, and the exporter takes it alone for a moment to learn the highest id
# that no claim in flight can undercut (export.py ``pending_rows``). SQLite has one writer: ids come in order.
CLAIM_FENCE = 7_265_081_134


def claim_fence(s: Session) -> None:
    """Call first in a transaction that inserts claims."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": CLAIM_FENCE})


def settled_horizon(s: Session) -> int | None:
    """PostgreSQL: the highest row id once every claim transaction in flight has ended; rows up to it can
    no longer be joined by a lower id. Ends the session's transaction. None on SQLite (no need)."""
    if s.get_bind().dialect.name != "postgresql":
        return None
    s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CLAIM_FENCE})
    horizon = s.scalar(select(func.max(Result.id)))
    s.commit()
    return horizon or 0


def try_claim(s: Session, row: dict[str, Any]) -> int | None:
    """Insert a ``claimed`` row unless another row already owns the file (``ux_results_inbox_identity``):
    its id, or None. The database decides, atomically, which worker gets a file."""
    stmt = (
        insert_or_ignore(s, Result)
        .values(**row)
        .on_conflict_do_nothing(
            index_elements=["path", "size_bytes", "mtime_ns"], index_where=Result.moved_at.is_(None)
        )
        .returning(Result.id)
    )
    return s.execute(stmt).scalar()


def owner_of(s: Session, identity: Identity) -> Row | None:
    """The row that owns an inbox file, locked until the transaction ends (PostgreSQL; SQLite's write lock
    covers it already). None as well when another transaction has it locked: its worker is busy with it."""
    path, size, mtime = identity
    stmt = select(
        Result.id,
        Result.status,
        Result.lease_holder,
        Result.lease_token,
        Result.lease_expires_at,
        Result.moved_to,
        Result.received_at,
    ).where(Result.path == path, Result.size_bytes == size, Result.mtime_ns == mtime, Result.moved_at.is_(None))
    return s.execute(stmt.with_for_update(skip_locked=True)).first()


def take_over(s: Session, row_id: int, token: int, worker: str, expires: float) -> bool:
    """Make ``worker`` the row's holder with a new fencing token, if nobody changed it since ``token`` was read."""
    res = s.execute(
        update(Result)
        .where(Result.id == row_id, Result.lease_token == token)
        .values(lease_holder=worker, lease_token=token + 1, lease_expires_at=expires)
    )
    return res.rowcount == 1


def still_held(s: Session, tokens: dict[int, int], worker: str) -> set[int]:
    """Of these rows (id -> the token the worker claimed them with), those it still holds, locked for the
    rest of the transaction: a worker presumed dead and back writes nothing to a row taken from it."""
    if not tokens:
        return set()
    rows = s.execute(
        select(Result.id, Result.lease_token)
        .where(Result.id.in_(list(tokens)), Result.lease_holder == worker)
        .order_by(Result.id)
        .with_for_update()
    ).all()  # one lock order for every transaction: no deadlock
    return {r.id for r in rows if r.lease_token == tokens[r.id]}


def renew_leases(s: Session, worker: str, expires: float) -> int:
    """Extend every lease ``worker`` holds: claims, and committed rows whose file it has not moved yet.
    Rows locked right now (this worker committing them, another taking them over) wait for the next
    renewal rather than the lock: a renewal never takes part in a deadlock."""
    pending = (Result.status == Status.CLAIMED) | (Result.moved_to.is_not(None))
    ids = select(Result.id).where(Result.lease_holder == worker, Result.moved_at.is_(None), pending)
    ids = ids.with_for_update(skip_locked=True)  # SQLite renders no FOR UPDATE: its write lock covers it
    res = s.execute(update(Result).where(Result.id.in_(ids.scalar_subquery())).values(lease_expires_at=expires))
    return res.rowcount


GONE = "file left the inbox before it was processed"


def settle_claim(row: Result, discovery, now: dt.datetime) -> tuple[str, str]:
    """What to do with a claim its worker left, and why: ``redo`` (the file is there as claimed: a scan
    finds it and the claim takes this row over), ``release`` (delete the row: the file is not this daemon's
    to read, or was written on since, and the file as it is now is new work) or ``gone`` (the file left the
    inbox: the row becomes an error, here). A claimed row left as it is would hold back every later row
    from the CSVs, so none is left."""
    path = fs_path(row.path)
    if not discovery.would_read(path):
        return "release", "not a file this daemon reads (claimed by a run with another watch folder or suffixes)"
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None:
        if (st.st_size, st.st_mtime_ns) == (row.size_bytes, row.mtime_ns):
            return "redo", "the file is there as claimed"
        return "release", "the file changed since it was claimed"
    row.status, row.error = Status.ERROR, GONE
    row.processed_at, row.moved_at = now, now
    row.latency_ms = max(0.0, (now - row.received_at).total_seconds() * 1000)
    return "gone", GONE
