"""results/retention.py and `xr-results prune [--dry-run]`: old films, heatmaps, thumbnails, CSVs and rows go;
the reading list, unreviewed audit cases, claimed and unmoved rows, archives and the audit trail stay; a dry
run changes nothing and counts the same; on PostgreSQL one worker prunes at a time."""

from __future__ import annotations

import datetime as dt
import io
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from xr.core.config import RetentionConfig
from xr.results import audit
from xr.results.cli import main
from xr.results.engine import make_engine, session_factory
from xr.results.retention import RETENTION_LOCK, prune
from xr.results.schema import AuditEvent, OutboxItem, Result, Review, Status, utcnow

OLD = utcnow() - dt.timedelta(days=40)
NEW = utcnow() - dt.timedelta(hours=1)
KEEP_10 = RetentionConfig(processed_days=10, failed_days=10, heatmaps_days=10, csv_days=10)


def _file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"film")
    return str(path)


def _add(s, out: Path, name: str, status=Status.OK, when=OLD, **kw) -> Result:
    sub = {Status.OK: "processed", Status.DUPLICATE: "processed", Status.ERROR: "failed", Status.SKIPPED: "skipped"}
    claimed = status == Status.CLAIMED
    row = Result(
        path=f"/inbox/{name}",
        filename=name,
        size_bytes=4,
        mtime_ns=hash(name) & 0xFFFF,
        status=status,
        flagged=kw.pop("flagged", False),
        received_at=when,
        claimed_at=when,
        processed_at=None if claimed else when,
        moved_at=None if claimed else when,
        moved_to=None if claimed else _file(out / sub.get(status, "processed") / name),
        **kw,
    )
    s.add(row)
    s.flush()
    if status in (Status.OK, Status.DUPLICATE) and "heatmap_path" not in kw:
        row.heatmap_path = _file(out / "heatmaps" / f"{row.id}.png")
    _file(out / "thumbnails" / f"{row.id}-abc-thumb.png")
    return row


@pytest.fixture()
def world(any_db, tmp_path):
    out = tmp_path / "output"
    engine = make_engine(any_db)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        rows = {
            "old_ok": _add(s, out, "old_ok.png"),
            "old_error": _add(s, out, "old_error.png", Status.ERROR, error="cannot decode"),
            "old_skipped": _add(s, out, "old_skipped.png", Status.SKIPPED, error="not a chest film"),
            "old_flagged": _add(s, out, "old_flagged.png", flagged=True),
            "old_audit": _add(s, out, "old_audit.png", audit=True),
            "old_reviewed": _add(s, out, "old_reviewed.png", flagged=True),
            "claimed": _add(s, out, "claimed.png", Status.CLAIMED),
            "new_ok": _add(s, out, "new_ok.png", when=NEW),
        }
        first = _add(s, out, "first.png", flagged=True)
        s.add(Review(result_id=first.id, decision="pneumonia", reviewer="rita", reviewed_at=OLD))
        rows["first"] = first
        rows["dup"] = _add(s, out, "dup.png", Status.DUPLICATE, duplicate_of=first.id, heatmap_path=first.heatmap_path)
        s.add(Review(result_id=rows["old_reviewed"].id, decision="normal", reviewer="rita", reviewed_at=OLD))
        imported = _add(s, out, "archived.png", worker_id="xr-score", heatmap_path=None)
        archive = Path(_file(out.parent / "archive" / "archived.png"))
        os.unlink(imported.moved_to)
        imported.moved_to = None  # an xr-results import row: the film stays in its archive
        rows["imported"] = imported
        audit.record(s, "view_case", user="rita", case=rows["old_reviewed"])
        rows["newest"] = _add(s, out, "newest.png", when=NEW)
    ids = {k: r.id for k, r in rows.items()}
    for name in ("results-2026-01-01.csv", "results-2026-01-02.csv", "results-2099-01-01.csv", "flagged.csv"):
        p = Path(_file(out / "csv" / name))
        if "2026" in name:
            os.utime(p, (time.time() - 40 * 86400,) * 2)
    yield sessions, out, ids, archive
    engine.dispose()


def _state(sessions, out: Path) -> tuple:
    with sessions() as s:
        rows = sorted(tuple(r) for r in s.execute(select(Result.id, Result.moved_to, Result.heatmap_path)))
    return rows, sorted(str(p) for p in out.rglob("*") if p.is_file())


def test_dry_run_changes_nothing_and_counts_what_a_prune_deletes(world):
    sessions, out, ids, archive = world
    cfg = RetentionConfig(processed_days=10, failed_days=10, heatmaps_days=10, csv_days=10, rows_days=30)
    before = _state(sessions, out)
    dry = prune(sessions, out, cfg, dry_run=True)
    assert _state(sessions, out) == before
    real = prune(sessions, out, cfg)
    assert real == dry
    # old_ok, old_error, old_skipped, old_reviewed, first and its duplicate, the imported row (not its film)
    assert real["rows"] == 7
    assert real["kept_unreviewed"] == 2  # old_flagged, old_audit
    assert archive.exists()
    with sessions() as s:
        left = set(s.scalars(select(Result.id)))
        assert s.scalar(select(func.count()).select_from(Review)) == 0  # the reviews went with their rows
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 1  # the audit trail is not touched
    assert left == {ids[k] for k in ("old_flagged", "old_audit", "claimed", "new_ok", "newest")}
    assert prune(sessions, out, cfg) == dict.fromkeys(real, 0) | {"kept_unreviewed": 2}


def test_films_heatmaps_and_csvs_go_rows_stay(world):
    sessions, out, ids, archive = world
    counts = prune(sessions, out, KEEP_10)
    assert counts["processed"] == 4  # old_ok, old_reviewed, first, dup: not the reading list, not the new ones
    assert counts["failed"] == 2  # failed/ and skipped/
    assert counts["heatmaps"] == 3  # old_ok, old_reviewed, and the one first and dup share
    assert counts["csv"] == 2  # the two old daily files; not the newest, not flagged.csv
    assert counts["rows"] == 0
    with sessions() as s:
        got = {r.id: r for r in s.scalars(select(Result))}
    ok = got[ids["old_ok"]]
    assert ok.moved_to is None and ok.heatmap_path is None and ok.pruned_at is not None
    assert ok.status == Status.OK  # the result stays
    for keep in ("old_flagged", "old_audit", "new_ok"):
        row = got[ids[keep]]
        assert Path(row.moved_to).exists() and Path(row.heatmap_path).exists() and row.pruned_at is None
        assert (out / "thumbnails" / f"{row.id}-abc-thumb.png").exists()
    assert got[ids["claimed"]].status == Status.CLAIMED and got[ids["claimed"]].pruned_at is None
    assert not (out / "thumbnails" / f"{ids['old_ok']}-abc-thumb.png").exists()
    assert archive.exists() and (out / "csv" / "flagged.csv").exists()
    assert sorted(p.name for p in (out / "csv").glob("results-*")) == ["results-2099-01-01.csv"]


def test_a_review_releases_a_flagged_case(world):
    sessions, out, ids, _ = world
    with sessions.begin() as s:
        s.add(Review(result_id=ids["old_flagged"], decision="normal", reviewer="rita", reviewed_at=NEW))
    assert prune(sessions, out, RetentionConfig(processed_days=10))["processed"] == 5


def test_a_pending_outbox_item_keeps_its_row(world):
    sessions, out, ids, _ = world
    with sessions.begin() as s:
        s.add(
            OutboxItem(
                result_id=ids["old_ok"],
                kind="sr",
                destination="PACS@h:104",
                sop_class_uid="1.2",
                sop_instance_uid="1.2.3",
                status="pending",
                next_attempt_at=0,
                give_up_at=0,
                created_at=OLD,
            )
        )
    prune(sessions, out, RetentionConfig(rows_days=30))
    with sessions() as s:
        assert s.get(Result, ids["old_ok"]) is not None


def test_keeps_everything_by_default(world):
    sessions, out, _, _ = world
    before = _state(sessions, out)
    assert set(prune(sessions, out, RetentionConfig()).values()) == {0}
    assert _state(sessions, out) == before


def test_cli_prune_dry_run_then_prune(world, tmp_path, any_db):
    sessions, out, _, _ = world
    cfg = tmp_path / "config.yaml"
    cfg.write_text("retention:\n  processed_days: 10\n  failed_days: 10\n")
    args = ["--db", any_db, "--output", str(out), "--config", str(cfg), "prune"]
    buf = io.StringIO()
    assert main([*args, "--dry-run"], out=buf) == 0
    assert "would delete 4 processed, 2 failed" in buf.getvalue()
    buf = io.StringIO()
    assert main(args, out=buf) == 0
    assert "deleted 4 processed, 2 failed" in buf.getvalue() and "kept 2 old cases" in buf.getvalue()


def test_one_worker_prunes_at_a_time_on_postgresql(world, any_db):
    if not any_db.startswith("postgresql"):
        pytest.skip("an advisory lock: PostgreSQL only")
    sessions, out, _, _ = world
    engine = sessions.kw["bind"]
    with engine.connect() as other:  # another worker holds the lock
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": RETENTION_LOCK})
        assert prune(sessions, out, KEEP_10) is None
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RETENTION_LOCK})
        other.commit()
    assert prune(sessions, out, KEEP_10)["processed"] == 4
