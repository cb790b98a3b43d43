"""Stage ``xr-lease``: keep this worker's leases and settle what stopped workers left (several daemons on
one PostgreSQL database; with SQLite there is one daemon per database and no lease is needed).

Each claim (and each committed row whose file is not moved yet) carries the worker's id, a fencing token
and an expiry on the database's clock. Every third of ``daemon.lease_s`` this stage renews this worker's
leases; a worker that stops (killed, frozen, cut off) stops renewing, and once its leases run out the others
take its files over (results/journal.py ``claim_files``), each takeover raising the token, so a worker that
comes back finds its rows taken and writes nothing (``journal.still_held``). The same step sweeps what a
stopped worker left on files that are no longer there as it claimed them (results/settle.py ``sweep``), which a start
does for a single daemon.
"""

from __future__ import annotations

import os

from xr.daemon.discovery import Discovery
from xr.daemon.runtime import Runtime
from xr.daemon.stage import Stage
from xr.results import journal, settle
from xr.results.schema import utcnow


class LeaseKeeper(Stage):
    name = "xr-lease"

    def __init__(self, rt: Runtime, discovery: Discovery):
        super().__init__()
        self.rt, self.discovery = rt, discovery
        self.idle_s = rt.daemon.lease_s / 3  # one renewal per step
        self.renewals = 0

    def step(self, now: float) -> bool:
        self.renew()
        self.sweep()
        return False

    def renew(self) -> None:
        rt = self.rt
        try:
            with rt.sessions.begin() as s:
                n = journal.renew_leases(s, rt.worker_id, journal.db_time(s) + rt.daemon.lease_s)
        except Exception as exc:  # noqa: BLE001 - a database that is away now may be back at the next renewal
            rt.log.error("lease_renewal_failed", worker_id=rt.worker_id, reason=f"{type(exc).__name__}: {exc}")
            return
        self.renewals += 1
        rt.log.debug("leases_renewed", worker_id=rt.worker_id, rows=n)

    def sweep(self) -> None:
        """Settle claims whose lease ran out a whole lease ago and whose file is gone or changed, and record
        moves a stopped worker made but did not record."""
        rt = self.rt
        try:
            with rt.sessions.begin() as s:
                done = settle.sweep(s, self.discovery.would_read, rt.lease, utcnow())
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal
            rt.log.error("claim_sweep_failed", worker_id=rt.worker_id, reason=f"{type(exc).__name__}: {exc}")
            return
        for x in done:
            event = "move_recorded" if x.outcome == "moved" else "claim_settled"
            extra = {} if x.outcome == "moved" else {"outcome": x.outcome}
            rt.log.warning(event, file=x.path, id=x.row_id, from_worker=x.holder, reason=x.reason, **extra)


def default_worker_id() -> str:
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
