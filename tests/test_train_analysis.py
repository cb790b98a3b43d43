"""train/analysis.py: evaluation metrics and plots of a predictor on labelled items."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from xr.core.predict import Predictor
from xr.train.analysis import evaluate_items
from xr.train.calibrate import ece
from xr.train.data import Item


def test_evaluate_items_uses_the_configured_ece_bins(tiny_checkpoint, xray_paths, tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off")
    items = [Item(str(p), int(p.parent.name == "PNEUMONIA"), p.stem) for p in xray_paths[::3]]
    labels = [it.label for it in items]
    reported = {}
    for n_bins in (1, 15):
        out = tmp_path / f"bins{n_bins}"
        metrics = evaluate_items(predictor, items, out, num_workers=0, n_bins=n_bins)
        probs = np.array([float(r["probability"]) for r in csv.DictReader(open(out / "predictions.csv"))])
        assert metrics["ece"] == pytest.approx(ece(probs, labels, n_bins), abs=1e-5)
        assert (out / "reliability_diagram.png").exists()
        reported[n_bins] = metrics["ece"]
    assert reported[1] != pytest.approx(reported[15], abs=1e-4)  # the bin count matters on these images
