"""The drift watch: does the stream a calibration scores still look like the films it was fitted on?

A calibration file carries a ``reference`` (core/calibration.py): the flagged rate and the histogram of
calibrated probabilities on its own films (the carved validation split, or a site's sample). Over a window
of results scored by that calibration, ``xr-results stats`` compares:

- the flagged rate, by a binomial z-score against the reference rate: |z| > ``Z_BOUND`` (3.29, two-sided
  p < 0.001) warns;
- the score distribution, by the population stability index over the reference's bins: PSI > ``PSI_BOUND``
  (0.25, the usual "significant shift" level) warns.

Fewer than ``MIN_ROWS`` scored films say nothing. From the readers' reviews (results/reviewed.py
``site_alarms``) it also warns when the flag's PPV or estimated sensitivity leaves the interval measured when
the calibration was fitted (its reference's ``performance``), and when a scanner's flag rate moves away from
the site's (:func:`performance_alarms`, :func:`scanner_alarms`). A warning is the first sign that the site needs
``xr-train site-calibrate`` (other scanners or exposures), or that its case mix changed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z_BOUND = 3.29
PSI_BOUND = 0.25
MIN_ROWS = 50
_FLOOR = 1e-4  # an empty bin counts as this share, so PSI stays finite


def psi(reference_fractions, probs) -> float:
    """Population stability index of ``probs`` against the reference histogram (equal-width bins on [0, 1])."""
    expected = np.maximum(np.asarray(reference_fractions, dtype=np.float64), _FLOOR)
    counts, _ = np.histogram(np.asarray(probs, dtype=np.float64), bins=len(expected), range=(0.0, 1.0))
    observed = np.maximum(counts / max(1, counts.sum()), _FLOOR)
    return float(((observed - expected) * np.log(observed / expected)).sum())


def drift(reference: dict[str, Any] | None, probs, threshold: float) -> dict[str, Any]:
    """The window's flagged rate and score distribution against ``reference``, and whether to warn."""
    p = np.asarray(probs, dtype=np.float64)
    out: dict[str, Any] = {"n": int(p.size), "flagged_rate": float((p >= threshold).mean()) if p.size else None}
    if not reference:
        return out | {"warning": None, "reason": "the calibration has no reference distribution"}
    expected = reference["flagged_rate"]
    out["expected_flagged_rate"] = expected
    if p.size < MIN_ROWS:
        return out | {"warning": None, "reason": f"{p.size} scored films: at least {MIN_ROWS} are needed to judge"}
    sd = math.sqrt(max(expected * (1 - expected), 1e-6) / p.size)
    z = (out["flagged_rate"] - expected) / sd
    out["flagged_rate_z"] = z
    out["psi"] = psi(reference["fractions"], p)
    reasons = []
    if abs(z) > Z_BOUND:
        reasons.append(
            f"flagged rate {out['flagged_rate']:.3f} against {expected:.3f} expected (z {z:+.1f}, bound {Z_BOUND})"
        )
    if out["psi"] > PSI_BOUND:
        reasons.append(f"score distribution moved (PSI {out['psi']:.2f} > {PSI_BOUND})")
    return out | {"warning": bool(reasons), "reason": "; ".join(reasons) or "within bounds"}


# -- alarms from the reviews (issue 34) ------------------------------------------------------------------
# Reviews a live figure must rest on before it can alarm: flagged reviews for the PPV, audit reviews for
# the sensitivity (a handful of audit cases moves it by tenths).
MIN_REVIEWS = {"ppv": ("flagged_reviewed", 30), "sensitivity": ("audit_reviewed", 10)}
MIN_SCANNER_FILMS = MIN_ROWS


def performance_alarms(expected: dict[str, Any] | None, live: dict[str, Any], subject: str) -> list[dict[str, Any]]:
    """PPV or estimated sensitivity (results/performance.py ``estimate``) outside the interval measured
    when the calibration was fitted (its reference's ``performance``, train/site.py)."""
    out = []
    for metric, (count, need) in MIN_REVIEWS.items():
        ref, est = (expected or {}).get(metric), live.get(metric)
        if not ref or ref.get("low") is None or est is None or live["reviews"][count] < need:
            continue
        if not ref["low"] <= est["estimate"] <= ref["high"]:
            out.append(
                {
                    "alarm": metric,
                    "subject": subject,
                    "value": est["estimate"],
                    "expected": [ref["low"], ref["high"]],
                    "reason": f"{metric} {est['estimate']:.3f} ({est['low']:.3f}-{est['high']:.3f}, "
                    f"{live['reviews'][count]} reviews) outside {ref['low']:.3f}-{ref['high']:.3f} measured at calibration",
                }
            )
    return out


def scanner_alarms(by_scanner: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Each scanner's flag rate (flagged, films) against the site's pooled rate over the same window, by a
    binomial z-score (|z| > ``Z_BOUND``) once the scanner has ``MIN_SCANNER_FILMS`` films."""
    flagged = sum(f for f, _ in by_scanner.values())
    total = sum(n for _, n in by_scanner.values())
    if len(by_scanner) < 2 or not total:
        return []
    site = flagged / total
    out = []
    for name, (f, n) in sorted(by_scanner.items()):
        if n < MIN_SCANNER_FILMS:
            continue
        z = (f / n - site) / math.sqrt(max(site * (1 - site), 1e-6) / n)
        if abs(z) > Z_BOUND:
            out.append(
                {
                    "alarm": "scanner_flag_rate",
                    "subject": name,
                    "value": f / n,
                    "expected": site,
                    "reason": f"scanner {name}: flag rate {f / n:.3f} of {n} films against the site's {site:.3f} "
                    f"(z {z:+.1f}, bound {Z_BOUND})",
                }
            )
    return out
