"""The input edge: a Kafka consumer in a consumer group, behind the ``Source`` protocol.

Offsets are never committed automatically: the runner commits them, through the
source (at least once) or inside the producer's transaction (exactly once).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from worker.errors import FatalError, KafkaError, RetriableError, TopicError
from worker.events import SourceRecord
from worker.kafka import client_config, list_topics, raise_for, translate

__all__ = [
    "NO_CUTS",
    "Cut",
    "Cuts",
    "KafkaSource",
    "Offsets",
    "Partition",
    "RebalanceListener",
    "Source",
    "fingerprint",
    "read_cut",
    "topic_partitions",
]

Partition = tuple[str, int]
# The next offset to read, per partition: what a commit stores.
Offsets = Mapping[Partition, int]


class Cut(NamedTuple):
    """A record a commit cut between two of its calls (an envelope whose calls' outputs
    outgrow a transaction): its offset and its value's ``fingerprint``, which tell it
    from any other record found at that offset later (a topic created again, offsets
    carried to another cluster, where they may land on a neighbour), and how many of its
    calls are done. The committed offset stays at the record and its metadata says so;
    whoever reads the partition next skips them."""

    offset: int
    record: str
    calls: int


Cuts = Mapping[Partition, Cut]
NO_CUTS: Cuts = MappingProxyType({})
_CUT = re.compile(r"group-worker calls done: ([0-9]{1,9}) of record ([0-9]{1,10}-[0-9a-f]{8})")
# How often subscribe() asks again for a topic the consumer's metadata does not show yet.
_TOPIC_RETRY = 0.2


class RebalanceListener(Protocol):
    """Called by ``Source.consume`` when partitions move: ``on_assign`` once they are
    assigned (so it may pause them), the others before they go."""

    def on_assign(self, partitions: Sequence[Partition]) -> None: ...
    def on_revoke(self, partitions: Sequence[Partition]) -> None: ...
    def on_lost(self, partitions: Sequence[Partition]) -> None: ...


class Source(Protocol):
    """Records from the subscribed topics of one consumer-group member."""

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...
    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]: ...
    def commit(self, offsets: Offsets, cuts: Cuts = NO_CUTS) -> None: ...
    def committed_cuts(
        self, partitions: Sequence[Partition], timeout: float
    ) -> dict[Partition, Cut]: ...
    def committed(self, partitions: Sequence[Partition], timeout: float) -> Offsets: ...
    def pause(self, partitions: Sequence[Partition]) -> None: ...
    def resume(self, partitions: Sequence[Partition]) -> None: ...
    def seek(self, offsets: Offsets) -> None: ...
    def group_metadata(self) -> Any: ...
    def lag(self, partition: Partition) -> int | None: ...
    def close(self) -> None: ...


class KafkaSource:
    """A ``Source`` over ``confluent_kafka.Consumer``, reading committed data only.

    ``subscribe`` waits up to ``topic_timeout`` seconds for the topics to be usable:
    keep it below the service's liveness window (60 s), as the loop is not running yet.
    Call it from the loop's thread only: while ``consume`` runs (and a revoke's commit
    runs inside it), confluent-kafka makes a call from any other thread wait for it.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        properties: Mapping[str, str],
        *,
        group_instance_id: str = "",
        on_error: Callable[[BaseException], None] | None = None,
        topic_timeout: float = 30.0,
    ) -> None:
        settings: dict[str, Any] = {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            # A subscribed topic missing from the metadata is looked for again only at
            # this refresh (librdkafka's default: 5 minutes). subscribe() waits for the
            # topics, so this only bounds what slips past that (a lagging broker).
            "topic.metadata.refresh.interval.ms": 30_000,
            # Prefetch, so that one hot partition's backlog does not queue ahead of every
            # other partition's calls in the one queue consume() reads: librdkafka's
            # default is 100,000 records a partition (within 64 MiB in all). A partition
            # whose share is full fetches again after fetch.queue.backoff.ms: at its
            # default of 1 s a hot partition drained at a fifth of the rate. The byte cap
            # (queued.max.messages.kbytes) stays librdkafka's 64 MiB. At 4 MiB a hot
            # group's batch envelopes held other groups' calls 0.5 s behind them against
            # 4.5 s, but partitions starved for 30 s at a time after broker outages, and
            # stage two caught up in 78-158 s against 54-73 s (docs/performance.md).
            "queued.min.messages": 2_000,
            "fetch.queue.backoff.ms": 10,
            # A partition read again (the runner's turns behind a hot partition) is
            # fetched only once the fetch in flight returns, which waits this long when
            # the other partitions have nothing new. Behind envelopes a hot backlog drained
            # at 20,300-21,100 calls/s with librdkafka's 500 ms, 24,200-29,200 at 100 ms
            # (bench.fairness, docs/performance.md); a fetch of idle partitions is cheap.
            "fetch.wait.max.ms": 100,
        }
        if group_instance_id:
            settings["group.instance.id"] = group_instance_id
        config = client_config(bootstrap_servers, properties, "consumer", settings)
        kip848 = str(config.get("group.protocol", "")).lower() == "consumer"
        if kip848:
            # KIP-848: the broker assigns partitions (incrementally), and librdkafka
            # refuses a client-side strategy. Its range assignor spreads each topic's
            # partitions over the members; its default (uniform) balances their total,
            # which left one of two workers all of stage one, the other all of stage two.
            del config["partition.assignment.strategy"]
            config.setdefault("group.remote.assignor", "range")
        self._cooperative = kip848 or "cooperative" in str(
            config.get("partition.assignment.strategy")
        )
        self._consumer = Consumer(config)
        self._listener: RebalanceListener | None = None
        # Exceptions raised in rebalance callbacks are swallowed by the C client; keep
        # the first one and re-raise it from consume().
        self._callback_error: BaseException | None = None
        self._on_error = on_error
        self._topic_timeout = topic_timeout
        self._group_id = group_id

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        """Join the group for ``topics``; ``listener`` hears of every partition move.

        Blocks until this consumer's metadata shows every topic with its partitions
        and their leaders, so the first assignment covers them all (librdkafka leaves
        a topic it does not see yet unassigned until its next metadata refresh).
        Raises ``TopicError`` naming the topic when one does not exist within
        ``topic_timeout`` seconds; ``KafkaError`` when no broker answers, or a partition
        has no leader, by then (the supervisor retries those).
        """
        deadline = time.monotonic() + self._topic_timeout
        for topic in topics:
            while (problem := self._unusable(topic, deadline)) is not None:
                if time.monotonic() >= deadline:
                    # A topic without leaders is a cluster in trouble: retried, not fatal.
                    error = RetriableError if "leader" in problem else TopicError
                    raise error(
                        f"topic {topic} is not usable after {self._topic_timeout:g}s: {problem}"
                    )
                time.sleep(_TOPIC_RETRY)
        self._listener = listener
        self._consumer.subscribe(
            list(topics),
            on_assign=self._guard(listener.on_assign, self._assign),
            on_revoke=self._guard(listener.on_revoke),
            on_lost=self._guard(listener.on_lost),
        )

    def consume(self, max_records: int, timeout: float) -> list[SourceRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds.

        Runs rebalance callbacks. Raises what a callback raised, and ``KafkaError``
        subclasses for fatal consumer errors (``FatalError`` naming the group or topic
        for a missing ACL); per-partition errors are logged by the caller's ``on_error``
        and skipped.
        """
        messages = self._consumer.consume(max_records, timeout)
        if self._callback_error is not None:
            raised, self._callback_error = self._callback_error, None
            raise raised
        records: list[SourceRecord] = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(message)
                continue
            translated = translate(error)
            if error.code() == ClientError.GROUP_AUTHORIZATION_FAILED:
                raise FatalError(f"consumer group {self._group_id} (needs Read): {translated}")
            if error.code() == ClientError.TOPIC_AUTHORIZATION_FAILED:
                raise FatalError(f"topic {message.topic()} (needs Read): {translated}")
            if isinstance(translated, FatalError):
                raise translated
            if self._on_error is not None:
                self._on_error(translated)
        return records

    def commit(self, offsets: Offsets, cuts: Cuts = NO_CUTS) -> None:
        """Commit ``offsets`` synchronously, with ``cuts``; raises ``KafkaError`` when it
        fails."""
        if offsets:
            try:
                self._consumer.commit(offsets=topic_partitions(offsets, cuts), asynchronous=False)
            except KafkaException as e:
                raise_for(e.args[0])

    def committed_cuts(
        self, partitions: Sequence[Partition], timeout: float
    ) -> dict[Partition, Cut]:
        """The cut committed with the offset of each of ``partitions`` that has one.

        Waits until their committed offsets are stable: no transaction that sent
        offsets for them is still open. A previous owner paused past its session (a
        stall, not a crash) may still commit one it sent offsets in before the
        rebalance: its changelog records, and its cut, then commit with it, and a
        restore must wait for them. Blocks up to ``timeout`` seconds (the open
        transaction commits, or its timeout aborts it); raises ``KafkaError`` after
        that."""
        cuts = {}
        for tp in self._read_committed(partitions, timeout):
            cut = read_cut(tp.offset, tp.metadata)
            if cut is not None:
                cuts[tp.topic, tp.partition] = cut
        return cuts

    def committed(self, partitions: Sequence[Partition], timeout: float) -> Offsets:
        """The committed offset of each of ``partitions``, once stable (as
        ``committed_cuts``); ``OFFSET_BEGINNING`` for one with none, where the consumer
        starts it (``auto.offset.reset``). Raises ``KafkaError``."""
        return {
            (tp.topic, tp.partition): tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            for tp in self._read_committed(partitions, timeout)
        }

    def _read_committed(
        self, partitions: Sequence[Partition], timeout: float
    ) -> list[TopicPartition]:
        try:
            found = self._consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout)
        except KafkaException as e:
            raise_for(e.args[0])
        for tp in found:
            if tp.error is not None:
                raise_for(tp.error)
        return list(found)

    def pause(self, partitions: Sequence[Partition]) -> None:
        """Stop fetching ``partitions`` (backpressure); consume() still serves rebalances."""
        self._consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: Sequence[Partition]) -> None:
        """Fetch ``partitions`` again after ``pause``."""
        self._consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def seek(self, offsets: Offsets) -> None:
        """Move the read position of assigned partitions back (or forward) to ``offsets``.

        Raises ``KafkaError``, never retriable: records consumed past ``offsets`` would
        be lost to a loop that went on (it reads after them, then commits beyond them);
        the next loop reads from the committed offsets."""
        for tp in topic_partitions(offsets):
            try:
                self._consumer.seek(tp)
            except KafkaException as e:
                raise KafkaError(f"seek {tp.topic}[{tp.partition}] failed: {e}") from None

    def group_metadata(self) -> Any:
        """The consumer group metadata a transactional producer commits offsets with."""
        return self._consumer.consumer_group_metadata()

    def lag(self, partition: Partition) -> int | None:
        """High watermark minus read position, from cached values; None when unknown."""
        tp = TopicPartition(*partition)
        _, high = self._consumer.get_watermark_offsets(tp, cached=True)
        position = self._consumer.position([tp])[0].offset
        if high < 0 or position < 0:
            return None
        return max(high - position, 0)

    def close(self) -> None:
        """Leave the group (running the revoke callback) and release the client."""
        self._consumer.close()

    def _unusable(self, topic: str, deadline: float) -> str | None:
        """Why this consumer's metadata shows ``topic`` unusable; None when it is usable.

        Raises ``KafkaError`` when no broker answers by ``deadline``: the broker is
        away, which the supervisor retries, not a topic layout to fix.
        """
        wait = max(deadline - time.monotonic(), _TOPIC_RETRY)
        try:
            metadata = list_topics(self._consumer, topic, timeout=wait).topics.get(topic)
        except KafkaException as e:
            raise_for(e.args[0])
        if metadata is None:
            return "not in the metadata"
        if metadata.error is not None:
            return str(metadata.error.str())
        if not metadata.partitions:
            return "no partitions"
        for partition in metadata.partitions.values():
            if partition.error is not None or partition.leader < 0:
                return f"partition {partition.id} has no leader"
        return None

    def _assign(self, partitions: list[TopicPartition]) -> None:
        """Take ``partitions`` in on_assign, before the listener hears of them: the
        client assigns them only after the callback, which undoes a pause made in it.
        Cooperative protocols add to the assignment; the eager one replaces it."""
        if self._cooperative:
            self._consumer.incremental_assign(partitions)
        else:
            self._consumer.assign(partitions)

    def _guard(
        self,
        callback: Callable[[Sequence[Partition]], None],
        first: Callable[[list[TopicPartition]], None] | None = None,
    ) -> Callable[..., None]:
        def run(_: Consumer, partitions: list[TopicPartition]) -> None:
            try:
                if first is not None:
                    first(partitions)
                callback([(tp.topic, tp.partition) for tp in partitions])
            except BaseException as e:  # surfaced from consume()
                if self._callback_error is None:
                    self._callback_error = e

        return run


def topic_partitions(offsets: Offsets, cuts: Cuts = NO_CUTS) -> list[TopicPartition]:
    """``offsets`` as the client takes them, each with the cut of the record there, if
    any, in its metadata."""
    positions = []
    for (t, p), o in offsets.items():
        cut = cuts.get((t, p))
        if cut is not None and cut.offset == o:
            text = f"group-worker calls done: {cut.calls} of record {cut.record}"
            positions.append(TopicPartition(t, p, o, metadata=text))
        else:
            positions.append(TopicPartition(t, p, o))
    return positions


def read_cut(offset: int, metadata: str | None) -> Cut | None:
    """The cut a committed ``offset``'s ``metadata`` records; None for none, or any other
    text (another tool's)."""
    found = _CUT.fullmatch(metadata or "")
    if offset < 0 or found is None:
        return None
    return Cut(offset, found[2], int(found[1]))


def fingerprint(value: str | bytes | None) -> str:
    """A record value's length and CRC-32, in hex: what tells a cut record from another
    (records of one producer batch share a timestamp)."""
    data = value.encode() if isinstance(value, str) else value or b""
    return f"{len(data)}-{zlib.crc32(data):08x}"
