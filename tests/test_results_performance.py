"""results/performance.py: the flag's sensitivity, specificity, PPV and NPV from reviews, with intervals."""

from __future__ import annotations

import numpy as np
import pytest

from xr.results.performance import METRICS, ReviewCounts, estimate


def _simulate(rng, n=300, prevalence=0.6, sens=0.9, spec=0.85, review_share=0.8, audit_rate=0.1):
    """A window of films with known truth; returns (counts, the true metrics of the flag on these films)."""
    truth = rng.random(n) < prevalence
    flagged = np.where(truth, rng.random(n) < sens, rng.random(n) > spec)
    read = np.where(flagged, rng.random(n) < review_share, rng.random(n) < audit_rate)
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    fp, tn = int((~truth & flagged).sum()), int((~truth & ~flagged).sum())
    counts = ReviewCounts(
        flagged=int(flagged.sum()),
        unflagged=int((~flagged).sum()),
        flagged_reviewed=int((read & flagged).sum()),
        flagged_pneumonia=int((read & flagged & truth).sum()),
        audit_reviewed=int((read & ~flagged).sum()),
        audit_pneumonia=int((read & ~flagged & truth).sum()),
    )
    true = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}
    return counts, true


@pytest.mark.parametrize("audit_rate", [0.05, 0.2, 0.5])
def test_intervals_cover_the_truth_at_about_their_nominal_rate(audit_rate):
    rng = np.random.default_rng(7)
    sims, hits = 200, dict.fromkeys(METRICS, 0)
    for i in range(sims):
        counts, true = _simulate(rng, audit_rate=audit_rate)
        est = estimate(counts, draws=4000, seed=i)
        for m in METRICS:
            hits[m] += est[m] is not None and est[m]["low"] <= true[m] <= est[m]["high"]
    coverage = {m: hits[m] / sims for m in METRICS}
    # nominal 0.95; 200 simulations put a true 0.95 between 0.91 and 0.98 nineteen times in twenty
    assert all(0.90 <= c <= 0.995 for c in coverage.values()), coverage


def test_weights_are_the_inverse_of_the_share_reviewed():
    # 100 flagged, half reviewed, 40 of 50 pneumonia; 1000 unflagged, 100 audited, 2 of them pneumonia
    est = estimate(ReviewCounts(100, 1000, 50, 40, 100, 2))
    tp, fn = 40 * 100 / 50, 2 * 1000 / 100  # each review stands for the films of its group not read
    assert est["sensitivity"]["estimate"] == pytest.approx(tp / (tp + fn))
    assert est["specificity"]["estimate"] == pytest.approx((1000 - fn) / (1000 - fn + 100 - tp))
    assert est["ppv"]["estimate"] == pytest.approx(0.8) and est["npv"]["estimate"] == pytest.approx(0.98)
    assert est["reviews"]["total"] == 150
    for m in METRICS:
        assert est[m]["low"] < est[m]["estimate"] < est[m]["high"]


def test_no_missed_pneumonia_in_the_audit_sample_still_leaves_room_below_one():
    counts = ReviewCounts(flagged=60, unflagged=140, flagged_reviewed=60, flagged_pneumonia=55, audit_reviewed=14)
    est = estimate(counts)
    sens = est["sensitivity"]
    assert sens["estimate"] == 1.0 and sens["high"] == 1.0
    assert sens["low"] < 0.97  # 126 unaudited unflagged films could hide a few
    assert est["npv"]["low"] < 1.0


def test_every_film_read_gives_the_exact_figures():
    est = estimate(ReviewCounts(60, 140, 60, 55, 140, 3))
    assert est["sensitivity"] == {"estimate": 55 / 58, "low": 55 / 58, "high": 55 / 58}


def test_without_audit_reviews_nothing_about_misses_is_claimed():
    est = estimate(ReviewCounts(60, 140, 60, 55, 0, 0))
    assert est["sensitivity"] is None and est["specificity"] is None and est["npv"] is None
    assert est["ppv"]["estimate"] == pytest.approx(55 / 60)


def test_counts_out_of_range_are_refused():
    with pytest.raises(ValueError, match="audit reviews"):
        ReviewCounts(10, 5, 0, 0, 6, 0)
