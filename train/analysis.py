"""Evaluation of a calibrated model on a labelled folder: predictions, metrics and plots."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from torch.utils.data import DataLoader

from xr.core.model import CLASS_NAMES
from xr.core.predict import Predictor
from xr.train.calibrate import ece
from xr.train.data import Item, XRDataset

PLOTS = ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "reliability_diagram.png")


def compute_metrics(labels, probs, threshold: float, n_bins: int = 15) -> dict[str, Any]:
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    prec, rec, f1s, support = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    both = len(set(y.tolist())) == 2
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "n": int(len(y)),
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "average_precision": float(average_precision_score(y, p)) if both else None,
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "sensitivity": float(rec[1]),
        "specificity": float(rec[0]),
        "per_class": {
            cls: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1s[i]), "support": int(support[i])}
            for i, cls in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "ece": ece(p, y, n_bins),
        "threshold": float(threshold),
    }


CI_METRICS = ("accuracy", "sensitivity", "specificity", "f1", "auroc", "ece")


def bootstrap_metrics(
    labels,
    probs,
    threshold: float,
    groups=None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 15,
    weights=None,
) -> dict[str, dict[str, float | None]]:
    """Each metric of :data:`CI_METRICS` with a percentile bootstrap interval: ``{"value", "low", "high"}``.

    Resamples whole patients (``groups``) with replacement where given, so two films of one patient
    never count as two independent cases. A resample without both classes has no AUROC and is skipped
    for it. ``weights``: films of the stream each stands for (reviews: results/reviewed.py); None counts
    each film once.
    """
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    if weights is None:
        point = _counted(y, p, threshold, n_bins)
    else:
        point = _weighted(y, p, np.asarray(weights, dtype=np.float64), threshold, n_bins)

    value = point(np.arange(len(y)))
    draws: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for k, v in point(idx).items():
            if v is not None:
                draws[k].append(v)
    tail = 100 * (1 - level) / 2
    return {
        k: {
            "value": value[k],
            "low": float(np.percentile(draws[k], tail)) if draws[k] else None,
            "high": float(np.percentile(draws[k], 100 - tail)) if draws[k] else None,
        }
        for k in CI_METRICS
    }


def _counted(y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int):
    """The metrics of the films at ``idx``, each film counted once."""

    def point(idx: np.ndarray) -> dict[str, float | None]:
        yy, pp = y[idx], p[idx]
        pred = pp >= threshold
        tp, fp = int((pred & (yy == 1)).sum()), int((pred & (yy == 0)).sum())
        fn, tn = int((~pred & (yy == 1)).sum()), int((~pred & (yy == 0)).sum())
        return {
            "accuracy": (tp + tn) / len(yy),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "auroc": float(roc_auc_score(yy, pp)) if 0 < yy.sum() < len(yy) else None,
            "ece": ece(pp, yy, n_bins),
        }

    return point


def _weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float, n_bins: int):
    """The metrics of the films at ``idx``, each film counted by its weight."""

    def point(idx: np.ndarray) -> dict[str, float | None]:
        yy, pp, ww = y[idx] == 1, p[idx], w[idx]
        pred = pp >= threshold
        tp, fp = ww[pred & yy].sum(), ww[pred & ~yy].sum()
        fn, tn = ww[~pred & yy].sum(), ww[~pred & ~yy].sum()
        both = 0 < yy.sum() < len(yy)
        return {
            "accuracy": float((tp + tn) / ww.sum()) if ww.sum() > 0 else None,
            "sensitivity": float(tp / (tp + fn)) if tp + fn > 0 else None,
            "specificity": float(tn / (tn + fp)) if tn + fp > 0 else None,
            "f1": float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0,
            "auroc": float(roc_auc_score(yy, pp, sample_weight=ww)) if both else None,
            "ece": ece(pp, yy, n_bins, weights=ww) if ww.sum() > 0 else None,
        }

    return point


@contextmanager
def _figure(path: Path, title: str):
    """One 4.5x4 in figure per plot, titled, saved to ``path`` and closed."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    yield ax
    ax.set_title(title.strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_plots(out: Path, labels, probs, threshold: float, title: str = "", n_bins: int = 15) -> None:
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    both = len(set(y.tolist())) == 2  # ROC and PR need both classes

    with _figure(out / "confusion_matrix.png", f"{title} threshold {threshold:.3f}") as ax:
        ConfusionMatrixDisplay(confusion_matrix(y, pred, labels=[0, 1]), display_labels=CLASS_NAMES).plot(
            ax=ax, colorbar=False, values_format="d"
        )
    with _figure(out / "roc_curve.png", f"{title} ROC") as ax:
        if both:
            RocCurveDisplay.from_predictions(y, p, ax=ax, name="PNEUMONIA", plot_chance_level=True)
    with _figure(out / "pr_curve.png", f"{title} precision-recall") as ax:
        if both:
            PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="PNEUMONIA", plot_chance_level=True)
    with _figure(out / "reliability_diagram.png", f"{title} reliability") as ax:
        frac_pos, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
        ax.plot(mean_pred, frac_pos, "o-", label=f"model (ECE {ece(p, y, n_bins):.3f})")
        ax.set_xlabel("calibrated P(PNEUMONIA)")
        ax.set_ylabel("observed fraction PNEUMONIA")
        ax.legend(loc="upper left")


def score_items(predictor: Predictor, items: list[Item], batch_size: int = 32, num_workers: int = 1) -> np.ndarray:
    """Logits through the predictor's own preset and model (the daemon's path)."""
    dataset = XRDataset(items, predictor.preset, predictor.preset.eval_transform())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return np.concatenate([predictor.logits(x).numpy() for x, _ in loader]).astype(np.float64)


def fullres_pairs(shared: Path) -> tuple[list[Path], list[Path]]:
    """The full-resolution samples in ``shared``/samples/fullres and their 224x224 dataset copies of the
    same name in ``shared``/data/chest_xray/train (../shared/README.md), in the same order."""
    fullres = sorted((shared / "samples" / "fullres").glob("*/*.jpeg"))
    copies = [shared / "data" / "chest_xray" / "train" / p.parent.name / p.name for p in fullres]
    return fullres, copies


def pair_agreement(predictor: Predictor, first: list[Path], second: list[Path]) -> dict[str, Any]:
    """How alike ``predictor`` scores two renderings of the same films: per pair the logit gap (first minus
    second), the absolute calibrated-probability difference, and the indices whose triage decision differs."""
    first_scores, second_scores = predictor.predict_paths(first), predictor.predict_paths(second)
    first_logits, second_logits = np.array([x.logit for x in first_scores]), np.array([y.logit for y in second_scores])
    return {
        "logit_gap": first_logits - second_logits,
        "prob_diff": np.abs(np.array([x.probability - y.probability for x, y in zip(first_scores, second_scores)])),
        "flips": [i for i, (x, y) in enumerate(zip(first_scores, second_scores)) if x.flagged != y.flagged],
        "first_logit": first_logits,
        "second_logit": second_logits,
    }


def evaluate_items(
    predictor: Predictor,
    items: list[Item],
    out: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    title: str = "",
    n_bins: int = 15,
) -> dict[str, Any]:
    """Write predictions.csv, metrics.json and the four plots for ``items`` into ``out``; ECE and the
    reliability diagram over ``n_bins`` bins (calibration.ece_bins)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([it.label for it in items])
    logits = score_items(predictor, items, batch_size, num_workers)
    probs = predictor.calibrate(torch.as_tensor(logits)).numpy()
    thr = predictor.threshold
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "logit", "probability", "predicted", "correct"])
        for it, z, p in zip(items, logits, probs):
            predicted = CLASS_NAMES[int(p >= thr)]
            w.writerow(
                [it.path, CLASS_NAMES[it.label], f"{z:.6f}", f"{p:.6f}", predicted, predicted == CLASS_NAMES[it.label]]
            )
    metrics = compute_metrics(labels, probs, thr, n_bins)
    metrics.update({"T": predictor.temperature, "model_id": predictor.model_id})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_plots(out, labels, probs, thr, title=title, n_bins=n_bins)
    return metrics
