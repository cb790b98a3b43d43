"""Where the daemon's files live when neither a flag nor config.yaml says: the same answers for
``xr-daemon`` and ``xr-results`` from any working directory, in a checkout or an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from xr.core.config import SHIPPED_MODEL, Settings, load_settings


def settings_for(path: str | None, overrides: dict | None = None) -> Settings:
    """``--config PATH``, else ``$XR_CONFIG``, else the packaged defaults; then ``overrides``."""
    return load_settings(path or os.environ.get("XR_CONFIG") or None, overrides)


def default_output() -> Path:
    """The user's data folder for xr-triage (e.g. ~/.local/share/xr-triage/output on Linux,
    ~/Library/Application Support/xr-triage/output on macOS)."""
    return Path(platformdirs.user_data_dir("xr-triage", appauthor=False)) / "output"


def output_dir(cfg: Settings, flag: str | Path | None = None) -> Path:
    return Path(flag or cfg.daemon.output or default_output()).expanduser().resolve()


def results_db(cfg: Settings, output: Path, flag: str | None = None) -> str:
    """A path or SQLAlchemy URL: ``--db``, else ``daemon.db``, else ``<output>/results.sqlite``."""
    return flag or cfg.daemon.db or str(output / "results.sqlite")


def model_path(cfg: Settings, flag: str | Path | None = None) -> Path:
    chosen = flag or cfg.daemon.model
    return Path(chosen).expanduser().resolve() if chosen else SHIPPED_MODEL
