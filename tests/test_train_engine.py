"""train/engine.py: freezing, head-on-features, and one real optimisation step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from xr.core.config import load_config
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
    import dataclasses
    import math

    from xr.core.config import load_config
    from xr.train.engine import prior_correction

    cfg = load_config()
    labels = [0] * 100 + [1] * 300  # true odds 3:1

    def with_(sampler, pos_weight):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, weighted_sampler=sampler, pos_weight=pos_weight))

    assert prior_correction(with_(False, False), labels) == 0.0
    assert prior_correction(with_(True, False), labels) == math.log(3)  # balanced batches learned odds 1:1
    assert prior_correction(with_(False, True), labels) == math.log(3)  # pos_weight 1/3 learned odds 1:1
    assert prior_correction(with_(True, True), labels) == 2 * math.log(3)


def _paired_views(n=64, dim=16, seed=0):
    """Two 'renderings' of each sample: feature 0 is the film, shared by both views; the others are
    grain, drawn afresh per view but spuriously more present in the positives, so a plain model leans
    on it (as ours read JPEG grain as disease)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 1] * (n // 2))
    views = torch.zeros(n, 2, dim)
    views[:, :, 0] = (2.0 * y + 0.5 * torch.randn(n, generator=g))[:, None]
    views[:, :, 1:] = 0.7 * y[:, None, None] + torch.randn(n, 2, dim - 1, generator=g)
    return TensorDataset(views.reshape(n, 2, 1, 4, dim // 4), y)  # [N, views, C, H, W] like XRDataset


def _view_gap(consistency: float) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    ds = _paired_views()
    loader = make_loader(ds, 16, 0, torch.Generator().manual_seed(0), shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        stats = train_one_epoch(
            model, loader, opt, torch.nn.BCEWithLogitsLoss(), torch.device("cpu"), channels_last=False,
            consistency=consistency,
        )
    assert stats["images"] == 2 * len(ds)  # both views of every image were trained on
    with torch.no_grad():
        z = model(ds.tensors[0].flatten(0, 1)).reshape(-1, 2)
    return (z[:, 0] - z[:, 1]).abs().mean().item()


def test_consistency_loss_makes_two_views_of_an_image_score_alike():
    plain, stable = _view_gap(0.0), _view_gap(2.0)
    assert stable < 0.5 * plain, (plain, stable)


def _consistency_pull(space: str) -> torch.Tensor:
    """How far one consistency step moves each view's logit, for a confident pair (logits 6 and 8) and a
    borderline pair (0 and 2): each view's logit is its own weight, and the classification loss is off."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
    logits = torch.tensor([6.0, 8.0, 0.0, 2.0])
    with torch.no_grad():
        model[1].weight.copy_(logits[None])
    views = torch.eye(4).reshape(2, 2, 1, 1, 4)  # [images, views, C, H, W]: one-hot, so z = weight
    loader = DataLoader(TensorDataset(views, torch.tensor([1, 1])), batch_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(
        model, loader, opt, lambda out, y: 0.0 * out.sum(), torch.device("cpu"), channels_last=False,
        consistency=1.0, consistency_space=space,
    )
    return (model[1].weight.detach()[0] - logits).abs()


def test_probability_space_consistency_pulls_borderline_films_and_leaves_confident_ones():
    logit, prob = _consistency_pull("logit"), _consistency_pull("probability")
    assert torch.allclose(logit[:2], logit[2:])  # on logits, a gap of 2 pulls alike however sure the model is
    assert prob[2:].min() > 20 * prob[:2].max(), prob  # on probabilities, the pair near 0.5 takes the pull
    assert prob[2:].min() > 0


def _tiny_fit(tmp_path, xray_paths, val_labels=(0, 0, 1, 1), **train):
    """fit() on 6 fixture images (2 NORMAL, 4 PNEUMONIA) with 4 for val, one step per epoch, on CPU."""
    normal = [p for p in xray_paths if p.parent.name == "NORMAL"]
    pneumonia = [p for p in xray_paths if p.parent.name == "PNEUMONIA"]
    train_items = [Item(str(p), 0, p.stem) for p in normal[:2]] + [Item(str(p), 1, p.stem) for p in pneumonia[:4]]
    pools = {0: iter(normal[2:]), 1: iter(pneumonia[4:])}
    val_items = [Item(str(p), y, p.stem) for y in val_labels for p in [next(pools[y])]]
    overrides = {"model.pretrained": False, "data.num_workers": 0, "train.batch_size": 4, "train.max_steps_per_epoch": 1}
    cfg = load_config(overrides=overrides | {f"train.{k}": v for k, v in train.items()})
    return fit(cfg, Splits(train_items, val_items, [], []), tmp_path, torch.device("cpu"))


def test_fit_trains_with_the_configured_consistency_view_and_space(tmp_path, xray_paths, monkeypatch):
    seen, real = [], engine.train_one_epoch

    def spy(model, loader, *args, **kw):
        second_view = getattr(loader.dataset, "second_view", None)
        seen.append((type(second_view).__name__, kw.get("consistency"), kw.get("consistency_space")))
        return real(model, loader, *args, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    _tiny_fit(tmp_path, xray_paths, epochs=3, head_epochs=2, consistency_weight=1.0, consistency_view="both",
              consistency_space="probability")
    assert seen[-1] == ("RandomChoice", 1.0, "probability")  # the fine-tuning epoch, with both views


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
