"""The training stage: head-only epochs on cached features, then fine-tuning, with early stopping.

Shaped like torchvision/timm ``train.py``: ``train_one_epoch`` and ``evaluate`` return metric dicts,
``fit`` writes one summary row per epoch and, after each epoch, ``checkpoint_last.pt`` with all it
takes to resume (train/resume.py).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from xr.core.config import Recipe
from xr.core.errors import XRError
from xr.core.model import CLASS_NAMES, checkpoint_meta, create_model, save_checkpoint
from xr.core.predict import autocast, use_bf16
from xr.core.preprocessing import Preset
from xr.train import resume
from xr.train.data import Splits, XRDataset, make_loader, seed_everything
from xr.train.prior import BiasShift, prior_correction

BEST_CHECKPOINT = "xr_mvp_best.pt"
LAST_CHECKPOINT = "checkpoint_last.pt"
EPOCH_LOG = "epochs.csv"
VAL_LOGITS = "val_logits.csv"


def make_loss(cfg: Recipe, labels: list[int], device: torch.device) -> nn.Module:
    pos_weight = None
    if cfg.train.pos_weight:
        n_pos = max(1, sum(labels))
        n_neg = max(1, len(labels) - sum(labels))
        pos_weight = torch.tensor([n_neg / n_pos], device=device)
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def _smoothed_targets(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    y = y.float()
    return y * (1.0 - smoothing) + 0.5 * smoothing if smoothing > 0 else y


def frozen_modules(model: nn.Module, freeze_stages: int) -> list[nn.Module]:
    """Stem plus the first ``freeze_stages`` block stages: generic edge/texture filters. Keeping them
    fixed halves the backward cost on a CPU and leaves fewer weights to overfit a few thousand images."""
    return [model.conv_stem, model.bn1, *list(model.blocks)[:freeze_stages]]


def set_trainable(model: nn.Module, head_only: bool, freeze_stages: int) -> list[nn.Module]:
    """Set requires_grad; return the modules whose BatchNorm statistics must stay frozen."""
    for p in model.parameters():
        p.requires_grad = not head_only
    if head_only:
        for p in model.get_classifier().parameters():
            p.requires_grad = True
        return [m for m in model.children() if m is not model.get_classifier()]
    frozen = frozen_modules(model, freeze_stages)
    for m in frozen:
        for p in m.parameters():
            p.requires_grad = False
    return frozen


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    frozen: list[nn.Module] = (),
    bf16: bool = False,
    channels_last: bool = True,
    smoothing: float = 0.0,
    max_steps: int | None = None,
    ema: Any = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_steps`` batches); the mean loss and the speed."""
    model.train()
    for m in frozen:
        m.eval()  # frozen layers keep their ImageNet BatchNorm statistics
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = tqdm(loader, total=steps, desc=desc, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if step >= steps:
            break
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device).float().reshape(-1, 1)
        with autocast(device, bf16):
            out = model(x)
        out = out.float().reshape(-1, 1)
        loss = loss_fn(out, _smoothed_targets(y, smoothing))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        total_loss += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    bf16: bool = False,
    channels_last: bool = True,
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            out = model(x)
        logits.append(out.float().reshape(-1).cpu())
        labels.append(torch.as_tensor(y).reshape(-1))
    return torch.cat(logits).numpy().astype(np.float64), torch.cat(labels).numpy().astype(np.int64)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, **kw) -> dict[str, Any]:
    """Validation metrics at the raw logit (threshold 0.5 uncalibrated); logits kept for calibration."""
    logits, labels = predict_logits(model, loader, device, **kw)
    loss = float(
        F.binary_cross_entropy_with_logits(torch.as_tensor(logits), torch.as_tensor(labels, dtype=torch.float64))
    )
    usable = len(set(labels.tolist())) == 2 and np.isfinite(logits).all()
    auroc = float(roc_auc_score(labels, logits)) if usable else float("nan")  # fit() names the cause
    acc = float(((logits >= 0) == (labels == 1)).mean())
    return {"loss": loss, "auroc": auroc, "acc": acc, "logits": logits, "labels": labels}


class _HeadOnFeatures(nn.Module):
    """The model's own classifier (with its dropout) applied to cached pooled features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = F.dropout(feats, p=self.model.drop_rate, training=self.training)
        return self.model.get_classifier()(feats)


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, **kw) -> TensorDataset:
    """Pooled backbone features, computed once: head-only epochs then cost almost nothing."""
    model.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", leave=False, dynamic_ncols=True):
        x = x.to(device)
        if kw.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, kw.get("bf16", False)):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y).reshape(-1))
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def _write_epoch_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def save_val_logits(path: Path, items, logits: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "logit"])
        for it, z, y in zip(items, logits, labels):
            w.writerow([it.path, int(y), repr(float(z))])


def fit(
    cfg: Recipe, splits: Splits, out_dir: str | Path, device: torch.device, *, resume_run: bool = False
) -> dict[str, Any]:
    """Train on ``splits.train``, select on ``splits.val`` AUROC; write the best checkpoint and logs.
    ``resume_run``: carry on from ``checkpoint_last.pt`` after its epoch, to the same end."""
    out_dir = Path(out_dir)
    val_classes = sorted({it.label for it in splits.val})
    if len(val_classes) < 2:
        held = f"{len(splits.val)} images of {CLASS_NAMES[val_classes[0]]} only" if val_classes else "no images"
        raise XRError(
            f"the val split holds {held}: selecting the best epoch needs val AUROC, "
            "which needs both NORMAL and PNEUMONIA; re-run `xr-train split`"
        )
    saved = resume.load(out_dir / LAST_CHECKPOINT, cfg) if resume_run else None
    out_dir.mkdir(parents=True, exist_ok=True)
    train_cfg = cfg.train
    train_gen = seed_everything(train_cfg.seed)  # the training loader's order and its workers' seeds
    eval_gen = torch.Generator().manual_seed(train_cfg.seed)  # loaders that draw nothing but worker seeds
    bf16 = use_bf16(device, train_cfg.amp)  # forward-only passes: cached features, evaluation
    bf16_step = use_bf16(device, train_cfg.amp, training=True)
    channels_last = train_cfg.channels_last
    preset = Preset.from_config(cfg.preprocess)
    train_ds = XRDataset(splits.train, preset, preset.train_transform(cfg.augment))
    train_eval_ds = XRDataset(splits.train, preset, preset.eval_transform())
    val_ds = XRDataset(splits.val, preset, preset.eval_transform())
    workers = cfg.data.num_workers
    val_loader = make_loader(val_ds, train_cfg.batch_size, workers, eval_gen)

    model = create_model(cfg.model.arch, cfg.model.pretrained, cfg.model.weights_path, cfg.model.drop_rate).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = make_loss(cfg, train_ds.labels(), device)
    shift = prior_correction(cfg, train_ds.labels())
    log_path = out_dir / EPOCH_LOG
    if saved is None:
        meta = checkpoint_meta(cfg.model.arch, preset, cfg.to_dict(), splits.summary())
        meta["prior_correction"] = shift
        epoch, best, since_best, history = 0, {"auroc": -math.inf, "epoch": -1}, 0, []
        log_path.unlink(missing_ok=True)
    else:
        meta, epoch, state = saved.meta, saved.epoch, saved.state
        best, since_best, history = state["best"], state["since_best"], state["history"]
        model.load_state_dict(state["model"])
        log_path.unlink(missing_ok=True)  # rows of an epoch cut short go; it runs again
        for row in history:
            _write_epoch_row(log_path, row)
        tqdm.write(f"resuming after epoch {epoch} ({saved.phase}) from {out_dir / LAST_CHECKPOINT}")
    pending_rng = saved.state["rng"] if saved else None

    def start_epoch() -> None:
        """The first epoch after a resume starts from the random state the interrupted run was in."""
        nonlocal pending_rng
        if pending_rng is not None:
            resume.restore_rng(pending_rng, train_gen)
            pending_rng = None

    def save_last(phase: str, eval_model: nn.Module, optimizer, scheduler=None, ema=None) -> None:
        state = {
            "model": resume.weights(model),
            "ema": resume.weights(ema.module) if ema is not None else None,
            "best": dict(best),
            "since_best": since_best,
            "history": list(history),
            "rng": resume.rng_state(train_gen, device),
        }
        # Shifted like the best checkpoint, as meta["prior_correction"] says of both.
        with BiasShift(eval_model, shift):
            save_checkpoint(
                out_dir / LAST_CHECKPOINT,
                eval_model,
                meta,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                epoch=epoch,
                phase=phase,
                config=cfg.to_dict(),
                state=state,
            )

    def finish_epoch(phase: str, train_stats: dict, val: dict, lr: float, eval_model: nn.Module) -> bool:
        # NaN > best is always False: without this check no epoch would ever be saved, silently.
        if math.isnan(val["auroc"]):
            raise XRError(
                f"epoch {epoch}: val AUROC is undefined (NaN): the model output non-finite logits "
                f"(training diverged; try a lower train.lr than {train_cfg.lr}); no checkpoint saved"
            )
        improved = val["auroc"] > best["auroc"]
        if improved:
            best.update(auroc=val["auroc"], epoch=epoch)
            with BiasShift(eval_model, shift):
                save_checkpoint(out_dir / BEST_CHECKPOINT, eval_model, meta)
            save_val_logits(out_dir / VAL_LOGITS, splits.val, val["logits"] + shift, val["labels"])
        row = {
            "epoch": epoch,
            "phase": phase,
            "lr": lr,
            "train_loss": round(train_stats["loss"], 5),
            "train_images_per_s": round(train_stats["images_per_s"], 2),
            "val_loss": round(val["loss"], 5),
            "val_auroc": round(val["auroc"], 5),
            "val_acc": round(val["acc"], 4),
            "seconds": round(train_stats["seconds"], 1),
            "best": improved,
        }
        _write_epoch_row(log_path, row)
        history.append(row)
        tqdm.write(
            f"epoch {epoch:2d} [{phase}] loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"auroc {row['val_auroc']:.4f} acc {row['val_acc']:.3f} | {row['train_images_per_s']:.1f} img/s"
            f"{' *best*' if improved else ''}"
        )
        return improved

    # -- phase 1: head only, on cached features ------------------------------------------------------
    head_epochs = min(train_cfg.head_epochs, train_cfg.epochs)  # train.epochs is the total, head epochs included
    if epoch < head_epochs:
        set_trainable(model, head_only=True, freeze_stages=train_cfg.freeze_stages)
        feature_opts = {"bf16": bf16, "channels_last": channels_last}
        train_feats = extract_features(
            model, make_loader(train_eval_ds, train_cfg.batch_size, workers, eval_gen), device, **feature_opts
        )
        val_feats = extract_features(model, val_loader, device, **feature_opts)
        head = _HeadOnFeatures(model)
        head_opt = torch.optim.AdamW(
            model.get_classifier().parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        if saved is not None:
            head_opt.load_state_dict(saved.optimizer)
        feat_loader = make_loader(
            train_feats, train_cfg.batch_size, 0, train_gen, balanced=train_cfg.weighted_sampler, shuffle=True
        )
        val_feat_loader = make_loader(val_feats, 256, 0, eval_gen)
        while epoch < head_epochs:
            start_epoch()
            epoch += 1
            stats = train_one_epoch(
                head,
                feat_loader,
                head_opt,
                loss_fn,
                device,
                bf16=False,
                channels_last=False,
                smoothing=train_cfg.label_smoothing,
                desc=f"head {epoch}",
            )
            val = evaluate(head, val_feat_loader, device, channels_last=False)
            finish_epoch("head", stats, val, head_opt.param_groups[0]["lr"], model)
            save_last("head", model, head_opt)
        del train_feats, val_feats

    # -- phase 2: fine-tune all but the frozen stem stages ------------------------------------------
    frozen = set_trainable(model, head_only=False, freeze_stages=train_cfg.freeze_stages)
    head_params = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": body_params, "lr": train_cfg.lr * train_cfg.backbone_lr_mult},
            {"params": head_params, "lr": train_cfg.lr},
        ],
        lr=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=train_cfg.plateau_factor, patience=train_cfg.plateau_patience
    )
    ema = None
    if train_cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=train_cfg.ema_decay)
    if saved is not None and saved.phase == "full":
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        if ema is not None:
            ema.module.load_state_dict(saved.state["ema"])
    train_loader = make_loader(
        train_ds, train_cfg.batch_size, workers, train_gen, balanced=train_cfg.weighted_sampler, shuffle=True
    )
    while epoch < train_cfg.epochs and since_best < train_cfg.early_stopping_patience:
        start_epoch()
        epoch += 1
        stats = train_one_epoch(
            model,
            train_loader,
            optimizer,
            loss_fn,
            device,
            frozen=frozen,
            bf16=bf16_step,
            channels_last=channels_last,
            smoothing=train_cfg.label_smoothing,
            max_steps=train_cfg.max_steps_per_epoch,
            ema=ema,
            desc=f"epoch {epoch}",
        )
        eval_model = ema.module if ema is not None else model
        val = evaluate(eval_model, val_loader, device, bf16=bf16, channels_last=channels_last)
        improved = finish_epoch("full", stats, val, optimizer.param_groups[1]["lr"], eval_model)
        scheduler.step(val["auroc"])
        since_best = 0 if improved else since_best + 1
        save_last("full", eval_model, optimizer, scheduler, ema)
    if since_best >= train_cfg.early_stopping_patience:
        tqdm.write(f"early stopping: no val AUROC gain for {since_best} epochs")
    return {"best_epoch": best["epoch"], "best_val_auroc": best["auroc"], "epochs_run": epoch, "history": history}
