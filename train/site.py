"""``xr-train site-calibrate``: fit a model's calibration to a site from a small labelled sample of its films.

The model's ranking usually travels to a new site; its probabilities and threshold do not (other scanners,
exposures, populations and prevalence shift the logits). A logistic recalibration of the logit,
p = sigmoid(a z + b), with a prior centred on the model's own calibration (train/calibrate.py
``fit_logistic``), then a threshold chosen on the site's recalibrated films by the objective, gives a
``calibration_threshold.json`` bound to that model. The report says how sure 50-200 films can make anyone:
metrics with patient-bootstrap intervals, and a cross-validated estimate of the same procedure on new films.

``--from-db`` fits from the site's own reviews instead of a labelled folder (:func:`site_calibrate_from_db`):
each reviewed flagged or audit film is a labelled film, its stored logit the model's, the reader's decision
its label, weighted by the films of the stream it stands for (results/reviewed.py), so the flagged films
the readers see most of do not outweigh the unflagged ones the audit samples.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.model_selection import StratifiedGroupKFold

from xr.core.calibration import CALIBRATION_FILE, Calibration, reference
from xr.core.errors import XRError
from xr.core.model import CLASS_NAMES
from xr.core.predict import Predictor
from xr.train import calibrate as cal
from xr.train.analysis import bootstrap_metrics, score_items
from xr.train.data import Item, discover

REPORT_JSON, REPORT_MD = "site_report.json", "SITE_REPORT.md"
PLOTS = ("reliability_diagram.png", "score_histogram.png")


def fit_site(
    logits,
    labels,
    base: Calibration,
    objective: str,
    target_sensitivity: float = 0.97,
    strength: float = 1.0,
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    weights=None,
) -> tuple[float, float, float]:
    """(a, b, threshold) for these films (each counted by its weight): recalibration with a prior on
    ``base``, then the threshold."""
    a, b = cal.fit_logistic(
        logits, labels, scale0=1.0 / base.temperature, shift0=base.shift, strength=strength, weights=weights
    )
    probs = cal.sigmoid(a * np.asarray(logits) + b)
    threshold, _ = cal.choose_threshold(
        probs, labels, objective, fn_cost, fp_cost, target_sensitivity=target_sensitivity, weights=weights
    )
    return a, b, threshold


def cross_validate(
    logits,
    labels,
    groups,
    base: Calibration,
    objective: str,
    repeats: int = 50,
    seed: int = 0,
    n_bins: int = 15,
    weights=None,
    **fit_kw,
) -> dict[str, dict[str, float]]:
    """The whole procedure on new films: repeated patient-grouped 2-fold splits, each half scored by the
    recalibration and threshold fitted on the other; per repeat the metrics of all films so scored (each
    counted by its weight), then per metric the mean and the 5th-95th percentile over the repeats."""
    z, y, g = np.asarray(logits, dtype=np.float64), np.asarray(labels).astype(int), np.asarray(groups)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if len(set(g)) < 4 or min(np.bincount(y, minlength=2)) < 4:
        raise XRError("cross-validation needs at least 4 films of each class and 4 patients")
    runs: list[dict[str, float]] = []
    for r in range(repeats):
        p, pred = np.zeros_like(z), np.zeros(len(z), dtype=bool)
        for fit_idx, ev_idx in StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed + r).split(z, y, g):
            a, b, thr = fit_site(
                z[fit_idx], y[fit_idx], base, objective, weights=None if w is None else w[fit_idx], **fit_kw
            )
            p[ev_idx] = cal.sigmoid(a * z[ev_idx] + b)
            pred[ev_idx] = p[ev_idx] >= thr
        yy = y == 1
        if w is None:
            runs.append(
                {
                    "accuracy": float((pred == yy).mean()),
                    "sensitivity": float(pred[yy].mean()),
                    "specificity": float((~pred[~yy]).mean()),
                    "ece": cal.ece(p, y, n_bins),
                }
            )
        else:
            runs.append(
                {
                    "accuracy": float(w[pred == yy].sum() / w.sum()),
                    "sensitivity": float(w[pred & yy].sum() / w[yy].sum()),
                    "specificity": float(w[~pred & ~yy].sum() / w[~yy].sum()),
                    "ece": cal.ece(p, y, n_bins, weights=w),
                }
            )
    return {
        k: {
            "mean": float(np.mean([m[k] for m in runs])),
            "p05": float(np.percentile([m[k] for m in runs], 5)),
            "p95": float(np.percentile([m[k] for m in runs], 95)),
        }
        for k in runs[0]
    }


def site_calibrate(
    model: Path,
    data: Path,
    out: Path,
    *,
    objective: str = "f1",
    target_sensitivity: float = 0.97,
    strength: float = 1.0,
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    device: str = "auto",
    amp: str = "auto",
    n_boot: int = 1000,
    cv_repeats: int = 50,
    n_bins: int = 15,
    batch_size: int = 32,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Score the site's films, fit and write ``out/calibration_threshold.json`` and the report; return the report."""
    items = _site_items(data)
    predictor = Predictor.from_checkpoint(model, device=device, amp=amp)
    logits = score_items(predictor, items, batch_size, num_workers)
    sample = Sample(
        [it.path for it in items],
        logits,
        np.array([it.label for it in items]),
        np.array([it.patient for it in items]),
        None,
        str(Path(data).resolve()),
    )
    return fit_and_report(
        predictor,
        model,
        sample,
        out,
        objective=objective,
        target_sensitivity=target_sensitivity,
        strength=strength,
        fn_cost=fn_cost,
        fp_cost=fp_cost,
        n_boot=n_boot,
        cv_repeats=cv_repeats,
        n_bins=n_bins,
    )


@dataclass(frozen=True)
class Sample:
    """A site's labelled films as the fit sees them: names, the model's logits, labels (1 = PNEUMONIA),
    patient groups, and weights (None: one film each; reviews: the films each stands for)."""

    names: list[str]
    logits: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    weights: np.ndarray | None
    source: str  # the folder, or the database and window the reviews came from
    extra: dict[str, Any] | None = None  # what the report says about where it came from


def fit_and_report(
    predictor: Any,
    model: Path,
    sample: Sample,
    out: Path,
    *,
    objective: str = "f1",
    target_sensitivity: float = 0.97,
    strength: float = 1.0,
    fn_cost: float = 5.0,
    fp_cost: float = 1.0,
    n_boot: int = 1000,
    cv_repeats: int = 50,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Fit the site calibration to ``sample``, write it bound to ``predictor``'s model, with the report."""
    base = predictor.calibration
    logits, labels, groups, weights = sample.logits, sample.labels, sample.groups, sample.weights
    fit_kw = {"target_sensitivity": target_sensitivity, "strength": strength, "fn_cost": fn_cost, "fp_cost": fp_cost}
    a, b, threshold = fit_site(logits, labels, base, objective, weights=weights, **fit_kw)
    probs = cal.sigmoid(a * logits + b)
    before = base.probability(logits)
    site = Calibration(
        temperature=1.0 / a,
        shift=b,
        threshold=threshold,
        kind="site",
        model_sha256=predictor.model_sha256,
        reference=_reference(labels, probs, threshold, groups, weights, n_boot),
        extra={
            "model": str(Path(model).resolve()),
            "model_id": predictor.model_id,
            "data": sample.source,
            **(sample.extra or {}),
            "n": int(len(labels)),
            "n_per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
            "objective": objective,
            **({"target_sensitivity": target_sensitivity} if objective == "sensitivity" else {}),
            **({"fn_cost": fn_cost, "fp_cost": fp_cost} if objective == "cost" else {}),
            "prior": {"scale": 1.0 / base.temperature, "shift": base.shift, "strength": strength, "from": base.id},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    site.write(out / CALIBRATION_FILE)
    report = {
        "calibration_id": site.id,
        "model_id": predictor.model_id,
        "n": int(len(labels)),
        "scale": a,
        "shift": b,
        "threshold": threshold,
        "objective": objective,
        "before": bootstrap_metrics(labels, before, base.threshold, groups, n_boot, n_bins=n_bins, weights=weights),
        "after": bootstrap_metrics(labels, probs, threshold, groups, n_boot, n_bins=n_bins, weights=weights),
        "cross_validated": cross_validate(
            logits, labels, groups, base, objective, cv_repeats, n_bins=n_bins, weights=weights, **fit_kw
        ),
        **(sample.extra or {}),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    _write_predictions(out / "predictions.csv", sample.names, labels, logits, probs, threshold, weights)
    _plots(out, labels, before, probs, base, n_bins, weights)
    (out / REPORT_MD).write_text(_markdown(report, base, site, sample.source))
    return report


def _reference(labels, probs, threshold: float, groups, weights, n_boot: int) -> dict[str, Any]:
    """The calibration's reference (core/calibration.py) from its films, each counted by its weight, with
    the flag's sensitivity and PPV on them and their patient-bootstrap 95% intervals: the drift watch warns
    when the site's reviews later put either outside its interval (results/drift.py)."""
    y, p = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    ref = reference(p, threshold)
    if weights is not None:  # reviews over-represent flagged films: the stream's shares, not the sample's
        counts, _ = np.histogram(p, bins=ref["bins"], range=(0.0, 1.0), weights=w)
        ref["flagged_rate"] = float(w[p >= threshold].sum() / w.sum())
        ref["fractions"] = [float(c / w.sum()) for c in counts]
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(0)

    def point(idx: np.ndarray) -> tuple[float, float]:
        yy, flag, ww = y[idx] == 1, p[idx] >= threshold, w[idx]
        tp = ww[flag & yy].sum()
        pos, flagged = ww[yy].sum(), ww[flag].sum()
        return (tp / pos if pos else np.nan), (tp / flagged if flagged else np.nan)

    draws = np.array(
        [
            point(np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]))
            for _ in range(n_boot)
        ]
    )
    value = point(np.arange(len(y)))
    ref["performance"] = {}
    for i, name in enumerate(("sensitivity", "ppv")):
        d = draws[:, i][~np.isnan(draws[:, i])]  # resamples without a pneumonia or a flag say nothing here
        ref["performance"][name] = {
            "value": None if np.isnan(value[i]) else float(value[i]),
            "low": float(np.percentile(d, 2.5)) if d.size else None,
            "high": float(np.percentile(d, 97.5)) if d.size else None,
        }
    return ref


def _site_items(data: Path) -> list[Item]:
    found = discover(data)
    items = found.get("test") or []
    if not items:
        raise XRError(f"{data}: no labelled films (expected {data}/NORMAL and {data}/PNEUMONIA)")
    if len({it.label for it in items}) < 2:
        raise XRError(f"{data}: a site calibration needs films of both classes, NORMAL and PNEUMONIA")
    return items


def _write_predictions(path: Path, names, labels, logits, probs, threshold: float, weights=None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "logit", "probability", "predicted"] + (["weight"] if weights is not None else []))
        for i, (name, y, z, p) in enumerate(zip(names, labels, logits, probs)):
            row = [name, CLASS_NAMES[int(y)], f"{z:.6f}", f"{p:.6f}", CLASS_NAMES[int(p >= threshold)]]
            w.writerow(row + ([f"{weights[i]:.4f}"] if weights is not None else []))


def _plots(out: Path, labels, before, after, base: Calibration, n_bins: int, weights=None) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for probs, name in ((before, "model's own calibration"), (after, "site calibration")):
        frac, mean = calibration_curve(labels, probs, n_bins=min(n_bins, 10), strategy="uniform")
        ax.plot(mean, frac, "o-", label=f"{name} (ECE {cal.ece(probs, labels, n_bins, weights=weights):.3f})")
    ax.set_xlabel("calibrated P(PNEUMONIA)")
    ax.set_ylabel("observed fraction PNEUMONIA")
    ax.set_title("site films: reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.linspace(0, 1, 11)
    series = [
        (
            np.histogram(before, bins=edges)[0] / max(1, len(before)),
            f"site, model's own calibration ({len(before)} films)",
        ),
        (np.histogram(after, bins=edges)[0] / max(1, len(after)), "site, site calibration"),
    ]
    if base.reference:
        series.insert(0, (np.asarray(base.reference["fractions"]), f"validation split ({base.reference['n']} films)"))
    width = 0.1 / (len(series) + 1)
    for i, (fractions, label) in enumerate(series):
        ax.bar(edges[:-1] + (i + 0.5) * width, fractions, width=width, align="edge", label=label)
    ax.set_xlabel("calibrated P(PNEUMONIA)")
    ax.set_ylabel("fraction of films")
    ax.set_title("score distribution: site vs validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=120)
    plt.close(fig)


def _ci(m: dict) -> str:
    if m["value"] is None:
        return "n/a"
    span = f" ({m['low']:.3f}-{m['high']:.3f})" if m["low"] is not None else ""
    return f"{m['value']:.3f}{span}"


def _markdown(report: dict, base: Calibration, site: Calibration, data: str) -> str:
    cv = report["cross_validated"]
    rows = [
        f"| {name} | "
        + " | ".join(_ci(report[key][m]) for m in ("accuracy", "sensitivity", "specificity", "auroc", "ece"))
        + " |"
        for name, key in (("model's own calibration", "before"), ("site calibration (fitted on these films)", "after"))
    ]
    rows.append(
        "| site calibration, cross-validated (mean, 5-95% over repeats) | "
        + " | ".join(
            f"{cv[m]['mean']:.3f} ({cv[m]['p05']:.3f}-{cv[m]['p95']:.3f})" if m in cv else ""
            for m in ("accuracy", "sensitivity", "specificity", "auroc", "ece")
        )
        + " |"
    )
    return "\n".join(
        [
            "# Site calibration report",
            "",
            f"Model `{report['model_id']}`; {report['n']} labelled films from `{data}`.",
            f"Fitted p = sigmoid({report['scale']:.3f} x logit {report['shift']:+.3f}) (the model's own: "
            f"sigmoid(logit / {base.temperature:.3f} {base.shift:+.3f})), threshold {report['threshold']:.3f} by "
            f"{report['objective']}. Calibration id `{site.id}`: use it with `xr-daemon --calibration FILE` or "
            "`daemon.calibration`, and only with this model.",
            "",
            "| | accuracy | sensitivity (PNEUMONIA recall) | specificity (NORMAL recall) | AUROC | ECE |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "In brackets: 95% patient-bootstrap intervals. The fitted row is measured on the films it was fitted on",
            "and so flatters it; the cross-validated row (each half of the patients scored by the same procedure",
            "fitted on the other half, repeated) is what to expect on new films. With about 100 films an interval",
            "of +/-0.05 is normal: more labelled films narrow it.",
            "",
            f"Plots: `{PLOTS[0]}` (before and after), `{PLOTS[1]}` (this site's scores beside the validation split's).",
            "",
        ]
    )
