"""``xr-results retry ID...``: put films from failed/ (error rows; skipped/ ones when asked) back through the
inbox, after the cause was fixed (a decoder installed, a limit raised in config.yaml).

The film is moved, never copied and never over another file (core/moves.py's ``move_no_overwrite``),
to the inbox under its old name (``name-1.ext`` if that is taken). The old row is kept: ``moved_to`` is
emptied and ``retry_path`` names where the film went; once the daemon has scored it there,
:func:`link_retries` (run by the daemon's housekeeping stage and by this command) sets the old row's
``retried_as`` to the new row's id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import aliased

from xr.results.schema import Result, Status, fs_path, storable

RETRIED = {Status.ERROR: "failed", Status.SKIPPED: "skipped"}


@dataclass(frozen=True)
class Outcome:
    row_id: int
    to: str | None  # where the film went in the inbox; None: refused
    reason: str | None = None


def _refusal(row: Result | None, row_id: int, output: Path, skipped: bool) -> str | None:
    if row is None:
        return f"no row {row_id}"
    if row.status == Status.SKIPPED and not skipped:
        return f"row {row_id} was skipped ({row.error or 'not a chest film'}): retry it with --skipped"
    if row.status not in RETRIED:
        return f"row {row_id} is {row.status}: only films in failed/ (error rows) or skipped/ are retried"
    if row.retry_path:
        return f"row {row_id} was already retried: its film went to {row.retry_path}"
    if not row.moved_to:
        return f"row {row_id}'s film is not in {RETRIED[Status(row.status)]}/ (left in place or deleted by retention)"
    folder = (output / RETRIED[Status(row.status)]).resolve()
    film = Path(fs_path(row.moved_to))
    if not film.parent.resolve().is_relative_to(folder) or not film.is_file():
        return f"row {row_id}'s film {row.moved_to} is not in {folder}"
    return None


def retry(sessions, output: Path, inbox: Path, ids: list[int], *, skipped: bool = False) -> list[Outcome]:
    """Move each row's film back into ``inbox``; one transaction per row, the move inside it (a failed
    move leaves the row as it was)."""
    from xr.core.moves import free_name, move_no_overwrite

    output, inbox = Path(output).resolve(), Path(inbox).resolve()
    if not inbox.is_dir():
        raise FileNotFoundError(f"inbox {inbox} is not a folder")
    out = []
    for row_id in ids:
        with sessions.begin() as s:
            row = s.get(Result, row_id, with_for_update=True)
            reason = _refusal(row, row_id, output, skipped)
            if reason:
                out.append(Outcome(row_id, None, reason))
                continue
            # under its old name (the one it has in failed/ may carry a -N); never over a file
            new = move_no_overwrite(fs_path(row.moved_to), free_name(inbox / Path(row.filename).name))
            s.execute(update(Result).where(Result.id == row_id).values(moved_to=None, retry_path=storable(str(new))))
            out.append(Outcome(row_id, str(new)))
    with sessions.begin() as s:
        link_retries(s)
    return out


def link_retries(s) -> int:
    """Set ``retried_as`` of retried rows whose film the daemon has given a row since; how many."""
    new = aliased(Result)
    first_new = (
        select(func.min(new.id))
        .where(new.path == Result.retry_path, new.id > Result.id)
        .correlate(Result)
        .scalar_subquery()
    )
    pending = select(Result.id).where(Result.retry_path.is_not(None), Result.retried_as.is_(None))
    ids = list(s.scalars(pending))
    if not ids:
        return 0
    found = s.execute(select(Result.id, first_new).where(Result.id.in_(ids))).all()
    links = [{"id": i, "retried_as": n} for i, n in found if n is not None]
    if links:
        s.execute(update(Result), links)
    return len(links)
