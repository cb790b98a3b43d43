"""The audit trail: who looked at or decided on which case, who signed in and who changed accounts.

Only :func:`record` writes, and only inserts: migration 0006 adds triggers that make the database refuse
an UPDATE or DELETE on ``audit`` whatever program sends it. xr-review records in the same transaction as
the change it audits; ``xr-results audit`` reads it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from xr.results.schema import AUDIT_COLUMNS, AuditEvent, Result, utcnow

ACTIONS = (
    "login",
    "login_failed",
    "logout",
    "view_queue",
    "view_case",
    "view_image",
    "view_heatmap",
    "review",
    "view_audit",
    "view_performance",
    "export",
    "user_added",
    "user_disabled",
    "user_enabled",
    "user_password_changed",
)
OUTCOMES = ("ok", "denied", "failed")


def record(
    s: Session,
    action: str,
    *,
    user: str | None,
    outcome: str = "ok",
    case: Result | None = None,
    remote_addr: str | None = None,
    detail: str | None = None,
) -> None:
    """Add one audit row to ``s``'s transaction (it is written when that transaction commits)."""
    if action not in ACTIONS or outcome not in OUTCOMES:
        raise ValueError(f"unknown audit action or outcome: {action!r}, {outcome!r}")
    s.add(
        AuditEvent(
            at=utcnow(),
            username=(user or None) and user[:128],
            action=action,
            outcome=outcome,
            result_id=case.id if case is not None else None,
            accession_number=case.accession_number if case is not None else None,
            patient_id=case.patient_id if case is not None else None,
            study_instance_uid=case.study_instance_uid if case is not None else None,
            remote_addr=(remote_addr or None) and remote_addr[:64],
            detail=(detail or None) and detail[:2000],
        )
    )


def query(
    s: Session,
    *,
    since: dt.datetime | None = None,
    user: str | None = None,
    action: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Audit rows, oldest first (the newest ``limit`` where given)."""
    stmt = select(AuditEvent)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if user:
        stmt = stmt.where(AuditEvent.username == user)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    stmt = stmt.order_by(AuditEvent.id.desc())
    if limit:
        stmt = stmt.limit(limit)
    rows = [{c: getattr(e, c) for c in AUDIT_COLUMNS} for e in s.scalars(stmt)]
    return rows[::-1]
