"""structlog in production mode: JSON lines rendered by the codec (orjson), on standard error.

Events are snake_case facts (``partition_assigned``); context such as topic,
partition and offset is bound with ``structlog.contextvars``. Trait values are never
logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from worker import codec

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str = "info") -> None:
    """Configure structlog once, at start; safe to call again (tests do)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=codec.encode_lenient),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Any:
    """A bound logger for a module, with ``context`` bound."""
    return structlog.get_logger(**context)
