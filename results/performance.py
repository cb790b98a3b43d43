"""How the flag does at this site, estimated from the readers' reviews.

The flag splits a window's scored films into ``flagged`` (N_F) and ``unflagged`` (N_U). Readers review
flagged cases (n_F of them, x_F read as pneumonia) and a random audit sample of the unflagged ones (n_U
reviewed, x_U read as pneumonia: pneumonia the flag missed). The unreviewed films are inferred from the
reviewed ones of their group, which is what weighting each flagged review by N_F / n_F (the inverse of the
share reviewed) and each audit review by N_U / n_U (about the inverse of the audit rate) means:

    TP = x_F + pneumonia among the N_F - n_F flagged films nobody read
    FN = x_U + pneumonia among the N_U - n_U unflagged films nobody audited
    sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), PPV = TP / N_F, NPV = TN / N_U

Intervals come from the posterior predictive of those unread counts: the pneumonia rate in each group has a
Jeffreys prior, Beta(1/2, 1/2), updated by its reviews, and the unread films are drawn binomially from it.
So an interval is exact (zero width) only where every film of a group was read, and when no missed
pneumonia happened to be in the audit sample the sensitivity's interval still reaches below 1 by what the
unaudited films could hide. Jeffreys intervals hold close to their nominal coverage for small counts
(Brown, Cai and DasGupta 2001); tests/test_results_performance.py checks it by simulation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METRICS = ("sensitivity", "specificity", "ppv", "npv")


@dataclass(frozen=True)
class ReviewCounts:
    """One window's films and reviews (module docstring: N_F, N_U, n_F, x_F, n_U, x_U)."""

    flagged: int
    unflagged: int
    flagged_reviewed: int = 0
    flagged_pneumonia: int = 0
    audit_reviewed: int = 0
    audit_pneumonia: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.flagged_reviewed > self.flagged or self.flagged_pneumonia > self.flagged_reviewed:
            raise ValueError(f"flagged reviews out of range: {self}")
        if self.audit_reviewed > self.unflagged or self.audit_pneumonia > self.audit_reviewed:
            raise ValueError(f"audit reviews out of range: {self}")


def _unread_positives(rng, reviewed: int, positive: int, unread: int, draws: int) -> np.ndarray:
    """Draws of how many of ``unread`` films are pneumonia, given ``positive`` of ``reviewed`` were."""
    if unread == 0:
        return np.zeros(draws)
    rate = rng.beta(positive + 0.5, reviewed - positive + 0.5, size=draws)
    return rng.binomial(unread, rate).astype(np.float64)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def estimate(counts: ReviewCounts, level: float = 0.95, draws: int = 20_000, seed: int = 0) -> dict:
    """Sensitivity, specificity, PPV and NPV of the flag: each ``{"estimate", "low", "high"}`` (None where
    the reviews cannot say: no audit review means no estimate of what the flag misses), and ``reviews``:
    what the figures rest on."""
    c = counts
    rng = np.random.default_rng(seed)
    n_f, x_f, n_u, x_u = c.flagged_reviewed, c.flagged_pneumonia, c.audit_reviewed, c.audit_pneumonia
    tp = x_f + _unread_positives(rng, n_f, x_f, c.flagged - n_f, draws)
    fn = x_u + _unread_positives(rng, n_u, x_u, c.unflagged - n_u, draws)
    fp, tn = c.flagged - tp, c.unflagged - fn
    sampled = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, np.full(draws, float(c.flagged))),
        "npv": _ratio(tn, np.full(draws, float(c.unflagged))),
    }
    # plug-in point estimates: each group's unread films at its reviewed rate
    tp_hat = c.flagged * x_f / n_f if n_f else np.nan
    fn_hat = c.unflagged * x_u / n_u if n_u else np.nan
    point = {
        "sensitivity": tp_hat / (tp_hat + fn_hat) if tp_hat + fn_hat > 0 else np.nan,
        "specificity": (c.unflagged - fn_hat) / (c.unflagged - fn_hat + c.flagged - tp_hat)
        if c.unflagged - fn_hat + c.flagged - tp_hat > 0
        else np.nan,
        "ppv": x_f / n_f if n_f else np.nan,
        "npv": 1 - x_u / n_u if n_u else np.nan,
    }
    # a group nobody reviewed says nothing about its films: the metrics that need it have no estimate
    needs = {"sensitivity": (n_f, n_u), "specificity": (n_f, n_u), "ppv": (n_f,), "npv": (n_u,)}
    tail = (1 - level) / 2 * 100
    out: dict = {}
    for m in METRICS:
        values = sampled[m]
        if min(needs[m]) == 0 or np.isnan(point[m]) or np.isnan(values).all():
            out[m] = None
            continue
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        out[m] = {"estimate": float(point[m]), "low": float(min(low, point[m])), "high": float(max(high, point[m]))}
    out["reviews"] = {
        "flagged": c.flagged,
        "unflagged": c.unflagged,
        "flagged_reviewed": n_f,
        "audit_reviewed": n_u,
        "total": n_f + n_u,
        "level": level,
    }
    return out
