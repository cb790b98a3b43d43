"""The DICOM outbox: objects (SR, SC) for the PACS, committed before they are sent.

An item is one encoded object for one destination. It is inserted once (the pair destination + SOP Instance
UID is unique, and the UID is derived from the result), claimed by one sender at a time, and then marked
``sent`` when the PACS answered Success, retried later with a growing backoff when it did not, or marked
``failed`` once its ``give_up_at`` has passed. A sender that dies between its C-STORE and the mark leaves the
item pending: after the claim's hold runs out it is sent again with the same UID, which a PACS stores as
the same instance. All times are the database's clock (epoch seconds), which every worker shares.

Several workers on PostgreSQL: a claim takes the due rows ``FOR UPDATE SKIP LOCKED`` and moves their
``next_attempt_at`` past the hold in the same transaction, so each item is with one sender at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from xr.results.journal import db_time
from xr.results.rows import insert_or_ignore
from xr.results.schema import OUTBOX_KINDS, OutboxItem, utcnow

PENDING, SENT, FAILED = "pending", "sent", "failed"


@dataclass(frozen=True)
class Claimed:
    """An item handed to a sender: what it needs to send and mark it."""

    id: int
    result_id: int
    kind: str
    destination: str
    sop_instance_uid: str
    data: bytes
    attempts: int  # including this one


def enqueue(
    s: Session,
    *,
    result_id: int,
    kind: str,
    destination: str,
    data: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    study_instance_uid: str | None,
    give_up_after_s: float,
) -> bool:
    """Add one object for one destination; False where that destination already has this UID (queued,
    sent or failed: never a second copy)."""
    if kind not in OUTBOX_KINDS:
        raise ValueError(f"outbox kind {kind!r}: expected one of {', '.join(OUTBOX_KINDS)}")
    now = db_time(s)
    stmt = insert_or_ignore(s, OutboxItem).values(
        result_id=result_id,
        kind=kind,
        destination=destination,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        data=data,
        status=PENDING,
        attempts=0,
        next_attempt_at=now,
        give_up_at=now + give_up_after_s,
        created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"]).returning(OutboxItem.id)
    return s.execute(stmt).first() is not None


def has_item(s: Session, result_id: int, kind: str, destination: str) -> bool:
    q = select(OutboxItem.id).where(
        OutboxItem.result_id == result_id, OutboxItem.kind == kind, OutboxItem.destination == destination
    )
    return s.execute(q.limit(1)).first() is not None


def claim_due(s: Session, worker_id: str, limit: int, hold_s: float) -> list[Claimed]:
    """Up to ``limit`` pending items whose time has come, SRs first then oldest first, held for this sender for ``hold_s``
    (their ``next_attempt_at`` moves past it, so no other sender takes them meanwhile)."""
    now = db_time(s)
    rows = s.execute(
        select(OutboxItem.id, OutboxItem.attempts)
        .where(OutboxItem.status == PENDING, OutboxItem.next_attempt_at <= now)
        .order_by(OutboxItem.kind.desc(), OutboxItem.next_attempt_at, OutboxItem.id)  # reports (sr) first
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    s.execute(
        update(OutboxItem)
        .where(OutboxItem.id.in_(ids))
        .values(claimed_by=worker_id, next_attempt_at=now + hold_s, attempts=OutboxItem.attempts + 1)
    )
    got = s.execute(
        select(
            OutboxItem.id,
            OutboxItem.result_id,
            OutboxItem.kind,
            OutboxItem.destination,
            OutboxItem.sop_instance_uid,
            OutboxItem.data,
            OutboxItem.attempts,
        )
        .where(OutboxItem.id.in_(ids))
        .order_by(OutboxItem.id)
    ).all()
    return [Claimed(*r) for r in got]


def mark_sent(s: Session, item_id: int) -> None:
    """The PACS has it: done. The object's bytes are dropped (the UID alone says what was sent)."""
    s.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id, OutboxItem.status == PENDING)
        .values(status=SENT, sent_at=utcnow(), data=None, last_error=None)
    )


def release(s: Session, item_ids: list[int], worker_id: str) -> None:
    """Claimed items this sender did not try (it is stopping): due again now, the attempt not counted."""
    if item_ids:
        s.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(item_ids), OutboxItem.status == PENDING, OutboxItem.claimed_by == worker_id)
            .values(next_attempt_at=db_time(s), attempts=OutboxItem.attempts - 1)
        )


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Wait before attempt ``attempts + 1``: initial, doubling, capped."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1))


def mark_attempt_failed(
    s: Session, item_id: int, worker_id: str, error: str, *, initial_s: float, max_s: float
) -> str | None:
    """A send that did not end in Success: retry after the backoff, or ``failed`` once past ``give_up_at``.
    Returns the item's new status (None where another sender has taken it meanwhile)."""
    now = db_time(s)
    row = s.execute(
        select(OutboxItem.attempts, OutboxItem.give_up_at)
        .where(OutboxItem.id == item_id, OutboxItem.status == PENDING, OutboxItem.claimed_by == worker_id)
        .with_for_update()
    ).first()
    if row is None:
        return None
    if now >= row.give_up_at:
        s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(status=FAILED, last_error=error[:2000]))
        return FAILED
    wait = backoff_s(row.attempts, initial_s, max_s)
    s.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id)
        .values(next_attempt_at=min(now + wait, max(row.give_up_at, now)), last_error=error[:2000])
    )
    return PENDING


def retry_failed(s: Session, give_up_after_s: float, ids: Iterable[int] | None = None) -> int:
    """Put failed items back in the queue (the operator's ``xr-results outbox retry``); how many."""
    now = db_time(s)
    q = update(OutboxItem).where(OutboxItem.status == FAILED, OutboxItem.data.is_not(None))
    if ids is not None:
        q = q.where(OutboxItem.id.in_(list(ids)))
    res = s.execute(q.values(status=PENDING, next_attempt_at=now, give_up_at=now + give_up_after_s, attempts=0))
    return res.rowcount or 0


def counts(s: Session) -> dict[tuple[str, str], int]:
    """(destination, status) -> items."""
    rows = s.execute(
        select(OutboxItem.destination, OutboxItem.status, func.count()).group_by(
            OutboxItem.destination, OutboxItem.status
        )
    ).all()
    return {(d, st): n for d, st, n in rows}


def items(s: Session, status: str | None = None, limit: int | None = None) -> list[Any]:
    q = select(OutboxItem).order_by(OutboxItem.id.desc())
    if status is not None:
        q = q.where(OutboxItem.status == status)
    if limit is not None:
        q = q.limit(limit)
    return list(s.scalars(q))


def state_by_result(s: Session, result_ids: list[int]) -> dict[int, str]:
    """Per result: ``sent`` when every object reached every destination, else ``failed`` or ``pending``
    (for ``xr-results list``)."""
    if not result_ids:
        return {}
    out: dict[int, set[str]] = {}
    for i in range(0, len(result_ids), 500):  # bounded IN lists (SQLite caps bound parameters)
        chunk = result_ids[i : i + 500]
        for rid, st in s.execute(
            select(OutboxItem.result_id, OutboxItem.status).where(OutboxItem.result_id.in_(chunk))
        ).all():
            out.setdefault(rid, set()).add(st)
    return {rid: FAILED if FAILED in sts else PENDING if PENDING in sts else SENT for rid, sts in out.items()}
