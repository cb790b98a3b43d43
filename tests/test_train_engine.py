"""train/engine.py: freezing, head-on-features, and one real optimisation step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from xr.core.config import load_recipe
from xr.core.errors import XRError
from xr.core.model import create_model
from xr.train import engine
from xr.train.data import Item, Splits
from xr.train.engine import _HeadOnFeatures, evaluate, fit, make_loader, set_trainable, train_one_epoch


def _tiny_batchset(n=8, size=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.tensor([0, 1] * (n // 2))
    x[y == 1] += 1.0  # separable
    return TensorDataset(x, y)


def test_frozen_stages_keep_weights_and_batchnorm_stats():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained=False)
    frozen = set_trainable(model, head_only=False, freeze_stages=2)
    stem_w = model.conv_stem.weight.clone()
    stem_bn = model.bn1.running_mean.clone()
    block2_w = model.blocks[2][0].conv_pw.weight.clone()
    ds = _tiny_batchset()
    loader = make_loader(ds, 4, 0, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stats = train_one_epoch(model, loader, opt, torch.nn.BCEWithLogitsLoss(), torch.device("cpu"), frozen=frozen)
    assert stats["images"] == 8 and stats["loss"] > 0 and stats["images_per_s"] > 0
    assert torch.equal(model.conv_stem.weight, stem_w)
    assert torch.equal(model.bn1.running_mean, stem_bn)  # BN stats of frozen layers untouched
    assert not torch.equal(model.blocks[2][0].conv_pw.weight, block2_w)  # later stages learn


def test_head_only_changes_only_the_classifier():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained=False)
    set_trainable(model, head_only=True, freeze_stages=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    feats = TensorDataset(torch.randn(16, 1280), torch.tensor([0, 1] * 8))
    head = _HeadOnFeatures(model)
    opt = torch.optim.AdamW(model.get_classifier().parameters(), lr=1e-2)
    loader = make_loader(feats, 8, 0, torch.Generator().manual_seed(0), balanced=True)
    before = model.classifier.weight.clone()
    train_one_epoch(head, loader, opt, torch.nn.BCEWithLogitsLoss(), torch.device("cpu"), channels_last=False)
    assert not torch.equal(model.classifier.weight, before)
    val = evaluate(head, make_loader(feats, 16, 0, torch.Generator()), torch.device("cpu"), channels_last=False)
    assert set(val) >= {"loss", "auroc", "acc", "logits", "labels"} and len(val["logits"]) == 16


def test_balanced_sampler_draws_classes_evenly():
    labels = torch.tensor([0] * 10 + [1] * 90)
    ds = TensorDataset(torch.zeros(100, 1), labels)
    loader = make_loader(ds, 100, 0, torch.Generator().manual_seed(0), balanced=True)
    drawn = torch.cat([y for _, y in loader] * 1)
    frac = drawn.float().mean().item()
    assert 0.35 < frac < 0.65  # vs 0.9 without the sampler


def test_prior_correction_undoes_the_training_odds():
    import math

    from xr.train.engine import prior_correction

    cfg = load_recipe()
    labels = [0] * 100 + [1] * 300  # true odds 3:1

    def with_(sampler, pos_weight):
        return cfg.replace({"train.weighted_sampler": sampler, "train.pos_weight": pos_weight})

    assert prior_correction(with_(False, False), labels) == 0.0
    assert prior_correction(with_(True, False), labels) == math.log(3)  # balanced batches learned odds 1:1
    assert prior_correction(with_(False, True), labels) == math.log(3)  # pos_weight 1/3 learned odds 1:1
    assert prior_correction(with_(True, True), labels) == 2 * math.log(3)


def _tiny_fit(tmp_path, xray_paths, val_labels=(0, 0, 1, 1), **train):
    """fit() on 6 fixture images (2 NORMAL, 4 PNEUMONIA) with 4 for val, one step per epoch, on CPU."""
    normal = [p for p in xray_paths if p.parent.name == "NORMAL"]
    pneumonia = [p for p in xray_paths if p.parent.name == "PNEUMONIA"]
    train_items = [Item(str(p), 0, p.stem) for p in normal[:2]] + [Item(str(p), 1, p.stem) for p in pneumonia[:4]]
    pools = {0: iter(normal[2:]), 1: iter(pneumonia[4:])}
    val_items = [Item(str(p), y, p.stem) for y in val_labels for p in [next(pools[y])]]
    overrides = {
        "model.pretrained": False,
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.max_steps_per_epoch": 1,
    }
    cfg = load_recipe(overrides=overrides | {f"train.{k}": v for k, v in train.items()})
    return fit(cfg, Splits(train_items, val_items, [], []), tmp_path, torch.device("cpu"))


def test_epochs_is_the_total_head_epochs_included(tmp_path, xray_paths):
    result = _tiny_fit(tmp_path, xray_paths, epochs=1, head_epochs=2)
    assert result["epochs_run"] == 1 and [r["phase"] for r in result["history"]] == ["head"]
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)  # a head-only run has one too
    assert last["epoch"] == 1


def test_last_checkpoint_has_the_prior_correction_of_the_best(tmp_path, xray_paths):
    """Both checkpoints say prior_correction in their meta; both must carry it in the classifier bias."""
    result = _tiny_fit(tmp_path, xray_paths, epochs=1, head_epochs=0)
    assert result["best_epoch"] == 1  # so best and last hold the same weights
    best = torch.load(tmp_path / "xr_mvp_best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert best["meta"]["prior_correction"] == last["meta"]["prior_correction"] != 0.0
    assert best["model"].keys() == last["model"].keys()
    for key, value in best["model"].items():
        assert torch.equal(value, last["model"][key]), key


def test_one_class_val_is_a_clear_error_before_training(tmp_path, xray_paths):
    with pytest.raises(XRError, match=r"val split holds 2 images of PNEUMONIA only.*both NORMAL and PNEUMONIA"):
        _tiny_fit(tmp_path, xray_paths, val_labels=(1, 1), epochs=1, head_epochs=1)
    assert not (tmp_path / "epochs.csv").exists()


def test_nan_val_auroc_is_an_error_not_a_run_without_checkpoint(tmp_path, xray_paths, monkeypatch):
    """NaN > best is False: without the check, training would end with no xr_mvp_best.pt and no word."""
    real = engine.predict_logits

    def diverged(*args, **kw):
        logits, labels = real(*args, **kw)
        return np.full_like(logits, np.nan), labels

    monkeypatch.setattr(engine, "predict_logits", diverged)
    with pytest.raises(XRError, match=r"epoch 1: val AUROC is undefined .*non-finite logits"):
        _tiny_fit(tmp_path, xray_paths, epochs=1, head_epochs=1)
