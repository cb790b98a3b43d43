"""results/journal.py and results/settle.py: the claim/lease state machine (claim, takeover, fencing,
commit, move, settle, sweep), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from xr.results import journal, schema, settle
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status


# -- claims and leases, on SQLite and PostgreSQL ----------------------------------------------------------
def _claim_row(path="/in/a.png", size=10, mtime=1, worker="w1", expires=100.0, **kw) -> dict:
    now = dt.datetime(2026, 1, 1)
    return {
        "path": path,
        "filename": path.rsplit("/", 1)[-1],
        "size_bytes": size,
        "mtime_ns": mtime,
        "status": Status.CLAIMED,
        "received_at": now,
        "claimed_at": now,
        "lease_holder": worker,
        "lease_token": 0,
        "lease_expires_at": expires,
        **kw,
    }


def test_one_claim_per_inbox_file(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        first = journal.try_claim(s, _claim_row(worker="w1"))
        assert first is not None
        assert journal.try_claim(s, _claim_row(worker="w2")) is None  # the same file: the database says no
        assert journal.try_claim(s, _claim_row(size=11, worker="w2")) is not None  # another file under the name
        owner = journal.owner_of(s, ("/in/a.png", 10, 1))
        assert (owner.id, owner.lease_holder, owner.lease_token) == (first, "w1", 0)
    with sessions.begin() as s:  # once moved, the name is free for a new file of the same identity
        s.execute(update(Result).where(Result.id == first).values(status=Status.OK, moved_at=dt.datetime(2026, 1, 2)))
    with sessions.begin() as s:
        assert journal.try_claim(s, _claim_row(worker="w2")) not in (None, first)
    eng.dispose()


def test_a_takeover_raises_the_token_and_fences_the_old_holder(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        rid = journal.try_claim(s, _claim_row(worker="w1", expires=50.0))
        assert journal.still_held(s, {rid: 0}, "w1") == {rid}
    with sessions.begin() as s:  # w1's lease ran out; w2 takes the file
        assert journal.take_over(s, rid, 0, "w2", 200.0)
        assert not journal.take_over(s, rid, 0, "w3", 200.0)  # a third that read the old token loses the race
    with sessions.begin() as s:
        assert journal.still_held(s, {rid: 0}, "w1") == set()  # w1, back, holds nothing: it writes nothing
        assert journal.still_held(s, {rid: 1}, "w2") == {rid}
        assert journal.renew_leases(s, "w2", 300.0) == 1 and journal.renew_leases(s, "w1", 300.0) == 0
        assert s.get(Result, rid).lease_expires_at == 300.0
        assert journal.db_time(s) > 1.7e9  # epoch seconds on the database's clock
    eng.dispose()


def test_committed_but_unmoved_rows_keep_their_lease_moved_ones_do_not(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    with sessions.begin() as s:
        waiting = journal.try_claim(s, _claim_row(path="/in/w.png"))
        done = journal.try_claim(s, _claim_row(path="/in/d.png"))
        left = journal.try_claim(s, _claim_row(path="/in/l.png"))
        s.execute(update(Result).where(Result.id == waiting).values(status=Status.OK, moved_to="/out/w.png"))
        s.execute(
            update(Result)
            .where(Result.id == done)
            .values(status=Status.OK, moved_to="/out/d.png", moved_at=dt.datetime(2026, 1, 2))
        )
        s.execute(update(Result).where(Result.id == left).values(status=Status.OK))  # left in place: done
        assert journal.renew_leases(s, "w1", 500.0) == 1
        assert s.get(Result, waiting).lease_expires_at == 500.0
    eng.dispose()


# -- the state machine, step by step -------------------------------------------------------------------------
NOW = dt.datetime(2026, 1, 1, 12)


def _file(path, size=10, mtime=1, sha="s", still_there=lambda: True) -> journal.FileClaim:
    return journal.FileClaim(str(path), size, mtime, NOW, {"sha256": sha}, still_there=still_there)


class _Model:
    model_id, threshold, temperature, calibration_id = "m-1", 0.5, 1.5, "cal-1"


class _Score:
    def __init__(self, logit, flagged):
        self.logit, self.probability, self.flagged = logit, 0.9 if flagged else 0.1, flagged
        self.label = "PNEUMONIA" if flagged else "NORMAL"


def _commit(sessions, outcomes, worker, place=lambda o: None):
    with sessions.begin() as s:
        return journal.commit_batch(
            s, outcomes, worker=worker, model=_Model(), wait_ms=1.0, model_ms=2.0, place=place, now=NOW
        )


def _expire(sessions, row_id):
    with sessions.begin() as s:  # its worker stopped renewing: the lease ran out long ago
        s.execute(update(Result).where(Result.id == row_id).values(lease_expires_at=journal.db_time(s) - 1000))


def test_claim_takeover_fencing_commit_and_move(any_db):
    sessions = session_factory(eng := make_engine(any_db))
    w1, w2 = journal.Lease("w1", 30, exclusive=False), journal.Lease("w2", 30, exclusive=False)
    with sessions.begin() as s:
        [a] = journal.claim_files(s, [_file("/in/a.png")], w1, NOW)
    assert a.outcome == journal.Claim.NEW and a.token == 0 and a.received_at == NOW
    with sessions.begin() as s:  # a live worker holds it: the other looks again once its lease would end
        [held] = journal.claim_files(s, [_file("/in/a.png")], w2, NOW)
    assert held.outcome == journal.Claim.HELD and 25 < held.retry_in_s < 40
    _expire(sessions, a.row_id)
    with sessions.begin() as s:
        [redo] = journal.claim_files(s, [_file("/in/a.png", sha="s2")], w2, NOW)
    assert (redo.outcome, redo.row_id, redo.token, redo.taken_from) == (journal.Claim.REDO, a.row_id, 1, "w1")
    with sessions.begin() as s:
        assert journal.still_held(s, {a.row_id: 0}, "w1") == set()  # w1, back, holds nothing
        assert journal.still_held(s, {a.row_id: 1}, "w2") == {a.row_id}
        row = s.get(Result, a.row_id)
        assert (row.lease_holder, row.sha256, row.status) == ("w2", "s2", Status.CLAIMED)
    # w1 commits what it scored before it was presumed dead: nothing is written
    stale = journal.Outcome(a.row_id, 0, Status.OK, NOW, score=_Score(2.0, True))
    lost = _commit(sessions, [stale], "w1", place=lambda o: "/out/processed/a.png")
    assert lost.rows == {} and lost.lost == [stale]
    fresh = journal.Outcome(a.row_id, 1, Status.OK, NOW, score=_Score(-1.0, False))
    done = _commit(sessions, [fresh], "w2", place=lambda o: "/out/processed/a.png")
    assert list(done.rows) == [a.row_id] and done.lost == []
    with sessions() as s:
        row = s.get(Result, a.row_id)
        assert (row.status, row.logit, row.label, row.flagged, row.worker_id) == (
            Status.OK,
            -1.0,
            "NORMAL",
            False,
            "w2",
        )
        assert (row.model_id, row.calibration_id, row.batch_id, row.moved_to) == (
            "m-1",
            "cal-1",
            done.batch_id,
            "/out/processed/a.png",
        )
        assert row.moved_at is None and row.lease_token == 1
    _expire(sessions, a.row_id)  # w2 stopped before the move: a takeover now says only the move is left
    with sessions.begin() as s:
        [left] = journal.claim_files(s, [_file("/in/a.png")], w1, NOW)
    assert (left.outcome, left.token, left.moved_to) == (journal.Claim.COMMITTED, 2, "/out/processed/a.png")
    with sessions.begin() as s:  # w2's move record is fenced off too; w1's is written
        assert journal.record_moves(s, {a.row_id: (1, "/out/processed/a.png", NOW)}, "w2") == set()
        assert journal.record_moves(s, {a.row_id: (2, "/out/processed/a.png", NOW)}, "w1") == {a.row_id}
    with sessions() as s:
        assert s.get(Result, a.row_id).moved_at == NOW
    with sessions.begin() as s:  # moved: the name is free for a new file of the same identity
        [again] = journal.claim_files(s, [_file("/in/a.png")], w2, NOW)
    assert again.outcome == journal.Claim.NEW and again.row_id != a.row_id
    eng.dispose()


def test_a_claim_of_a_file_another_worker_moved_meanwhile_is_dropped(any_db):
    sessions = session_factory(eng := make_engine(any_db))
    with sessions.begin() as s:
        [c] = journal.claim_files(
            s, [_file("/in/a.png", still_there=lambda: False)], journal.Lease("w", 30, False), NOW
        )
    assert c.outcome == journal.Claim.MOVED_AWAY
    with sessions() as s:
        assert s.scalars(select(Result)).all() == []
    eng.dispose()


def test_commit_of_duplicates_errors_and_skips(any_db):
    sessions = session_factory(eng := make_engine(any_db))
    lease = journal.Lease("w", 30)
    with sessions.begin() as s:
        claims = journal.claim_files(s, [_file(f"/in/{n}.png") for n in "abcd"], lease, NOW)
    a, b, c, d = (x.row_id for x in claims)
    done = _commit(
        sessions,
        [
            journal.Outcome(a, 0, Status.OK, NOW, score=_Score(3.0, True)),
            journal.Outcome(b, 0, Status.DUPLICATE, NOW, duplicate_of=a),  # its first in the same batch
            journal.Outcome(c, 0, Status.ERROR, NOW, error="cannot decode image: truncated"),
            journal.Outcome(d, 0, Status.SKIPPED, NOW, error="modality CT is not in scope"),
        ],
        "w",
        place=lambda o: f"/out/{o.status}/{o.row_id}",
    )
    assert done.lost == []
    with sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Result))}
        batch = s.get(schema.Batch, done.batch_id)
    assert (rows[b].status, rows[b].duplicate_of, rows[b].logit, rows[b].flagged) == (Status.DUPLICATE, a, 3.0, True)
    assert (rows[c].status, rows[c].error, rows[c].logit) == (Status.ERROR, "cannot decode image: truncated", None)
    assert rows[d].status == Status.SKIPPED and rows[d].moved_to == f"/out/skipped/{d}"
    assert (batch.size, batch.n_ok, batch.n_error, batch.n_duplicate) == (4, 1, 1, 1)
    with sessions.begin() as s:  # a later duplicate of a committed film takes its score from the database
        [e] = journal.claim_files(s, [_file("/in/e.png")], lease, NOW)
    _commit(sessions, [journal.Outcome(e.row_id, 0, Status.DUPLICATE, NOW, duplicate_of=a)], "w")
    with sessions() as s:
        assert s.get(Result, e.row_id).probability == rows[a].probability
    eng.dispose()


def test_give_back_deletes_only_what_is_still_held(any_db):
    sessions = session_factory(eng := make_engine(any_db))
    with sessions.begin() as s:
        [a, b] = journal.claim_files(s, [_file("/in/a.png"), _file("/in/b.png")], journal.Lease("w", 30, False), NOW)
    with sessions.begin() as s:
        journal.give_back(s, {a.row_id: 0, b.row_id: 5}, "w")  # b's token is not the one held
    with sessions() as s:
        assert [r.id for r in s.scalars(select(Result))] == [b.row_id]
    eng.dispose()


def test_settle_at_start_redoes_releases_fails_and_takes_over_moves(tmp_path, any_db):
    sessions = session_factory(eng := make_engine(any_db))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    there, changed, unmoved = inbox / "there.png", inbox / "changed.png", inbox / "unmoved.png"
    for p in (there, changed, unmoved):
        p.write_bytes(b"x" * 10)
    st, su = there.stat(), unmoved.stat()
    dead = journal.Lease("dead", 30)
    with sessions.begin() as s:
        claims = journal.claim_files(
            s,
            [
                _file(there, st.st_size, st.st_mtime_ns),
                _file(changed, 3, 1),
                _file(inbox / "gone.png"),
                _file(inbox / "other" / "x.png"),
                _file(unmoved, su.st_size, su.st_mtime_ns),
            ],
            dead,
            NOW,
        )
    ids = [c.row_id for c in claims]
    _commit(
        sessions,
        [journal.Outcome(ids[4], 0, Status.OK, NOW, score=_Score(0.0, False))],
        "dead",
        place=lambda o: "/out/u.png",
    )
    with sessions.begin() as s:
        settled, moves = settle.settle_at_start(s, lambda p: "other" not in p, journal.Lease("me", 30), NOW)
    assert [(x.row_id, x.outcome) for x in settled] == [
        (ids[0], "redo"),
        (ids[1], "release"),
        (ids[2], "gone"),
        (ids[3], "release"),
    ]
    assert [(m.row_id, m.path, m.identity, m.moved_to, m.token) for m in moves] == [
        (ids[4], str(unmoved), (su.st_size, su.st_mtime_ns), "/out/u.png", 1)
    ]
    with sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Result))}
    assert set(rows) == {ids[0], ids[2], ids[4]}
    assert rows[ids[0]].status == Status.CLAIMED
    gone = rows[ids[2]]
    assert (gone.status, gone.error, gone.processed_at, gone.moved_at) == (Status.ERROR, settle.GONE, NOW, NOW)
    assert rows[ids[4]].lease_holder == "me" and rows[ids[4]].lease_token == 1
    eng.dispose()


def test_sweep_leaves_live_leases_and_files_still_there_alone(tmp_path, any_db):
    sessions = session_factory(eng := make_engine(any_db))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "there.png").write_bytes(b"x")
    st = (inbox / "there.png").stat()
    with sessions.begin() as s:
        live = journal.claim_files(s, [_file(inbox / "live.png")], journal.Lease("alive", 1000, False), NOW)[0]
        there, gone = journal.claim_files(
            s,
            [_file(inbox / "there.png", st.st_size, st.st_mtime_ns), _file(inbox / "gone.png")],
            journal.Lease("dead", 30, False),
            NOW,
        )
    for c in (there, gone):
        _expire(sessions, c.row_id)
    with sessions.begin() as s:
        done = settle.sweep(s, lambda p: True, journal.Lease("me", 30, False), NOW)
    assert [(x.row_id, x.outcome, x.holder) for x in done] == [(gone.row_id, "gone", "dead")]
    with sessions() as s:
        assert s.get(Result, live.row_id).status == s.get(Result, there.row_id).status == Status.CLAIMED
    eng.dispose()
