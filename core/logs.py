"""structlog set-up for the daemon: JSON lines (default) or console rendering, to stderr."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class SafeStream:
    """A log stream that never takes the daemon down: a closed pipe (``xr-daemon 2>&1 | tee log`` after
    Ctrl-C, a log reader that died) turns logging off instead of failing the batch being committed, and a
    file name that is not valid UTF-8 is written with escapes."""

    def __init__(self, stream):
        self.stream = stream
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                enc = getattr(self.stream, "encoding", None) or "ascii"
                self.stream.write(text.encode(enc, "backslashreplace").decode(enc))
        except UnicodeError:
            pass  # this line only; the next ones may well be writable
        except (OSError, ValueError):  # BrokenPipeError, EIO, or a stream closed under us
            self.closed = True

    def flush(self) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.closed = True

    def isatty(self) -> bool:
        return getattr(self.stream, "isatty", lambda: False)()


def configure_logging(fmt: str = "json", level: int | None = None, stream=None) -> structlog.stdlib.BoundLogger:
    """``fmt``: ``json`` (one JSON object per line) or ``console`` (human-readable, colours on a TTY).
    ``level`` defaults to ``$XR_LOG_LEVEL`` or INFO."""
    stream = SafeStream(stream or sys.stderr)
    if level is None:
        level = logging.getLevelName(os.environ.get("XR_LOG_LEVEL", "INFO").upper())
        level = level if isinstance(level, int) else logging.INFO
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
