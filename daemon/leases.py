"""Claims and leases: what a worker holds, and what a stopped worker left.

Each claim (and each committed row whose file is not moved yet) carries the worker's id, a fencing token
and an expiry on the database's clock. With several daemons on one PostgreSQL database, thread ``xr-lease``
renews this worker's leases every third of ``daemon.lease_s``; a worker that stops (killed, frozen, cut
off) stops renewing, and once its leases run out the other workers take its files over (daemon/pipeline.py
``Claimer``), each takeover raising the token, so a worker that comes back finds its rows taken and writes
nothing (``db.still_held``). The same thread settles claims a stopped worker left on files that are no
longer there as they were (``settle_claim``), which a start does for a single daemon. With SQLite there
is one daemon per database and no lease is needed.
"""
from __future__ import annotations

import datetime as dt
import os

from sqlalchemy import select

from xr.daemon.db import CLAIMED, ERROR, Result, db_time, delete_rows, fs_path, renew_leases, utcnow
from xr.daemon.pipeline import Context, Stage

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
    row.status, row.error = ERROR, GONE
    row.processed_at, row.moved_at = now, now
    row.latency_ms = max(0.0, (now - row.received_at).total_seconds() * 1000)
    return "gone", GONE


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
                rows = s.scalars(select(Result).where(Result.status == CLAIMED, Result.lease_expires_at < stale)
                                 .order_by(Result.id).with_for_update(skip_locked=True)).all()  # fmt: skip
                now, released = utcnow(), []
                for row in rows:
                    outcome, reason = settle_claim(row, ctx.discovery, now)
                    if outcome == "redo":
                        continue
                    if outcome == "release":
                        released.append(row.id)
                    ctx.log.warning("claim_settled", file=row.path, id=row.id, from_worker=row.lease_holder,
                                    outcome=outcome, reason=reason)  # fmt: skip
                delete_rows(s, released)
                # Scored, and moved by a worker that stopped before it could record the move: record it.
                unrecorded = s.scalars(select(Result).where(Result.status != CLAIMED, Result.moved_at.is_(None),
                                                            Result.moved_to.is_not(None), Result.lease_expires_at < stale)
                                       .order_by(Result.id).with_for_update(skip_locked=True)).all()  # fmt: skip
                for row in unrecorded:
                    if os.path.lexists(fs_path(row.path)):
                        continue  # still in the inbox: a claim takes it over and moves it
                    ctx.log.warning("move_recorded", file=row.path, id=row.id, from_worker=row.lease_holder,
                                    reason="its worker moved the file and stopped before recording it")  # fmt: skip
                    row.moved_to = row.moved_to if os.path.lexists(row.moved_to) else None
                    row.moved_at, row.lease_holder, row.lease_token = now, ctx.worker_id, row.lease_token + 1
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal
            ctx.log.error("claim_sweep_failed", worker_id=ctx.worker_id, reason=f"{type(exc).__name__}: {exc}")


def default_worker_id() -> str:
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
