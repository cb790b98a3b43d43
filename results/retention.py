"""Retention: delete what the daemon wrote once it is older than ``retention.*`` days (docs/operations.md,
"Retention"). Run once a day by the daemon (daemon/retention.py) and by ``xr-results prune [--dry-run]``.

What is never deleted, whatever the settings:

- a case on the reading list: a flagged (scored) or audit row without a review, with its film and heatmap;
- a row still ``claimed`` or whose file has not been moved yet (``moved_at`` empty);
- anything outside the output folder's processed/, failed/, skipped/, heatmaps/, thumbnails/ and csv/
  (an ``xr-results import`` row's film stays in its archive: only the row may go);
- the audit trail (the ``audit`` table is append-only and kept as long as the law requires, by its owner);
- the newest results CSV of each kind (the exporter appends to it) and the newest result row (SQLite would
  hand its id out again, and ids only grow for the CSVs and reviews).

A film or heatmap deleted before its row keeps the row's result: ``moved_to`` / ``heatmap_path`` are
emptied and ``pruned_at`` says when. A row deleted takes its reviews, its outbox items (never one still
pending), its film, its heatmap (unless another kept row shares it: a duplicate names its first's) and its
thumbnails with it; the eligible duplicates of a row go with it. Files are deleted before the rows are
updated, so a stop in between leaves rows naming missing files, which the next pass finishes.

On PostgreSQL only the worker holding :data:`RETENTION_LOCK` prunes; the others skip the pass.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, text, update
from sqlalchemy.orm import aliased

from xr.results.export import RESULTS_PREFIX
from xr.results.schema import SCORED, OutboxItem, Result, Review, Status, fs_path, utcnow

RETENTION_LOCK = 7_265_081_134  # PostgreSQL advisory lock key: the one worker that prunes
BATCH = 500  # rows per transaction
COUNTS = ("processed", "failed", "heatmaps", "thumbnails", "csv", "rows", "kept_unreviewed")
THUMBNAILS = "thumbnails"  # review/app.py's cache: <id>-<key>-<size>.png


def enabled(cfg: Any) -> bool:
    """Whether any ``retention.*`` setting deletes something (0 and null keep for ever)."""
    return any(getattr(cfg, k) for k in ("processed_days", "failed_days", "heatmaps_days", "csv_days", "rows_days"))


def _cutoff(now: dt.datetime, days: int | None) -> dt.datetime | None:
    return now - dt.timedelta(days=days) if days else None


def _eligible(r, cutoff: dt.datetime):
    """A row of alias ``r`` retention may act on: final, moved, older than ``cutoff`` and not waiting for a
    reader (a flagged or audit case without a review)."""
    reviewed = exists(select(Review.id).where(Review.result_id == r.id))
    waiting = and_(or_(and_(r.flagged.is_(True), r.status.in_(SCORED)), r.audit.is_(True)), ~reviewed)
    return and_(r.status != Status.CLAIMED, r.moved_at.is_not(None), r.processed_at < cutoff, ~waiting)


def _inside(stored: str | None, roots: tuple[Path, ...]) -> Path | None:
    """The file a row names if it lies under one of ``roots`` (never an archive or an inbox film)."""
    if not stored:
        return None
    path = Path(fs_path(stored))
    try:
        resolved = path.parent.resolve() / path.name  # the name itself may be a symlink: delete the link
    except OSError:
        return None
    return resolved if any(resolved.is_relative_to(root) for root in roots) else None


class Pass:
    """One retention pass over one output folder and database; ``run()`` returns the counts."""

    def __init__(
        self,
        sessions,
        output: Path,
        cfg: Any,
        *,
        dry_run: bool = False,
        now: dt.datetime | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        self.sessions = sessions
        self.output = Path(output).resolve()
        self.cfg = cfg
        self.dry_run = dry_run
        self.now = now or utcnow()
        self.should_stop = should_stop
        self.counts = dict.fromkeys(COUNTS, 0)
        self.gone: set[int] = set()  # dry run: the rows a real pass would have deleted

    # -- files ------------------------------------------------------------------------------------------
    def _remove(self, path: Path | None, kind: str) -> None:
        if path is None or not os.path.lexists(path):
            return
        if not self.dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
        self.counts[kind] += 1

    def _thumbnails(self, row_id: int) -> None:
        for p in (self.output / THUMBNAILS).glob(f"{row_id}-*.png"):
            self._remove(p, "thumbnails")

    def _roots(self, *subs: str) -> tuple[Path, ...]:
        return tuple(self.output / s for s in subs)

    # -- the passes -------------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        c = self.cfg
        failed = (Status.ERROR, Status.SKIPPED)
        steps = (
            (_cutoff(self.now, c.rows_days), self._rows),
            (_cutoff(self.now, c.processed_days), lambda cut, aft: self._films(cut, aft, SCORED, ("processed",))),
            (_cutoff(self.now, c.failed_days), lambda cut, aft: self._films(cut, aft, failed, ("failed", "skipped"))),
            (_cutoff(self.now, c.heatmaps_days), self._heatmaps),
        )
        for cut, step in steps:
            if cut is not None and not self.should_stop():
                self._batches(step, cut)
        if c.csv_days and not self.should_stop():
            self._csv(time.time() - c.csv_days * 86400)
        oldest = min((d for d in (c.rows_days, c.processed_days, c.failed_days, c.heatmaps_days) if d), default=0)
        if oldest:
            with self.sessions() as s:  # what the oldest cutoff would have taken but for a reader
                r = aliased(Result)
                cut = self.now - dt.timedelta(days=oldest)
                waiting = and_(
                    r.status != Status.CLAIMED, r.processed_at < cut, ~_eligible(r, cut), r.moved_at.is_not(None)
                )
                self.counts["kept_unreviewed"] = s.scalar(select(func.count()).select_from(r).where(waiting)) or 0
        return self.counts

    def _batches(self, step, cutoff: dt.datetime) -> None:
        """Call ``step(cutoff, after)`` on id-ordered batches until it finds no more rows."""
        after = 0
        while not self.should_stop():
            last = step(cutoff, after)
            if last is None:
                return
            after = last

    def _films(self, cutoff, after, statuses, subs) -> int | None:
        roots, kind = self._roots(*subs), subs[0]
        with self.sessions.begin() as s:
            r = Result
            rows = s.execute(
                select(r.id, r.moved_to)
                .where(_eligible(r, cutoff), r.status.in_(statuses), r.moved_to.is_not(None), r.id > after)
                .order_by(r.id)
                .limit(BATCH)
            ).all()
            if not rows:
                return None
            changed = []
            for row_id, moved_to in rows:
                path = _inside(moved_to, roots) if row_id not in self.gone else None
                if path is None:
                    continue  # left in place (daemon.on_*: leave) or outside the output folder: not ours
                self._remove(path, kind)
                self._thumbnails(row_id)
                changed.append({"id": row_id, "moved_to": None, "pruned_at": self.now})
            if changed and not self.dry_run:
                s.execute(update(Result), changed)
            return rows[-1].id

    def _heatmaps(self, cutoff, after) -> int | None:
        roots = self._roots("heatmaps")
        other = aliased(Result)
        # a heatmap a kept row still names (a duplicate names its first's) stays
        shared = exists(select(other.id).where(other.heatmap_path == Result.heatmap_path, ~_eligible(other, cutoff)))
        with self.sessions.begin() as s:
            rows = s.execute(
                select(Result.id, Result.heatmap_path)
                .where(_eligible(Result, cutoff), Result.heatmap_path.is_not(None), ~shared, Result.id > after)
                .order_by(Result.id)
                .limit(BATCH)
            ).all()
            if not rows:
                return None
            seen: set[str] = set()
            todo = [(i, h) for i, h in rows if i not in self.gone]
            for row_id, heatmap in todo:
                if heatmap not in seen:
                    seen.add(heatmap)
                    self._remove(_inside(heatmap, roots), "heatmaps")
                self._thumbnails(row_id)
            if todo and not self.dry_run:
                s.execute(update(Result), [{"id": i, "heatmap_path": None, "pruned_at": self.now} for i, _ in todo])
            return rows[-1].id

    def _rows(self, cutoff, after) -> int | None:
        def deletable(r, newest: int):  # never a row with a pending outbox item, nor the newest row
            pending = exists(select(OutboxItem.id).where(OutboxItem.result_id == r.id, OutboxItem.status == "pending"))
            return and_(_eligible(r, cutoff), ~pending, r.id < newest)

        other = aliased(Result)
        with self.sessions.begin() as s:
            newest = s.scalar(select(func.max(Result.id))) or 0
            # a row whose duplicate stays, stays (duplicate_of refers to it)
            needed = exists(select(other.id).where(other.duplicate_of == Result.id, ~deletable(other, newest)))
            ids = list(
                s.scalars(
                    select(Result.id)
                    .where(deletable(Result, newest), ~needed, Result.id > after)
                    .order_by(Result.id)
                    .limit(BATCH)
                )
            )
            if not ids:
                return None
            # its duplicates go with a row (each one deletable, else ``needed`` kept the row)
            dups = set(s.scalars(select(Result.id).where(Result.duplicate_of.in_(ids)))) - set(ids)
            gone = sorted((set(ids) | dups) - self.gone)
            if self.dry_run:  # what a real pass would have deleted by now: later steps pass over it
                self.gone |= set(gone)
            files = s.execute(select(Result.id, Result.moved_to, Result.heatmap_path).where(Result.id.in_(gone))).all()
            film_roots = self._roots("processed", "failed", "skipped")
            for row_id, moved_to, _ in files:
                path = _inside(moved_to, film_roots)
                self._remove(path, "processed" if path and path.is_relative_to(film_roots[0]) else "failed")
                self._thumbnails(row_id)
            heatmaps = {h for _, _, h in files if h}
            if heatmaps:
                kept = set(
                    s.scalars(
                        select(Result.heatmap_path).where(
                            Result.heatmap_path.in_(heatmaps), Result.id.not_in([*gone, *self.gone])
                        )
                    )
                )
                for h in sorted(heatmaps - kept):
                    self._remove(_inside(h, self._roots("heatmaps")), "heatmaps")
            self.counts["rows"] += len(gone)
            if not self.dry_run:
                s.execute(delete(Review).where(Review.result_id.in_(gone)))
                s.execute(delete(OutboxItem).where(OutboxItem.result_id.in_(gone)))
                s.execute(update(Result).where(Result.retried_as.in_(gone)).values(retried_as=None))
                s.execute(delete(Result).where(Result.id.in_(dups)))  # first: they refer to the others
                s.execute(delete(Result).where(Result.id.in_(gone)))
            return ids[-1]

    def _csv(self, before: float) -> None:
        folder = self.output / "csv"
        files = sorted(folder.glob(f"{RESULTS_PREFIX}*.csv"))
        newest = {
            max((p for p in files if p.name[len(RESULTS_PREFIX)].isdigit() and len(p.stem) == n), default=None)
            for n in (len("results-YYYY-MM-DD"), len("results-000000"))
        }
        for p in files:
            try:
                old = p.stat().st_mtime < before
            except OSError:
                continue
            if old and p not in newest:
                self._remove(p, "csv")


def prune(
    sessions,
    output: Path,
    cfg: Any,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, int] | None:
    """One retention pass (see the module's doc); the counts, or None when another worker holds the
    PostgreSQL lock (it prunes). ``dry_run`` deletes and changes nothing and counts the same."""
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        return _run(sessions, output, cfg, dry_run, now, should_stop)
    with engine.connect() as conn:  # session-level: held across the pass's transactions
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RETENTION_LOCK}).scalar():
            return None
        try:
            return _run(sessions, output, cfg, dry_run, now, should_stop)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RETENTION_LOCK})
            conn.commit()


def _run(sessions, output, cfg, dry_run, now, should_stop) -> dict[str, int]:
    return Pass(sessions, output, cfg, dry_run=dry_run, now=now, should_stop=should_stop).run()
