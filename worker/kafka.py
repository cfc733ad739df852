"""What every Kafka client shares: base configuration, and error translation.

confluent-kafka reports failures as ``KafkaError`` values (inside ``KafkaException``);
this is the one place they become the worker's error tree (``worker.errors``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Literal, NoReturn

from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException, Producer

from worker.errors import AbortableError, ConfigError, FatalError, KafkaError, RetriableError
from worker.limits import PRODUCER_MAX_DEFAULT
from worker.logs import kafka_client_logger

__all__ = ["client_config", "produce_all", "producer_max_bytes", "raise_for", "translate"]

# Prefixes that scope a librdkafka property to one client kind.
_SCOPES = ("consumer.", "producer.", "admin.")


def client_config(
    bootstrap_servers: str,
    properties: Mapping[str, str],
    role: Literal["consumer", "producer", "admin"],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka configuration for one client of kind ``role``.

    In order, later winning: the servers and every unscoped property (SASL, SSL...),
    the client's own ``settings``, then the properties scoped to ``role``
    (``consumer.fetch.max.bytes``), which a user sets on purpose for that client.
    librdkafka's own log lines go to ``logs.kafka_client_logger`` (JSON, not raw lines
    on standard error); confluent-kafka delivers them when the client is polled.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "logger": kafka_client_logger(),
    }
    config.update({k: v for k, v in properties.items() if not k.startswith(_SCOPES)})
    config.update(settings or {})
    scope = f"{role}."
    config.update({k.removeprefix(scope): v for k, v in properties.items() if k.startswith(scope)})
    return config


def producer_max_bytes(config: Mapping[str, Any]) -> int:
    """The largest record a producer with ``config`` (``client_config``) accepts itself:
    its ``message.max.bytes``. Raises ``ConfigError`` when that is not an integer."""
    try:
        return int(config.get("message.max.bytes", PRODUCER_MAX_DEFAULT))
    except ValueError:
        raise ConfigError("config: kafka.message.max.bytes must be an integer") from None


def translate(error: ClientError | Any) -> KafkaError:
    """The worker error for a confluent-kafka ``KafkaError`` (or anything else)."""
    if not isinstance(error, ClientError):
        return KafkaError(str(error))
    text = f"{error.name()}: {error.str()}"
    if error.fatal():
        return FatalError(text)
    if error.txn_requires_abort():
        return AbortableError(text)
    if error.retriable() or error.code() in (
        ClientError._TIMED_OUT,
        ClientError._TRANSPORT,
        ClientError._ALL_BROKERS_DOWN,
        ClientError.REQUEST_TIMED_OUT,
        ClientError.NOT_COORDINATOR,
        ClientError.COORDINATOR_NOT_AVAILABLE,
        ClientError.COORDINATOR_LOAD_IN_PROGRESS,
        # Metadata not settled yet: a topic just created, or a broker just restarted.
        ClientError.NOT_LEADER_FOR_PARTITION,
        ClientError.LEADER_NOT_AVAILABLE,
        ClientError.UNKNOWN_TOPIC_OR_PART,
    ):
        return RetriableError(text)
    return KafkaError(text)


def raise_for(error: ClientError | Any) -> NoReturn:
    """Raise the translated error for ``error``."""
    raise translate(error)


def produce_all(
    producer: Producer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    timeout: float = 60.0,
    max_bytes: int = PRODUCER_MAX_DEFAULT,
) -> tuple[int, list[str]]:
    """Produce every ``(key, value)`` to ``topic`` and wait for them all to be delivered.

    Blocks, serving deliveries, while the local queue is full, then flushes for up to
    ``timeout`` seconds. Returns how many were delivered and one line per failure,
    naming the record by its position (from 1): a record the producer refuses outright
    (e.g. larger than ``max_bytes``, the producer's ``message.max.bytes``), which does
    not stop the others, or one whose delivery failed; records still queued at the
    timeout make one line together. Never raises for a single record.
    """
    errors: list[str] = []
    delivered = 0

    def on_delivery(index: int, error: ClientError | None, _: object) -> None:
        nonlocal delivered
        if error is None:
            delivered += 1
        else:
            errors.append(f"record {index}: {error.str()}")

    for index, (key, value) in enumerate(records, start=1):
        try:
            _produce(producer, topic, key, value, partial(on_delivery, index))
        except KafkaException as e:
            errors.append(f"record {index}: {_refusal(e.args[0], value, max_bytes)}")
        if index % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining:
        errors.append(f"{remaining} records still undelivered after {timeout:.0f}s")
    return delivered, errors


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Callable[[ClientError | None, object], None],
) -> None:
    """Queue one record, serving deliveries while the queue is full; raises
    ``KafkaException`` when the producer refuses the record itself."""
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:  # the queue is full: let deliveries drain it
            producer.poll(0.05)


def _refusal(error: ClientError, value: bytes | None, max_bytes: int) -> str:
    if error.code() == ClientError.MSG_SIZE_TOO_LARGE:
        return (
            f"{error.str()} ({len(value or b'')} bytes; "
            f"the producer's limit is message.max.bytes={max_bytes})"
        )
    return error.str()
