"""core/heatmap.py: a Grad-CAM map that says something about the film, drawn by the model that scored it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from xr.core.heatmap import gradcam, heatmap_model, overlay, write_heatmap
from xr.core.predict import Predictor


def _setup(tiny_checkpoint):
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")
    return pred, heatmap_model(pred.model)


def test_the_map_is_not_constant_and_follows_the_film(tiny_checkpoint, xray_paths):
    pred, model = _setup(tiny_checkpoint)
    maps = [gradcam(model, pred.preset, pred.pixels(p.read_bytes())) for p in (xray_paths[0], xray_paths[-1])]
    for m in maps:
        assert m.shape == (224, 224) and 0.0 <= m.min() and m.max() <= 1.0
        assert m.std() > 0.05, "a flat map says nothing"
    assert np.abs(maps[0] - maps[1]).mean() > 0.05  # another film, another map
    again = gradcam(model, pred.preset, pred.pixels(xray_paths[0].read_bytes()))
    assert np.allclose(again, maps[0], atol=1e-5)  # the same film, the same map


def test_the_map_is_the_scoring_models_own(tiny_checkpoint, xray_paths):
    """Another head on the same backbone looks elsewhere: a map is only meaningful for its own model."""
    pred, model = _setup(tiny_checkpoint)
    other = heatmap_model(pred.model)
    with torch.no_grad():
        other.get_classifier().weight.mul_(-1)
    pixels = pred.pixels(xray_paths[3].read_bytes())
    a, b = gradcam(model, pred.preset, pixels), gradcam(other, pred.preset, pixels)
    assert np.abs(a - b).mean() > 0.05
    # and the private copy leaves the scoring model untouched: no hooks, same scores
    before = pred.logits(pixels[None])
    gradcam(model, pred.preset, pixels)
    assert not pred.model._forward_hooks and torch.equal(pred.logits(pixels[None]), before)


def test_overlay_and_files(tiny_checkpoint, xray_paths, fullres_paths, tmp_path):
    pred, model = _setup(tiny_checkpoint)
    data = fullres_paths[0].read_bytes()
    cam = gradcam(model, pred.preset, pred.pixels(data))
    film = Image.open(fullres_paths[0]).convert("L")
    out = write_heatmap(tmp_path / "heatmaps", "7", film, cam, pred.preset)
    assert out == tmp_path / "heatmaps" / "7.png" and (tmp_path / "heatmaps" / "7.map.png").is_file()
    with Image.open(out) as im:
        assert im.mode == "RGB" and max(im.size) == 768  # a readable size
        rgb = np.asarray(im, dtype=np.int64)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 30).mean() > 0.01  # colour where the model looked
    plain = overlay(film, np.zeros_like(cam), pred.preset)
    grey = np.asarray(plain, dtype=np.int64)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 1  # no map, no colour: just the film
    assert not list((tmp_path / "heatmaps").glob(".*"))  # no temp file left
