"""A ``results`` row as a test writes it straight into the database (the journal's and engine's tests)."""

from __future__ import annotations

import datetime as dt

from xr.results.schema import Result, Status


def result_row(path="/in/a.png", size=10, mtime=1, status=Status.CLAIMED, sha="s1", **kw) -> Result:
    now = dt.datetime(2026, 1, 1)
    return Result(
        path=path,
        filename=path.rsplit("/", 1)[-1],
        size_bytes=size,
        mtime_ns=mtime,
        sha256=sha,
        status=status,
        received_at=now,
        claimed_at=now,
        **kw,
    )
