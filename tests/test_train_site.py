"""train/site.py and `xr-train site-calibrate`: a site's films -> a calibration bound to the model, a report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xr.core.calibration import CALIBRATION_FILE, Calibration
from xr.core.errors import CheckpointError
from xr.core.model import file_sha256
from xr.core.predict import Predictor
from xr.train.site import cross_validate, site_calibrate

SEEN: dict[str, list] = {}  # what site_run's site_calibrate handed its cross-validation


@pytest.fixture(scope="module")
def site_run(tiny_checkpoint, fixtures_dir, tmp_path_factory):
    from xr.train import site

    out = tmp_path_factory.mktemp("site")
    real = site.cross_validate

    def spy(logits, labels, groups, *a, **kw):
        SEEN["cross_validate"] = [list(logits), list(labels), list(groups)]
        return real(logits, labels, groups, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site, "cross_validate", spy)
        report = site_calibrate(
            tiny_checkpoint,
            fixtures_dir / "chest_xray" / "train",
            out,
            n_boot=200,
            cv_repeats=5,
            device="cpu",
            num_workers=0,
        )
    return out, report


def test_writes_a_site_calibration_bound_to_the_model(site_run, tiny_checkpoint):
    out, report = site_run
    data = json.loads((out / CALIBRATION_FILE).read_text())
    assert data["kind"] == "site" and data["model_sha256"] == file_sha256(tiny_checkpoint)
    assert data["T"] == pytest.approx(1 / report["scale"]) and data["shift"] == pytest.approx(report["shift"])
    assert data["n"] == 27 and data["n_per_class"] == {"NORMAL": 13, "PNEUMONIA": 14} and data["objective"] == "f1"
    assert data["reference"]["n"] == 27 and sum(data["reference"]["fractions"]) == pytest.approx(1.0)
    assert data["prior"]["scale"] == pytest.approx(1 / 1.5)  # the model's own calibration (T 1.5) was the prior
    for name in (
        "site_report.json",
        "SITE_REPORT.md",
        "predictions.csv",
        "reliability_diagram.png",
        "score_histogram.png",
    ):
        assert (out / name).is_file(), name
    with Image.open(out / "score_histogram.png") as im:
        assert im.size[0] > 300


def test_the_predictor_scores_with_it_and_only_for_its_model(site_run, tiny_checkpoint, tmp_path):
    out, report = site_run
    pred = Predictor.from_checkpoint(tiny_checkpoint, calibration=out / CALIBRATION_FILE, device="cpu")
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    logits = torch.tensor([float(r["logit"]) for r in rows])
    assert pred.calibrate(logits).numpy() == pytest.approx([float(r["probability"]) for r in rows], abs=1e-5)
    assert pred.threshold == pytest.approx(report["threshold"]) and pred.calibration_id == report["calibration_id"]
    other = tmp_path / "other.pt"
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model"]["classifier.bias"] += 1.0
    torch.save(raw, other)
    with pytest.raises(CheckpointError, match="was fitted for model"):
        Predictor.from_checkpoint(other, calibration=out / CALIBRATION_FILE, device="cpu")


def test_the_report_gives_intervals_and_a_cross_validated_estimate(site_run):
    out, report = site_run
    for phase in ("before", "after"):
        for metric in ("accuracy", "sensitivity", "specificity", "auroc"):
            m = report[phase][metric]
            assert m["low"] <= m["value"] <= m["high"], (phase, metric, m)
        assert 0 <= report[phase]["ece"]["low"] <= report[phase]["ece"]["high"]  # ECE's bootstrap is biased up
    cv = report["cross_validated"]
    assert set(cv) == {"accuracy", "sensitivity", "specificity", "ece"}
    assert all(0 <= v["p05"] <= v["mean"] <= v["p95"] <= 1 for v in cv.values())
    text = (out / "SITE_REPORT.md").read_text()
    assert "| site calibration, cross-validated" in text and report["calibration_id"] in text


def test_cross_validation_recovers_a_separable_shifted_site():
    rng = np.random.default_rng(0)
    y = np.array([0] * 80 + [1] * 120)
    z = np.where(y == 1, rng.normal(4, 1.5, 200), rng.normal(-1, 1.5, 200)) + 2.5  # normals read as pneumonia
    groups = np.arange(200)
    base = Calibration(temperature=1.0)
    cv = cross_validate(z, y, groups, base, "f1", repeats=10)
    assert cv["accuracy"]["mean"] > 0.9 and cv["specificity"]["mean"] > 0.85
    uncorrected = ((z >= 0) == (y == 1)).mean()  # the model's own threshold 0.5 on these logits
    assert uncorrected < cv["accuracy"]["mean"] - 0.1


def test_cli_site_calibrate_then_evaluate_with_it(tiny_checkpoint, fixtures_dir, tmp_path, capsys, monkeypatch):
    import functools

    from xr.train import cli, site

    monkeypatch.setattr(cli, "tune_malloc", lambda: False)
    # the report's bootstrap and cross-validation at a test's size (the module fixture checks the report)
    monkeypatch.setattr(site, "site_calibrate", functools.partial(site.site_calibrate, n_boot=100, cv_repeats=4))
    data = fixtures_dir / "chest_xray" / "train"
    assert (
        cli.main(
            [
                "site-calibrate",
                "--data",
                str(data),
                "--model",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "site"),
                "--objective",
                "sensitivity",
                "--target-sensitivity",
                "0.9",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert said.startswith("site-calibrate (27 films): p = sigmoid(") and "(sensitivity)" in said
    site = json.loads((tmp_path / "site" / CALIBRATION_FILE).read_text())
    assert site["objective"] == "sensitivity" and site["target_sensitivity"] == 0.9
    assert (
        cli.main(
            [
                "evaluate",
                "--data",
                str(data),
                "--model",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "eval"),
                "--calibration",
                str(tmp_path / "site" / CALIBRATION_FILE),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(site["threshold"])
    assert metrics["sensitivity"] >= 0.9  # the site's own films, at the threshold chosen for them
    # an empty or one-class folder is a one-line error
    (tmp_path / "one" / "NORMAL").mkdir(parents=True)
    shutil.copy(next(data.glob("NORMAL/*.jpeg")), tmp_path / "one" / "NORMAL" / "a.jpeg")
    assert (
        cli.main(
            [
                "site-calibrate",
                "--data",
                str(tmp_path / "one"),
                "--model",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "needs films of both classes" in capsys.readouterr().err


# -- patient-grouped folds -------------------------------------------------------------------------------
def _partition(names, groups) -> set[frozenset]:
    by: dict = {}
    for n, g in zip(names, groups):
        by.setdefault(g, set()).add(n)
    return {frozenset(v) for v in by.values()}


def test_the_site_films_are_grouped_by_patient(site_run):
    """The fixtures hold four patients with two films each (Kaggle names: personN_..., IM-NNNN-...): those
    pairs, and only they, share a group in the cross-validation site_calibrate runs."""
    out, _ = site_run
    names = [Path(r["path"]).name for r in csv.DictReader(open(out / "predictions.csv"))]
    _, _, groups = SEEN["cross_validate"]
    assert len(groups) == len(names) == 27
    expected = {frozenset(n for n in names if n.startswith(f"person{k}_")) for k in (1, 1000, 1003, 1004)}
    assert all(len(pair) == 2 for pair in expected)
    expected |= {frozenset([n]) for n in names if not any(n in pair for pair in expected)}
    assert _partition(names, groups) == expected


def test_no_patient_is_on_both_sides_of_a_cross_validation_split(monkeypatch):
    """30 patients with 3 films each: every fit sees some patients whole and is scored on the others whole."""
    from xr.train import site

    rng = np.random.default_rng(1)
    patient_label = np.array([0] * 14 + [1] * 16)
    groups = np.repeat(np.arange(30), 3)
    y = patient_label[groups]
    z = np.where(y == 1, 1.5, -1.0) + rng.normal(0, 1.2, len(y)) + np.arange(len(y)) * 1e-6  # each logit unique
    patient_of = dict(zip(z.tolist(), groups.tolist()))
    fits = []
    real = site.fit_site

    def spy(logits, labels, *a, **kw):
        fits.append({patient_of[v] for v in np.asarray(logits).tolist()})
        return real(logits, labels, *a, **kw)

    monkeypatch.setattr(site, "fit_site", spy)
    cross_validate(z, y, groups, Calibration(temperature=1.0), "f1", repeats=4)
    assert len(fits) == 8  # 4 repeats x 2 folds
    for a, b in zip(fits[::2], fits[1::2]):  # the two folds of one repeat: each other's evaluation half
        assert a and b and not a & b and a | b == set(range(30))
    for fitted in fits:  # a fit saw a patient's films all or none
        seen = [v for v in z.tolist() if patient_of[v] in fitted]
        assert len(seen) == 3 * len(fitted)


# -- the cost objective ----------------------------------------------------------------------------------
def _cost(probs, labels, thr, fn_cost, fp_cost) -> float:
    pred = np.asarray(probs) >= thr
    y = np.asarray(labels).astype(bool)
    return float(fn_cost * (~pred & y).sum() + fp_cost * (pred & ~y).sum())


@pytest.mark.parametrize(("fn_cost", "fp_cost"), [(10.0, 1.0), (1.0, 10.0)])
def test_the_cost_objective_takes_the_cheapest_threshold(
    site_run, tiny_checkpoint, fixtures_dir, tmp_path, monkeypatch, fn_cost, fp_cost
):
    """objective cost: the threshold minimises fn_cost x missed pneumonia + fp_cost x false alarms on the
    site's recalibrated films (checked against every distinct cut of those films), and the file says the costs."""
    from xr.train import site

    out, _ = site_run
    logits, labels, _ = SEEN["cross_validate"]
    monkeypatch.setattr(site, "score_items", lambda *a, **kw: np.asarray(logits))  # the films, already scored
    report = site_calibrate(
        tiny_checkpoint,
        fixtures_dir / "chest_xray" / "train",
        tmp_path,
        objective="cost",
        fn_cost=fn_cost,
        fp_cost=fp_cost,
        n_boot=20,
        cv_repeats=2,
        device="cpu",
        num_workers=0,
    )
    probs = 1 / (1 + np.exp(-(report["scale"] * np.asarray(logits) + report["shift"])))
    cuts = np.concatenate([[0.0], np.sort(probs) + 1e-12, [1.0 + 1e-9]])  # every distinct prediction of the films
    best = min(_cost(probs, labels, t, fn_cost, fp_cost) for t in cuts)
    assert _cost(probs, labels, report["threshold"], fn_cost, fp_cost) == best
    data = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert data["objective"] == "cost" and (data["fn_cost"], data["fp_cost"]) == (fn_cost, fp_cost)
    assert data["threshold"] == pytest.approx(report["threshold"])
