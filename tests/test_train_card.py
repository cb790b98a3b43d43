"""train/card.py: the model card, also where a test metric is undefined."""
from __future__ import annotations

import json

from xr.core.config import load_config
from xr.train.card import write_model_card
from xr.train.data import Item, Splits


def _card_for(tmp_path, overrides: dict) -> tuple[dict, str]:
    """The card of a run on a one-class test split, with ``overrides`` applied to the shipped config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    splits = Splits([Item("a.jpeg", 0, "a"), Item("b.jpeg", 1, "b")], [Item("c.jpeg", 1, "c")], [Item("d.jpeg", 1, "d")], [])
    train = {"best_epoch": 2, "best_val_auroc": 0.9, "epochs_run": 3}
    calib = {"T": 1.2, "threshold": 0.4, "objective": "f1",
             "calibration": {"nll_before": 0.5, "nll_after": 0.4, "ece_before": 0.1, "ece_after": 0.05}}
    test = {"n": 1, "auroc": None, "accuracy": 1.0, "f1": 1.0, "sensitivity": 1.0, "specificity": 0.0, "ece": 0.3,
            "per_class": {"NORMAL": {"recall": 0.0}, "PNEUMONIA": {"recall": 1.0}}}
    write_model_card(tmp_path, load_config().replace(overrides), splits, train, calib, test, "xr-train all", 60.0)
    return json.loads((tmp_path / "model_card.json").read_text()), (tmp_path / "MODEL_CARD.md").read_text()


def test_card_shows_an_undefined_test_auroc_as_na(tmp_path):
    """A one-class test split has no AUROC (metrics say None); the card must still be written."""
    card, text = _card_for(tmp_path, {})
    assert "| n/a | 1.0000 | 1.0000 | 1.0000 | 0.0000 | 0.3000 |" in text
    assert card["test_metrics"]["auroc"] is None


def test_card_states_the_rendering_the_model_was_trained_with(tmp_path):
    """The card's input contract names the rendering's size, filter and quality from the run's config."""
    card, _ = _card_for(tmp_path, {"preprocess.render_filter": "bilinear", "preprocess.render_quality": 90})
    assert card["input"]["render"].startswith("squashed to 224x224 (bilinear), JPEG quality 90"), card["input"]


def test_card_describes_the_consistency_training_used(tmp_path):
    _, plain = _card_for(tmp_path / "plain", {})
    assert "Consistency" not in plain
    _, both = _card_for(tmp_path / "both", {
        "train.consistency_weight": 50.0, "train.consistency_view": "both", "train.consistency_space": "probability",
    })
    assert "Consistency loss weight 50.0 on the probabilities of each image and either its re-encoded copy " in both
    assert "(JPEG quality 50-75, shifted block grid) or a simulated full-resolution export" in both
