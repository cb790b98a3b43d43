"""What a stopped worker left, the other half of the claim/lease state machine (results/journal.py holds
claims, leases, the batch commit and recorded moves): at start (:func:`settle_at_start`: its claims are
redone, released or turned into error rows, a file that crashed the decoder twice set aside, and committed
rows whose move it did not finish taken over) and, with several workers, while running (:func:`sweep`)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from xr.results.journal import Lease, db_time, take_over
from xr.results.rows import delete_rows, final_row
from xr.results.schema import Result, Status, fs_path

GONE = "file left the inbox before it was processed"


def settle_claim(row: Result, would_read: Callable[[str], bool], now: dt.datetime) -> tuple[str, str]:
    """What to do with a claim its worker left, and why: ``redo`` (the file is there as claimed: a scan
    finds it and the claim takes this row over), ``release`` (delete the row: the file is not this daemon's
    to read, or was written on since, and the file as it is now is new work) or ``gone`` (the file left the
    inbox: the row becomes an error, here). A claimed row left as it is would hold back every later row
    from the CSVs, so none is left."""
    path = fs_path(row.path)
    if not would_read(path):
        return "release", "not a file this daemon reads (claimed by a run with another watch folder or suffixes)"
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None:
        if (st.st_size, st.st_mtime_ns) == (row.size_bytes, row.mtime_ns):
            return "redo", "the file is there as claimed"
        return "release", "the file changed since it was claimed"
    for col, value in final_row(Status.ERROR, now=now, received_at=row.received_at, error=GONE).items():
        setattr(row, col, value)
    row.moved_at = now  # final with nothing to move: no later row waits for it in the CSVs
    return "gone", GONE


@dataclass(frozen=True)
class Settled:
    row_id: int
    path: str
    holder: str | None
    outcome: str  # redo | release | gone (settle_claim), set_aside (crashed twice), or moved (a move recorded)
    reason: str


CRASH_LIMIT = 2  # runs that may die reading one file before it is set aside
CRASHED = "the daemon stopped twice while reading this file (set aside: it may crash the decoder)"


def _settle(
    s: Session,
    rows: list[Result],
    would_read: Callable[[str], bool],
    now: dt.datetime,
    place: Callable[[str], str | None] | None = None,
) -> list[Settled]:
    out, released = [], []
    for row in rows:
        outcome, reason = settle_claim(row, would_read, now)
        if outcome == "redo" and place is not None and (row.read_crashes or 0) >= CRASH_LIMIT:
            # A file that killed the process twice is not read a third time: an error row, and the
            # file goes where errors go (the caller's ``place``), moved like any committed row.
            for col, value in final_row(Status.ERROR, now=now, received_at=row.received_at, error=CRASHED).items():
                setattr(row, col, value)
            row.moved_to = place(fs_path(row.path))
            row.moved_at = None if row.moved_to is not None else now
            outcome, reason = "set_aside", CRASHED
        if outcome == "release":
            released.append(row.id)
        out.append(Settled(row.id, row.path, row.lease_holder, outcome, reason))
    delete_rows(s, released)
    return out


@dataclass(frozen=True)
class LeftMove:
    """A committed row whose file a stopped run did not move, taken over by this worker (a new token)."""

    row_id: int
    path: str  # in the inbox, as the file system names it
    identity: tuple[int, int]  # (size, mtime_ns) of the file as scored
    moved_to: str
    token: int


def settle_at_start(
    s: Session,
    would_read: Callable[[str], bool],
    lease: Lease,
    now: dt.datetime,
    *,
    crashed: Collection[int] = (),
    place: Callable[[str], str | None] | None = None,
) -> tuple[list[Settled], list[LeftMove]]:
    """Before a worker watches: settle the claims a previous run left (all of them on a database of its own;
    with several workers, this worker's and those whose lease ran out), and take over the committed rows
    whose move it did not finish.

    ``crashed``: the claims that run was reading (parse or decode) when it died; each counts one crash,
    and a claim at :data:`CRASH_LIMIT` becomes an error row moved to ``place(path)`` (``set_aside``)."""
    clock = db_time(s)
    if crashed:  # counted whoever settles the row: with several workers it may be another's, later
        s.execute(
            update(Result)
            .where(Result.id.in_(list(crashed)), Result.status == Status.CLAIMED)
            .values(read_crashes=Result.read_crashes + 1)
        )
    left = lease.left_rows(clock)
    claims = s.scalars(
        select(Result)
        .where(Result.status == Status.CLAIMED, left)
        .order_by(Result.id)
        .with_for_update(skip_locked=True)
    ).all()
    settled = _settle(s, list(claims), would_read, now, place)
    s.flush()  # the rows set aside are committed rows whose move is left: the query below takes them
    pending = s.scalars(
        select(Result)
        .where(Result.status != Status.CLAIMED, Result.moved_at.is_(None), Result.moved_to.is_not(None), left)
        .order_by(Result.id)
        .with_for_update(skip_locked=True)
    ).all()
    tokens = {r.id: r.lease_token for r in pending}  # read before the takeover updates the loaded rows
    moves = [
        LeftMove(r.id, fs_path(r.path), (r.size_bytes, r.mtime_ns), r.moved_to, tokens[r.id] + 1)
        for r in pending
        if take_over(s, r.id, tokens[r.id], lease.worker, clock + lease.seconds)
    ]
    return settled, moves


def sweep(s: Session, would_read: Callable[[str], bool], lease: Lease, now: dt.datetime) -> list[Settled]:
    """While running, with several workers: settle the claims whose lease ran out a whole lease ago and whose
    file is no longer there as claimed (one still there is left to a claim, which takes it over), and record
    the moves a stopped worker made but did not record. Returns what it did, ``redo`` rows left out."""
    stale = db_time(s) - lease.seconds
    claims = s.scalars(
        select(Result)
        .where(Result.status == Status.CLAIMED, Result.lease_expires_at < stale)
        .order_by(Result.id)
        .with_for_update(skip_locked=True)
    ).all()
    done = [x for x in _settle(s, list(claims), would_read, now) if x.outcome != "redo"]
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
        done.append(Settled(row.id, row.path, row.lease_holder, "moved", MOVED_UNRECORDED))
        row.moved_to = row.moved_to if os.path.lexists(row.moved_to) else None
        row.moved_at, row.lease_holder, row.lease_token = now, lease.worker, row.lease_token + 1
    return done


MOVED_UNRECORDED = "its worker moved the file and stopped before recording it"
