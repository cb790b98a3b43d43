"""Heatmaps from the scoring forward: the class activation map equals torchcam's Grad-CAM at ``bn2``
(core/predict.py), the overlay over the pixels the model saw (core/heatmap.py), and the ``xr-heatmap`` stage
(daemon/heatmaps.py) drawing submitted maps without a decode, and owed ones from the database."""

from __future__ import annotations

import copy
import datetime as dt
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from xr.core.heatmap import overlay, upsample, write_heatmap
from xr.core.predict import Predictor
from xr.daemon import heatmaps
from xr.daemon.heatmaps import HeatmapStage
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status, utcnow


@pytest.fixture(scope="module")
def pred(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")


@pytest.fixture(scope="module")
def films(pred, xray_paths) -> torch.Tensor:
    """uint8 pixels of 3 films, NORMAL and PNEUMONIA."""
    return torch.stack([pred.pixels(p.read_bytes()) for p in (xray_paths[0], *xray_paths[-2:])])


@pytest.fixture(scope="module")
def grad_cams(pred, films) -> np.ndarray:
    """torchcam's Grad-CAM of the logit at ``bn2`` for each film (one forward and backward of the batch on a
    private fp32 copy), at feature resolution and normalised as torchcam does."""
    from torchcam.methods import GradCAM

    model = copy.deepcopy(pred.model).float().eval().to(memory_format=torch.contiguous_format)
    x = pred._normalize(films).requires_grad_(True)
    cam = GradCAM(model, target_layer="bn2")
    try:
        with torch.enable_grad():
            (coarse,) = cam(class_idx=0, scores=model(x))
    finally:
        cam.remove_hooks()
    return coarse.detach().numpy()


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_the_scoring_forwards_map_is_grad_cam_at_bn2(pred, tiny_checkpoint, films, grad_cams, traced):
    if traced:
        pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")
        pred.trace_forward(len(films))
        assert pred.has_trace
    got = pred.predict_batch(films, cams=True)
    for p, want in zip(got, grad_cams):
        assert p.cam.shape == (7, 7) and p.cam.dtype == np.float32
        assert p.cam.min() == 0.0 and abs(p.cam.max() - 1.0) < 1e-6 and p.cam.std() > 0.05
        np.testing.assert_allclose(p.cam, want, atol=1e-5, rtol=0)
    assert np.abs(got[0].cam - got[-1].cam).mean() > 0.05  # another film, another map
    # without cams the same logits, to the bit, and no maps
    plain = pred.predict_batch(films)
    assert [p.logit for p in plain] == [p.logit for p in got] and all(p.cam is None for p in plain)


def test_upsample_is_torchs_bilinear():
    cam = np.random.default_rng(0).random((7, 7), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(224, 224), mode="bilinear")
    np.testing.assert_allclose(upsample(cam, 224), want[0, 0].numpy(), atol=1e-6)


def test_overlay_and_files(pred, films, tmp_path):
    cam = pred.predict_batch(films[2:], cams=True)[0].cam
    out = write_heatmap(tmp_path / "heatmaps", "7", films[2], cam)
    assert out == tmp_path / "heatmaps" / "7.png"
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (224, 224)  # the model's view; the review page scales it
        rgb = np.asarray(im, dtype=np.int64)
    assert np.array_equal(rgb, overlay(films[2], cam))  # the PNG holds the overlay exactly
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).mean() > 0.01  # colour where the model looked
    with Image.open(tmp_path / "heatmaps" / "7.map.png") as im:
        assert np.array_equal(np.asarray(im), np.rint(cam * 255).astype(np.uint8))  # the map as computed
    plain = overlay(films[2], np.zeros_like(cam)).astype(np.int64)
    assert np.array_equal(plain, np.repeat(films[2].numpy().transpose(1, 2, 0), 3, axis=2))  # no map: the film
    three = overlay(films[2].expand(3, -1, -1), cam)  # [3, S, S] pixels draw the same
    assert np.array_equal(three, rgb)
    assert not list((tmp_path / "heatmaps").glob(".*"))  # no temp file left
    with pytest.raises(ValueError, match="uint8"):
        overlay(films[2].float(), cam)
    Image.open(io.BytesIO(out.read_bytes())).verify()


# -- the xr-heatmap stage --------------------------------------------------------------------------------
class Log:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def info(self, event, **kw):
        self.events.append((event, kw))

    warning = info


def _db(tmp_path):
    engine = make_engine(tmp_path / "results.sqlite")
    return engine, session_factory(engine)


def _row(s, path, model_id, *, flagged=True, status=Status.OK, moved_to=None, moved=True, age_s=60.0, **extra) -> int:
    now = utcnow()
    row = Result(
        path=str(path),
        filename=path.name,
        size_bytes=1,
        mtime_ns=0,
        status=status,
        flagged=flagged,
        model_id=model_id,
        received_at=now,
        claimed_at=now,
        processed_at=now - dt.timedelta(seconds=age_s),
        moved_to=None if moved_to is None else str(moved_to),
        moved_at=now if moved_to is not None and moved else None,
        **extra,
    )
    s.add(row)
    s.flush()
    return row.id


def _stage(sessions, tmp_path, pred, log, **kw) -> HeatmapStage:
    return HeatmapStage(
        sessions,
        tmp_path / "heatmaps",
        "flagged",
        worker_id="w1",
        exclusive=True,
        lease_s=60.0,
        log=log,
        predictor=lambda: pred,
        **kw,
    )


def test_the_stage_draws_a_submitted_map_without_the_film(pred, films, tmp_path):
    engine, sessions = _db(tmp_path)
    gone = tmp_path / "inbox" / "gone.jpeg"  # never written: the stage must not read the film
    with sessions.begin() as s:
        rid = _row(s, gone, pred.model_id, moved_to=tmp_path / "processed" / "gone.jpeg", age_s=0.0)
        dup = _row(s, tmp_path / "inbox" / "again.jpeg", pred.model_id, status=Status.DUPLICATE, duplicate_of=rid)
    log = Log()
    stage = _stage(sessions, tmp_path, pred, log)
    cam = pred.predict_batch(films[2:], cams=True)[0].cam
    assert stage.submit(rid, films[2], cam, pred.model_id)
    assert stage.outstanding() >= 1
    assert stage.step(time.monotonic()) is False  # one film: it waits a moment for more to draw together
    assert stage.step(time.monotonic() + 1.0) is True
    want = str(tmp_path / "heatmaps" / f"{rid}.png")
    with sessions() as s:
        assert s.get(Result, rid).heatmap_path == want
        assert s.get(Result, dup).heatmap_path == want  # a duplicate shares its first's
    with Image.open(want) as im:
        assert np.array_equal(np.asarray(im), overlay(films[2], cam))
    assert [kw["source"] for e, kw in log.events if e == "heatmap"] == ["forward"]
    assert not any(e == "heatmap_failed" for e, _ in log.events)
    assert stage.outstanding() == 0 and stage.written == 1  # nothing owed: --once may stop
    # the queue brought every film: the database is looked at only every IDLE_PASS_S, not every second;
    # between passes a re-export that came after its first was drawn gets its heatmap all the same
    with sessions.begin() as s:
        later = _row(
            s, tmp_path / "inbox" / "later.jpeg", pred.model_id, status=Status.DUPLICATE, duplicate_of=rid, age_s=0
        )
    now, passes = time.monotonic(), stage.passes
    stage.step(now + 5.0)
    assert stage.passes == passes
    with sessions() as s:
        assert s.get(Result, later).heatmap_path == want
    stage.step(now + heatmaps.IDLE_PASS_S + 1.0)
    assert stage.passes == passes + 1
    engine.dispose()


def test_a_full_queue_drops_to_the_database_and_the_fallback_draws_it(pred, films, xray_paths, tmp_path, monkeypatch):
    monkeypatch.setattr(heatmaps, "SETTLE_S", 0.0)  # the rows here are old: no need to wait for them to settle
    engine, sessions = _db(tmp_path)
    moved = tmp_path / "processed" / "film.jpeg"
    moved.parent.mkdir()
    moved.write_bytes(xray_paths[-1].read_bytes())
    with sessions.begin() as s:
        owed = _row(s, tmp_path / "inbox" / "film.jpeg", pred.model_id, moved_to=moved)
        _row(s, tmp_path / "inbox" / "normal.jpeg", pred.model_id, flagged=False, moved_to=moved)  # none wanted
        _row(s, tmp_path / "inbox" / "other.jpeg", "another-model", moved_to=moved)  # not this model's to draw
        late = _row(s, tmp_path / "inbox" / "late.jpeg", pred.model_id, moved_to=moved, moved=False)
        earlier = _row(s, tmp_path / "inbox" / "earlier.jpeg", pred.model_id, heatmap_path="/h/earlier.png")
        copy_of = _row(
            s, tmp_path / "inbox" / "copy.jpeg", pred.model_id, status=Status.DUPLICATE, duplicate_of=earlier
        )
    log = Log()
    stage = _stage(sessions, tmp_path, pred, log, max_queued=0, every_s=0.0)
    assert not stage.submit(owed, films[2], np.zeros((7, 7), np.float32), pred.model_id)  # full: dropped
    assert stage.outstanding() >= 1
    assert stage.step(0.0) is True  # the database pass draws the owed row: one decode, one forward
    with sessions() as s:
        assert s.get(Result, owed).heatmap_path == str(tmp_path / "heatmaps" / f"{owed}.png")
        assert {r.id for r in s.query(Result).filter(Result.heatmap_path.is_not(None))} == {owed, earlier, copy_of}
        assert s.get(Result, copy_of).heatmap_path == "/h/earlier.png"  # a re-export after its first was drawn
    want = pred.predict_batch(pred.pixels(moved.read_bytes())[None], cams=True)[0].cam
    with Image.open(tmp_path / "heatmaps" / f"{owed}.map.png") as im:
        assert np.array_equal(np.asarray(im), np.rint(want * 255).astype(np.uint8))
    assert [kw["source"] for e, kw in log.events if e == "heatmap"] == ["fallback"]
    assert stage.outstanding() == 1  # the film not yet moved is still owed: --once waits for it
    with sessions.begin() as s:
        s.get(Result, late).moved_at = utcnow()
    assert stage.step(time.monotonic()) is True  # the next pass draws it
    assert stage.outstanding() == 0 and stage.step(time.monotonic()) is False
    engine.dispose()


def test_a_film_that_cannot_be_read_is_tried_once(pred, tmp_path):
    engine, sessions = _db(tmp_path)
    with sessions.begin() as s:
        rid = _row(s, tmp_path / "inbox" / "x.jpeg", pred.model_id, moved_to=tmp_path / "processed" / "x.jpeg")
    log = Log()
    stage = _stage(sessions, tmp_path, pred, log)
    assert stage.step(0.0) is True and stage.step(10.0) is False
    assert [kw["id"] for e, kw in log.events if e == "heatmap_failed"] == [rid]
    assert stage.outstanding() == 0
    engine.dispose()
