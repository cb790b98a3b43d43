"""Choosing where a finished file goes out of the inbox (the moves themselves: core/moves.py).

A destination is chosen (and reserved) in the batch commit, so the row names it before the file moves;
:class:`Destinations` keeps the names chosen and not yet moved to, so two files of one name never get the
same one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from xr.core.moves import free_name
from xr.results.schema import Status, storable


class Destinations:
    """Where finished files go (processed/, failed/, skipped/, or left in place, by ``daemon.on_*``), and the
    destinations chosen but not yet moved to: shared by the inferer (which reserves) and the finisher."""

    def __init__(self, inbox: Path, output: Path, on_success: str, on_error: str, on_skipped: str):
        self.inbox = inbox
        self.modes = {
            Status.ERROR: (on_error, output / "failed"),
            Status.SKIPPED: (on_skipped, output / "skipped"),
        }
        self.success = (on_success, output / "processed")
        self._reserved: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, src: str, status: Status) -> str | None:
        """Choose and reserve where a finished file goes, under its path below the inbox (None: left in place)."""
        mode, base = self.modes.get(status, self.success)
        if mode == "leave":
            return None
        try:
            rel = Path(src).relative_to(self.inbox)
        except ValueError:
            rel = Path(Path(src).name)
        rel = Path(storable(str(rel)))  # the row names its destination, so it must be a name the DB can hold
        with self._lock:
            dst = free_name(base / rel, self._reserved)
            self._reserved.add(str(dst))
        return str(dst)

    def hold(self, dst: str) -> None:
        """Reserve a destination a row already names (a move left by a stopped run)."""
        with self._lock:
            self._reserved.add(dst)

    def release(self, dst: str | None) -> None:
        """The file went there, or will not: the name is no longer held back."""
        if dst is not None:
            with self._lock:
                self._reserved.discard(dst)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reserved)
