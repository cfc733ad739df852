"""The consumer edge (worker.source) on the real local broker: subscribing to fresh topics."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from confluent_kafka import Producer

from tests.integration.harness import BOOTSTRAP, Topics, create_topic, free_port
from worker.errors import RetriableError, TopicError
from worker.restore import KafkaRestorer
from worker.source import Cut, KafkaSource, Partition

pytestmark = pytest.mark.integration


class RecordingListener:
    """A ``RebalanceListener`` that remembers the partitions it holds."""

    def __init__(self) -> None:
        self.assigned: set[Partition] = set()

    def on_assign(self, partitions: Sequence[Partition]) -> None:
        self.assigned.update(partitions)

    def on_revoke(self, partitions: Sequence[Partition]) -> None:
        self.assigned.difference_update(partitions)

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        self.assigned.difference_update(partitions)


def test_a_topic_created_just_after_subscribing_is_assigned_at_once(topics: Topics) -> None:
    """A subscribed topic created two seconds late is assigned with the others within seconds."""
    create_topic(topics.input, 3)
    late = threading.Timer(2.0, create_topic, (topics.repartition, 3))
    source = KafkaSource(BOOTSTRAP, topics.group_id, {})
    listener = RecordingListener()
    late.start()
    try:
        started = time.monotonic()
        source.subscribe([topics.input, topics.repartition], listener)
        wanted = {(t, p) for t in (topics.input, topics.repartition) for p in range(3)}
        while listener.assigned != wanted and time.monotonic() - started < 10:
            source.consume(100, 0.1)
        elapsed = time.monotonic() - started
        assert listener.assigned == wanted, f"after {elapsed:.1f}s: {sorted(listener.assigned)}"
    finally:
        late.join()
        source.close()


def test_a_topic_that_never_appears_is_a_topic_error_within_the_bound(topics: Topics) -> None:
    """Subscribing to a topic that does not exist fails with one line naming it, in time."""
    create_topic(topics.input, 3)
    source = KafkaSource(BOOTSTRAP, topics.group_id, {}, topic_timeout=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(TopicError) as error:
            source.subscribe([topics.input, topics.repartition], RecordingListener())
        elapsed = time.monotonic() - started
    finally:
        source.close()
    message = str(error.value)
    assert topics.repartition in message
    assert topics.input not in message
    assert "\n" not in message
    assert 2.0 <= elapsed < 4.0, f"raised after {elapsed:.1f}s"


def test_a_subscribe_no_broker_answers_is_retriable_not_a_topic_error(topics: Topics) -> None:
    """Without a broker, subscribe raises a RetriableError (the supervisor rebuilds), in time."""
    source = KafkaSource(
        f"127.0.0.1:{free_port()}", topics.group_id, {"log_level": "0"}, topic_timeout=1.0
    )
    try:
        started = time.monotonic()
        with pytest.raises(RetriableError):
            source.subscribe([topics.input], RecordingListener())
        assert time.monotonic() - started < 3.0
    finally:
        source.close()


def test_a_changelog_without_the_inputs_partition_is_a_topic_error(topics: Topics) -> None:
    """Restoring a partition its changelog lacks (the input got more partitions) is a
    TopicError naming the topic and partition: the worker stops with exit 2 and says so,
    instead of rebuilding its clients until it gives up."""
    create_topic(topics.state, 2)
    restorer = KafkaRestorer(BOOTSTRAP, topics.group_id, {})
    try:
        assert restorer.bounds(topics.state, 1) == (0, 0)
        with pytest.raises(TopicError, match=f"topic {topics.state} has no partition 2"):
            restorer.bounds(topics.state, 2)
    finally:
        restorer.close()


class PausingListener(RecordingListener):
    """Pauses partition 0 of each assignment, as the runner holds a partition whose
    state is not restored yet."""

    def __init__(self, source: KafkaSource) -> None:
        super().__init__()
        self.source = source

    def on_assign(self, partitions: Sequence[Partition]) -> None:
        super().on_assign(partitions)
        self.source.pause([p for p in partitions if p[1] == 0])


@pytest.mark.parametrize(
    "protocol",
    [{}, {"partition.assignment.strategy": "range"}, {"group.protocol": "consumer"}],
    ids=["cooperative_sticky", "eager_range", "kip848"],
)
def test_a_partition_paused_as_it_is_assigned_stays_paused(
    topics: Topics, protocol: dict[str, str]
) -> None:
    """A pause made in on_assign holds: confluent-kafka assigns the partitions after the
    callback, which undid it, unless the source assigns them first (every protocol)."""
    create_topic(topics.input, 2)
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    for n in range(20):
        producer.produce(topics.input, b"v", partition=n % 2)
    assert producer.flush(10) == 0
    source = KafkaSource(BOOTSTRAP, topics.group_id, protocol)
    listener = PausingListener(source)
    try:
        source.subscribe([topics.input], listener)
        read: list[int] = []
        deadline = time.monotonic() + 15
        while len(read) < 10 and time.monotonic() < deadline:
            read += [r.partition() or 0 for r in source.consume(100, 0.2)]
        deadline = time.monotonic() + 2  # partition 0's records, if the pause was lost
        while time.monotonic() < deadline:
            read += [r.partition() or 0 for r in source.consume(100, 0.2)]
        assert read == [1] * 10
        source.resume([(topics.input, 0)])
        deadline = time.monotonic() + 10
        while len(read) < 20 and time.monotonic() < deadline:
            read += [r.partition() or 0 for r in source.consume(100, 0.2)]
        assert read == [1] * 10 + [0] * 10
    finally:
        source.close()


def test_a_restore_read_closed_early_goes_on_where_it_stopped(topics: Topics) -> None:
    """A restore cut into slices reads each record once, in order: a read closed before
    its end keeps its place (and the records consumed but not passed on), and a read of
    another partition or offset starts afresh."""
    create_topic(topics.state, 2)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
    for n in range(30_000):
        producer.produce(topics.state, b"{}", b"k%d" % n, partition=n % 2)
    assert producer.flush(30) == 0
    restorer = KafkaRestorer(BOOTSTRAP, topics.group_id, {})
    try:
        for partition in (0, 1):
            offsets: list[int] = []
            while len(offsets) < 15_000:
                reader = restorer.read(topics.state, partition, len(offsets))
                offsets += [entry[0] for _, entry in zip(range(4_000), reader, strict=False)]
                reader.close()  # type: ignore[attr-defined]
            assert offsets == list(range(15_000))
        again = [entry[0] for entry in restorer.read(topics.state, 0, 14_990)]
        assert again == list(range(14_990, 15_000))
    finally:
        restorer.close()


def test_a_read_closed_early_is_let_go_when_its_partition_is_released(topics: Topics) -> None:
    """A restore read closed before its end stays assigned, holding what it fetched
    ahead, until its partition is released (revoked in the middle of its restore)."""
    create_topic(topics.state, 2)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
    for n in range(2_000):
        producer.produce(topics.state, b"{}", b"k%d" % n, partition=0)
    assert producer.flush(30) == 0
    restorer = KafkaRestorer(BOOTSTRAP, topics.group_id, {})
    try:
        reader = restorer.read(topics.state, 0)
        next(reader)
        reader.close()  # type: ignore[attr-defined]
        parked = [(tp.topic, tp.partition) for tp in restorer._consumer.assignment()]
        assert parked == [(topics.state, 0)]
        restorer.release(1)
        assert len(restorer._consumer.assignment()) == 1
        restorer.release(0)
        assert restorer._consumer.assignment() == []
        assert [entry[0] for entry in restorer.read(topics.state, 0, 1_998)] == [1_998, 1_999]
    finally:
        restorer.close()


def test_every_partition_of_a_backlog_is_fetched_while_the_prefetch_is_full(
    topics: Topics,
) -> None:
    """A consumer slower than its fetches keeps the prefetch full, and every partition
    still gets its turn. A byte bound on the prefetch (queued.max.messages.kbytes, tried
    for batch envelopes) also lowers librdkafka's fetch size to it: a fetch of 4 MiB was
    filled by the first four partitions of its request, 1 MiB each, in the same order
    every time, and 34,971 records of 48,000 were read between two of partition 5's."""
    create_topic(topics.input, 6)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
    for _ in range(8_000):
        for partition in range(6):
            producer.produce(topics.input, b"x" * 1_000, partition=partition)
        producer.poll(0)
    assert producer.flush(30) == 0
    source = KafkaSource(BOOTSTRAP, topics.group_id, {})
    last = dict.fromkeys(range(6), 0)  # where each partition's last record came
    gap = dict.fromkeys(range(6), 0)  # the most records of others between two of its own
    read = 0
    try:
        source.subscribe([topics.input], RecordingListener())
        deadline = time.monotonic() + 60
        while read < 48_000 and time.monotonic() < deadline:
            for record in source.consume(500, 0.5):
                partition = record.partition() or 0
                gap[partition] = max(gap[partition], read - last[partition])
                last[partition] = read
                read += 1
            time.sleep(0.1)
    finally:
        source.close()
    assert read == 48_000
    assert max(gap.values()) <= 20_000, gap


def test_a_cut_commits_in_the_offsets_metadata_and_reads_back(topics: Topics) -> None:
    """At least once the source commits a cut itself: the broker keeps it with the
    offset, and a commit without one clears it."""
    create_topic(topics.input, 1)
    partition = (topics.input, 0)
    source = KafkaSource(BOOTSTRAP, topics.group_id, {})
    try:
        assert source.committed_cuts([partition], 10) == {}
        cut = Cut(5, "812-0badcafe", 17)
        source.commit({partition: 5}, {partition: cut})
        assert source.committed_cuts([partition], 10) == {partition: cut}
        source.commit({partition: 6})
        assert source.committed_cuts([partition], 10) == {}
    finally:
        source.close()
