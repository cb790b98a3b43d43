"""Calibration as plain functions over cached logits: temperature scaling, logistic recalibration for a
site, and the decision threshold.

- ``fit_temperature``: one scalar T by LBFGS on the validation NLL (after gpleiss/temperature_scaling).
- ``fit_logistic``: p = sigmoid(a z + b) on a site's films, a MAP fit with a Gaussian prior centred on
  the model's own calibration, so 50-200 films move it only as far as they show it must go: a new site
  shifts logits (other exposures, another prevalence), which a temperature alone cannot undo.
- ``choose_threshold``: on calibrated probabilities, by F1, Youden, cost or a target sensitivity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xr.core.errors import XRError

OBJECTIVES = ("f1", "youden", "cost", "sensitivity")


def _as_tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64)).reshape(-1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64)).reshape(-1)
    if z.numel() != y.numel() or z.numel() == 0:
        raise XRError(f"need as many labels as logits (got {z.numel()} logits, {y.numel()} labels)")
    _check_finite(z.numpy(), "logits")
    return z, y


def _check_finite(values: np.ndarray, what: str) -> None:
    """NaN would poison the fit (or, in ece, count in a bin's weight but not its mean): name it instead."""
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise XRError(
            f"{len(bad)} of {len(values)} {what} are NaN or infinite (first at row {bad[0]}); "
            "the model's output is broken (training diverged?)"
        )


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean binary negative log-likelihood of sigmoid(logit / T)."""
    z, y = _as_tensors(logits, labels)
    return float(F.binary_cross_entropy_with_logits(z / temperature, y))


def fit_temperature(logits, labels, max_iter: int = 200) -> float:
    """The T > 0 minimising validation NLL of sigmoid(logit / T) (LBFGS over log T)."""
    z, y = _as_tensors(logits, labels)
    if y.min() == y.max():
        raise XRError("temperature scaling needs both classes in the validation labels")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = log_t.detach().exp().item()
    if not np.isfinite(t):
        raise XRError("temperature fit diverged (validation logits separate the classes perfectly?)")
    return float(np.clip(t, 0.05, 20.0))


def _weights(weights, n: int) -> np.ndarray:
    """Per-film weights (None: 1 each): how many films of the stream a labelled film stands for (a site's
    reviews: results/reviewed.py). Weights of 1 give exactly the unweighted figures."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n or not np.isfinite(w).all() or (w < 0).any():
        raise XRError(f"need {n} finite weights >= 0, got {w.size}")
    return w


def fit_logistic(
    logits, labels, scale0: float = 1.0, shift0: float = 0.0, strength: float = 1.0, weights=None
) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a z + b): the minimum of the summed NLL (each film's term times its weight)
    plus ``strength`` / 2 x ((log a - log scale0)^2 + (b - shift0)^2), a Gaussian prior on the log-scale
    and the shift centred on the calibration the model came with (``scale0`` = 1/T, ``shift0``).
    ``strength`` is the prior's weight in units of the NLL's curvature of about one film: small next to
    100 films, decisive next to 5."""
    from scipy.optimize import minimize

    z, y = (t.numpy() for t in _as_tensors(logits, labels))
    w = _weights(weights, z.size)
    if y.min() == y.max():
        raise XRError("a site calibration needs films of both classes (NORMAL and PNEUMONIA)")
    if not (scale0 > 0 and strength >= 0):
        raise XRError(f"fit_logistic: scale0 must be > 0 and strength >= 0, got {scale0}, {strength}")
    log_a0 = np.log(scale0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_a, b = theta
        a = np.exp(log_a)
        s = a * z + b
        p = sigmoid(s)
        nll = float((w * (np.logaddexp(0.0, s) - y * s)).sum())
        prior = 0.5 * strength * ((log_a - log_a0) ** 2 + (b - shift0) ** 2)
        grad_s = w * (p - y)
        grad = np.array([(grad_s * z).sum() * a + strength * (log_a - log_a0), grad_s.sum() + strength * (b - shift0)])
        return nll + prior, grad

    solution = minimize(objective, x0=np.array([log_a0, shift0]), jac=True, method="L-BFGS-B")
    a, b = float(np.exp(solution.x[0])), float(solution.x[1])
    if not (np.isfinite(a) and np.isfinite(b)):
        raise XRError("logistic recalibration diverged (do the site's logits separate the classes perfectly?)")
    return a, b


def ece(probs, labels, n_bins: int = 15, weights=None) -> float:
    """Expected calibration error of P(PNEUMONIA), equal-width bins over [0, 1] (films weighted by ``weights``)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    _check_finite(p, "probabilities")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    if weights is None:
        for b in range(n_bins):
            mask = bins == b
            if mask.any():
                total += mask.mean() * abs(p[mask].mean() - y[mask].mean())
        return float(total)
    w = _weights(weights, p.size)
    for b in range(n_bins):
        mask = bins == b
        wb = w[mask].sum()
        if wb > 0:
            total += wb / w.sum() * abs((w[mask] * p[mask]).sum() / wb - (w[mask] * y[mask]).sum() / wb)
    return float(total)


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def threshold_scores(
    probs,
    labels,
    objective: str = "f1",
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    grid: int = 999,
    target_sensitivity: float = 0.97,
    weights=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, score) over an even grid in (0, 1); higher score is better for every objective.
    ``sensitivity``: the specificity of thresholds that keep sensitivity >= ``target_sensitivity`` (-1 for
    the others), so the best is the highest threshold that still finds that share of pneumonia."""
    if objective not in OBJECTIVES:
        raise XRError(f"calibration objective {objective!r} is not allowed; choose one of {', '.join(OBJECTIVES)}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    thr = np.linspace(0.0, 1.0, grid + 2)[1:-1]
    pred = p[None, :] >= thr[:, None]
    if weights is None:
        tp = (pred & y).sum(1).astype(float)
        fp = (pred & ~y).sum(1).astype(float)
        fn = (~pred & y).sum(1).astype(float)
        tn = (~pred & ~y).sum(1).astype(float)
    else:  # films counted by their weights
        w = _weights(weights, p.size)
        tp, fp = (pred & y) @ w, (pred & ~y) @ w
        fn, tn = (~pred & y) @ w, (~pred & ~y) @ w
    if objective == "f1":
        score = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    elif objective in ("youden", "sensitivity"):
        tpr = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        tnr = np.divide(tn, tn + fp, out=np.zeros_like(tn), where=(tn + fp) > 0)
        score = tpr + tnr - 1.0 if objective == "youden" else np.where(tpr >= target_sensitivity - 1e-12, tnr, -1.0)
    else:
        score = -(fn_cost * fn + fp_cost * fp)
    return thr, score


def choose_threshold(
    probs,
    labels,
    objective: str = "f1",
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    grid: int = 999,
    target_sensitivity: float = 0.97,
    weights=None,
) -> tuple[float, float]:
    """Best threshold and its score. Where a range of thresholds ties for best, take its middle:
    the validation set cannot tell them apart, and the middle is farthest from both error edges."""
    thr, score = threshold_scores(probs, labels, objective, fn_cost, fp_cost, grid, target_sensitivity, weights)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    # Middle of the first contiguous run of best thresholds.
    run_end = best[0]
    while run_end + 1 < len(thr) and score[run_end + 1] >= score.max() - 1e-12:
        run_end += 1
    mid = (best[0] + run_end) // 2
    return float(thr[mid]), float(score[mid])


def calibration_report(logits, labels, temperature: float, n_bins: int = 15) -> dict[str, float]:
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return {
        "nll_before": nll(z, y, 1.0),
        "nll_after": nll(z, y, temperature),
        "ece_before": ece(sigmoid(z), y, n_bins),
        "ece_after": ece(sigmoid(z / temperature), y, n_bins),
    }
