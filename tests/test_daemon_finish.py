"""daemon/finish.py in process: moves made and recorded under the row's lease, files changed or taken over
left alone, failed moves tried again, and CSV updates paced under a stream of batches."""

from __future__ import annotations

import os
import time

import daemon_parts
import pytest
from daemon_parts import film

from xr.daemon.finish import Finisher, PendingMove
from xr.daemon.stage import Supervisor
from xr.results import journal, rows
from xr.results.schema import Result, Status, utcnow


class Exporter:
    elect = False  # the only daemon on its database

    def __init__(self, handled=None):
        self.handled = handled if handled is not None else []
        self.calls = []

    def export(self):
        self.calls.append(self.handled[:])


@pytest.fixture()
def parts(tmp_path):
    p = daemon_parts.parts(tmp_path, predictor=None)
    yield p
    p.close()


def _committed(p, path, moved_to):
    """A claimed and committed row for ``path`` (the inferer's work), its PendingMove."""
    st = os.lstat(path)
    lease = p.rt.lease
    with p.rt.sessions.begin() as s:
        [c] = journal.claim_files(
            s, [journal.FileClaim(str(path), st.st_size, st.st_mtime_ns, utcnow(), {})], lease, utcnow()
        )
        rows.update_rows(s, [{"id": c.row_id, "status": Status.OK, "moved_to": str(moved_to)}])
    p.destinations.hold(str(moved_to))
    return PendingMove(c.row_id, str(path), (st.st_size, st.st_mtime_ns), str(moved_to), c.token)


def _row(p, row_id):
    with p.rt.sessions() as s:
        return s.get(Result, row_id)


def test_moves_are_made_recorded_and_released(parts, tmp_path):
    p = parts
    a = film(tmp_path / "inbox" / "a.png", 1)
    b = film(tmp_path / "inbox" / "b.png", 2)
    dest = tmp_path / "out" / "processed"
    ma, mb = _committed(p, a, dest / "a.png"), _committed(p, b, dest / "b.png")
    with open(b, "ab") as f:
        f.write(b"new bytes")  # rewritten in place after it was read: never moved under the old row
    fin = Finisher(p.rt, p.discovery, p.destinations, Exporter(), p.finish)
    fin.move([ma, mb])
    assert (dest / "a.png").read_bytes() and not a.exists() and b.exists()
    assert _row(p, ma.row_id).moved_at is not None and _row(p, ma.row_id).moved_to == str(dest / "a.png")
    assert _row(p, mb.row_id).moved_at is not None and _row(p, mb.row_id).moved_to is None  # recorded as gone
    assert p.discovery.released == [(str(a), None), (str(b), None)] and len(p.destinations) == 0
    assert p.log.named("move_skipped")[0]["id"] == mb.row_id


def test_a_move_whose_lease_was_taken_is_not_made(parts, tmp_path):
    p = parts
    a = film(tmp_path / "inbox" / "a.png", 1)
    m = _committed(p, a, tmp_path / "out" / "processed" / "a.png")
    with p.rt.sessions.begin() as s:
        assert journal.take_over(s, m.row_id, m.token, "other", journal.db_time(s) + 60)
    Finisher(p.rt, p.discovery, p.destinations, Exporter(), p.finish).move([m])
    assert a.exists() and _row(p, m.row_id).moved_at is None
    assert p.log.named("lease_lost")[0]["id"] == m.row_id and p.discovery.released == [(str(a), None)]


def test_a_failed_move_is_settled_and_tried_again(parts, tmp_path, monkeypatch):
    p = parts
    a = film(tmp_path / "inbox" / "a.png", 1)
    m = _committed(p, a, tmp_path / "out" / "processed" / "a.png")
    from xr.daemon import finish

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(finish, "move_no_overwrite", refuse)
    fin = Finisher(p.rt, p.discovery, p.destinations, Exporter(), p.finish)
    fin.move([m])
    assert p.discovery.released == [(str(a), m.identity)]  # not picked up again while it is there as scored
    assert _row(p, m.row_id).moved_at is None and p.log.named("move_failed")
    monkeypatch.undo()
    fin.step(time.monotonic() + finish.MOVE_RETRY_S + 1)  # its retry is due
    assert not a.exists() and _row(p, m.row_id).moved_at is not None


def test_csv_updates_are_paced_under_a_stream_and_catch_up_at_the_end(parts):
    """A backlog of finished batches is exported once it is handled, not once per batch; and the last
    state always reaches the CSVs, also what is still queued when the stage is stopped."""
    p = parts
    handled = p.discovery.released
    exporter = Exporter(handled)
    for i in range(200):  # 200 finished batches waiting (files left in place: no move, no DB)
        p.finish.put([PendingMove(i, f"/in/{i}.png", (1, 1), None)])
    runner = Supervisor([Finisher(p.rt, p.discovery, p.destinations, exporter, p.finish)])
    runner.start()
    deadline = time.monotonic() + 30
    while not p.finish.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    p.finish.put([PendingMove(200, "/in/200.png", (1, 1), None)])
    runner.stop()
    assert runner.failed() == [] and len(handled) == 201
    assert len(exporter.calls) <= 5, len(exporter.calls)  # not 200
    assert exporter.calls[-1] == handled  # everything handled reached the CSVs
