"""Claims and leases: what a worker holds, and what a stopped worker left.

Each claim (and each committed row whose file is not moved yet) carries the worker's id, a fencing token
and an expiry on the database's clock. With several daemons on one PostgreSQL database, thread ``xr-lease``
renews this worker's leases every third of ``daemon.lease_s``; a worker that stops (killed, frozen, cut
off) stops renewing, and once its leases run out the other workers take its files over (daemon/pipeline.py
``Claimer``), each takeover raising the token, so a worker that comes back finds its rows taken and writes
nothing (``journal.still_held``). The same thread settles claims a stopped worker left on files that are no
longer there as they were (``settle_claim``), which a start does for a single daemon. With SQLite there
is one daemon per database and no lease is needed.
"""

from __future__ import annotations

import os

from sqlalchemy import select

from xr.daemon.pipeline import Context, Stage
from xr.results.journal import db_time, delete_rows, renew_leases, settle_claim
from xr.results.schema import Result, Status, fs_path, utcnow


class LeaseKeeper(Stage):
    name = "xr-lease"

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx
        self.renewals = 0

    def run(self) -> None:
        while not self.halt.wait(self.ctx.lease_s / 3):
            self.renew()
            self.sweep()

    def renew(self) -> None:
        ctx = self.ctx
        try:
            with ctx.sessions.begin() as s:
                n = renew_leases(s, ctx.worker_id, db_time(s) + ctx.lease_s)
        except Exception as exc:  # noqa: BLE001 - a database that is away now may be back at the next renewal
            ctx.log.error("lease_renewal_failed", worker_id=ctx.worker_id, reason=f"{type(exc).__name__}: {exc}")
            return
        self.renewals += 1
        ctx.log.debug("leases_renewed", worker_id=ctx.worker_id, rows=n)

    def sweep(self) -> None:
        """Settle rows whose lease ran out a whole lease ago and whose file is no longer there as claimed.
        A row whose file is still there is left to the claim path, which takes it over."""
        ctx = self.ctx
        try:
            with ctx.sessions.begin() as s:
                stale = db_time(s) - ctx.lease_s
                rows = s.scalars(
                    select(Result)
                    .where(Result.status == Status.CLAIMED, Result.lease_expires_at < stale)
                    .order_by(Result.id)
                    .with_for_update(skip_locked=True)
                ).all()
                now, released = utcnow(), []
                for row in rows:
                    outcome, reason = settle_claim(row, ctx.discovery, now)
                    if outcome == "redo":
                        continue
                    if outcome == "release":
                        released.append(row.id)
                    ctx.log.warning(
                        "claim_settled",
                        file=row.path,
                        id=row.id,
                        from_worker=row.lease_holder,
                        outcome=outcome,
                        reason=reason,
                    )
                delete_rows(s, released)
                # Scored, and moved by a worker that stopped before it could record the move: record it.
                unrecorded = s.scalars(
                    select(Result)
                    .where(
                        Result.status != Status.CLAIMED,
                        Result.moved_at.is_(None),
                        Result.moved_to.is_not(None),
                        Result.lease_expires_at < stale,
                    )
                    .order_by(Result.id)
                    .with_for_update(skip_locked=True)
                ).all()
                for row in unrecorded:
                    if os.path.lexists(fs_path(row.path)):
                        continue  # still in the inbox: a claim takes it over and moves it
                    ctx.log.warning(
                        "move_recorded",
                        file=row.path,
                        id=row.id,
                        from_worker=row.lease_holder,
                        reason="its worker moved the file and stopped before recording it",
                    )
                    row.moved_to = row.moved_to if os.path.lexists(row.moved_to) else None
                    row.moved_at, row.lease_holder, row.lease_token = now, ctx.worker_id, row.lease_token + 1
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal
            ctx.log.error("claim_sweep_failed", worker_id=ctx.worker_id, reason=f"{type(exc).__name__}: {exc}")


def default_worker_id() -> str:
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
