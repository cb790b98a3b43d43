"""The file events of the inbox (watchdog): hints for discovery (daemon/discovery.py), queued as
``(kind, path)``: ``seen`` (created, modified, closed), ``moved`` (moved in: complete when it appears) and
``rescan`` (a folder created or moved in)."""

from __future__ import annotations

import os
import queue
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: queue.SimpleQueue[tuple[str, str]]):
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if event.is_directory:
            if kind in ("created", "moved"):
                self.sink.put(("rescan", ""))
            return
        if kind == "moved":
            self.sink.put(("moved", os.fsdecode(event.dest_path)))
        elif kind in ("created", "modified", "closed"):
            self.sink.put(("seen", os.fsdecode(event.src_path)))


def start_observer(cls, inbox: Path, sink: queue.SimpleQueue[tuple[str, str]]):
    """A started observer of class ``cls`` (watchdog's native one, or its polling one) over ``inbox``,
    putting its events on ``sink``."""
    obs = cls(timeout=0.2)
    obs.name = "xr-observer"
    obs.schedule(_Handler(sink), str(inbox), recursive=True)
    try:
        obs.start()
    except BaseException:
        obs.stop()
        raise
    return obs
