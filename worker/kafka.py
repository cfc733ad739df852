"""What every Kafka client shares: base configuration, and error translation.

confluent-kafka reports failures as ``KafkaError`` values (inside ``KafkaException``);
this is the one place they become the worker's error tree (``worker.errors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

from confluent_kafka import KafkaError as ClientError
from confluent_kafka import Producer

from worker.errors import AbortableError, FatalError, KafkaError, RetriableError

__all__ = ["client_config", "produce_all", "raise_for", "translate"]

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
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    config.update({k: v for k, v in properties.items() if not k.startswith(_SCOPES)})
    config.update(settings or {})
    scope = f"{role}."
    config.update({k.removeprefix(scope): v for k, v in properties.items() if k.startswith(scope)})
    return config


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
) -> tuple[int, list[str]]:
    """Produce every ``(key, value)`` to ``topic`` and wait for them all to be delivered.

    Blocks, serving deliveries, while the local queue is full, then flushes for up to
    ``timeout`` seconds. Returns how many were produced and the delivery errors (empty
    when every record was delivered; records still queued at the timeout count as one).
    """
    errors: list[str] = []

    def delivered(error: ClientError | None, _: object) -> None:
        if error is not None:
            errors.append(error.str())

    count = 0
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:  # the queue is full: let deliveries drain it
                producer.poll(0.05)
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining:
        errors.append(f"{remaining} records still undelivered after {timeout:.0f}s")
    return count, errors
