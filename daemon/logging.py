"""structlog set-up for the daemon: JSON lines (default) or console rendering, to stderr."""
from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(fmt: str = "json", level: int | None = None, stream=None) -> structlog.stdlib.BoundLogger:
    """``fmt``: ``json`` (one JSON object per line) or ``console`` (human-readable, colours on a TTY).
    ``level`` defaults to ``$XR_LOG_LEVEL`` or INFO."""
    stream = stream or sys.stderr
    if level is None:
        level = logging.getLevelName(os.environ.get("XR_LOG_LEVEL", "INFO").upper())
        level = level if isinstance(level, int) else logging.INFO
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("xr.daemon")


def get_logger():
    return structlog.get_logger("xr.daemon")
