"""daemon/leases.py: the lease keeper stage renews this worker's leases and settles what a stopped worker left."""

from __future__ import annotations

import datetime as dt
import types

from sqlalchemy import select

from xr.core.config import load_settings
from xr.core.intake import DecodeLimits
from xr.daemon.leases import LeaseKeeper
from xr.daemon.runtime import Runtime
from xr.results import journal
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status
from xr.results.settle import GONE, settle_claim


class _Log:
    def __init__(self):
        self.events = []

    def __getattr__(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))


def _claim(s, path, size, mtime, holder, expires):
    now = dt.datetime(2026, 1, 1)
    return journal.try_claim(
        s,
        {
            "path": str(path),
            "filename": path.name,
            "size_bytes": size,
            "mtime_ns": mtime,
            "status": Status.CLAIMED,
            "received_at": now,
            "claimed_at": now,
            "lease_holder": holder,
            "lease_token": 0,
            "lease_expires_at": expires,
        },
    )


def _runtime(tmp_path, sessions, log, lease_s=5):
    cfg = load_settings(overrides={"daemon.lease_s": lease_s})
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    return Runtime(cfg, inbox, out, sessions, log, DecodeLimits(), worker_id="me", exclusive=False)


def _reads_all():
    return types.SimpleNamespace(would_read=lambda p: True)


def test_claims_of_a_dead_worker_on_files_gone_or_changed_are_settled(tmp_path, any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    there, changed = inbox / "there.png", inbox / "changed.png"
    there.write_bytes(b"x" * 10)
    changed.write_bytes(b"y" * 20)
    st = there.stat()
    with sessions.begin() as s:
        past = journal.db_time(s) - 1000
        ids = {
            "there": _claim(s, there, st.st_size, st.st_mtime_ns, "dead", past),  # left to a takeover
            "changed": _claim(s, changed, 5, 1, "dead", past),  # written on since: the new bytes are new work
            "gone": _claim(s, inbox / "gone.png", 5, 1, "dead", past),  # left the inbox: an error row
            "live": _claim(s, inbox / "live.png", 5, 1, "alive", journal.db_time(s) + 1000),  # a live worker's
        }
    log = _Log()
    LeaseKeeper(_runtime(tmp_path, sessions, log), _reads_all()).sweep()
    with sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Result))}
    assert rows[ids["there"]].status == Status.CLAIMED
    assert ids["changed"] not in rows
    assert rows[ids["gone"]].status == Status.ERROR and "left the inbox" in rows[ids["gone"]].error
    assert rows[ids["gone"]].moved_at is not None  # final: no later row waits for it in the CSVs
    assert rows[ids["live"]].status == Status.CLAIMED
    settled = sorted((kw["outcome"], kw["reason"]) for level, event, kw in log.events if event == "claim_settled")
    assert settled == [("gone", GONE), ("release", "the file changed since it was claimed")]
    eng.dispose()


def test_a_file_another_folder_watches_is_released(tmp_path):
    row = Result(path=str(tmp_path / "a.png"), size_bytes=1, mtime_ns=1, received_at=dt.datetime(2026, 1, 1))
    outcome, reason = settle_claim(row, lambda p: False, dt.datetime(2026, 1, 2))
    assert outcome == "release" and reason.startswith("not a file this daemon reads")


def test_renewal_extends_only_this_workers_leases(tmp_path, any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        mine = _claim(s, tmp_path / "a.png", 1, 1, "me", 10.0)
        theirs = _claim(s, tmp_path / "b.png", 1, 1, "other", 10.0)
    keeper = LeaseKeeper(_runtime(tmp_path, sessions, _Log(), lease_s=30), _reads_all())
    keeper.renew()
    with sessions() as s:
        assert s.get(Result, mine).lease_expires_at > journal.db_time(s) + 20
        assert s.get(Result, theirs).lease_expires_at == 10.0
    assert keeper.renewals == 1
    eng.dispose()


def test_a_move_a_dead_worker_made_but_did_not_record_is_recorded(tmp_path, any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    dest = tmp_path / "out" / "processed" / "a.png"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"x")  # moved out of the inbox, then the worker died
    with sessions.begin() as s:
        rid = _claim(s, tmp_path / "inbox" / "a.png", 1, 1, "dead", journal.db_time(s) - 1000)
        s.get(Result, rid).status, s.get(Result, rid).moved_to = Status.OK, str(dest)
    log = _Log()
    LeaseKeeper(_runtime(tmp_path, sessions, log), _reads_all()).sweep()
    with sessions() as s:
        row = s.get(Result, rid)
        assert row.moved_at is not None and row.moved_to == str(dest) and row.lease_token == 1
    assert [e for _, e, _ in log.events] == ["move_recorded"]
    eng.dispose()
