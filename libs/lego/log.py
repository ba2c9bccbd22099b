"""structlog configuration: JSON lines in services, `request_id`/`node_id` bound where known."""

from __future__ import annotations

import logging
import sys

import structlog


def _current_stderr(*args: object) -> structlog.WriteLogger:
    """A logger writing to whatever sys.stderr is now (a test harness may have swapped and closed
    the stream that was current when logging was configured). WriteLogger writes each line with its
    newline in one call, so processes sharing one log file do not interleave within a line."""
    return structlog.WriteLogger(sys.stderr)


def configure_logging(level: str = "info", json: bool = True) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_current_stderr,
        cache_logger_on_first_use=False,
    )
