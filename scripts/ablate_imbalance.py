"""Measure the class-imbalance options (pos_weight, WeightedRandomSampler) cheaply.

Backbone features of the ImageNet Lite0 are extracted once for the patient-grouped train/val/test
split; a linear head is then trained under each of the four settings, and the script prints val/test
AUROC and per-class recall at the raw 0.5 threshold and at the F1 threshold chosen on val.

    python scripts/ablate_imbalance.py --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from xr.core.config import load_recipe
from xr.core.model import create_model
from xr.core.preprocessing import Preset
from xr.train.analysis import compute_metrics
from xr.train.calibrate import choose_threshold, fit_temperature, sigmoid
from xr.train.data import XRDataset, make_loader, make_splits, seed_everything
from xr.train.engine import (
    _HeadOnFeatures,
    evaluate,
    extract_features,
    make_loss,
    train_one_epoch,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    cfg = load_recipe()
    splits = make_splits(args.data, cfg.data)
    preset = Preset.from_config(cfg.preprocess)
    dev = torch.device("cpu")
    gen = seed_everything(0)
    backbone = create_model(cfg.model.arch, pretrained=True).to(memory_format=torch.channels_last)
    feats = {}
    for name in ("train", "val", "test"):
        ds = XRDataset(getattr(splits, name), preset, preset.eval_transform())
        feats[name] = extract_features(
            backbone, make_loader(ds, 32, cfg.data.num_workers, gen), dev, channels_last=True
        )
    print(
        f"{'pos_weight':>10} {'sampler':>8} | {'val AUROC':>9} {'test AUROC':>10} | raw 0.5: {'rec N':>6} {'rec P':>6} | "
        f"val-F1 thr: {'rec N':>6} {'rec P':>6} {'acc':>6}"
    )
    for pos_weight in (False, True):
        for sampler in (False, True):
            c = cfg.replace({"train.pos_weight": pos_weight, "train.weighted_sampler": sampler})
            seed_everything(0)
            model = create_model(cfg.model.arch, pretrained=False)
            head = _HeadOnFeatures(model)
            opt = torch.optim.AdamW(model.get_classifier().parameters(), lr=1e-3, weight_decay=c.train.weight_decay)
            loss_fn = make_loss(c, feats["train"].tensors[1].tolist(), dev)
            loader = make_loader(
                feats["train"], 32, 0, torch.Generator().manual_seed(0), balanced=sampler, shuffle=True
            )
            for _ in range(args.epochs):
                train_one_epoch(head, loader, opt, loss_fn, dev, channels_last=False, desc="head")
            val = evaluate(head, make_loader(feats["val"], 256, 0, gen), dev, channels_last=False)
            test = evaluate(head, make_loader(feats["test"], 256, 0, gen), dev, channels_last=False)
            raw = compute_metrics(test["labels"], sigmoid(test["logits"]), 0.5)
            t = fit_temperature(val["logits"], val["labels"])
            thr, _ = choose_threshold(sigmoid(val["logits"] / t), val["labels"], "f1")
            cal = compute_metrics(test["labels"], sigmoid(test["logits"] / t), thr)
            print(
                f"{str(pos_weight):>10} {str(sampler):>8} | {val['auroc']:9.4f} {test['auroc']:10.4f} | "
                f"        {raw['per_class']['NORMAL']['recall']:6.3f} {raw['per_class']['PNEUMONIA']['recall']:6.3f} | "
                f"           {cal['per_class']['NORMAL']['recall']:6.3f} {cal['per_class']['PNEUMONIA']['recall']:6.3f} {cal['accuracy']:6.3f}"
            )


if __name__ == "__main__":
    main()
