"""structlog in production mode: JSON lines rendered by the codec (orjson), on standard error.

Events are snake_case facts (``partition_assigned``) with their context as keys (a
``dead_letter`` line names its record's topic, partition, offset and
``record_timestamp``); ``structlog.contextvars`` are merged into every line. Trait values
are never logged.

librdkafka's own lines (connection failures, warnings) reach structlog too, as
``kafka_client_log`` events, through the stdlib logger every Kafka client is given
(``kafka_client_logger``), with flood control. They never carry trait values, and never
the SASL password: librdkafka's configuration dump (debug context ``conf``) redacts
sensitive properties, and its configuration warnings name properties, not secrets.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker import codec

__all__ = ["KafkaClientLogHandler", "configure_logging", "get_logger", "kafka_client_logger"]

_KAFKA_LOGGER = "worker.kafka_client"
# The same kind of client line at most once per this many seconds.
_FLOOD_WINDOW = 30.0
# Kinds remembered for flood control before the expired ones are forgotten.
_MAX_KINDS = 1_000
_NUMBERS = re.compile(r"\d+")


def configure_logging(level: str = "info") -> None:
    """Configure structlog once, at start; safe to call again (tests do).

    Call it before creating Kafka clients: their lines then follow ``level`` too.
    """
    number = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=codec.encode_lenient),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
    kafka_client_logger().setLevel(number)


def get_logger(**context: Any) -> Any:
    """A bound logger for a module, with ``context`` bound."""
    return structlog.get_logger(**context)


def kafka_client_logger() -> logging.Logger:
    """The stdlib logger for librdkafka's lines (the clients' ``logger`` property).

    It forwards to structlog through a ``KafkaClientLogHandler`` and never propagates;
    its level is the configured one (info until ``configure_logging``).
    """
    logger = logging.getLogger(_KAFKA_LOGGER)
    if not logger.handlers:
        logger.addHandler(KafkaClientLogHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger


class KafkaClientLogHandler(logging.Handler):
    """Forwards confluent-kafka's log records to structlog as ``kafka_client_log`` events.

    confluent-kafka logs each librdkafka line as ``"%s [%s] %s"`` with the facility, the
    client name and the message as arguments, at a level mapped from syslog's (0-3
    error, 4 warning, 5-6 info, 7 debug). Flood control: a line of the same facility
    and message (numbers aside) as one let through less than ``window`` seconds before
    is dropped; the next one let through says how many were, as ``suppressed``. Called
    from whichever thread polls the client; ``logging`` serialises the calls.
    """

    def __init__(
        self, window: float = _FLOOD_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        # Per kind of line: when one was last let through, and how many were dropped since.
        self._kinds: dict[tuple[str, str], tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and len(record.args) == 3:
            facility, client, message = (str(arg) for arg in record.args)
        else:  # not from confluent-kafka: keep the text as it is
            facility, client, message = "", record.name, record.getMessage()
        kind, now = (facility, _NUMBERS.sub("", message)), self._clock()
        shown, suppressed = self._kinds.get(kind, (None, 0))
        if shown is not None and now - shown < self._window:
            self._kinds[kind] = (shown, suppressed + 1)
            return
        if len(self._kinds) >= _MAX_KINDS:
            self._kinds = {k: v for k, v in self._kinds.items() if now - v[0] < self._window}
        self._kinds[kind] = (now, 0)
        fields: dict[str, Any] = {"client": client, "facility": facility, "message": message}
        if suppressed:
            fields["suppressed"] = suppressed
        # A fresh structlog logger each time: lines are few, and it follows reconfiguration.
        log = structlog.get_logger("worker.kafka")
        log.log(_level(record.levelno), "kafka_client_log", **fields)


def _level(number: int) -> int:
    """The structlog level of a client line: CRITICAL (syslog 0-2) counts as error."""
    for level in (logging.ERROR, logging.WARNING, logging.INFO):
        if number >= level:
            return level
    return logging.DEBUG
