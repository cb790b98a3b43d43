"""train/calibrate.py: temperature fitting and the three threshold objectives."""

from __future__ import annotations

import numpy as np
import pytest

from xr.core.errors import XRError
from xr.train.calibrate import calibration_report, choose_threshold, ece, fit_temperature, nll, sigmoid


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_t(true_t):
    rng = np.random.default_rng(0)
    z_true = rng.normal(0.0, 3.0, 20000)  # well-calibrated logits
    y = (rng.random(20000) < sigmoid(z_true)).astype(int)
    logits = z_true * true_t  # over- (T>1) or under-confident (T<1) model
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(logits, y, t) <= nll(logits, y, 1.0) + 1e-9


def test_calibration_report_improves_overconfident_model():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < sigmoid(z)).astype(int)
    logits = 3 * z
    rep = calibration_report(logits, y, fit_temperature(logits, y))
    assert rep["nll_after"] < rep["nll_before"]
    assert rep["ece_after"] < rep["ece_before"] / 2


def test_fit_temperature_needs_both_classes():
    with pytest.raises(XRError, match="both classes"):
        fit_temperature([1.0, 2.0], [1, 1])


def test_ece_of_perfect_and_wrong_predictions():
    assert ece([1.0, 0.0, 1.0], [1, 0, 1]) == pytest.approx(0.0)
    assert ece([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    assert ece([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0)


# Hand-made case: positives at 0.35, 0.6, 0.9; negatives at 0.1, 0.4, 0.7.
PROBS = np.array([0.1, 0.4, 0.7, 0.35, 0.6, 0.9])
LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_threshold_f1():
    thr, score = choose_threshold(PROBS, LABELS, "f1")
    # F1 by threshold range: (0, 0.1] 6/9, (0.1, 0.35] 6/8, (0.35, 0.4] 4/7, (0.4, 0.6] 4/6, (0.6, 0.7] 2/5.
    assert score == pytest.approx(0.75)
    assert 0.1 < thr <= 0.35


def test_threshold_youden():
    thr, score = choose_threshold(PROBS, LABELS, "youden")
    # J = tpr + tnr - 1 ties at 1/3 on (0.1, 0.35], (0.4, 0.6] and (0.7, 0.9]; the lowest range wins.
    assert score == pytest.approx(1 / 3)
    assert 0.1 < thr <= 0.35


def test_threshold_cost_prefers_recall_when_misses_are_expensive():
    thr_fn, _ = choose_threshold(PROBS, LABELS, "cost", fn_cost=10.0, fp_cost=1.0)
    assert thr_fn <= 0.35  # catch every positive
    thr_fp, _ = choose_threshold(PROBS, LABELS, "cost", fn_cost=1.0, fp_cost=10.0)
    assert thr_fp > 0.7  # no false alarm at all


def test_threshold_middle_of_tied_range():
    thr, _ = choose_threshold([0.2, 0.8], [0, 1], "f1", grid=999)
    assert thr == pytest.approx(0.5, abs=0.002)


def test_unknown_objective_is_rejected():
    with pytest.raises(XRError, match="objective 'accuracy' is not allowed"):
        choose_threshold(PROBS, LABELS, "accuracy")


def test_nan_logits_and_probabilities_are_named_not_fitted():
    """A NaN would otherwise end in "separate the classes perfectly?" (fit) or a silently low ECE."""
    with pytest.raises(XRError, match=r"1 of 4 logits are NaN or infinite \(first at row 2\)"):
        fit_temperature([-1.0, 2.0, np.nan, 0.5], [0, 1, 1, 0])
    with pytest.raises(XRError, match=r"2 of 4 probabilities are NaN or infinite \(first at row 0\)"):
        ece([np.nan, 0.2, np.nan, 0.9], [1, 0, 1, 1])


@pytest.mark.parametrize(("a", "b"), [(1.0, -2.0), (0.6, 1.0), (1.8, -0.5)])
def test_fit_logistic_recovers_a_known_shift_and_scale(a, b):
    """A site whose logits are scaled and shifted from calibrated ones: the fit finds both back."""
    from xr.train.calibrate import fit_logistic

    rng = np.random.default_rng(3)
    z = rng.normal(1.0, 3.0, 8000)
    y = (rng.random(8000) < sigmoid(a * z + b)).astype(int)
    got_a, got_b = fit_logistic(z, y, scale0=1.0, shift0=0.0, strength=1.0)
    assert got_a == pytest.approx(a, rel=0.08) and got_b == pytest.approx(b, abs=0.15)


def test_fit_logistic_prior_holds_a_few_films_near_the_models_own_calibration():
    from xr.train.calibrate import fit_logistic

    rng = np.random.default_rng(4)
    z = rng.normal(0.0, 3.0, 12)
    y = (rng.random(12) < sigmoid(z - 2.0)).astype(int)
    y[:2] = [0, 1]
    weak, strong = fit_logistic(z, y, 1.0, 0.0, strength=0.01), fit_logistic(z, y, 1.0, 0.0, strength=1000.0)
    assert strong == pytest.approx((1.0, 0.0), abs=0.02)  # 12 films cannot outweigh a strong prior
    assert abs(weak[1]) > abs(strong[1])  # a weak one lets them move it
    with pytest.raises(XRError, match="both classes"):
        fit_logistic([1.0, 2.0], [1, 1])


def test_sensitivity_objective_keeps_the_target_recall_with_the_highest_threshold():
    rng = np.random.default_rng(5)
    y = np.array([0] * 300 + [1] * 300)
    p = np.clip(np.where(y == 1, rng.normal(0.75, 0.15, 600), rng.normal(0.3, 0.15, 600)), 0.001, 0.999)
    thr, spec = choose_threshold(p, y, "sensitivity", target_sensitivity=0.95)
    sens = (p[y == 1] >= thr).mean()
    assert sens >= 0.95 and spec == pytest.approx((p[y == 0] < thr).mean())
    assert (p[y == 1] >= thr + 0.01).mean() < 0.95  # a threshold 0.01 higher would miss the target
