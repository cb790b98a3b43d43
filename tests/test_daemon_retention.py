"""daemon/retention.py: the daemon's housekeeping stage applies retention (first an hour after start, then
daily), logs a `retention` event with the counts, and links retried films to their new rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select

from xr.core.config import RetentionConfig
from xr.daemon.retention import EVERY_S, FIRST_PASS_S, RetentionStage
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status, utcnow


class Log:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def info(self, event, **kw):
        self.events.append((event, kw))

    warning = error = info


def _row(s, path: str, when: dt.datetime, moved_to: str | None, **kw) -> int:
    row = Result(
        path=path,
        filename=Path(path).name,
        size_bytes=1,
        mtime_ns=1,
        status=kw.pop("status", Status.OK),
        received_at=when,
        claimed_at=when,
        processed_at=when,
        moved_at=when,
        moved_to=moved_to,
        **kw,
    )
    s.add(row)
    s.flush()
    return row.id


def test_the_stage_prunes_an_hour_after_start_then_daily(tmp_path):
    out = tmp_path / "output"
    film = out / "processed" / "old.png"
    film.parent.mkdir(parents=True)
    film.write_bytes(b"x")
    engine = make_engine(tmp_path / "results.sqlite")
    sessions = session_factory(engine)
    with sessions.begin() as s:
        old = _row(s, "/inbox/old.png", utcnow() - dt.timedelta(days=9), str(film))
        _row(s, "/inbox/new.png", utcnow(), None)
    log = Log()
    stage = RetentionStage(sessions, out, RetentionConfig(processed_days=7), log, start=0.0)
    stage.step(FIRST_PASS_S - 1)
    assert film.exists() and not [e for e, _ in log.events if e == "retention"]
    stage.step(FIRST_PASS_S)
    assert not film.exists()
    (event, counts), *_ = [(e, kw) for e, kw in log.events if e == "retention"]
    assert counts["processed"] == 1 and counts["rows"] == 0
    assert stage.next_prune == FIRST_PASS_S + EVERY_S
    with sessions() as s:
        assert s.get(Result, old).moved_to is None and s.get(Result, old).pruned_at is not None
    engine.dispose()


def test_the_stage_keeps_everything_by_default_and_links_retries(tmp_path):
    engine = make_engine(tmp_path / "results.sqlite")
    sessions = session_factory(engine)
    with sessions.begin() as s:
        old = _row(s, "/inbox/a.png", utcnow(), None, status=Status.ERROR, retry_path="/inbox/a-1.png")
        new = _row(s, "/inbox/a-1.png", utcnow(), str(tmp_path / "processed" / "a-1.png"))
    log = Log()
    stage = RetentionStage(sessions, tmp_path, RetentionConfig(), log, start=0.0)
    stage.step(10 * EVERY_S)
    assert not stage.prunes and stage.passes == 0
    with sessions() as s:
        assert s.scalar(select(Result.retried_as).where(Result.id == old)) == new
    assert ("retries_linked", {"rows": 1}) in log.events
    engine.dispose()
