"""train/engine.py: freezing, head-on-features, and one real optimisation step."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from xr.core.config import load_recipe
from xr.core.errors import XRError
from xr.core.model import create_model
from xr.train import engine
from xr.train.data import Item, Splits, make_loader
from xr.train.engine import _HeadOnFeatures, evaluate, fit, set_trainable, train_one_epoch


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

    from xr.train.prior import prior_correction

    cfg = load_recipe()
    labels = [0] * 100 + [1] * 300  # true odds 3:1

    def with_(sampler, pos_weight):
        return cfg.replace({"train.weighted_sampler": sampler, "train.pos_weight": pos_weight})

    assert prior_correction(with_(False, False), labels) == 0.0
    assert prior_correction(with_(True, False), labels) == math.log(3)  # balanced batches learned odds 1:1
    assert prior_correction(with_(False, True), labels) == math.log(3)  # pos_weight 1/3 learned odds 1:1
    assert prior_correction(with_(True, True), labels) == 2 * math.log(3)


def _tiny_fit(tmp_path, xray_paths, val_labels=(0, 0, 1, 1), workers=0, resume_run=False, **train):
    """fit() on 6 fixture images (2 NORMAL, 4 PNEUMONIA) with 4 for val, one step per epoch, on CPU."""
    normal = [p for p in xray_paths if p.parent.name == "NORMAL"]
    pneumonia = [p for p in xray_paths if p.parent.name == "PNEUMONIA"]
    train_items = [Item(str(p), 0, p.stem) for p in normal[:2]] + [Item(str(p), 1, p.stem) for p in pneumonia[:4]]
    pools = {0: iter(normal[2:]), 1: iter(pneumonia[4:])}
    val_items = [Item(str(p), y, p.stem) for y in val_labels for p in [next(pools[y])]]
    overrides = {
        "model.pretrained": False,
        "data.num_workers": workers,
        "train.batch_size": 4,
        "train.max_steps_per_epoch": 1,
    }
    cfg = load_recipe(overrides=overrides | {f"train.{k}": v for k, v in train.items()})
    return fit(cfg, Splits(train_items, val_items, [], []), tmp_path, torch.device("cpu"), resume_run=resume_run)


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, xray_paths):
    """One uninterrupted run per loader-worker count, shared by the kill points: (result, run folder)."""
    runs = {}

    def run(workers, **budget):
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"whole-{workers}")
            runs[workers] = (_tiny_fit(out, xray_paths, workers=workers, **budget), out)
        return runs[workers]

    return run


class _Killed(Exception):
    """Stands for a kill: raised where the run would die."""


def _outputs(run) -> dict:
    """What a run leaves, less its timings."""
    timed = ("seconds", "train_images_per_s")
    last = torch.load(run / "checkpoint_last.pt", weights_only=True)
    return {
        "epochs.csv": [
            {k: v for k, v in r.items() if k not in timed} for r in csv.DictReader(open(run / "epochs.csv"))
        ],
        "val_logits.csv": (run / "val_logits.csv").read_text(),
        "best": torch.load(run / "xr_mvp_best.pt", weights_only=True)["model"],
        "last": last["model"],
        "trained": last["state"]["model"],
        "optimizer": last["optimizer"]["state"],
        "epoch": last["epoch"],
    }


@pytest.mark.parametrize(
    ("killed_at", "workers"),
    [(2, 0), (4, 0), (4, 1)],
    ids=["head-epoch", "full-epoch", "full-epoch-loader-worker"],
)
def test_a_resumed_run_ends_as_the_uninterrupted_one(
    tmp_path, xray_paths, monkeypatch, killed_at, workers, uninterrupted
):
    """Killed while saving epoch ``killed_at`` (its log row and best checkpoint written, checkpoint_last
    not), then resumed: the same epochs, logs, weights and optimizer state as a run never stopped.
    The default recipe's augmentations, EMA and plateau scheduler all draw or carry state."""
    budget = {"epochs": 5, "head_epochs": 2}
    whole, whole_dir = uninterrupted(workers, **budget)

    real, saves = engine.resume.rng_state, []

    def dies_at_epoch(*args):
        saves.append(1)
        if len(saves) == killed_at:
            raise _Killed
        return real(*args)

    monkeypatch.setattr(engine.resume, "rng_state", dies_at_epoch)
    with pytest.raises(_Killed):
        _tiny_fit(tmp_path / "cut", xray_paths, workers=workers, **budget)
    monkeypatch.setattr(engine.resume, "rng_state", real)
    assert torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=True)["epoch"] == killed_at - 1
    resumed = _tiny_fit(tmp_path / "cut", xray_paths, workers=workers, resume_run=True, **budget)

    assert {k: v for k, v in resumed.items() if k != "history"} == {k: v for k, v in whole.items() if k != "history"}
    got, want = _outputs(tmp_path / "cut"), _outputs(whole_dir)
    assert [r["epoch"] for r in got["epochs.csv"]] == ["1", "2", "3", "4", "5"]
    assert got["epochs.csv"] == want["epochs.csv"] and got["val_logits.csv"] == want["val_logits.csv"]
    assert got["epoch"] == want["epoch"] == 5
    for part in ("best", "last", "trained", "optimizer"):
        flat_got, flat_want = _flatten(got[part]), _flatten(want[part])
        assert flat_got.keys() == flat_want.keys(), part
        for key, value in flat_want.items():
            assert torch.equal(flat_got[key], value), f"{part} {key}"


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: torch.as_tensor(tree)}


def test_resume_needs_the_run_s_checkpoint_and_recipe(tmp_path, xray_paths):
    with pytest.raises(XRError, match=r"nothing to resume: .*checkpoint_last.pt not found"):
        _tiny_fit(tmp_path, xray_paths, resume_run=True, epochs=2, head_epochs=1)
    _tiny_fit(tmp_path, xray_paths, epochs=1, head_epochs=1)
    with pytest.raises(XRError, match=r"trained with another recipe \(train.epochs 1 -> 2\)"):
        _tiny_fit(tmp_path, xray_paths, resume_run=True, epochs=2, head_epochs=1)
