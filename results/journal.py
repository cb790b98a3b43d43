"""The journal: the claim/lease state machine of results rows, in one module.

A row is written ``claimed`` before a file is decoded (:func:`claim_files`: insert, or take over what a
stopped worker left), the batch commit turns it final in one transaction (:func:`commit_batch`), and only
then is the file moved (``moved_to`` is chosen in that commit, ``moved_at`` set after the move:
:func:`record_moves`). With several workers on one database each claim carries a lease (holder, fencing
token, expiry on the database's clock); every later write re-checks the token (:func:`still_held`). What a
stopped run left is settled at start and, with several workers, while running: results/settle.py
(``settle_at_start``, ``sweep``), the other half of the state machine.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from xr.results.rows import delete_rows, final_row, insert_or_ignore, scores_by_id, update_rows
from xr.results.schema import Batch, Result, Status

Identity = tuple[str, int, int]  # (path, size_bytes, mtime_ns) of a file in the inbox


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


# -- the state machine: a row's life from claim to move ------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    """Who claims, and for how long: ``worker``'s id, ``seconds`` a lease lasts, and whether this worker is
    the only one on its database (SQLite: every claim left by another run is a dead run's)."""

    worker: str
    seconds: float
    exclusive: bool = True

    def may_take(self, holder: str | None, expires_at: float | None, clock: float) -> bool:
        """Whether this worker may take over a row held by ``holder`` until ``expires_at`` (database clock)."""
        return self.exclusive or holder == self.worker or (expires_at or 0.0) < clock

    def left_rows(self, clock: float):
        """The rows a start settles: all (the only worker), else this worker's and those whose lease ran out."""
        if self.exclusive:
            return Result.id.is_not(None)
        return (
            (Result.lease_holder == self.worker) | Result.lease_expires_at.is_(None) | (Result.lease_expires_at < clock)
        )


class Claim(str, enum.Enum):
    """What claiming a file came to."""

    NEW = "new"  # a new claimed row: read and score the file
    REDO = "redo"  # a claim a stopped run left on this very file, taken over: read and score it again
    COMMITTED = "committed"  # a final row whose file was not moved yet, taken over: only the move is left
    HELD = "held"  # another worker holds the file: look again when its lease would have run out
    MOVED_AWAY = "moved_away"  # read before another worker scored and moved it: the result is that worker's


@dataclass(frozen=True)
class FileClaim:
    """A file to claim: its identity as the rows hold it, when it was first seen, the facts read from it
    (sha256, DICOM identifiers), and whether it is still in the inbox as read (asked after the insert)."""

    path: str
    size: int
    mtime_ns: int
    received_at: dt.datetime
    facts: dict[str, Any]
    still_there: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class Claimed:
    outcome: Claim
    row_id: int | None = None
    token: int = 0  # the fencing token every later write of this row checks (``still_held``)
    received_at: dt.datetime | None = None
    moved_to: str | None = None  # COMMITTED: where the commit placed the file
    retry_in_s: float = 0.0  # HELD: until the holder's lease would have run out
    taken_from: str | None = None  # a takeover from another live-lease worker: which one
    overdue_s: float = 0.0  # ...and how long its lease had run out


def claim_files(s: Session, files: list[FileClaim], lease: Lease, now: dt.datetime) -> list[Claimed]:
    """Claim each file, in the order given (sort them: every worker locks in one order, so two claim
    batches never deadlock): insert its ``claimed`` row, or take over the row a stopped worker left (a new
    fencing token), or say who holds it. Holds the claim fence (PostgreSQL) for the transaction."""
    claim_fence(s)
    clock = db_time(s)
    expires = clock + lease.seconds
    out = []
    for f in files:
        fields = {"claimed_at": now, "lease_holder": lease.worker, "lease_expires_at": expires, **f.facts}
        new = {
            "path": f.path,
            "filename": os.path.basename(f.path),
            "size_bytes": f.size,
            "mtime_ns": f.mtime_ns,
            "status": Status.CLAIMED,
            "received_at": f.received_at,
            "lease_token": 0,
            **fields,
        }
        row_id = try_claim(s, new)
        if row_id is not None:
            if not lease.exclusive and not f.still_there():
                # Read before another worker scored and moved it (this one was frozen in between): the
                # claim is of a file that is gone.
                delete_rows(s, [row_id])
                out.append(Claimed(Claim.MOVED_AWAY))
            else:
                out.append(Claimed(Claim.NEW, row_id, 0, f.received_at))
            continue
        owner = owner_of(s, (f.path, f.size, f.mtime_ns))  # another row owns the file: a dead run's, or a worker's
        if (
            owner is None
            or not lease.may_take(owner.lease_holder, owner.lease_expires_at, clock)
            or not take_over(s, owner.id, owner.lease_token, lease.worker, expires)
        ):
            wait = (owner.lease_expires_at or clock) - clock if owner is not None else 0.0
            out.append(Claimed(Claim.HELD, retry_in_s=max(wait, 0.0) + lease.seconds / 10))
            continue
        taken = owner.lease_holder != lease.worker and not lease.exclusive
        done = owner.status != Status.CLAIMED
        if not done:
            update_rows(s, [{"id": owner.id, **fields}])  # redo it
        out.append(
            Claimed(
                Claim.COMMITTED if done else Claim.REDO,
                owner.id,
                owner.lease_token + 1,
                owner.received_at,
                moved_to=owner.moved_to,
                taken_from=owner.lease_holder if taken else None,
                overdue_s=clock - (owner.lease_expires_at or clock),
            )
        )
    return out


def record_facts(s: Session, facts: dict[int, dict[str, Any]]) -> None:
    """Write what claimed files' headers say (row id -> DICOM identifier columns). A header is parsed only
    once its file is claimed: the parse is the first thing a hostile file can crash."""
    update_rows(s, [{"id": row_id, **columns} for row_id, columns in facts.items()])


def give_back(s: Session, tokens: dict[int, int], worker: str) -> None:
    """Delete the claims (id -> token) this worker still holds: their files are new work again."""
    delete_rows(s, list(still_held(s, tokens, worker)))


@dataclass
class Outcome:
    """A file's result, ready to commit: ``score`` for ``ok``, ``duplicate_of`` for ``duplicate``, ``error``
    for ``error`` and ``skipped``."""

    row_id: int
    token: int
    status: Status
    received_at: dt.datetime
    error: str | None = None
    duplicate_of: int | None = None
    score: Any = None


@dataclass
class Committed:
    batch_id: int
    rows: dict[int, dict[str, Any]]  # row id -> the columns written (``moved_to`` included)
    lost: list[Outcome]  # taken over by another worker meanwhile: not written, the result is that worker's


def commit_batch(
    s: Session,
    outcomes: list[Outcome],
    *,
    worker: str,
    model: Any,
    wait_ms: float,
    model_ms: float,
    place: Callable[[Outcome], str | None],
    now: dt.datetime,
    audit_rate: float = 0.0,
    draw: Callable[[], float] = random.random,
) -> Committed:
    """Turn a batch's claims final in this transaction, with its ``batches`` row. Fencing: rows whose lease
    another worker took (this one was presumed dead) are not written, nor duplicates of them. ``place``
    chooses each written row's destination (None: the file stays in the inbox). Each unflagged ``ok`` row
    is an audit case with probability ``audit_rate`` (``review.audit_rate``): drawn here, once, as it is
    scored, so the sample is random whatever order films are read in."""
    held = still_held(s, {o.row_id: o.token for o in outcomes}, worker)
    b = Batch(created_at=now, size=len(held), wait_ms=wait_ms, model_ms=model_ms, model_id=model.model_id)
    s.add(b)
    s.flush()
    # Plain dicts in one executemany, not loaded ORM objects: less GIL held per file, which a GPU host's
    # decode threads need (docs/benchmarks.md).
    firsts = scores_by_id(s, [o.duplicate_of for o in outcomes if o.duplicate_of is not None])
    rows: dict[int, dict[str, Any]] = {}
    lost: list[Outcome] = []
    for o in outcomes:
        first = None if o.duplicate_of is None else rows.get(o.duplicate_of) or firsts.get(o.duplicate_of)
        if o.row_id not in held or (o.duplicate_of is not None and first is None):
            lost.append(o)
            continue
        row = final_row(
            o.status,
            now=now,
            received_at=o.received_at,
            model=model,
            score=first if o.duplicate_of is not None else o.score,
            error=o.error,
            duplicate_of=o.duplicate_of,
            worker=worker,
            batch_id=b.id,
        )
        row["id"], row["moved_to"] = o.row_id, place(o)
        row["audit"] = o.status == Status.OK and not row["flagged"] and audit_rate > 0 and draw() < audit_rate
        rows[o.row_id] = row
    update_rows(s, list(rows.values()))
    counts = Counter(r["status"] for r in rows.values())
    b.n_ok, b.n_error, b.n_duplicate = counts[Status.OK], counts[Status.ERROR], counts[Status.DUPLICATE]
    return Committed(b.id, rows, lost)


def record_moves(s: Session, moves: dict[int, tuple[int, str | None, dt.datetime]], worker: str) -> set[int]:
    """Record where files went (row id -> (token, where or None when gone, when)), for the rows this worker
    still holds; returns those ids."""
    mine = still_held(s, {rid: token for rid, (token, _, _) in moves.items()}, worker)
    update_rows(
        s, [{"id": rid, "moved_to": where, "moved_at": when} for rid, (_, where, when) in moves.items() if rid in mine]
    )
    return mine
