"""Test doubles for the worker's boundaries: ``FakeSource``, ``FakeSink``, ``FakeClock``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.errors import AbortableError, KafkaError, ProducerHungError, RetriableError
from worker.events import Record, SourceRecord
from worker.restore import Entry
from worker.sink import Headers, Refusal
from worker.source import (
    NO_CUTS,
    Cut,
    Cuts,
    Offsets,
    Partition,
    RebalanceListener,
    Source,
    read_cut,
    topic_partitions,
)

__all__ = ["FakeClock", "FakeRestorer", "FakeSink", "FakeSource", "Produced"]


class FakeClock:
    """A clock that moves only when told to (``sleep`` and ``advance`` move it)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.now = start_ms / 1000

    def monotonic(self) -> float:
        return self.now

    def now_ms(self) -> int:
        return int(self.now * 1000)

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def metadata_cuts(offsets: Offsets, cuts: Cuts) -> dict[Partition, Cut]:
    """The cuts a commit of ``offsets`` leaves in their metadata, through the text the
    worker writes there and reads back."""
    found = {}
    for tp in topic_partitions(offsets, cuts):
        cut = read_cut(tp.offset, tp.metadata)
        if cut is not None:
            found[tp.topic, tp.partition] = cut
    return found


class FakeSource:
    """A single-member consumer group over in-memory partitions.

    ``consume`` hands out records from the read position; ``commit`` stores offsets;
    ``rebalance`` revokes and assigns partitions the next time ``consume`` runs.
    Each ``consume`` call advances the fake clock by the poll timeout.
    """

    def __init__(self, clock: FakeClock, partitions: int = 1, topic: str = "in") -> None:
        self.topic = topic
        self.clock = clock
        self.log: dict[Partition, list[Record]] = {(topic, p): [] for p in range(partitions)}
        self.position: dict[Partition, int] = {}
        self.committed_offsets: dict[Partition, int] = {}
        self.offset_cuts: dict[Partition, Cut] = {}  # in the committed offsets' metadata
        self.commits: list[dict[Partition, int]] = []
        self.fail_committed: KafkaError | None = None  # the next committed_cuts() raises it
        self.committed_reads: list[list[Partition]] = []  # committed_cuts() calls, in order
        self.listener: RebalanceListener | None = None
        self.pending_assign: list[Partition] = list(self.log)
        self.pending_revoke: list[Partition] = []
        self.fail_commit: KafkaError | None = None
        self.closed = False
        self.paused: set[Partition] = set()
        self.consumes = 0
        # Called at the start of every consume(), with the number of calls so far.
        self.on_consume: Callable[[int], None] | None = None

    def restarted(self) -> FakeSource:
        """A new consumer of the same group, as after a restart: it shares this one's
        partitions and committed offsets."""
        source = FakeSource(self.clock, topic=self.topic)
        source.log, source.committed_offsets = self.log, self.committed_offsets
        source.offset_cuts = self.offset_cuts
        source.pending_assign = list(self.log)
        return source

    def append(self, value: bytes | None, partition: int = 0, key: bytes | None = None) -> None:
        tp = (self.topic, partition)
        offset = len(self.log[tp])
        self.log[tp].append(Record(self.topic, partition, offset, value, key, self.clock.now_ms()))

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.listener = listener

    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]:
        assert self.listener is not None
        self.consumes += 1
        if self.on_consume is not None:
            self.on_consume(self.consumes)
        if self.pending_revoke:
            revoked, self.pending_revoke = self.pending_revoke, []
            self.listener.on_revoke(revoked)
            for tp in revoked:
                self.position.pop(tp, None)
        if self.pending_assign:
            assigned, self.pending_assign = self.pending_assign, []
            for tp in assigned:
                self.position[tp] = max(self.committed_offsets.get(tp, 0), 0)
            self.listener.on_assign(assigned)
        out: list[SourceRecord] = []
        for tp, offset in self.position.items():
            if tp in self.paused:
                continue
            chunk = self.log[tp][offset : offset + max_records - len(out)]
            out.extend(chunk)
            self.position[tp] = offset + len(chunk)
        if not out:
            self.clock.advance(timeout)
        return out

    def commit(self, offsets: Offsets, cuts: Cuts = NO_CUTS) -> None:
        if self.fail_commit is not None:
            raise self.fail_commit
        self.store_offsets(offsets, cuts)
        self.commits.append(dict(offsets))

    def store_offsets(self, offsets: Offsets, cuts: Cuts = NO_CUTS) -> None:
        """What a commit of ``offsets`` leaves in the group, each with its metadata."""
        self.committed_offsets.update(offsets)
        for partition in offsets:
            self.offset_cuts.pop(partition, None)
        self.offset_cuts.update(metadata_cuts(offsets, cuts))

    def committed_cuts(
        self, partitions: Sequence[Partition], timeout: float
    ) -> dict[Partition, Cut]:
        self.committed_reads.append(list(partitions))
        if self.fail_committed is not None:
            error, self.fail_committed = self.fail_committed, None
            raise error
        return {p: self.offset_cuts[p] for p in partitions if p in self.offset_cuts}

    def committed(self, partitions: Sequence[Partition], timeout: float) -> Offsets:
        return {p: self.committed_offsets.get(p, 0) for p in partitions}

    def pause(self, partitions: Sequence[Partition]) -> None:
        self.paused.update(partitions)

    def resume(self, partitions: Sequence[Partition]) -> None:
        self.paused.difference_update(partitions)

    def seek(self, offsets: Offsets) -> None:
        # As librdkafka drops a partition's prefetch on seek and fetches it anew, behind
        # what other partitions have queued: it is read after them.
        for tp, offset in offsets.items():
            self.position.pop(tp, None)
            self.position[tp] = offset

    def group_metadata(self) -> Any:
        return "fake-group-metadata"

    def lag(self, partition: Partition) -> int | None:
        return len(self.log[partition]) - self.position.get(partition, 0)

    def close(self) -> None:
        assert self.listener is not None
        self.listener.on_revoke(list(self.position))
        self.closed = True

    def rebalance(self, revoke: Sequence[Partition], assign: Sequence[Partition]) -> None:
        self.pending_revoke.extend(revoke)
        self.pending_assign.extend(assign)


@dataclass(frozen=True, slots=True)
class Produced:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None
    partition: int | None
    timestamp: int = 0
    report: bool = False


@dataclass
class FakeSink:
    """A sink that keeps what it is given; ``committed`` is what a reader would see.

    With ``transactional`` it behaves like a transactional producer: outputs become
    visible only at ``commit``, and ``abort`` discards them.
    """

    transactional: bool = True
    open: list[Produced] = field(default_factory=list)
    committed: list[Produced] = field(default_factory=list)
    offset_commits: list[dict[Partition, int]] = field(default_factory=list)
    commit_cuts: list[dict[Partition, Cut]] = field(default_factory=list)  # with each
    fail_next_commit: KafkaError | None = None
    # Once set, every commit raises it, as every call of a fenced producer fails; a new
    # producer (``abort`` then clearing it) starts afresh.
    fenced: KafkaError | None = None
    # The produce that raises this (the transaction failed under it), counted in
    # ``open`` from 0: as librdkafka refuses records once a transaction has failed.
    fail_produce: tuple[int, KafkaError] | None = None
    aborts: int = 0
    # The next commit hangs, as a producer after a broker restart: before the broker
    # committed ("uncommitted") or after ("committed"); from then on every transactional
    # call fails at once with ``ProducerHungError``, until ``renew``.
    hang_next_commit: Literal["uncommitted", "committed"] | None = None
    hang_next_abort: bool = False
    hung: ProducerHungError | None = None
    renews: int = 0
    fail_renew: KafkaError | None = None  # the next renew() raises it
    in_transaction: bool = False
    queued: int = 0  # what backlog() reports, set by tests
    # A broker's verdict on each record at commit: an error text refuses it for good
    # (the commit fails and ``take_refused`` reports it), ``None`` accepts it.
    refuse: Callable[[Produced], str | None] = lambda _: None
    refused: list[Refusal] = field(default_factory=list)
    # Per topic partition, how many records were committed: the next offset.
    ends: dict[Partition, int] = field(default_factory=dict)
    # Stands for the topics' ids: another sink is another cluster (or topics re-created).
    cluster: str = "cluster-1"
    # When set, a record produced with timestamp 0 is stamped with its time, as the
    # producer does; else it keeps 0.
    clock: FakeClock | None = None

    def begin(self) -> None:
        if self.transactional:
            assert not self.in_transaction, "begin inside an open transaction"
            self.in_transaction = True

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp: int = 0,
        *,
        report: bool = False,
    ) -> None:
        if self.transactional:
            assert self.in_transaction, "produce outside a transaction"
        if self.fail_produce is not None and len(self.open) == self.fail_produce[0]:
            error, self.fail_produce = self.fail_produce[1], None
            raise error
        if timestamp == 0 and self.clock is not None:
            timestamp = self.clock.now_ms()
        self.open.append(Produced(topic, key, value, headers, partition, timestamp, report))

    def commit(
        self,
        offsets: Offsets,
        source: Source,
        last_records: Callable[[], None] = lambda: None,
        meanwhile: Callable[[], None] = lambda: None,
        cuts: Cuts = NO_CUTS,
    ) -> Offsets:
        if self.hung is not None:
            raise self.hung
        if self.transactional and not self.in_transaction:
            return {}  # as KafkaSink: no transaction open, nothing to commit
        last_records()
        meanwhile()
        hang, self.hang_next_commit = self.hang_next_commit, None
        if hang == "uncommitted":
            self.hung = ProducerHungError("a transactional call hung past 10s")
            raise self.hung
        if self.fail_next_commit is not None:
            error, self.fail_next_commit = self.fail_next_commit, None
            raise error
        if self.fenced is not None:
            raise self.fenced
        accepted = []
        for p in self.open:
            verdict = self.refuse(p)
            if verdict is None:
                accepted.append(p)
                continue
            size = len(p.key or b"") + len(p.value)
            too_large = "too large" in verdict
            self.refused.append(Refusal(p.topic, p.key, p.value, size, verdict, too_large))
        if self.refused:
            if not self.transactional:  # the rest were delivered; the refused never will be
                self.committed.extend(accepted)
                self.open.clear()
            raise AbortableError(f"{len(self.refused)} outputs refused")
        reached: dict[Partition, int] = {}
        for p in self.open:  # a record's offset: how many its topic partition held
            position = (p.topic, p.partition or 0)
            self.ends[position] = self.ends.get(position, 0) + 1
            if p.report or not self.transactional:  # as KafkaSink reports deliveries
                reached[position] = self.ends[position]
        self.committed.extend(self.open)
        self.open.clear()
        if self.transactional:
            # The transaction commits the offsets to the group, as the broker does.
            self.offset_commits.append(dict(offsets))
            self.commit_cuts.append(metadata_cuts(offsets, cuts))
            if isinstance(source, FakeSource):
                source.store_offsets(offsets, cuts)
            self.in_transaction = False
        else:
            source.commit(offsets, cuts)
        if hang == "committed":  # the broker committed; the producer never heard
            self.hung = ProducerHungError("a transactional call hung past 10s")
            raise self.hung
        return reached

    def abort(self) -> None:
        if self.hang_next_abort:
            self.hang_next_abort = False
            self.hung = ProducerHungError("a transactional call timed out")
        if self.hung is not None:
            raise self.hung
        self.aborts += 1
        # At least once too: KafkaSink raises AbortableError only once its flush is over
        # (every record delivered or failed) and forgets the batch's delivery reports,
        # so nothing of the batch is left to reach the next one.
        self.open.clear()
        if self.transactional:
            self.in_transaction = False

    def renew(self) -> None:
        """A new producer: it ends the open transaction (what was not committed is
        dropped) and starts afresh."""
        self.renews += 1
        if self.fail_renew is not None:
            error, self.fail_renew = self.fail_renew, None
            raise error
        self.hung = None
        self.open.clear()
        self.in_transaction = False

    def poll(self) -> None:
        pass

    def backlog(self) -> int:
        return self.queued

    def take_refused(self) -> list[Refusal]:
        refused, self.refused = self.refused, []
        return refused

    def close(self) -> None:
        pass

    def topic(self, name: str) -> list[Produced]:
        return [p for p in self.committed if p.topic == name]


class FakeRestorer:
    """Reads back what a ``FakeSink`` committed, as a read_committed consumer would."""

    def __init__(self, sink: FakeSink) -> None:
        self.sink = sink
        self.reads: list[tuple[str, int]] = []
        self.released: list[int] = []

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        self.reads.append((topic, partition))
        records = (p for p in self.sink.topic(topic) if p.partition == partition)
        for offset, p in enumerate(records):
            if offset >= start:
                yield offset, p.key, p.value, p.timestamp

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        return 0, self.sink.ends.get((topic, partition), 0)

    def topic_ids(self, topics: Sequence[str]) -> list[str]:
        return [f"{self.sink.cluster}/{topic}" for topic in topics]

    def release(self, partition: int) -> None:
        self.released.append(partition)

    def close(self) -> None:
        pass


class FlakyRestorer(FakeRestorer):
    """A ``FakeRestorer`` whose first ``fail`` reads raise a retriable error (a broker
    away while a partition is restored)."""

    def __init__(self, sink: FakeSink, fail: int) -> None:
        super().__init__(sink)
        self.fail = fail

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        if self.fail:
            self.fail -= 1
            raise RetriableError("restore: broker transport failure")
        yield from super().read(topic, partition, start)
