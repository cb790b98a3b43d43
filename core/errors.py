"""The project's exception types: each carries a human-readable reason, never a bare traceback."""

from __future__ import annotations

from pathlib import Path


class XRError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(XRError):
    """config.yaml or a command-line override is invalid; the message names the key."""


class ImageError(XRError):
    """An input image cannot be used. ``path`` names the file, ``reason`` says why; ``incomplete`` says the
    bytes end too early (empty, a cut header, truncated data): a file still being written looks like that.

    ``ImageError(message)`` (one argument) is the finished message without a path: torch's DataLoader
    re-raises a worker's exception as ``type(exc)(text)``, and a class it cannot rebuild that way
    reaches the user as a bare RuntimeError.
    """

    def __init__(self, path: str | Path | None, reason: str | None = None, incomplete: bool = False):
        if reason is None:
            path, reason = None, _worker_message(str(path), type(self).__qualname__)
        self.path = None if path is None else str(path)
        self.reason = reason
        self.incomplete = incomplete
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):
        # Pickled by its fields (the default would pass only the message, losing ``path``).
        return type(self), (self.path, self.reason, self.incomplete)


def _worker_message(text: str, name: str) -> str:
    """The original message in torch's DataLoader re-raise text, else ``text``.

    That text is "Caught ImageError in DataLoader worker process N.\nOriginal Traceback ...\n
    xr.core.errors.ImageError: <message>"; the user needs the file and reason, not the worker's stack."""
    marker = f"{name}: "
    if text.startswith(f"Caught {name} ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


class CheckpointError(XRError):
    """A checkpoint or its calibration file is missing, corrupt or does not match its declared arch."""
