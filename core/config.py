"""The two configuration files, as pydantic models validated once at start-up.

- ``config.yaml`` holds what an operator sets: read by ``xr-daemon``, and in part by ``xr-results``,
  ``xr-review`` and ``xr-score`` (each section's ``ALSO_READ_BY``/``READ_BY``). Its defaults ship as
  ``core/config.yaml``.
- ``recipe.yaml`` holds what a retrainer sets: ``preprocess``, ``augment``, ``model``, ``data``,
  ``train``, ``calibration``, read by ``xr-train`` only (the daemon takes preprocessing and the network
  from the checkpoint). Its defaults ship as ``train/recipe.yaml``; each run saves its resolved copy.

Unknown or misplaced keys, wrong types and values out of range are a :class:`ConfigError` naming the
key. Flags only override (``load_settings(path, {"daemon.stable_ms": 900})``). The packaged YAML files
and docs/configuration.md are generated from these definitions (``python scripts/write_config_docs.py``)
and a test keeps them current.

This module loads the two files and names everything a program needs; the definitions live in
core/config_settings.py (``Settings`` and its sections), core/config_recipe.py (``Recipe`` and its
sections) and core/config_base.py (the value types, ``Section`` and the validation both share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from xr.core.config_base import Fraction, Number, Section, _File, validate
from xr.core.config_recipe import (
    AugmentConfig,
    CalibrationConfig,
    DataConfig,
    ModelConfig,
    PreprocessConfig,
    Recipe,
    TrainConfig,
)
from xr.core.config_settings import (
    AE_TITLE,
    DESTINATION,
    CsvConfig,
    DaemonConfig,
    DicomConfig,
    DicomNodeConfig,
    DicomSendConfig,
    OutputConfig,
    RetentionConfig,
    ReviewConfig,
    Settings,
    parse_destination,
)
from xr.core.errors import ConfigError

__all__ = [
    "AE_TITLE",
    "AugmentConfig",
    "CalibrationConfig",
    "CsvConfig",
    "DESTINATION",
    "DaemonConfig",
    "DataConfig",
    "DicomConfig",
    "DicomNodeConfig",
    "DicomSendConfig",
    "FILES",
    "Fraction",
    "ModelConfig",
    "Number",
    "OutputConfig",
    "PACKAGE_ROOT",
    "PreprocessConfig",
    "RECIPE_PATH",
    "Recipe",
    "RetentionConfig",
    "ReviewConfig",
    "SETTINGS_PATH",
    "SHIPPED_MODEL",
    "Section",
    "Settings",
    "TrainConfig",
    "load_recipe",
    "load_settings",
    "parse_destination",
    "save_config",
    "validate",
]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding core/, daemon/, train/ (installed: xr/)
SETTINGS_PATH = PACKAGE_ROOT / "core" / "config.yaml"
RECIPE_PATH = PACKAGE_ROOT / "train" / "recipe.yaml"
SHIPPED_MODEL = PACKAGE_ROOT / "models" / "xr_mvp_best.pt"  # package data (models/ in the checkout)


FILES: tuple[type[_File], ...] = (Settings, Recipe)


def _load(cls: type[_File], path: str | Path | None, default: Path, overrides: dict[str, Any] | None):
    path = Path(path) if path is not None else default
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(cls, data, str(path)).replace(overrides or {})


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """The operator's config.yaml (default: the packaged one), then ``overrides``."""
    return _load(Settings, path, SETTINGS_PATH, overrides)


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """A training recipe.yaml (default: the packaged one), then ``overrides``."""
    return _load(Recipe, path, RECIPE_PATH, overrides)


def save_config(cfg: _File, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
