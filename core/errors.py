"""The project's exception types: each carries a human-readable reason, never a bare traceback."""
from __future__ import annotations

from pathlib import Path


class XRError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(XRError):
    """config.yaml or a command-line override is invalid; the message names the key."""


class ImageError(XRError):
    """An input image cannot be used. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class CheckpointError(XRError):
    """A checkpoint or its calibration file is missing, corrupt or does not match its declared arch."""
