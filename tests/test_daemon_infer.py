"""daemon/infer.py in process, through ``Inferer.step``: batches scored and committed, duplicates, error
rows, a lease taken over before the commit, cut-short files handed back, films passed on for heatmaps."""

from __future__ import annotations

import time

import daemon_parts
import pytest
from daemon_parts import film, item
from sqlalchemy import select, update

from xr.core.predict import Predictor
from xr.daemon.claim import Claimer
from xr.daemon.infer import Inferer
from xr.daemon.runtime import WorkSlots
from xr.results.schema import Result, Status


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


class Heatmaps:
    def __init__(self):
        self.submitted = []

    def submit(self, row_id, pixels, cam, model_id):
        self.submitted.append((row_id, pixels, cam, model_id))


@pytest.fixture()
def make(tmp_path, predictor):
    made = []

    def build(stage=None, **kw):
        p = daemon_parts.parts(tmp_path, predictor, **kw)
        p.slots = WorkSlots(8)
        claimer = Claimer(p.rt, p.discovery, p.model, p.slots, p.ready, p.decoded, p.finish)
        inferer = Inferer(p.rt, p.discovery, p.model, p.slots, p.destinations, p.decoded, p.finish, heatmaps=stage)
        made.append((p, claimer))
        return p, claimer, inferer

    yield build
    for p, claimer in made:
        claimer.close()
        p.close()


def _claim(p, claimer, paths, **kw):
    """Claim and decode ``paths`` as the claim stage does; the inferer's queue then holds them all."""
    for path in paths:
        p.ready.put(item(path, **kw))
    claimer.step(time.monotonic())
    deadline = time.monotonic() + 30
    while p.decoded.qsize() < len(paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.decoded.qsize() == len(paths)


def _rows(p):
    with p.rt.sessions() as s:
        return {r.filename: r for r in s.scalars(select(Result))}


def _free(slots):
    n = 0
    while slots.take_now():
        n += 1
    slots.give_back(n)
    return n


def test_a_batch_is_scored_committed_and_handed_to_the_finisher(make, tmp_path, predictor):
    p, claimer, inferer = make()
    paths = [film(tmp_path / "inbox" / f"{n}.png", n) for n in range(3)]
    _claim(p, claimer, paths)
    assert inferer.step(time.monotonic())
    rows = _rows(p)
    want = predictor.predict_paths(paths)
    for path, pred in zip(paths, want):
        row = rows[path.name]
        assert row.status == Status.OK and row.batch_id is not None and row.worker_id == "me"
        assert row.logit == pytest.approx(pred.logit, abs=1e-5) and row.flagged == pred.flagged
        assert row.model_id == predictor.model_id and row.calibration_id == predictor.calibration_id
        assert row.moved_to == str(tmp_path / "out" / "processed" / path.name) and row.moved_at is None
    [moves] = p.drain(p.finish, 1)
    assert sorted((m.src, m.moved_to) for m in moves) == sorted((str(x), rows[x.name].moved_to) for x in paths)
    assert inferer.batches == 1 and inferer.files == 3 and _free(p.slots) == 8
    [batch] = p.log.named("batch")
    assert (batch["size"], batch["scored"], batch["ok"]) == (3, 3, 3)
    assert not inferer.step(time.monotonic())  # nothing decoded: no work


def test_duplicates_in_one_batch_share_the_first_score_and_bad_films_are_error_rows(make, tmp_path):
    p, claimer, inferer = make()
    a = film(tmp_path / "inbox" / "a.png", 1)
    (tmp_path / "inbox" / "a-copy.png").write_bytes(a.read_bytes())
    (tmp_path / "inbox" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all" * 20)
    _claim(p, claimer, [a, tmp_path / "inbox" / "a-copy.png", tmp_path / "inbox" / "bad.png"])
    inferer.step(time.monotonic())
    rows = _rows(p)
    first, dup = sorted((rows["a.png"], rows["a-copy.png"]), key=lambda r: r.status != Status.OK)  # decode order
    bad = rows["bad.png"]
    assert (dup.status, dup.duplicate_of, dup.probability) == (Status.DUPLICATE, first.id, first.probability)
    assert bad.status == Status.ERROR and bad.error and bad.moved_to == str(tmp_path / "out" / "failed" / "bad.png")
    assert p.log.named("file_error")[0]["id"] == bad.id
    [batch] = p.log.named("batch")
    assert (batch["scored"], batch["ok"], batch["duplicates"], batch["errors"]) == (1, 1, 1, 1)


def test_a_file_another_worker_took_over_before_the_commit_is_not_written(make, tmp_path):
    p, claimer, inferer = make(exclusive=False)
    a, b = film(tmp_path / "inbox" / "a.png", 1), film(tmp_path / "inbox" / "b.png", 2)
    _claim(p, claimer, [a, b])
    with p.rt.sessions.begin() as s:  # this worker was presumed dead meanwhile; another took ``a``
        s.execute(
            update(Result)
            .where(Result.filename == "a.png")
            .values(lease_holder="other", lease_token=Result.lease_token + 1)
        )
    inferer.step(time.monotonic())
    rows = _rows(p)
    assert rows["a.png"].status == Status.CLAIMED and rows["a.png"].lease_holder == "other"
    assert rows["b.png"].status == Status.OK
    assert p.discovery.released == [(str(a), None)] and p.log.named("lease_lost")[0]["id"] == rows["a.png"].id
    [moves] = p.drain(p.finish, 1)
    assert [m.src for m in moves] == [str(b)]
    assert _free(p.slots) == 8


def test_a_cut_short_film_inside_its_grace_period_is_handed_back_with_no_row(make, tmp_path):
    p, claimer, inferer = make(incomplete_grace_s=60)
    whole = film(tmp_path / "inbox" / "whole.png", 3, side=256).read_bytes()
    cut = tmp_path / "inbox" / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])  # the writer paused mid-file
    _claim(p, claimer, [cut], changed_mono=time.monotonic())
    inferer.step(time.monotonic())
    assert "cut.png" not in _rows(p)
    assert [i.path for i in p.discovery.deferred] == [str(cut)]
    assert p.log.named("file_incomplete")[0]["watching_s"] > 50
    assert p.finish.empty() and _free(p.slots) == 8


@pytest.mark.parametrize("mode", ["all", "flagged"])
def test_films_that_get_a_heatmap_are_passed_on_with_their_pixels_and_map(make, tmp_path, mode):
    heatmaps = Heatmaps()
    p, claimer, inferer = make(stage=heatmaps, heatmaps=mode)
    paths = [film(tmp_path / "inbox" / f"{n}.png", n) for n in range(3)]  # and a duplicate: one claim batch
    (tmp_path / "inbox" / "dup.png").write_bytes(paths[0].read_bytes())
    _claim(p, claimer, [*paths, tmp_path / "inbox" / "dup.png"])
    inferer.step(time.monotonic())
    rows = _rows(p)
    want = {r.id for r in rows.values() if r.status == Status.OK and (mode == "all" or r.flagged)}
    assert {rid for rid, *_ in heatmaps.submitted} == want  # duplicates get their first's later
    for _, pixels, cam, model_id in heatmaps.submitted:
        assert pixels is not None and cam is not None and cam.ndim == 2 and 0 <= cam.min() <= cam.max() <= 1
        assert model_id == p.model.predictor.model_id


def test_the_inferer_draws_audit_cases_at_review_audit_rate(make, tmp_path):
    """review.audit_rate reaches the commit: at 1 every unflagged film is an audit case, no flagged one."""
    import dataclasses

    from xr.core.config import load_settings

    p, claimer, _ = make()
    paths = [film(tmp_path / "inbox" / f"{n}.png", n) for n in range(4)]
    _claim(p, claimer, paths)
    rt = dataclasses.replace(p.rt, cfg=load_settings(overrides={"review.audit_rate": 1.0}))
    inferer = Inferer(rt, p.discovery, p.model, p.slots, p.destinations, p.decoded, p.finish)
    assert inferer.step(time.monotonic())
    rows = _rows(p).values()
    assert [r.audit for r in rows] == [not r.flagged for r in rows]
    assert p.rt.cfg.review.audit_rate == 0.02  # the default
