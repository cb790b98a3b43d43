"""daemon/drift.py: the drift watch warns on a shifted stream and stays quiet on one like the reference."""

from __future__ import annotations

import numpy as np
import pytest

from xr.core.calibration import reference
from xr.results.drift import MIN_ROWS, drift, psi


def _site_scores(rng, n, positives=0.6):
    """Calibrated probabilities of a site: positives near 1, negatives near 0, a few in between."""
    y = rng.random(n) < positives
    return np.where(y, rng.beta(8, 1.5, n), rng.beta(1.5, 8, n))


@pytest.mark.parametrize("seed", range(5))
def test_quiet_on_a_stream_like_the_reference(seed):
    rng = np.random.default_rng(seed)
    ref = reference(_site_scores(rng, 700), threshold=0.5)
    d = drift(ref, _site_scores(rng, 400), threshold=0.5)
    assert d["warning"] is False, d
    assert abs(d["flagged_rate"] - ref["flagged_rate"]) < 0.1 and d["psi"] < 0.1


@pytest.mark.parametrize("seed", range(5))
def test_warns_on_a_shifted_stream(seed):
    rng = np.random.default_rng(seed)
    ref = reference(_site_scores(rng, 700), threshold=0.5)
    # another site: every score pushed up (normals look like pneumonia to this calibration)
    shifted = np.clip(_site_scores(rng, 400) + 0.3, 0, 1)
    d = drift(ref, shifted, threshold=0.5)
    assert d["warning"] is True and "PSI" in d["reason"], d
    # a change of case mix alone (far fewer positives) moves the flagged rate
    fewer = drift(ref, _site_scores(rng, 400, positives=0.2), threshold=0.5)
    assert fewer["warning"] is True and fewer["flagged_rate_z"] < -3.29


def test_too_few_rows_or_no_reference_say_so_instead_of_judging():
    rng = np.random.default_rng(0)
    ref = reference(_site_scores(rng, 700), threshold=0.5)
    small = drift(ref, np.ones(MIN_ROWS - 1), threshold=0.5)
    assert small["warning"] is None and "at least 50" in small["reason"]
    none = drift(None, _site_scores(rng, 400), threshold=0.5)
    assert none["warning"] is None and "no reference" in none["reason"]


def test_psi_is_zero_for_the_same_histogram_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    p = _site_scores(rng, 2000)
    ref = reference(p, 0.5)["fractions"]
    assert psi(ref, p) == pytest.approx(0.0, abs=1e-9)
    assert psi(ref, np.clip(p + 0.1, 0, 1)) < psi(ref, np.clip(p + 0.3, 0, 1))
