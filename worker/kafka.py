"""What every Kafka client shares: base configuration, and error translation.

confluent-kafka reports failures as ``KafkaError`` values (inside ``KafkaException``);
this is the one place they become the worker's error tree (``worker.errors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from confluent_kafka import KafkaError as ClientError

from worker.errors import AbortableError, FatalError, KafkaError, RetriableError

__all__ = ["client_config", "raise_for", "translate"]

# Prefixes that scope a librdkafka property to one client kind.
_SCOPES = ("consumer.", "producer.", "admin.")


def client_config(bootstrap_servers: str, properties: Mapping[str, str]) -> dict[str, Any]:
    """librdkafka configuration shared by every client: servers plus unscoped properties."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers}
    config.update({k: v for k, v in properties.items() if not k.startswith(_SCOPES)})
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
