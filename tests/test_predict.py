"""Calibrated prediction (core/predict.py): temperature and threshold from calibration_threshold.json,
labels and flags, device choice, per-file errors, and the CPU fast paths matching fp32."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xr.core.errors import CheckpointError, ImageError
from xr.core.predict import (
    CALIBRATION_FILE,
    Calibration,
    Prediction,
    Predictor,
    autocast,
    cpu_has_fast_bf16,
    resolve_device,
    use_bf16,
)


def _model_dir(tmp_path: Path, checkpoint: Path, calibration: dict | str | None) -> Path:
    """A folder holding (a link to) the checkpoint and, optionally, a calibration file beside it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    link = tmp_path / checkpoint.name
    link.symlink_to(checkpoint)
    if calibration is not None:
        text = calibration if isinstance(calibration, str) else json.dumps(calibration)
        (tmp_path / CALIBRATION_FILE).write_text(text)
    return link


@pytest.fixture(scope="module")
def scored_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """conftest's checkpoint with a seeded random head (create_model starts the head at zero, which
    would give every image logit 0), and the same calibration file beside it (T=1.5, threshold 0.5)."""
    raw = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    raw["model"]["classifier.weight"] = torch.randn(raw["model"]["classifier.weight"].shape, generator=gen) * 0.05
    out = tmp_path_factory.mktemp("scored") / tiny_checkpoint.name
    torch.save(raw, out)
    (out.parent / CALIBRATION_FILE).write_text((tiny_checkpoint.parent / CALIBRATION_FILE).read_text())
    return out


@pytest.fixture(scope="module")
def images(xray_paths) -> list[Path]:
    """12 fixture images, 6 NORMAL and 6 PNEUMONIA (few forwards: the CPU is shared)."""
    return xray_paths[:6] + xray_paths[-6:]


@pytest.fixture(scope="module")
def base(scored_checkpoint, images):
    """The scored model (calibration T=1.5, threshold 0.5 beside it) on the 12 images, plain fp32."""
    predictor = Predictor.from_checkpoint(scored_checkpoint, device="cpu", amp="off", channels_last=False)
    preds = predictor.predict_paths(images, batch_size=32)
    return predictor, preds


def test_reads_calibration_beside_checkpoint(base):
    predictor, preds = base
    assert predictor.temperature == 1.5 and predictor.threshold == 0.5
    assert predictor.calibration.extra["objective"] == "f1"
    digest = predictor.model_sha256
    assert predictor.model_id == f"efficientnet_lite0-{digest[:12]}" and len(digest) == 64  # the weights
    assert predictor.calibration_id.startswith("validation-")  # and the calibration, apart
    assert len(preds) == 12 and all(isinstance(p, Prediction) for p in preds)
    for p in preds:
        assert p.probability == pytest.approx(1 / (1 + math.exp(-p.logit / 1.5)), abs=1e-6)
        assert p.flagged == (p.probability >= 0.5)
        assert p.label == ("PNEUMONIA" if p.flagged else "NORMAL")
    assert len({round(p.logit, 4) for p in preds}) == 12  # the images really get different scores


def test_threshold_and_temperature_decide_label_and_flag(base, scored_checkpoint, images, tmp_path):
    _, preds = base
    logits = [p.logit for p in preds]
    t = 2.0
    probs = sorted(1 / (1 + math.exp(-z / t)) for z in logits)
    threshold = (probs[5] + probs[6]) / 2  # 6 images below, 6 above
    ckpt = _model_dir(tmp_path / "m", scored_checkpoint, {"T": t, "threshold": threshold, "note": "test"})
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", amp="off", channels_last=False)
    assert predictor.temperature == t and predictor.threshold == threshold
    got = predictor.predict_paths(images)
    flags = [p.flagged for p in got]
    assert sum(flags) == 6 and len(flags) - sum(flags) == 6
    for old, new in zip(preds, got):
        assert new.logit == pytest.approx(old.logit, abs=1e-5)  # same model, only calibration changed
        assert new.probability == pytest.approx(1 / (1 + math.exp(-new.logit / t)), abs=1e-6)
        assert new.flagged == (new.probability >= threshold)
        assert new.label == ("PNEUMONIA" if new.flagged else "NORMAL")


def test_probability_equal_to_threshold_is_flagged(base):
    predictor, preds = base
    p = preds[0].probability
    at = Predictor(predictor.model, predictor.meta, Calibration(1.5, p), device="cpu", amp="off", channels_last=False)
    assert at._prediction(preds[0].logit, p).flagged
    assert at._prediction(preds[0].logit, p).label == "PNEUMONIA"
    assert not at._prediction(preds[0].logit, math.nextafter(p, 0.0)).flagged


def test_missing_calibration_file_means_uncalibrated(base, scored_checkpoint, images, tmp_path):
    _, preds = base
    ckpt = _model_dir(tmp_path / "m", scored_checkpoint, None)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", amp="off", channels_last=False)
    assert predictor.temperature == 1.0 and predictor.threshold == 0.5
    assert predictor.calibration.extra == {"calibrated": False}
    got = predictor.predict_paths(images[:3])
    for old, new in zip(preds, got):
        assert new.probability == pytest.approx(1 / (1 + math.exp(-old.logit)), abs=1e-5)
        assert new.flagged == (new.probability >= 0.5)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"T": 0, "threshold": 0.5}, "T must be a positive"),
        ({"T": -1.2, "threshold": 0.5}, "T must be a positive"),
        ({"T": float("nan"), "threshold": 0.5}, "T must be a positive"),
        ({"T": 1.0, "threshold": 1.5}, "threshold must be between 0 and 1"),
        ({"T": 1.0, "threshold": 0.0}, "threshold must be between 0 and 1"),
        ({"T": 1.0, "threshold": -0.1}, "threshold must be between 0 and 1"),
        ({"T": "warm", "threshold": 0.5}, "numeric 'T' and 'threshold'"),
        ({"threshold": 0.5}, "numeric 'T' and 'threshold'"),
        ([1.0, 0.5], "numeric 'T' and 'threshold'"),
        ('{"T": 1.0, "threshold": ', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_invalid_calibration_file_is_rejected(tmp_path, content, words):
    path = tmp_path / CALIBRATION_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError) as info:
        Calibration.read(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_invalid_calibration_beside_checkpoint_fails_loading(scored_checkpoint, tmp_path):
    ckpt = _model_dir(tmp_path / "m", scored_checkpoint, {"T": -1, "threshold": 0.5})
    with pytest.raises(CheckpointError, match="T must be a positive"):
        Predictor.from_checkpoint(ckpt, device="cpu")
    # An explicitly named calibration file that is absent is an error, not a silent default.
    with pytest.raises(CheckpointError, match="calibration file not found"):
        Predictor.from_checkpoint(scored_checkpoint, calibration=tmp_path / "nope.json", device="cpu")


def test_a_site_calibration_shifts_and_scales_and_refuses_another_model(
    base, scored_checkpoint, tiny_checkpoint, images, tmp_path
):
    predictor, preds = base
    site = Calibration(temperature=0.5, shift=-1.0, threshold=0.7, kind="site", model_sha256=predictor.model_sha256)
    site.write(tmp_path / "site.json")
    with_site = Predictor.from_checkpoint(
        scored_checkpoint, calibration=tmp_path / "site.json", device="cpu", amp="off", channels_last=False
    )
    assert with_site.calibration_id.startswith("site-") and with_site.calibration_id != predictor.calibration_id
    for old, new in zip(preds, with_site.predict_paths(images)):
        assert new.probability == pytest.approx(1 / (1 + math.exp(-(old.logit / 0.5 - 1.0))), abs=1e-5)
        assert new.flagged == (new.probability >= 0.7)
    # the file records its model: with another checkpoint it is an error naming both
    with pytest.raises(CheckpointError, match=r"site\.json was fitted for model [0-9a-f]{12}, not this one"):
        Predictor.from_checkpoint(tiny_checkpoint, calibration=tmp_path / "site.json", device="cpu")
    with pytest.raises(CheckpointError, match="was fitted for model"):
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu").with_calibration(with_site.calibration)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_resolve_device_on_a_cpu_machine():
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(CheckpointError, match="MPS is not available"):
            resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(CheckpointError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_predict_paths_returns_image_error_in_place(base, images, tmp_path):
    predictor, preds = base
    text = tmp_path / "report.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [images[0], text, images[1], empty, tmp_path / "gone.png", images[2]]
    got = predictor.predict_paths(paths, batch_size=2)  # errors and images spread over batches
    assert len(got) == len(paths)
    assert [type(r).__name__ for r in got] == [
        "Prediction",
        "ImageError",
        "Prediction",
        "ImageError",
        "ImageError",
        "Prediction",
    ]
    for res, name in ((got[1], "report.png"), (got[3], "empty.jpg"), (got[4], "gone.png")):
        assert isinstance(res, ImageError) and name in str(res)
    for res, ref in ((got[0], preds[0]), (got[2], preds[1]), (got[5], preds[2])):
        assert res.probability == pytest.approx(ref.probability, abs=1e-5)
        assert res.label == ref.label


def test_amp_setting_chooses_bf16(base):
    predictor, _ = base
    assert predictor.bf16 is False  # amp="off"
    m, meta, cal = predictor.model, predictor.meta, predictor.calibration
    assert Predictor(m, meta, cal, device="cpu", amp="bf16", channels_last=False).bf16 is True
    assert Predictor(m, meta, cal, device="cpu", amp="auto", channels_last=False).bf16 is cpu_has_fast_bf16()
    cpu = torch.device("cpu")
    assert use_bf16(cpu, "auto", training=True) is False  # the CPU training step is faster in fp32
    assert use_bf16(cpu, "bf16", training=True) is True and use_bf16(cpu, "off") is False


def test_fast_paths_match_fp32(base, scored_checkpoint, images):
    """Tolerances on the calibrated probability, against plain fp32 (channels_last=False, amp="off"):
    channels_last fp32 within 1e-4 (same math, different memory order); bf16 autocast within 0.03
    (bf16 keeps ~3 significant digits). bf16 runs on only 2 images: it is emulated (slow) on AVX2 CPUs."""
    _, preds = base
    fast = Predictor.from_checkpoint(scored_checkpoint, device="cpu", amp="off", channels_last=True)
    assert fast.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    fast_preds = fast.predict_paths(images)
    for ref, got in zip(preds, fast_preds):
        assert abs(ref.probability - got.probability) < 1e-4
    batch = torch.stack([fast.preprocess(p) for p in (images[0], images[-1])])
    bf16 = Predictor.from_checkpoint(scored_checkpoint, device="cpu", amp="bf16", channels_last=True)
    assert bf16.bf16
    bf16_preds = bf16.predict_batch(batch)
    diffs = [abs(ref.probability - got.probability) for ref, got in zip((preds[0], preds[-1]), bf16_preds)]
    assert max(diffs) < 0.03, diffs
    assert all(isinstance(p.logit, float) and math.isfinite(p.logit) for p in bf16_preds)


def test_predict_batch_and_warmup(base, images):
    predictor, preds = base
    predictor.warmup(batch_size=2)
    batch = torch.stack([predictor.preprocess(p) for p in images[:2]])
    got = predictor.predict_batch(batch)
    assert [round(p.probability, 5) for p in got] == [round(p.probability, 5) for p in preds[:2]]


def test_cuda_graph_needs_a_cuda_device(base):
    predictor, _ = base
    with pytest.raises(CheckpointError, match="need a cuda device, not cpu"):
        predictor.capture_cuda_graph(4)
    assert predictor.has_cuda_graph is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_scores_like_eager(scored_checkpoint, images):
    """The daemon's CUDA path: batches up to the captured size replay the graph (padded), larger ones and
    float tensors run eager, and every result is the eager result of the same batch."""
    eager = Predictor.from_checkpoint(scored_checkpoint, device="cuda")
    graphed = Predictor.from_checkpoint(scored_checkpoint, device="cuda")
    graphed.capture_cuda_graph(8)
    assert graphed.has_cuda_graph
    pixels = torch.stack([eager.pixels(p) for p in images])  # 12 images
    small = graphed.logits(pixels[:5])
    torch.testing.assert_close(small, eager.logits(pixels[:5]), atol=1e-3, rtol=0)
    other = graphed.logits(pixels[5:8])  # a second replay must not overwrite the first result
    torch.testing.assert_close(small, eager.logits(pixels[:5]), atol=1e-3, rtol=0)
    torch.testing.assert_close(other, eager.logits(pixels[5:8]), atol=1e-3, rtol=0)
    torch.testing.assert_close(graphed.logits(pixels), eager.logits(pixels), atol=1e-3, rtol=0)  # 12 > 8: eager
    floats = torch.stack([eager.preprocess(p) for p in images[:3]])
    torch.testing.assert_close(graphed.logits(floats), eager.logits(floats), atol=1e-3, rtol=0)
    assert [p.label for p in graphed.predict_batch(pixels[:8])] == [p.label for p in eager.predict_batch(pixels[:8])]
    # the graph's class activation maps: those of the eager forward, and its logits with maps or without
    with_maps, without = graphed.predict_batch(pixels[:5], cams=True), graphed.predict_batch(pixels[:5])
    assert [p.logit for p in with_maps] == [p.logit for p in without] and all(p.cam is None for p in without)
    for g, e in zip(with_maps, eager.predict_batch(pixels[:5], cams=True)):
        assert g.cam.shape == (7, 7) and abs(g.cam - e.cam).max() < 0.05  # bf16 on both: rounding only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tune_malloc_settings_are_accepted_by_glibc():
    # mallopt answers 0 for a setting it rejects: the daemon and training would run with glibc's defaults
    # (~20% slower on CPU) or worse, and nothing else would say so.
    # A fresh interpreter, so this test process keeps its own allocator settings.
    code = "from xr.core.predict import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_trim_malloc_returns_what_the_tuned_heap_keeps():
    # With tune_malloc's thresholds, 200 MB freed stays resident (so forwards reuse it); the daemon trims
    # once after its start-up checks, or their scratch memory would count in its peak RSS for good.
    code = """
import torch
from xr.core.predict import trim_malloc, tune_malloc
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
tune_malloc()
x = torch.ones(50 * 2**20)  # 200 MB from the heap (below the 256 MiB mmap threshold)
del x
kept = rss()
print(trim_malloc(), kept - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ok, released = out.stdout.split()
    assert ok == "True" and int(released) > 150


@pytest.mark.parametrize("amp", ["off", "auto"])
def test_cpu_trace_scores_like_eager(scored_checkpoint, images, amp):
    """The daemon's CPU path: uint8 batches of any size run the trace and give the eager logits to the
    bit (in fp32, and in bf16 where the CPU has it); float tensors still run eager."""
    eager = Predictor.from_checkpoint(scored_checkpoint, device="cpu", amp=amp)
    traced = Predictor.from_checkpoint(scored_checkpoint, device="cpu", amp=amp)
    assert traced.has_trace is False
    traced.trace_forward(4)
    assert traced.has_trace
    pixels = torch.stack([eager.pixels(p) for p in images])  # 12 images, more than the traced batch
    for n in (1, 3, 4, 12):
        assert torch.equal(traced.logits(pixels[:n]), eager.logits(pixels[:n])), n
    # the forward that also gives the class activation maps leaves the logits of the plain model(x) as they
    # were, to the bit, with maps asked for or not
    with torch.inference_mode():
        x = eager._normalize(pixels[:4]).contiguous(memory_format=torch.channels_last)
        with autocast(eager.device, eager.bf16):
            plain = eager.model(x).float().reshape(-1)
    for p in (eager, traced):
        for cams in (False, True):
            preds = p.predict_batch(pixels[:4], cams=cams)
            assert [q.logit for q in preds] == plain.tolist() and all((q.cam is not None) == cams for q in preds)

    def eager_forward(*args, **kwargs):
        raise AssertionError("eager forward called")

    traced._forward = eager_forward  # the trace holds its own graph: only non-pixel input reaches this
    assert torch.equal(traced.logits(pixels[:2]), eager.logits(pixels[:2]))
    with pytest.raises(AssertionError, match="eager forward called"):
        traced.logits(torch.stack([eager.preprocess(p) for p in images[:2]]))


@pytest.mark.parametrize("fault", ["differs", "fails"])
def test_cpu_trace_that_fails_or_scores_differently_is_refused(scored_checkpoint, images, monkeypatch, fault):
    """A trace whose logits differ from eager in any bit, or one that cannot be made, is not used: the
    eager forward stays and scores never depend on the switch."""
    predictor = Predictor.from_checkpoint(scored_checkpoint, device="cpu")
    real_trace = torch.jit.trace

    def faulty(module, example, **kwargs):
        if fault == "fails":
            raise TypeError("this model cannot be traced")
        traced = real_trace(module, example, **kwargs)
        return lambda x: tuple(t + 1e-6 for t in traced(x))

    monkeypatch.setattr(torch.jit, "trace", faulty)
    message = (
        "traced forward differs from eager by up to" if fault == "differs" else "cannot trace the forward: TypeError"
    )
    with pytest.raises(RuntimeError, match=message):
        predictor.trace_forward(4)
    assert predictor.has_trace is False
    pixels = torch.stack([predictor.pixels(p) for p in images[:2]])
    monkeypatch.undo()
    assert torch.equal(
        predictor.logits(pixels), Predictor.from_checkpoint(scored_checkpoint, device="cpu").logits(pixels)
    )


def test_cpu_trace_needs_the_cpu(scored_checkpoint):
    predictor = Predictor.from_checkpoint(scored_checkpoint, device="cpu")
    predictor.device = torch.device("cuda")  # only its type is read
    with pytest.raises(RuntimeError, match="for the CPU, not cuda"):
        predictor.trace_forward(4)
    assert predictor.has_trace is False


def test_a_checkpoint_that_stored_decode_limits_in_its_preset_loads_and_decodes_with_the_limits_given(
    tiny_checkpoint, tmp_path, images
):
    """Checkpoints made before DecodeLimits (the shipped model among them) carry max_pixels and
    dicom_window in their preset: they load, and those stored values no longer decide anything."""
    from xr.core.intake import DecodeLimits

    raw = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    raw["meta"]["preprocess"].update(max_pixels=10**9, dicom_window=3)
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    predictor = Predictor.from_checkpoint(old, device="cpu")
    assert predictor.preset == Predictor.from_checkpoint(tiny_checkpoint, device="cpu").preset
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        predictor.pixels(images[0].read_bytes(), DecodeLimits(max_pixels=1000), name=images[0].name)
    assert predictor.pixels(images[0]).shape == predictor.pixel_shape  # DecodeLimits() by default
