"""Restoring a partition's state from its compacted topics when the partition is assigned.

``restore_partition`` is the logic, over any ``Restorer``; ``KafkaRestorer`` reads a
topic partition from the beginning to its end with ``read_committed``, so the writes of
an aborted or still-open transaction are never restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from worker import codec
from worker.dedupe import arrival_value, seen_key
from worker.errors import RetriableError, TopicError
from worker.kafka import client_config, raise_for, translate
from worker.members import membership_from_record
from worker.state import StateFormatError, state_from_record
from worker.store import StateStore

__all__ = ["Changelogs", "KafkaRestorer", "Restored", "Restorer", "restore_partition"]

log = structlog.get_logger("worker.restore")
Entry = tuple[bytes | None, bytes | None]  # (key, value)
_T = TypeVar("_T")
# How long a restore retries while the broker's metadata settles before giving up.
_RETRY_SECONDS = 60.0
# consume() waits for a full batch or its timeout: keep the timeout short, so the
# end-of-partition event of a small partition is seen at once.
_BATCH = 10_000
_PROGRESS_EVERY = 10_000


class Restorer(Protocol):
    """Reads a whole topic partition, oldest first."""

    def read(self, topic: str, partition: int) -> Iterator[Entry]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Restored:
    """What restoring one partition loaded."""

    states: int
    members: int
    seen: int  # dedupe ids
    skipped: int


def restore_partition(
    restorer: Restorer,
    store: StateStore,
    topics: Changelogs,
    partition: int,
    progress: Callable[[int], None] = lambda _: None,
) -> Restored:
    """Load ``partition``'s states, memberships and dedupe ids into ``store``; blocks.

    The newest record of each key wins (the topics are compacted, maybe not yet);
    tombstones delete. A malformed record is logged (without its value) and skipped.
    ``progress`` is called with the number of records read since its last call, every
    ``_PROGRESS_EVERY`` records and at the end. Raises ``KafkaError`` subclasses when the
    topics cannot be read, and ``TopicError`` when the state topic holds records in a
    format this worker does not read (a newer worker wrote them).
    """
    try:
        states, bad_states = _latest(restorer, topics.state, partition, state_from_record, progress)
    except StateFormatError as e:
        raise TopicError(f"topic {topics.state} partition {partition}: {e}") from None
    members, bad_members = _latest(
        restorer, topics.members, partition, membership_from_record, progress
    )
    seen, bad_seen = _latest(restorer, topics.dedupe, partition, arrival_value, progress)
    for state in states.values():
        store.restore(partition, state)
    for key, membership in members.items():
        store.restore_member(partition, key, membership)
    for name, arrival in seen.items():
        try:
            store.restore_seen(partition, seen_key(name), arrival)
        except ValueError as e:
            bad_seen += 1
            log.warning(
                "restore_record_skipped", topic=topics.dedupe, partition=partition, error=str(e)
            )
    return Restored(len(states), len(members), len(seen), bad_states + bad_members + bad_seen)


@dataclass(frozen=True, slots=True)
class Changelogs:
    """The topics a partition's state is restored from."""

    state: str
    members: str
    dedupe: str


def _latest(
    restorer: Restorer,
    topic: str,
    partition: int,
    parse: Callable[[Any], _T],
    progress: Callable[[int], None],
) -> tuple[dict[str, _T], int]:
    """The newest parsed value per key of a partition, and how many records were malformed."""
    latest: dict[str, _T] = {}
    skipped = 0
    read = 0
    for key, value in restorer.read(topic, partition):
        read += 1
        if read == _PROGRESS_EVERY:
            progress(read)
            read = 0
        name = (key or b"").decode(errors="replace")
        if value is None:
            latest.pop(name, None)
            continue
        try:
            latest[name] = parse(codec.decode(value))
        except StateFormatError:
            raise
        except (ValueError, TypeError, AttributeError) as e:
            skipped += 1
            log.warning("restore_record_skipped", topic=topic, partition=partition, error=str(e))
    progress(read)
    return latest, skipped


class KafkaRestorer:
    """A ``Restorer`` over a consumer that is assigned partitions by hand, never commits."""

    def __init__(
        self, bootstrap_servers: str, group_id: str, properties: Mapping[str, str]
    ) -> None:
        settings = {
            "group.id": f"{group_id}-restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # Restores read to the end: do not let the broker wait to fill a fetch.
            "fetch.wait.max.ms": 10,
        }
        self._consumer = Consumer(
            client_config(bootstrap_servers, properties, "consumer", settings)
        )

    def read(self, topic: str, partition: int) -> Iterator[Entry]:
        """Every record of the partition up to its last committed offset, oldest first."""
        tp = TopicPartition(topic, partition, OFFSET_BEGINNING)
        low, high = self._watermarks(tp)
        if high <= low:  # empty: no need to wait for the end-of-partition event
            return
        self._consumer.assign([tp])
        try:
            while True:
                for message in self._consumer.consume(_BATCH, 0.05):
                    error = message.error()
                    if error is None:
                        yield message.key(), message.value()
                    elif error.code() == ClientError._PARTITION_EOF:
                        return
                    elif not isinstance(translate(error), RetriableError):
                        raise_for(error)  # retriable ones are retried by the client
        except KafkaException as e:
            raise_for(e.args[0])
        finally:
            self._consumer.unassign()

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """Low and high (last committed) offsets, retrying while metadata settles."""
        deadline = time.monotonic() + _RETRY_SECONDS
        while True:
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=10)
                return low, high
            except KafkaException as e:
                error = translate(e.args[0])
                if not isinstance(error, RetriableError) or time.monotonic() > deadline:
                    raise error from None
                log.info(
                    "restore_retrying", topic=tp.topic, partition=tp.partition, error=str(error)
                )
                time.sleep(0.5)

    def partitions(self, topic: str) -> list[int]:
        """The partition numbers of ``topic``; raises ``TopicError`` when it does not exist."""
        metadata = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise TopicError(f"no topic {topic}")
        return sorted(metadata.partitions)

    def close(self) -> None:
        self._consumer.close()
