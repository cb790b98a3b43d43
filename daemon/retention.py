"""Stage ``xr-retention``: the daemon's housekeeping. Links retried films to their new rows
(results/retry.py) every :data:`LINK_S`, and, when config.yaml's ``retention:`` deletes anything, runs a
retention pass (results/retention.py) :data:`FIRST_PASS_S` after start and then every :data:`EVERY_S`.

The first pass waits an hour so a daemon restarted over and over (a bad config, a crash loop) does not
prune at each start, and the start itself stays quick. A failed pass is logged and tried again an hour
later: housekeeping never stops the scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from xr.core.errors import XRError
from xr.daemon.stage import Stage
from xr.results import retention
from xr.results.retry import link_retries

LINK_S = 30.0
FIRST_PASS_S = 3600.0
EVERY_S = 86400.0
AGAIN_S = 3600.0  # after a failed pass


class RetentionStage(Stage):
    name = "xr-retention"
    idle_s = 1.0

    def __init__(self, sessions: Any, output: Path, cfg: Any, log: Any, *, start: float, first_s: float = FIRST_PASS_S):
        super().__init__()
        self.sessions = sessions
        self.output = output
        self.cfg = cfg  # the retention section
        self.log = log
        self.prunes = retention.enabled(cfg)
        self.next_prune = start + first_s
        self.next_link = start
        self.passes = 0

    def step(self, now: float) -> bool:
        if now >= self.next_link:
            self.next_link = now + LINK_S
            n = self.link()
            if n:
                self.log.info("retries_linked", rows=n)
        if not self.prunes or now < self.next_prune:
            return False
        self.prune(now)
        return False

    def close(self) -> None:
        """A last link at stop: a retried film scored by a --once run gets its link before the run ends."""
        self.link()

    def link(self) -> int:
        """Link retried films to their new rows; how many (0 after a failure, which is logged)."""
        try:
            with self.sessions.begin() as s:
                return link_retries(s)
        except SQLAlchemyError as exc:
            self.log.warning("retention_failed", reason=f"linking retries: {exc}")
            return 0

    def prune(self, now: float) -> dict[str, int] | None:
        """One pass now; its counts (None: another worker prunes, or it failed)."""
        try:
            counts = retention.prune(self.sessions, self.output, self.cfg, should_stop=self.halt.is_set)
        except (SQLAlchemyError, OSError, XRError) as exc:
            self.next_prune = now + AGAIN_S
            self.log.error("retention_failed", reason=str(exc), retry_in_s=AGAIN_S)
            return None
        self.next_prune = now + EVERY_S
        self.passes += 1
        if counts is None:
            self.log.info("retention", skipped="another worker holds the retention lock")
        else:
            self.log.info("retention", **counts)
        return counts
