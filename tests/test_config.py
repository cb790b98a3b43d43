"""config.yaml -> typed, frozen Config: the shipped file loads, typos and wrong types are rejected with
the key named, overrides are type-checked, and a saved config loads back identical."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from xr.core.config import DEFAULT_CONFIG_PATH, Config, load_config, save_config
from xr.core.errors import ConfigError


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _shipped() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def _with(section: str, key: str, value, tmp_path):
    data = _shipped()
    data[section][key] = value
    return _write(tmp_path, data)


def test_shipped_config_loads_with_its_values():
    raw = _shipped()
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert isinstance(cfg, Config)
    # Every value in the file arrives in the typed object (no key silently ignored).
    for section, values in raw.items():
        obj = getattr(cfg, section)
        for key, value in values.items():
            got = getattr(obj, key)
            if isinstance(got, tuple):
                got = list(got)
            assert got == value, f"{section}.{key}: {got!r} != {value!r}"
    assert cfg.preprocess.img_size == 224
    assert cfg.preprocess.resize_mode == "squash"
    assert cfg.model.arch == "efficientnet_lite0"
    assert isinstance(cfg.preprocess.mean, tuple) and len(cfg.preprocess.mean) == 3
    # The default path is the shipped file.
    assert load_config() == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 99  # type: ignore[misc]


def test_unknown_key_in_section_is_rejected_naming_it(tmp_path):
    path = _with("train", "epochz", 3, tmp_path)
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(path)


def test_unknown_section_is_rejected_naming_it(tmp_path):
    data = _shipped()
    data["trainer"] = {"epochs": 3}
    with pytest.raises(ConfigError, match="trainer"):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "epochs", "12"),  # string for int
        ("train", "batch_size", True),  # bool for int
        ("train", "epochs", 3.5),  # float for int
        ("train", "channels_last", "yes"),  # string for bool
        ("train", "lr", "fast"),  # string for float
        ("preprocess", "mean", [0.5, 0.5]),  # list of wrong length
        ("preprocess", "std", "0.2"),  # not a list
        ("preprocess", "resize_mode", "crop"),  # bad Literal
        ("preprocess", "render_filter", "cubic"),  # bad Literal
        ("train", "consistency_view", "blur"),  # bad Literal
        ("train", "consistency_space", "prob"),  # bad Literal
        ("model", "arch", "resnet50"),  # bad Literal
        ("train", "amp", "fp16"),  # bad Literal
        ("daemon", "watch", 5),  # int for str
    ],
)
def test_wrong_type_is_rejected_naming_the_key(tmp_path, section, key, value):
    path = _with(section, key, value, tmp_path)
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(path)


def test_list_element_of_wrong_type_is_rejected(tmp_path):
    path = _with("augment", "rrc_scale", [0.9, "one"], tmp_path)
    with pytest.raises(ConfigError, match=r"augment\.rrc_scale"):
        load_config(path)


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    data = _shipped()
    data["train"]["lr"] = 1
    data["train"]["max_steps_per_epoch"] = 5
    data["daemon"]["db"] = None
    data["preprocess"]["render_size"] = None
    cfg = load_config(_write(tmp_path, data))
    assert cfg.preprocess.render_size is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps_per_epoch == 5
    assert cfg.daemon.db is None


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("data", "val_fraction", 0.9),
        ("augment", "sharpen_p", 1.5),
        ("augment", "downscale_range", [0.0, 1.0]),
        ("augment", "sharpen_range", [2.0, 1.0]),
        ("daemon", "decode_workers", -1),
        ("daemon", "batch_size", -1),
        ("preprocess", "render_size", 8),
        ("preprocess", "render_quality", 0),
        ("preprocess", "render_quality", 101),
    ],
)
def test_out_of_range_value_is_rejected(tmp_path, section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_config(_with(section, key, value, tmp_path))


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("calibration", "threshold_grid", 0),
        ("calibration", "ece_bins", 0),
        ("calibration", "fn_cost", -5.0),
        ("train", "lr", -1e-3),
        ("train", "epochs", 0),
        ("train", "ema_decay", 1.0),
        ("train", "label_smoothing", 1.0),
        ("train", "plateau_factor", 1.5),
        ("data", "num_workers", -1),
        ("model", "drop_rate", 1.0),
        ("augment", "rotation_deg", -5.0),
        ("augment", "jpeg_quality", [0, 95]),
        ("augment", "jpeg_quality", [50, 101]),
        ("augment", "jpeg_quality", [95, 50]),
        ("augment", "blur_sigma", [-0.1, 1.0]),
        ("daemon", "max_file_mb", 0),
        ("daemon", "rescan_s", 0),
        ("daemon", "stable_ms", -1),
        ("output", "csv_max_rows", 0),
    ],
)
def test_numbers_outside_their_range_are_rejected(tmp_path, section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .* is out of range; must be "):
        load_config(_with(section, key, value, tmp_path))


def test_range_error_names_key_value_and_range():
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"calibration.threshold_grid": 0})
    assert str(info.value) == "calibration.threshold_grid: 0 is out of range; must be in [1, inf)"
    with pytest.raises(ConfigError, match=r"must be low <= high, each in \[1, 100\]"):
        load_config(overrides={"augment.jpeg_quality": [95, 50]})


def test_committed_configs_pass_the_range_checks():
    load_config(DEFAULT_CONFIG_PATH)
    load_config(DEFAULT_CONFIG_PATH.parent / "models" / "config.yaml")


def test_bad_yaml_and_missing_file_raise_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_type_checked():
    cfg = load_config(DEFAULT_CONFIG_PATH, overrides={"train.epochs": 3, "model.arch": "efficientnet_b0"})
    assert cfg.train.epochs == 3
    assert cfg.model.arch == "efficientnet_b0"
    assert cfg.train.batch_size == load_config().train.batch_size  # the rest untouched
    # None means "flag not given": no change.
    assert load_config(overrides={"train.epochs": None}).train.epochs == load_config().train.epochs
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(overrides={"train.epochs": "three"})
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(overrides={"train.epochz": 3})
    with pytest.raises(ConfigError, match=r"trainer\.epochs"):
        load_config(overrides={"trainer.epochs": 3})


def test_replace_returns_a_checked_copy():
    cfg = load_config()
    new = cfg.replace({"train.lr": 1e-3, "preprocess.resize_mode": "shorter_side"})
    assert new.train.lr == 1e-3 and new.preprocess.resize_mode == "shorter_side"
    assert cfg.train.lr == 3e-4 and cfg.preprocess.resize_mode == "squash"  # original unchanged
    with pytest.raises(ConfigError, match=r"preprocess\.resize_mode"):
        cfg.replace({"preprocess.resize_mode": "stretch"})
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        cfg.replace({"train.batch_size": False})


def test_save_config_round_trip(tmp_path):
    cfg = load_config(overrides={"train.epochs": 7, "preprocess.mean": [0.5, 0.5, 0.5], "daemon.db": "x.sqlite"})
    out = tmp_path / "run" / "config.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    back = load_config(out)
    assert back == cfg
    assert back.preprocess.mean == (0.5, 0.5, 0.5)
    assert back.to_dict() == cfg.to_dict()
