"""Tests for worker.placement: murmur2 placement as the Java client and librdkafka do it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from confluent_kafka import Producer

from worker.placement import murmur2, partition_of


@pytest.mark.parametrize(
    ("key", "java"),
    [  # Apache Kafka's UtilsTest.testMurmur2, as signed 32-bit numbers
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_the_java_clients(key: bytes, java: int) -> None:
    """The hash is the Java client's, for every length of tail (0 to 3 bytes)."""
    assert murmur2(key) == java & 0xFFFFFFFF


def test_partition_of_agrees_with_librdkafkas_murmur2_random() -> None:
    """The partition is the one librdkafka's murmur2_random producer picks (its mock
    cluster, 4 partitions a topic), for groupId-like keys and random bytes of 1 to 40."""
    rng = random.Random(7)
    keys = [f"group-{n}".encode() for n in range(200)]
    keys += [rng.randbytes(n) for n in range(1, 41)]
    placed: dict[bytes, int] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None
        placed[message.key()] = message.partition()

    producer = Producer({"test.mock.num.brokers": "1", "partitioner": "murmur2_random"})
    for key in keys:
        producer.produce("placement", b"", key, on_delivery=delivered)
    assert producer.flush(10) == 0
    count = len(producer.list_topics("placement").topics["placement"].partitions)
    assert count > 1
    assert placed == {key: partition_of(key, count) for key in keys}
