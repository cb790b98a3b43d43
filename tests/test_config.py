"""core/config.py: the two files load, typos, misplaced keys and wrong types are rejected with the key
named, overrides are type-checked, a saved recipe loads back identical, and the generated files are current."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from xr.core.config import (
    RECIPE_PATH,
    SETTINGS_PATH,
    Recipe,
    Settings,
    load_recipe,
    load_settings,
    save_config,
)
from xr.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, data, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load(section: str, key: str, value, tmp_path):
    """Load the packaged file that holds ``section`` with one value changed."""
    if section in Settings.model_fields:
        data = yaml.safe_load(SETTINGS_PATH.read_text())
        data[section][key] = value
        return load_settings(_write(tmp_path, data))
    data = yaml.safe_load(RECIPE_PATH.read_text())
    data[section][key] = value
    return load_recipe(_write(tmp_path, data, "recipe.yaml"))


def test_packaged_files_load_with_their_values():
    for loader, path, cls in ((load_settings, SETTINGS_PATH, Settings), (load_recipe, RECIPE_PATH, Recipe)):
        raw = yaml.safe_load(path.read_text())
        cfg = loader()
        assert isinstance(cfg, cls) and cfg == cls()  # the file is exactly the code's defaults
        for section, values in raw.items():  # every value in the file arrives in the typed object
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    recipe = load_recipe()
    assert recipe.preprocess.img_size == 224 and recipe.model.arch == "efficientnet_lite0"
    assert isinstance(recipe.preprocess.mean, tuple) and len(recipe.preprocess.mean) == 3


def test_generated_files_are_current():
    """core/config.yaml, the example config.yaml, train/recipe.yaml and docs/configuration.md come from
    the definitions: run `python scripts/write_config_docs.py` after changing a key."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_config_docs", REPO / "scripts" / "write_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    generated = mod.generated()
    assert set(generated) == {SETTINGS_PATH, RECIPE_PATH, REPO / "config.yaml", REPO / "docs" / "configuration.md"}
    for path, text in generated.items():
        assert path.read_text() == text, f"{path} is stale: run python scripts/write_config_docs.py"
    # The example differs from the packaged defaults in the quick start's folders only.
    example = load_settings(REPO / "config.yaml")
    assert example == Settings().replace({"daemon.watch": "inbox", "daemon.output": "output"})


def test_docs_table_lists_every_key_with_default_range_and_reader():
    text = (REPO / "docs" / "configuration.md").read_text()
    for cls in (Settings, Recipe):
        for section, info in cls.model_fields.items():
            for key in info.annotation.model_fields:
                assert f"| `{section}.{key}` |" in text, f"{section}.{key} missing from docs/configuration.md"
    assert (
        "| `daemon.stable_ms` | a file written in place is ready once size and mtime are unchanged this long | `500` | integer >= 0 | xr-daemon |"
        in text
    )
    rows = {line.split(" | ")[0][2:].strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    # every program that reads a key: the file's readers, others besides, or others instead
    assert rows["daemon.db"].endswith("| xr-daemon, xr-results, xr-review |")
    assert rows["dicom.window"].endswith("| xr-daemon, xr-score, xr-review |")
    assert rows["review.failed_logins"].endswith("| xr-review |")
    assert rows["review.audit_rate"].endswith("| xr-daemon |")
    assert "| `train.lr` | AdamW learning rate | `0.0003` | number > 0 | xr-train |" in text


def test_config_is_frozen():
    with pytest.raises(pydantic.ValidationError):
        load_recipe().train.epochs = 99  # type: ignore[misc]


def test_unknown_key_in_section_is_rejected_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.epochz; known keys of train: epochs, "):
        _load("train", "epochz", 3, tmp_path)


def test_unknown_section_is_rejected_naming_it(tmp_path):
    data = yaml.safe_load(RECIPE_PATH.read_text()) | {"trainer": {"epochs": 3}}
    with pytest.raises(ConfigError, match="unknown config section 'trainer'"):
        load_recipe(_write(tmp_path, data))


def test_a_recipe_key_in_the_operators_config_says_where_it_belongs(tmp_path):
    """The daemon takes preprocessing from the checkpoint: an operator editing it must be told, not ignored."""
    data = yaml.safe_load(SETTINGS_PATH.read_text()) | {"preprocess": {"render_size": 112}}
    with pytest.raises(
        ConfigError,
        match=r"config section preprocess belongs in recipe\.yaml, read by xr-train; config\.yaml holds sections daemon, dicom, csv",
    ):
        load_settings(_write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"config key preprocess\.render_size belongs in recipe\.yaml"):
        load_settings(overrides={"preprocess.render_size": 112})
    with pytest.raises(ConfigError, match=r"config key daemon\.stable_ms belongs in config\.yaml, read by xr-daemon"):
        load_recipe(overrides={"daemon.stable_ms": 100})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "epochs", "12"),  # string for int
        ("train", "batch_size", True),  # bool for int
        ("train", "epochs", 3.5),  # float for int
        ("train", "channels_last", "yes"),  # string for bool
        ("train", "lr", "fast"),  # string for float
        ("train", "lr", "0.1"),  # a number as a string is still a string
        ("preprocess", "mean", [0.5, 0.5]),  # list of wrong length
        ("preprocess", "std", "0.2"),  # not a list
        ("preprocess", "resize_mode", "crop"),  # bad Literal
        ("model", "arch", "resnet50"),  # bad Literal
        ("model", "arch", "efficientnet_lite0_aa"),  # no longer an option
        ("train", "amp", "fp16"),  # bad Literal
        ("daemon", "watch", 5),  # int for str
        ("daemon", "poll", 1),  # int for bool
        ("csv", "rotation", "weekly"),  # bad Literal
    ],
)
def test_wrong_type_is_rejected_naming_the_key(tmp_path, section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        _load(section, key, value, tmp_path)


def test_type_error_says_what_was_expected_and_what_came(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load("train", "epochs", "12", tmp_path)
    assert str(info.value).startswith("train.epochs: Input should be a valid integer, got '12' (")
    with pytest.raises(
        ConfigError, match=r"model\.arch: Input should be 'efficientnet_lite0' or 'efficientnet_b0', got 'resnet50'"
    ):
        _load("model", "arch", "resnet50", tmp_path)


def test_list_element_of_wrong_type_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.rrc_scale\[1\]"):
        _load("augment", "rrc_scale", [0.9, "one"], tmp_path)


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    data = yaml.safe_load(RECIPE_PATH.read_text())
    data["train"]["lr"] = 1
    data["train"]["max_steps_per_epoch"] = 5
    data["preprocess"]["render_size"] = None
    cfg = load_recipe(_write(tmp_path, data))
    assert cfg.preprocess.render_size is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps_per_epoch == 5
    assert load_settings(overrides={"daemon.db": None}).daemon.db is None


@pytest.mark.parametrize(
    "section,key,value,bound",
    [
        ("calibration", "threshold_grid", 0, ">= 1"),
        ("calibration", "ece_bins", 0, ">= 1"),
        ("calibration", "fn_cost", -5.0, "> 0"),
        ("train", "lr", -1e-3, "> 0"),
        ("train", "epochs", 0, ">= 1"),
        ("train", "batch_size", 1, ">= 2"),
        ("train", "ema_decay", 1.0, "< 1"),
        ("train", "label_smoothing", 1.0, "< 1"),
        ("train", "plateau_factor", 1.5, "< 1"),
        ("data", "num_workers", -1, ">= 0"),
        ("data", "val_fraction", 0.9, "< 0.5"),
        ("model", "drop_rate", 1.0, "< 1"),
        ("augment", "rotation_deg", -5.0, ">= 0"),
        ("augment", "hflip_p", 1.5, "<= 1"),
        ("preprocess", "render_size", 8, ">= 16"),
        ("preprocess", "render_quality", 0, ">= 1"),
        ("preprocess", "render_quality", 101, "<= 100"),
        ("preprocess", "img_size", 8, ">= 16"),
        ("daemon", "max_file_mb", 0, "> 0"),
        ("daemon", "rescan_s", 0, "> 0"),
        ("daemon", "stable_ms", -1, ">= 0"),
        ("daemon", "decode_workers", -1, ">= 0"),
        ("daemon", "batch_size", -1, ">= 0"),
        ("daemon", "max_pixels", 0, ">= 1"),
        ("csv", "max_rows", 0, ">= 1"),
    ],
)
def test_numbers_outside_their_range_are_rejected(tmp_path, section, key, value, bound):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: {value!r} is out of range; must be {bound} \("):
        _load(section, key, value, tmp_path)


def test_cross_field_checks_name_the_key():
    with pytest.raises(
        ConfigError, match=r"^augment\.rrc_scale must be \[low, high\] with low <= high, got \[1\.0, 0\.5\]$"
    ):
        load_recipe(overrides={"augment.rrc_scale": [1.0, 0.5]})
    with pytest.raises(ConfigError, match=r"^augment\.rrc_scale low must be > 0"):
        load_recipe(overrides={"augment.rrc_scale": [0.0, 0.5]})
    with pytest.raises(ConfigError, match=r"^preprocess\.std must be > 0"):
        load_recipe(overrides={"preprocess.std": [0.2, 0.0, 0.2]})


def test_committed_recipes_load_as_written_and_are_what_trained_the_shipped_model():
    import torch

    for path in (REPO / "train" / "recipe.yaml", REPO / "models" / "recipe.yaml"):
        # every key and value as the file has it: none dropped, renamed or replaced by a default
        assert load_recipe(path).to_dict() == yaml.safe_load(path.read_text()), path
    meta = torch.load(REPO / "models" / "xr_mvp_best.pt", weights_only=True, map_location="cpu")["meta"]
    assert load_recipe(REPO / "models" / "recipe.yaml").to_dict() == meta["provenance"]["config"]


def test_bad_yaml_and_missing_file_raise_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- daemon\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_settings(tmp_path / "list.yaml")


def test_an_empty_file_or_section_means_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_settings(tmp_path / "empty.yaml") == Settings()
    (tmp_path / "section.yaml").write_text("daemon:\n")
    assert load_settings(tmp_path / "section.yaml") == Settings()


def test_overrides_apply_and_are_type_checked():
    cfg = load_recipe(overrides={"train.epochs": 3, "model.arch": "efficientnet_b0"})
    assert cfg.train.epochs == 3
    assert cfg.model.arch == "efficientnet_b0"
    assert cfg.train.batch_size == load_recipe().train.batch_size  # the rest untouched
    assert load_recipe(overrides={"preprocess.render_size": None}).preprocess.render_size is None  # null
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be a valid integer, got None"):
        load_recipe(overrides={"train.epochs": None})
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_recipe(overrides={"train.epochs": "three"})
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_recipe(overrides={"train.epochz": 3})
    with pytest.raises(ConfigError, match=r"'trainer'"):
        load_recipe(overrides={"trainer.epochs": 3})


def test_replace_returns_a_checked_copy():
    cfg = load_recipe()
    new = cfg.replace({"train.lr": 1e-3, "preprocess.resize_mode": "shorter_side"})
    assert new.train.lr == 1e-3 and new.preprocess.resize_mode == "shorter_side"
    assert cfg.train.lr == 3e-4 and cfg.preprocess.resize_mode == "squash"  # original unchanged
    with pytest.raises(ConfigError, match=r"preprocess\.resize_mode"):
        cfg.replace({"preprocess.resize_mode": "stretch"})
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        cfg.replace({"train.batch_size": False})


def test_save_config_round_trip(tmp_path):
    cfg = load_recipe(overrides={"train.epochs": 7, "preprocess.mean": [0.5, 0.5, 0.5]})
    out = tmp_path / "run" / "recipe.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    back = load_recipe(out)
    assert back == cfg and back.preprocess.mean == (0.5, 0.5, 0.5)
    assert back.to_dict() == cfg.to_dict()
    settings = load_settings(overrides={"daemon.db": "x.sqlite", "csv.rotation": "rows"})
    save_config(settings, tmp_path / "config.yaml")
    assert load_settings(tmp_path / "config.yaml") == settings


def test_a_bare_off_in_yaml_means_off(tmp_path):
    """YAML reads `off` as false: where a choice means off, that is what it means."""
    (tmp_path / "config.yaml").write_text("daemon:\n  heatmaps: off\n")
    assert load_settings(tmp_path / "config.yaml").daemon.heatmaps == "none"
    (tmp_path / "recipe.yaml").write_text("train:\n  amp: off\n")
    assert load_recipe(tmp_path / "recipe.yaml").train.amp == "off"
    with pytest.raises(ConfigError, match=r"daemon\.heatmaps: Input should be 'flagged', 'all' or 'none', got True"):
        load_settings(overrides={"daemon.heatmaps": True})
