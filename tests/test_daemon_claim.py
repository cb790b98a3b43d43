"""daemon/claim.py in process, through ``Claimer.step``: reading once, claiming rows, decoding, and what
becomes of files that vanish, change, cannot be read, are duplicates or belong to another worker."""

from __future__ import annotations

import dataclasses
import os
import time

import daemon_parts
import pytest
import torch
from daemon_parts import film, item
from sqlalchemy import select, update

from xr.core.intake import InputUnavailable
from xr.core.predict import Predictor
from xr.daemon import claim
from xr.daemon.claim import Claimer
from xr.daemon.runtime import WorkSlots
from xr.results import journal, settle
from xr.results.schema import Result, Status, utcnow


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture()
def make(tmp_path, predictor):
    made = []

    def build(slots: int = 8, **kw):
        p = daemon_parts.parts(tmp_path, predictor, **kw)
        p.slots = WorkSlots(slots)
        c = Claimer(p.rt, p.discovery, p.model, p.slots, p.ready, p.decoded, p.finish)
        made.append((p, c))
        return p, c

    yield build
    for p, c in made:
        c.close()
        p.close()


def _rows(p):
    with p.rt.sessions() as s:
        return {r.path: r for r in s.scalars(select(Result))}


def _free(slots: WorkSlots) -> int:
    n = 0
    while slots.take_now():
        n += 1
    slots.give_back(n)
    return n


def test_ready_files_are_claimed_and_decoded(make, tmp_path):
    p, c = make(slots=3)
    paths = [film(tmp_path / "inbox" / f"{n}.png", n) for n in range(3)]
    for path in paths:
        p.ready.put(item(path))
    assert c.step(time.monotonic())
    got = {f.item.path: f for f in p.drain(p.decoded, 3)}
    rows = _rows(p)
    for path in paths:
        f, row = got[str(path)], rows[str(path)]
        assert f.row_id == row.id and f.token == 0 and f.error is None and f.duplicate_of is None
        assert f.pixels is not None and f.pixels.dtype == torch.uint8 and f.preset == p.model.predictor.preset
        assert row.status == Status.CLAIMED and row.lease_holder == "me" and row.sha256 == f.sha256
        assert f.data == path.read_bytes()  # kept until the commit
    assert _free(p.slots) == 0  # each file holds its slot until its batch leaves the inferer
    assert not c.step(time.monotonic())  # nothing ready: no work


def test_vanished_changed_and_unavailable_files_get_no_row_and_their_slots_back(make, tmp_path, monkeypatch):
    p, c = make(slots=3)
    gone, grown, away = (film(tmp_path / "inbox" / f"{n}.png", i) for i, n in enumerate(("gone", "grown", "away")))
    items = [item(gone), item(grown), item(away)]
    gone.unlink()
    with open(grown, "ab") as f:
        f.write(b"more")  # written again after it looked complete
    read = claim.read_input

    def share_away(path, *a, **kw):
        if str(path) == str(away):
            raise InputUnavailable(path, "share unavailable (Stale file handle)")
        return read(path, *a, **kw)

    monkeypatch.setattr(claim, "read_input", share_away)
    for it in items:
        p.ready.put(it)
    assert c.step(time.monotonic())
    assert _rows(p) == {} and p.decoded.empty()
    assert sorted(path for path, _ in p.discovery.released) == sorted([str(gone), str(grown)])
    assert p.discovery.noted == [str(grown)]  # to settle again as a new file would
    assert [i.path for i in p.discovery.retried] == [str(away)]
    assert _free(p.slots) == 3


def test_unreadable_files_are_claimed_with_their_reason_and_not_decoded(make, tmp_path):
    p, c = make(max_file_mb=0.001)  # about 1 kB
    big = film(tmp_path / "inbox" / "big.png", 1, side=128)
    os.mkfifo(tmp_path / "inbox" / "pipe.png")
    for path in (big, tmp_path / "inbox" / "pipe.png"):
        p.ready.put(item(path))
    c.step(time.monotonic())
    got = {os.path.basename(f.item.path): f for f in p.drain(p.decoded, 2)}
    assert "over the limit of 1,048 (daemon.max_file_mb)" in got["big.png"].error
    assert got["pipe.png"].error == "not a regular file (a FIFO)"
    assert all(f.pixels is None and f.data is None and f.sha256 is None for f in got.values())
    assert {r.status for r in _rows(p).values()} == {Status.CLAIMED}


def test_a_film_scored_before_is_a_duplicate_without_a_decode(make, tmp_path):
    p, c = make()
    first, again = film(tmp_path / "inbox" / "a.png", 7), tmp_path / "inbox" / "sub" / "b.png"
    again.parent.mkdir()
    again.write_bytes(first.read_bytes())
    p.ready.put(item(first))
    c.step(time.monotonic())
    [f] = p.drain(p.decoded, 1)
    with p.rt.sessions.begin() as s:  # as the inferer commits it
        s.execute(update(Result).where(Result.id == f.row_id).values(status=Status.OK, moved_at=utcnow()))
    p.ready.put(item(again))
    c.step(time.monotonic())
    [dup] = p.drain(p.decoded, 1)
    assert dup.duplicate_of == f.row_id and dup.pixels is None and dup.sha256 == f.sha256


def test_files_other_workers_hold_wait_and_a_committed_one_is_only_moved(make, tmp_path):
    p, c = make(exclusive=False, worker="me")
    held, scored = film(tmp_path / "inbox" / "held.png", 1), film(tmp_path / "inbox" / "scored.png", 2)
    other = journal.Lease("other", 60, exclusive=False)
    with p.rt.sessions.begin() as s:
        files = [
            journal.FileClaim(str(x), x.stat().st_size, x.stat().st_mtime_ns, utcnow(), {}) for x in (held, scored)
        ]
        _, d = journal.claim_files(s, files, other, utcnow())
        # ``scored`` was committed by a worker that stopped before moving it
        s.execute(
            update(Result)
            .where(Result.id == d.row_id)
            .values(status=Status.OK, moved_to=str(tmp_path / "out" / "processed" / "scored.png"), lease_expires_at=0.0)
        )
    p.ready.put(item(held))
    p.ready.put(item(scored))
    c.step(time.monotonic())
    assert [i.path for i in p.discovery.retried] == [str(held)] and p.decoded.empty()
    [[move]] = p.drain(p.finish, 1)
    assert dataclasses.astuple(move)[:2] == (d.row_id, str(scored)) and move.token == 1
    assert move.moved_to == str(tmp_path / "out" / "processed" / "scored.png")
    assert p.log.named("lease_taken_over")[0]["from_worker"] == "other"
    assert _free(p.slots) == 8


def test_a_file_without_a_free_slot_waits_for_the_next_step_and_a_stop_gives_it_back(make, tmp_path):
    p, c = make(slots=1)
    a, b = film(tmp_path / "inbox" / "a.png", 1), film(tmp_path / "inbox" / "b.png", 2)
    p.ready.put(item(a))
    p.ready.put(item(b))
    assert c.step(time.monotonic())  # a claimed; b taken from the queue, kept for when a slot frees
    assert list(_rows(p)) == [str(a)] and p.ready.empty()
    assert c.step(time.monotonic())  # still no slot: a step that waited, and says there is more
    assert list(_rows(p)) == [str(a)]
    c.close()
    assert p.discovery.released == [(str(b), None)]


# -- files that may crash the process: claimed before any parse, marked while read ---------------------
def test_a_dicom_header_is_parsed_only_once_its_claim_row_exists(make, tmp_path, monkeypatch, xray_paths):
    """A header parse is the first thing a hostile file can crash, so it runs under a committed claim and a
    reading mark; its identifiers are recorded after it."""
    import dicom_films

    (tmp_path / "out").mkdir()
    marks = claim.ReadingMarks(tmp_path / "out")
    p, c = make()
    c.marks = marks
    path = dicom_films.write(
        dicom_films.cr_from_picture(xray_paths[0], AccessionNumber="ACC-9"), tmp_path / "inbox" / "a.dcm"
    )
    os.utime(path, (1, 1))
    seen = []
    parse = claim.dicom_facts

    def watched(data, limits):
        seen.append((_rows(p).get(str(path)), marks.take_left()))
        return parse(data, limits)

    monkeypatch.setattr(claim, "dicom_facts", watched)
    p.ready.put(item(path))
    c.step(time.monotonic())
    f = p.drain(p.decoded, 1)[0]
    row_at_parse, marked = seen[0]
    assert row_at_parse is not None and row_at_parse.status == Status.CLAIMED and marked == {row_at_parse.id}
    assert f.error is None and f.sop is not None and f.pixels is not None
    assert _rows(p)[str(path)].accession_number == "ACC-9"
    marks.close()


def test_reading_marks_outlive_a_process_that_dies_mid_read(tmp_path):
    """A mark is written before a parse or decode and cleared after; a process that dies in between leaves
    it for the next start, which takes it once."""
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    dies = (
        "import os, sys; from pathlib import Path; from xr.daemon.claim import ReadingMarks\n"
        "marks = ReadingMarks(Path(sys.argv[1]))\n"
        "with marks.reading(7):\n    pass\n"  # read to its end: cleared
        "with marks.reading(42):\n    os._exit(9)\n"  # killed mid-read
    )
    assert subprocess.run([sys.executable, "-c", dies, str(tmp_path / "out")]).returncode == 9
    assert (tmp_path / "out" / ".xr-daemon.reading").stat().st_mode & 0o777 == 0o600
    again = claim.ReadingMarks(tmp_path / "out")
    assert again.take_left() == {42}
    assert again.take_left() == set()
    again.close()


def test_a_claim_read_when_two_runs_died_is_set_aside(make, tmp_path, any_db):
    """settle.settle_at_start: each run that died reading a claim counts one crash; at the second the claim
    becomes an error row whose file goes where errors go, a move left like any other."""
    p, c = make(db=any_db)
    path = film(tmp_path / "inbox" / "killer.png", 1)
    c.claim([item(path)])
    f = p.drain(p.decoded, 1)[0]
    places = []

    def place(src):
        places.append(src)
        return str(tmp_path / "out" / "failed" / os.path.basename(src))

    for run in range(2):
        with p.rt.sessions.begin() as s:
            settled, moves = settle.settle_at_start(
                s, lambda _: True, p.rt.lease, utcnow(), crashed={f.row_id}, place=place
            )
        if run == 0:
            assert [x.outcome for x in settled] == ["redo"] and not moves
            assert _rows(p)[str(path)].read_crashes == 1
    row = _rows(p)[str(path)]
    assert [x.outcome for x in settled] == ["set_aside"] and places == [str(path)]
    assert row.status == Status.ERROR and "stopped twice" in row.error and row.read_crashes == 2
    assert [(m.row_id, m.moved_to) for m in moves] == [(f.row_id, str(tmp_path / "out" / "failed" / "killer.png"))]


def test_a_file_swapped_between_listing_and_read_is_not_claimed_under_the_listed_identity(make, tmp_path):
    """Another file renamed over a listed one (same size and mtime, so only the inode tells) is not read
    and scored as the file listed: no row, and the name goes back to discovery to settle as new work."""
    p, c = make()
    path = film(tmp_path / "inbox" / "a.png", 1)
    st = path.stat()
    listed = item(path, inode=(st.st_dev, st.st_ino))
    swap = film(tmp_path / "elsewhere" / "b.png", 2)
    os.utime(swap, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert swap.stat().st_size == st.st_size
    os.rename(swap, path)
    p.ready.put(listed)
    c.step(time.monotonic())
    assert _rows(p) == {} and p.decoded.empty()
    assert p.discovery.noted == [str(path)] and [r for r, _ in p.discovery.released] == [str(path)]


def test_an_exception_out_of_a_read_leaves_its_mark_as_a_crash_would(tmp_path):
    """Whatever escapes a parse or decode stops the stage, and the daemon, at every start: its mark stays,
    so the file is set aside at its second time like one that killed the process."""
    (tmp_path / "out").mkdir()
    marks = claim.ReadingMarks(tmp_path / "out")
    with pytest.raises(NotImplementedError):
        with marks.reading(5):
            raise NotImplementedError("Unknown Value Representation")
    marks.close()
    again = claim.ReadingMarks(tmp_path / "out")
    assert again.take_left() == {5}
    again.close()
