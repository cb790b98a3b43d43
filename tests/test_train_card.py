"""train/card.py: the model card, also where a test metric is undefined."""

from __future__ import annotations

import json

from xr.core.config import load_recipe
from xr.train.card import write_model_card
from xr.train.data import Item, Splits


def _card_for(tmp_path, overrides: dict) -> tuple[dict, str]:
    """The card of a run on a one-class test split, with ``overrides`` applied to the shipped config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    splits = Splits(
        [Item("a.jpeg", 0, "a"), Item("b.jpeg", 1, "b")], [Item("c.jpeg", 1, "c")], [Item("d.jpeg", 1, "d")], []
    )
    train = {"best_epoch": 2, "best_val_auroc": 0.9, "epochs_run": 3}
    calib = {
        "T": 1.2,
        "threshold": 0.4,
        "objective": "f1",
        "calibration": {"nll_before": 0.5, "nll_after": 0.4, "ece_before": 0.1, "ece_after": 0.05},
    }
    test = {
        "n": 1,
        "auroc": None,
        "accuracy": 1.0,
        "f1": 1.0,
        "sensitivity": 1.0,
        "specificity": 0.0,
        "ece": 0.3,
        "per_class": {"NORMAL": {"recall": 0.0}, "PNEUMONIA": {"recall": 1.0}},
    }
    write_model_card(tmp_path, load_recipe().replace(overrides), splits, train, calib, test, "xr-train all", 60.0)
    return json.loads((tmp_path / "model_card.json").read_text()), (tmp_path / "MODEL_CARD.md").read_text()


def test_card_shows_an_undefined_test_auroc_as_na(tmp_path):
    """A one-class test split has no AUROC (metrics say None); the card must still be written."""
    card, text = _card_for(tmp_path, {})
    assert "| n/a | 1.0000 | 1.0000 | 1.0000 | 0.0000 | 0.3000 |" in text
    assert card["test_metrics"]["auroc"] is None


def test_card_states_the_rendering_the_model_was_trained_with(tmp_path):
    """The card's input contract names the rendering's size and quality from the run's recipe."""
    card, _ = _card_for(tmp_path, {"preprocess.render_size": 192, "preprocess.render_quality": 90})
    assert card["input"]["render"].startswith("squashed to 192x192 (bicubic), JPEG quality 90"), card["input"]
    off, _ = _card_for(tmp_path / "off", {"preprocess.render_size": None})
    assert off["input"]["render"] == "off"
