"""The consumer (worker.source.KafkaSource) without a broker: its settings, its errors."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException

from worker import source
from worker.errors import FatalClientError, KafkaError, RetriableError
from worker.source import KafkaSource


def consumer_config(monkeypatch: pytest.MonkeyPatch, properties: dict[str, str]) -> Any:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(source, "Consumer", lambda config: seen.append(config))
    KafkaSource("127.0.0.1:1", "g", properties)
    [config] = seen
    return config


def test_a_partition_prefetches_little_and_a_full_one_fetches_again_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small prefetch per partition keeps a hot partition's backlog from queueing ahead
    of other partitions' calls, and only with a short backoff: librdkafka's 1 s default
    after a partition's share fills cut a hot partition's drain to a fifth, and a short
    wait for new data, so that a partition read again is fetched soon. The byte cap
    is left alone: lowered, it starved partitions after broker outages. A property of
    the configuration wins."""
    config = consumer_config(monkeypatch, {})
    assert config["queued.min.messages"] <= 5_000
    assert config["fetch.queue.backoff.ms"] <= 50
    assert config["fetch.wait.max.ms"] <= 100  # a partition read again is fetched soon
    assert "queued.max.messages.kbytes" not in config
    config = consumer_config(monkeypatch, {"consumer.queued.min.messages": "100000"})
    assert config["queued.min.messages"] == "100000"
    assert config["fetch.queue.backoff.ms"] <= 50


class _Message:
    def __init__(self, error: ClientError) -> None:
        self._error = error

    def error(self) -> ClientError:
        return self._error

    def topic(self) -> str:
        return "in"


def test_a_consumer_told_it_is_dead_ends_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A static member fenced by a newer one with its group.instance.id (after a broker
    stall expired its session) hears of it from a message whose code is _FATAL, not
    flagged fatal: it was logged and skipped, and the loop went on with a consumer that
    never got a record again (90 s idle in a chaos run, until it was killed). It raises,
    so the supervisor builds a new consumer, which rejoins."""
    fenced = ClientError(ClientError._FATAL, "Fatal error: Broker: Static consumer fenced")

    class Consumer:
        def __init__(self, config: Any) -> None:
            pass

        def consume(self, count: int, timeout: float) -> list[_Message]:
            return [_Message(fenced)]

    monkeypatch.setattr(source, "Consumer", Consumer)
    seen: list[BaseException] = []
    consumer = KafkaSource("127.0.0.1:1", "g", {}, on_error=seen.append)
    with pytest.raises(FatalClientError, match="Static consumer fenced"):
        consumer.consume(10, 0.1)
    assert seen == []


def test_a_cut_travels_in_the_offsets_metadata_and_only_ours_is_read() -> None:
    """A commit's cut is written into its offset's metadata and read back from it, only
    with the offset of the record it cut; metadata another tool wrote, or none, is no
    cut."""
    cut = source.Cut(7, source.fingerprint(b'{"batch": []}'), 1_999)
    assert cut.record == "13-9b23f39b"
    cuts = {("in", 0): cut, ("in", 1): source.Cut(8, "5-00000000", 3)}
    [with_cut, moved_on] = source.topic_partitions({("in", 0): 7, ("in", 1): 9}, cuts)
    assert (with_cut.offset, moved_on.offset, moved_on.metadata) == (7, 9, None)
    assert source.read_cut(7, with_cut.metadata) == cut
    assert source.read_cut(7, "group-worker calls done: 3 of record 0-00000000") == (
        7,
        source.fingerprint(None),
        3,
    )
    texts = (
        None,
        "",
        "1999",
        "group-worker calls done: 3",
        "group-worker calls done: -3 of record 5-0000000a",
        "group-worker calls done: \uff13 of record 5-0000000a",
        "group-worker calls done: 9999999999 of record 5-0000000a",
        "group-worker calls done: 3 of record 5-0000000A",
        "group-worker calls done: 3 of record 5-0000000a and more",
    )
    for other in texts:
        assert source.read_cut(7, other) is None, other
    assert source.read_cut(-1001, with_cut.metadata) is None


def test_a_seek_that_fails_is_not_retriable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed seek (reading records again) ends the loop: one that went on would read
    after the records it meant to read again and commit beyond them."""

    class Consumer:
        def __init__(self, config: Any) -> None:
            pass

        def seek(self, partition: Any) -> None:
            raise KafkaException(ClientError(ClientError._STATE, "Erroneous state"))

    monkeypatch.setattr(source, "Consumer", Consumer)
    consumer = KafkaSource("127.0.0.1:1", "g", {})
    with pytest.raises(KafkaError, match=r"seek in\[0\] failed") as failed:
        consumer.seek({("in", 0): 5})
    assert not isinstance(failed.value, RetriableError)
