"""The daemon's start-up settling: before it watches, what a previous run left behind (claims it held,
moves it had not finished) is settled (docs/operations.md, "Crash safety"); daemon/service.py calls it."""

from __future__ import annotations

from typing import Any

from xr.daemon.claim import ReadingMarks
from xr.daemon.discovery import Discovery
from xr.daemon.finish import Finisher, PendingMove
from xr.daemon.moves import Destinations
from xr.daemon.runtime import Runtime
from xr.results import settle
from xr.results.schema import Status, utcnow


def reconcile(
    rt: Runtime,
    discovery: Discovery,
    destinations: Destinations,
    finisher: Finisher,
    marks: ReadingMarks | None,
    log: Any,
) -> dict:
    """Before watching: settle what a previous run left (docs/operations.md, "Crash safety"). With
    several workers on one database, only rows this worker held or whose lease has run out."""
    crashed = marks.take_left() if marks is not None else set()
    with rt.sessions.begin() as s:
        settled, left = settle.settle_at_start(
            s,
            discovery.would_read,
            rt.lease,
            utcnow(),
            crashed=crashed,
            place=lambda path: destinations.reserve(path, Status.ERROR),
        )
    stats = {
        "claimed_redo": 0,
        "claimed_gone": 0,
        "claimed_released": 0,
        "claimed_set_aside": 0,
        "moves_finished": len(left),
    }
    for x in settled:  # redo: the scan finds the file again and its claim reuses the row
        stats[f"claimed_{'released' if x.outcome == 'release' else x.outcome}"] += 1
        if x.outcome == "set_aside":
            log.error("file_set_aside", file=x.path, id=x.row_id, reason=x.reason)
        elif x.row_id in crashed:
            log.warning("read_crashed", file=x.path, id=x.row_id, reason="the daemon stopped while reading it")
    for m in left:
        destinations.hold(m.moved_to)
    if left:
        finisher.move([PendingMove(m.row_id, m.path, m.identity, m.moved_to, m.token) for m in left])
    finisher.export()
    return stats
