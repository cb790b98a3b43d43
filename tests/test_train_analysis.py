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


def test_bootstrap_intervals_cover_the_population_value():
    """Samples of 200 films from a population with known accuracy 0.85: the 95% interval covers it in about
    95% of samples, and a larger sample gives a narrower interval."""
    from xr.train.analysis import bootstrap_metrics

    rng = np.random.default_rng(7)

    def sample(n):
        y = (rng.random(n) < 0.6).astype(int)
        correct = rng.random(n) < 0.85
        p = np.where(correct == (y == 1), 0.9, 0.1)  # right with probability 0.85, at threshold 0.5
        return y, p

    # 20 samples of 200 resamples each (the report uses 1000): each bootstrap computes an AUROC per resample
    covered, widths = 0, {}
    for i in range(20):
        y, p = sample(200)
        ci = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=i)["accuracy"]
        covered += ci["low"] <= 0.85 <= ci["high"]
        widths.setdefault(200, []).append(ci["high"] - ci["low"])
    assert covered >= 17, covered  # 85%+ of 20 (expected 19)
    y, p = sample(2000)
    wide = bootstrap_metrics(y, p, 0.5, n_boot=200)["accuracy"]
    assert wide["high"] - wide["low"] < 0.5 * np.mean(widths[200])


def test_bootstrap_resamples_whole_patients():
    from xr.train.analysis import bootstrap_metrics

    y = np.array([0, 0, 1, 1] * 10)
    p = np.array([0.1, 0.9, 0.9, 0.9] * 10)  # each patient: one film right, one wrong, ...
    groups = np.repeat(np.arange(20), 2)  # two films per patient
    ci = bootstrap_metrics(y, p, 0.5, groups=groups, n_boot=300)
    assert ci["accuracy"]["value"] == pytest.approx(0.75) and ci["accuracy"]["low"] <= 0.75 <= ci["accuracy"]["high"]
    assert ci["auroc"]["value"] is not None and ci["ece"]["low"] is not None
