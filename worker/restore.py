"""Restoring a partition's state from its compacted topics when the partition is assigned.

``restore_partition`` is the logic, over any ``Restorer``: a durable store replays only
the changelog records after the offsets it stored, a fresh or in-memory one all of
them. ``KafkaRestorer`` reads a topic partition from an offset to its end with
``read_committed``, so the writes of an aborted or still-open transaction are never
restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaException, Message, TopicCollection, TopicPartition
from confluent_kafka import KafkaError as ClientError
from confluent_kafka.admin import AdminClient

from worker.errors import RetriableError, StoreCorrupt, TopicError
from worker.kafka import client_config, list_topics, raise_for, translate
from worker.profile import StateFormatError
from worker.store import Changelog, ChangelogEntry, StateStore

__all__ = [
    "DEPLOYMENT_HEADER",
    "Changelogs",
    "Entry",
    "KafkaRestorer",
    "Restored",
    "Restorer",
    "restore_partition",
]

log = structlog.get_logger("worker.restore")
_T = TypeVar("_T")
Entry = tuple[int, bytes | None, bytes | None, int]  # (offset, key, value, timestamp ms)
# How long a restore retries while the broker's metadata settles before giving up.
_RETRY_SECONDS = 60.0
# consume() returns a full batch, or what it has when its timeout ends: the
# end-of-partition event waits out the timeout, once per changelog read, and most reads
# end on one (a transaction's marker follows the stored offset). So the timeout is short
# (bench.restart, 50,000 groups, 6 partitions: 50 ms took 1.1 s of the restart's
# restores, 5 ms 0.5 s; a rebuild went from 0.6x to 0.8-0.9x a bare consumer).
_BATCH = 10_000
_WAIT = 0.005
# The header that names the deployment (``worker.group_id``) which wrote a membership or
# dedupe record; a restore stops at one another deployment wrote (``KafkaRestorer``).
DEPLOYMENT_HEADER: Final = "deployment"
_PROGRESS_EVERY = 10_000


class Restorer(Protocol):
    """Reads a topic partition, oldest first."""

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        """The partition's records from offset ``start`` to its end, oldest first, as
        ``(offset, key, value, timestamp ms)`` (0 or less: none); from its first record
        when ``start`` is below it."""
        ...

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """The partition's first offset and the offset after its last record."""
        ...

    def topic_ids(self, topics: Sequence[str]) -> list[str]:
        """Each topic's id: unique to one creation of one topic, in one cluster."""
        ...

    def release(self, partition: int) -> None:
        """Let go of a read closed before its end in ``partition`` of any topic (its
        restore is revoked): what it fetched ahead is dropped."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Changelogs:
    """The topics a partition's state is restored from."""

    state: str
    members: str
    dedupe: str

    def by_role(self) -> tuple[tuple[Changelog, str], ...]:
        return (("state", self.state), ("members", self.members), ("dedupe", self.dedupe))

    def source(self, restorer: Restorer) -> bytes:
        """What a store built from these topics is a copy of: each topic's name and id,
        so a copy from another cluster, or from a topic since deleted and created
        again, is told apart."""
        names = [topic for _, topic in self.by_role()]
        ids = restorer.topic_ids(names)
        return "\n".join(f"{name} {id_}" for name, id_ in zip(names, ids, strict=True)).encode()


@dataclass(frozen=True, slots=True)
class Restored:
    """What restoring one partition loaded."""

    # Records read from each changelog, and how many of them were malformed.
    states: int
    members: int
    seen: int  # dedupe ids
    skipped: int
    # Why the partition's local data was not used, so it was rebuilt from the beginning
    # of its changelogs; None when it was used (or there was none).
    rebuilt: str | None = None
    # Whether RocksDB failed on the data during the replay (the reason it was rebuilt).
    failed: bool = False
    # The changelog whose replay ``until`` cut short (a later call goes on from there).
    cut_in: Changelog | None = None

    @property
    def finished(self) -> bool:
        return self.cut_in is None


def restore_partition(
    restorer: Restorer,
    store: StateStore,
    topics: Changelogs,
    partition: int,
    progress: Callable[[int], None] = lambda _: None,
    until: Callable[[], bool] = lambda: False,
    resume: Changelog | None = None,
) -> Restored:
    """Bring ``store``'s copy of ``partition`` up to date with its changelogs; blocks.

    Steps: (1) open the partition's store, whose files are discarded when unreadable or
    copied from other topics (by name and id: another cluster's, or a topic's deleted
    since); (2) check its stored offsets against the topics: an offset
    past a topic's end (the topic was recreated) or before its first record (records
    were deleted under it; the dedupe changelog excepted, whose old records expire
    anyway) means the files cannot be trusted, so they are wiped; (3) replay each
    changelog from its stored offset (``StateStore.apply_changelog``: the newest record
    of a key wins, tombstones delete, a malformed record is logged without its value
    and skipped); RocksDB failing on the files on the way (``StoreCorrupt``) wipes them,
    and the replay starts again from the beginning. ``progress`` is called with the
    number of records read since its last call, every ``_PROGRESS_EVERY`` records and
    at the end. When ``until()`` (asked at those times) is true, the replay stops there,
    with what it read stored, and ``Restored.cut_in`` names the changelog it was in.
    Called again with that as ``resume`` (the partition's store still open), it goes on
    from there, without steps (1) and (2) or the changelogs before it. Raises
    ``KafkaError`` subclasses when the topics cannot be read, and ``TopicError`` when
    the state topic holds records in a format this worker does not read (a newer worker
    wrote them).
    """
    source = b"" if resume else topics.source(restorer)
    rebuilt = None if resume else store.open_partition(partition, source)  # (1)
    failed = False
    try:
        starts = store.stored_offsets(partition)
        stale = None if resume else _stale(restorer, topics, partition, starts)  # (2)
        if stale is None:
            return _replay(
                restorer, store, topics, partition, starts, progress, until, rebuilt, resume
            )
    except StoreCorrupt as e:
        stale, failed = str(e), True
    log.warning("store_partition_stale", partition=partition, reason=stale)
    store.wipe(partition)
    store.open_partition(partition, source or topics.source(restorer))
    restored = _replay(restorer, store, topics, partition, {}, progress, until, stale)
    return replace(restored, failed=failed)


def _replay(
    restorer: Restorer,
    store: StateStore,
    topics: Changelogs,
    partition: int,
    starts: Mapping[Changelog, int],
    progress: Callable[[int], None],
    until: Callable[[], bool],
    rebuilt: str | None,
    resume: Changelog | None = None,
) -> Restored:
    read = {"state": 0, "members": 0, "dedupe": 0}
    skipped = 0
    cut: Changelog | None = None
    roles = topics.by_role()
    if resume is not None:  # the changelogs before it were replayed to their end
        roles = roles[[role for role, _ in roles].index(resume) :]
    for changelog, topic in roles:
        start = starts.get(changelog, 0)
        # Closed here however the apply ends: a reader left open would release its
        # partition whenever it is collected, maybe in the middle of the next read.
        reader = restorer.read(topic, partition, start)
        entries = _Counted(reader, progress, until)
        try:
            skipped += store.apply_changelog(partition, changelog, entries, start)
        except StateFormatError as e:
            where = f"topic {topic} partition {partition} offset {entries.offset}"
            raise TopicError(f"{where}: {e}") from None
        finally:
            if isinstance(reader, Generator):
                reader.close()
        read[changelog] = entries.count
        if entries.cut:
            cut = changelog
            break
    return Restored(read["state"], read["members"], read["dedupe"], skipped, rebuilt, cut_in=cut)


def _stale(
    restorer: Restorer, topics: Changelogs, partition: int, starts: Mapping[Changelog, int]
) -> str | None:
    """Why the stored offsets cannot be replayed from, or ``None`` when they can."""
    for changelog, topic in topics.by_role():
        start = starts.get(changelog)
        if start is None:
            continue
        low, high = restorer.bounds(topic, partition)
        if start > high:
            return f"stored offset {start} is past the end ({high}) of {topic}[{partition}]"
        if start < low and changelog != "dedupe":
            return f"stored offset {start} is before the start ({low}) of {topic}[{partition}]"
    return None


class _Counted:
    """``entries`` passed through, counted, with ``progress`` told every so often; they
    end early (``cut``) when ``until()`` is true at one of those times."""

    def __init__(
        self,
        entries: Iterator[Entry],
        progress: Callable[[int], None],
        until: Callable[[], bool],
    ) -> None:
        self._entries = entries
        self._progress = progress
        self._until = until
        self.count = 0
        self.offset = -1  # of the last record passed on: the one a store refused
        self.cut = False

    def __iter__(self) -> Iterator[ChangelogEntry]:
        unreported = 0
        for offset, key, value, timestamp in self._entries:
            self.offset = offset
            yield offset, key or b"", value, timestamp
            # Told once the record was applied: ``progress`` may end the restore by
            # raising, and the store then keeps every record before it.
            self.count += 1
            unreported += 1
            if unreported == _PROGRESS_EVERY:
                self._progress(unreported)
                unreported = 0
                if self._until():
                    self.cut = True
                    break
        self._progress(unreported)


class KafkaRestorer:
    """A ``Restorer`` over a consumer that is assigned partitions by hand, never commits.

    A record whose ``DEPLOYMENT_HEADER`` names a deployment other than ``group_id``
    stops the read with ``TopicError``: two deployments writing one membership or dedupe
    topic would each take the other's members as known, or its calls as duplicates.
    """

    def __init__(
        self, bootstrap_servers: str, group_id: str, properties: Mapping[str, str]
    ) -> None:
        self._deployment = group_id
        self._own = [(DEPLOYMENT_HEADER, group_id.encode())]
        settings = {
            "group.id": f"{group_id}-restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # Restores read to the end: do not let the broker wait to fill a fetch, and
            # take large ones (one partition is read at a time; librdkafka's default of
            # 1 MiB per fetch gave half the rate of a consumer reading every partition).
            "fetch.wait.max.ms": 10,
            # (bench, 1,000,000 groups: 16 MiB fetches rebuilt at 0.90x a bare consumer
            # with a peak RSS of 416 MB, 12 MiB at 0.83x and 365 MB, 8 MiB at 0.63x.)
            "max.partition.fetch.bytes": 12 << 20,
            "fetch.max.bytes": 12 << 20,
            # One fetch ahead of the records being applied.
            "queued.max.messages.kbytes": 12_288,
            # A start below the first record (deleted by retention) reads from it.
            "auto.offset.reset": "earliest",
            # Just after a broker restart a partition's first fetch can fail, and the
            # next waits this long (librdkafka: 500 ms), in every read of a restore then
            # (bench.chaos, 6 partitions restored as the broker came back: 7.4 s at
            # 500 ms, 1.2 s at 50).
            "fetch.error.backoff.ms": 50,
        }
        self._consumer = Consumer(
            client_config(bootstrap_servers, properties, "consumer", settings)
        )
        self._admin = AdminClient(client_config(bootstrap_servers, properties, "admin"))
        # A read closed before its end (a restore cut into slices) stays assigned, with
        # the records consumed and not passed on: the next read of that partition from
        # where it stopped goes on from them, without a new assignment's fetch (0.3 s).
        self._parked: tuple[str, int, int] | None = None  # topic, partition, next offset
        self._left: list[Message] = []

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        """The partition's records from ``start`` up to its last committed offset."""
        if self._parked == (topic, partition, start):
            self._parked, left = None, self._left
        else:
            self._unpark()
            low, high = self.bounds(topic, partition)
            if high <= max(low, start):  # nothing to read: no need to wait for the end event
                return
            self._consumer.assign([TopicPartition(topic, partition, start)])
            left = []
        messages: list[Message] = []
        passed = 0  # of messages
        try:
            while True:
                messages, left, passed = left or self._consumer.consume(_BATCH, _WAIT), [], 0
                for message in messages:
                    passed += 1
                    error = message.error()
                    if error is None:
                        headers = message.headers()
                        if headers is not None and headers != self._own:
                            self._check_writer(headers, topic, partition, message.offset())
                        start = (message.offset() or 0) + 1
                        yield (start - 1, message.key(), message.value(), message.timestamp()[1])
                    elif error.code() == ClientError._PARTITION_EOF:
                        self._consumer.unassign()
                        return
                    elif not isinstance(translate(error), RetriableError):
                        raise_for(error)  # retriable ones are retried by the client
        except GeneratorExit:  # closed before the end: parked, the rest kept
            self._parked, self._left = (topic, partition, start), messages[passed:]
            raise
        except KafkaException as e:
            self._consumer.unassign()
            raise_for(e.args[0])
        except BaseException:
            self._consumer.unassign()
            raise

    def release(self, partition: int) -> None:
        if self._parked is not None and self._parked[1] == partition:
            self._unpark()

    def _unpark(self) -> None:
        if self._parked is not None:
            self._parked, self._left = None, []
            self._consumer.unassign()

    def _check_writer(self, headers: Any, topic: str, partition: int, offset: int | None) -> None:
        # A consumed record's headers: a list of (name, bytes or None).
        for name, value in headers:
            writer = value.decode(errors="replace") if isinstance(value, bytes) else value
            if name == DEPLOYMENT_HEADER and writer != self._deployment:
                raise TopicError(
                    f"topic {topic} partition {partition} offset {offset}: a record written "
                    f"by deployment {writer!r} (its worker.group_id), not by this one "
                    f"({self._deployment!r})"
                    ": each deployment needs membership and dedupe topics of its own, or it "
                    "takes the other's members as known and its calls as duplicates"
                )

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """Low and high watermarks, retrying while metadata settles. Raises ``TopicError``
        when ``topic`` has no such partition for as long: the input got partitions it has
        not (a broker restarting forgets a topic's partitions for a moment)."""
        tp = TopicPartition(topic, partition)

        def watermarks() -> tuple[int, int]:
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            except KafkaException as e:
                if e.args[0].code() != ClientError._UNKNOWN_PARTITION:
                    raise
                # The client keeps what a broker shutting down told it (the topic, no
                # partitions) until it asks again: only a metadata request for the topic
                # lets a retry see the partition.
                list_topics(self._consumer, topic, timeout=10)
                raise _NoPartition(f"{topic} has no partition {partition} yet") from None
            return low, high

        try:
            return _retrying(watermarks, topic)
        except _NoPartition:
            raise TopicError(
                f"topic {topic} has no partition {partition}, which the input has: a "
                "changelog needs as many partitions as the input (state is co-partitioned)"
            ) from None

    def topic_ids(self, topics: Sequence[str]) -> list[str]:
        """The topics' ids, from the cluster's metadata (retrying while it settles)."""

        def describe() -> list[str]:
            found = self._admin.describe_topics(TopicCollection(list(topics)), request_timeout=10)
            return [str(found[topic].result().topic_id) for topic in topics]

        return _retrying(describe, ", ".join(topics))

    def partitions(self, topic: str) -> list[int]:
        """The partition numbers of ``topic``; raises ``TopicError`` when it does not exist."""
        metadata = list_topics(self._consumer, topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise TopicError(f"no topic {topic}")
        return sorted(metadata.partitions)

    def close(self) -> None:
        self._consumer.close()


class _NoPartition(RetriableError):
    """A partition the broker does not know (yet): retried, then a ``TopicError``."""


def _retrying(call: Callable[[], _T], topic: str) -> _T:
    """``call()``, retried for up to ``_RETRY_SECONDS`` while it fails retriably."""
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            return call()
        except KafkaException as e:
            error = translate(e.args[0])
        except RetriableError as e:
            error = e
        if not isinstance(error, RetriableError) or time.monotonic() > deadline:
            raise error from None
        log.info("restore_retrying", topic=topic, error=str(error))
        time.sleep(0.5)
