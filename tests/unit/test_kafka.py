"""Client configuration and error translation (worker.kafka)."""

from __future__ import annotations

from confluent_kafka import KafkaError as ClientError

from worker.errors import AbortableError, FatalError, KafkaError, RetriableError
from worker.kafka import client_config, translate

PROPERTIES = {
    "security.protocol": "SASL_SSL",
    "enable.auto.commit": "true",
    "consumer.fetch.max.bytes": "1048576",
    "consumer.isolation.level": "read_uncommitted",
    "producer.linger.ms": "50",
    "admin.request.timeout.ms": "9000",
}


def test_scoped_properties_reach_only_their_client_and_win() -> None:
    """Unscoped properties reach every client; scoped ones only theirs, over its settings."""
    settings = {"isolation.level": "read_committed", "enable.auto.commit": False}
    consumer = client_config("b:9092", PROPERTIES, "consumer", settings)
    assert consumer == {
        "bootstrap.servers": "b:9092",
        "security.protocol": "SASL_SSL",
        "enable.auto.commit": False,  # the client's own setting beats an unscoped one
        "isolation.level": "read_uncommitted",  # a scoped one beats the client's
        "fetch.max.bytes": "1048576",
    }
    producer = client_config("b:9092", PROPERTIES, "producer")
    assert producer["linger.ms"] == "50"
    assert "fetch.max.bytes" not in producer
    assert client_config("b:9092", PROPERTIES, "admin")["request.timeout.ms"] == "9000"


def test_errors_translate_by_class() -> None:
    """Fatal, abortable and retriable client errors map onto the worker's error tree."""
    assert isinstance(translate(ClientError(ClientError._FENCED, fatal=True)), FatalError)
    assert isinstance(
        translate(ClientError(ClientError._STATE, txn_requires_abort=True)), AbortableError
    )
    assert isinstance(translate(ClientError(ClientError._TRANSPORT)), RetriableError)
    assert isinstance(translate(ClientError(ClientError.NOT_LEADER_FOR_PARTITION)), RetriableError)
    other = translate(ClientError(ClientError.INVALID_CONFIG))
    assert type(other) is KafkaError
