"""restore_partition over a durable store: what it replays, and when it rebuilds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException

from tests.fakes import FakeRestorer, FakeSink
from tests.unit.test_store import state
from tests.unit.test_store_rocksdb import corrupt_blocks, dedupe_entries
from worker import codec, restore
from worker.errors import ConfigError, TopicError
from worker.profile import state_record
from worker.restore import Changelogs, Entry, restore_partition
from worker.store import RocksDBStateStore
from worker.store.directory import claim

TOPICS = Changelogs("state", "members", "dedupe")


def write_states(sink: FakeSink, *versions: tuple[str, int], topic: str = "state") -> None:
    """Commit a state record per ``(group, version)`` to ``topic`` partition 0."""
    sink.begin()
    for group_id, version in versions:
        value = codec.encode(state_record(state(group_id, version)))
        sink.produce(topic, group_id.encode(), value, partition=0)
    sink.commit({}, None)  # type: ignore[arg-type]  # no offsets: no source needed


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RocksDBStateStore]:
    store = RocksDBStateStore(tmp_path, cache_bytes=1 << 20)
    yield store
    store.close()


def versions(store: RocksDBStateStore, *groups: str) -> list[int | None]:
    return [(s.event_count if (s := store.get(0, g)) else None) for g in groups]


def test_a_partition_coming_back_replays_only_what_was_written_meanwhile(
    store: RocksDBStateStore,
) -> None:
    sink = FakeSink()
    write_states(sink, ("a", 1), ("b", 1), ("c", 1))
    first = restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    store.drop(0)  # revoked; another worker writes on
    write_states(sink, ("a", 2), ("d", 1))
    again = restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    assert (first.states, again.states, again.rebuilt) == (3, 2, None)
    assert versions(store, "a", "b", "c", "d") == [2, 1, 1, 1]
    assert store.stored_offsets(0) == {"state": 5, "members": 0, "dedupe": 0}


def test_offsets_past_a_topics_end_rebuild_the_partition(store: RocksDBStateStore) -> None:
    """The topic lost records at its end (an unclean leader election): the files hold
    changes the topic no longer has, so they are wiped, not trusted."""
    old = FakeSink()
    write_states(old, ("a", 1), ("b", 1), ("c", 1))
    restore_partition(FakeRestorer(old), store, TOPICS, 0)
    store.drop(0)
    new = FakeSink()
    write_states(new, ("a", 7))
    restored = restore_partition(FakeRestorer(new), store, TOPICS, 0)
    assert restored.rebuilt == "stored offset 3 is past the end (1) of state[0]"
    assert not restored.failed  # the topic changed, not the files
    assert versions(store, "a", "b", "c") == [7, None, None]


class Truncated(FakeRestorer):
    """A restorer over topics whose records before ``low`` were deleted."""

    def __init__(self, sink: FakeSink, low: dict[str, int]) -> None:
        super().__init__(sink)
        self.low = low

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        return self.low.get(topic, 0), super().bounds(topic, partition)[1]

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        return super().read(topic, partition, max(start, self.low.get(topic, 0)))


def test_records_deleted_under_the_stored_offset_rebuild_state_but_not_dedupe(
    store: RocksDBStateStore,
) -> None:
    sink = FakeSink()
    write_states(sink, ("a", 1))
    write_states(sink, ("d1", 1), topic="dedupe")
    restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    store.drop(0)
    write_states(sink, ("a", 2), ("b", 1), ("c", 1))
    write_states(sink, ("d2", 1), ("d3", 1), topic="dedupe")
    # Dedupe ids older than the retention went: replay from the first one left.
    kept = restore_partition(Truncated(sink, {"dedupe": 2}), store, TOPICS, 0)
    assert (kept.rebuilt, kept.states, kept.seen) == (None, 3, 1)
    store.drop(0)
    write_states(sink, ("a", 3), ("b", 2))
    # State records gone from under the stored offset cannot be replayed: rebuild from
    # what is left.
    rebuilt = restore_partition(Truncated(sink, {"state": 5}), store, TOPICS, 0)
    assert rebuilt.rebuilt == "stored offset 4 is before the start (5) of state[0]"
    assert versions(store, "a", "b", "c") == [None, 2, None]


def test_files_copied_from_other_topics_are_rebuilt(store: RocksDBStateStore) -> None:
    sink = FakeSink()
    write_states(sink, ("a", 1))
    write_states(sink, ("a", 9), ("b", 9), topic="other-state")
    restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    store.drop(0)
    other = Changelogs("other-state", "other-members", "other-dedupe")
    restored = restore_partition(FakeRestorer(sink), store, other, 0)
    assert restored.rebuilt == (
        "copied from other topics: state cluster-1/state, members cluster-1/members, "
        "dedupe cluster-1/dedupe"
    )
    assert (restored.states, versions(store, "a", "b")) == (2, [9, 9])


def test_a_copy_of_topics_since_created_again_or_of_another_cluster_is_rebuilt(
    store: RocksDBStateStore,
) -> None:
    """Same names, other topic ids: even a topic that has grown past the copy's offsets
    is told apart."""
    old = FakeSink()
    write_states(old, ("a", 1))
    restore_partition(FakeRestorer(old), store, TOPICS, 0)
    store.drop(0)
    new = FakeSink(cluster="cluster-2")
    write_states(new, ("b", 1), ("c", 1), ("d", 1))
    restored = restore_partition(FakeRestorer(new), store, TOPICS, 0)
    assert restored.rebuilt is not None
    assert restored.rebuilt.startswith("copied from other topics: state cluster-1/state")
    assert versions(store, "a", "b", "c", "d") == [None, 1, 1, 1]


def test_each_process_claims_a_slot_of_its_own(tmp_path: Path) -> None:
    """Two processes with one state_dir never share files; a restart gets its slot back."""
    first, second = claim(tmp_path, "group/one"), claim(tmp_path, "group/one")
    assert (first.path.parent.name, first.path.name, second.path.name) == ("group%2Fone", "0", "1")
    first.release()
    third = claim(tmp_path, "group/one")
    assert third.path == first.path
    assert claim(tmp_path, "..").path.parent.name == "%2E."


def test_a_state_dir_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    """A state_dir that is a file (or read-only) is a setting to fix: one line naming
    worker.state_dir, exit 2 like any bad setting (it exited 1, as a runtime failure)."""
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"^worker\.state_dir: cannot use .*: Not a directory$"):
        claim(file, "g")


def test_files_that_fail_during_the_replay_are_rebuilt(store: RocksDBStateStore) -> None:
    """Damage that opening does not see, met while replaying the tail: the files are
    wiped and every changelog replayed from the beginning, instead of a crash that a
    restart would only repeat."""
    sink = FakeSink()

    def write_ids(arrival: int) -> None:
        sink.begin()
        for _, key, value, _ in dedupe_entries(20_000, arrival):
            sink.produce("dedupe", key, value, partition=0)
        sink.commit({}, None)  # type: ignore[arg-type]

    write_ids(1)
    write_states(sink, ("a", 1))
    restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    store.close()  # flushes the write buffers into a table file
    corrupt_blocks(store.path(0))
    write_ids(2)  # the tail rewrites every id: its replay reads every block
    restored = restore_partition(FakeRestorer(sink), store, TOPICS, 0)
    assert restored.rebuilt is not None
    assert restored.rebuilt.startswith("partition 0's store: Corruption")
    assert restored.failed
    assert (restored.states, store.seen_count(), versions(store, "a")) == (1, 20_000, [1])
    assert store.seen(0, ("g7", "m7")) == 2
    assert store.stored_offsets(0) == {"state": 1, "members": 0, "dedupe": 40_000}


class _Forgetful:
    """A consumer told by a broker shutting down that the topic has no partitions: it
    says so until it has asked for the topic's metadata ``misses`` times (while the
    broker is away), then gives the partition's watermarks."""

    def __init__(self, misses: int) -> None:
        self.misses = misses
        self.asked = 0
        self.refreshed = 0

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self.asked += 1
        if self.refreshed < self.misses:
            raise KafkaException(ClientError(ClientError._UNKNOWN_PARTITION))
        return 3, 9

    def list_topics(self, topic: str, timeout: float) -> object:
        self.refreshed += 1
        return object()

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("misses", "found"), [(2, True), (10**9, False)])
def test_a_partition_the_broker_forgets_for_a_moment_is_asked_again(
    monkeypatch: pytest.MonkeyPatch, misses: int, found: bool
) -> None:
    """A changelog partition the broker does not know while it restarts is asked for
    again, after a metadata request for its topic (the client kept what the broker told
    it as it shut down, and a minute of retries could not succeed): the worker stopped,
    exit 2, as if the topic had too few partitions. One still unknown when the retries
    run out is that TopicError."""
    monkeypatch.setattr(restore, "_RETRY_SECONDS", 1.2)
    monkeypatch.setattr("worker.restore.time.sleep", lambda _: None)
    restorer = restore.KafkaRestorer("", "g", {"test.mock.num.brokers": "1"})
    restorer._consumer.close()
    consumer = restorer._consumer = _Forgetful(misses)  # type: ignore[assignment]
    try:
        if found:
            assert restorer.bounds("g.state", 4) == (3, 9)
            assert consumer.asked == 3
        else:
            with pytest.raises(TopicError, match=r"topic g\.state has no partition 4, which"):
                restorer.bounds("g.state", 4)
    finally:
        restorer.close()
