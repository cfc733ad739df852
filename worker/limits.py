"""Record limits: what each output topic accepts, and how large one group may grow.

The broker refuses a record batch larger than its topic's ``max.message.bytes``, and the
producer refuses a record larger than its own ``message.max.bytes``. A refused record
aborts its transaction, and replaying the batch produces it again: a loop that stalls
every group. So the worker reads the real limits at start (``topics.ensure_topics``),
checks every output against them before handing it to the producer, and bounds each
group's state so that its state record and the group snapshot of an enriched call
always fit (``GroupBound``).

Pure: no Kafka. ``Limits`` is the one mutable value here: ``update`` takes limits read
again after the broker refused a record as too large (a topic's limit was lowered while
the worker ran).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.errors import ConfigError, TopicError

__all__ = [
    "DEFAULT_MAX_GROUP_BYTES",
    "PRODUCER_MAX_DEFAULT",
    "GroupBound",
    "Limits",
    "group_bound",
]

# librdkafka's default message.max.bytes: the producer refuses larger records itself.
PRODUCER_MAX_DEFAULT = 1_000_000
# The default bound of one group's traits when the topics allow more: a group profile
# of 256 KiB is already far beyond any real account's traits, and every enriched call
# of the group carries it.
DEFAULT_MAX_GROUP_BYTES = 262_144
# Room for the record batch and record headers (61 + ~40 bytes) and for a compression
# codec that cannot shrink the value (lz4 adds about 0.4% to incompressible data).
_BATCH_OVERHEAD = 512
_COMPRESSION_SLACK = 0.99
# What an enriched call holds beside the group snapshot: the call itself (at most
# max_event_bytes), its normalised traits and the warnings quoting original values.
_CALL_COPIES = 3
_FIXED_FIELDS = 8_192
# Below this a group could not hold a handful of traits: the topics are misconfigured.
_MIN_GROUP_BYTES = 4_096

Headers = Sequence[tuple[str, bytes]]


class Limits:
    """The largest record (key + value + headers, in bytes) each topic accepts.

    Built from each topic's ``max.message.bytes`` and the producer's
    ``message.max.bytes``; a topic not listed gets the producer's limit.
    """

    def __init__(
        self, max_message_bytes: Mapping[str, int], producer_max: int = PRODUCER_MAX_DEFAULT
    ) -> None:
        # The producer's limit counts the record's share of its request.
        self._producer_room = producer_max - _BATCH_OVERHEAD
        self._by_topic = {t: self._usable(n) for t, n in max_message_bytes.items()}

    def record_bytes(self, topic: str) -> int:
        """The most bytes of key, value and headers one record of ``topic`` may have."""
        return self._by_topic.get(topic, self._producer_room)

    def fits(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> bool:
        """Whether the broker and the producer will accept this record."""
        size = len(value) + (len(key) if key else 0)
        if headers:
            size += sum(len(k) + len(v) for k, v in headers)
        return size <= self.record_bytes(topic)

    def batch_bytes(self) -> int:
        """The most bytes one producer batch may hold so that every topic takes it."""
        return min(self._by_topic.values(), default=self._producer_room)

    def update(self, max_message_bytes: Mapping[str, int]) -> None:
        """Take topics' ``max.message.bytes`` read again; other topics keep their limit."""
        self._by_topic.update((t, self._usable(n)) for t, n in max_message_bytes.items())

    def _usable(self, max_message_bytes: int) -> int:
        topic_room = int(max_message_bytes * _COMPRESSION_SLACK) - _BATCH_OVERHEAD
        return min(topic_room, self._producer_room)


@dataclass(frozen=True, slots=True)
class GroupBound:
    """How large one group's traits (with their merge stamps) may grow, in bytes.

    ``new_keys``: a call may add trait keys only while the group stays within it
    (``worker.max_group_bytes``). ``any_growth``: not even an update of a trait the group
    already has may take it past this one, the most that still fits the output topics.
    """

    new_keys: int
    any_growth: int


def group_bound(
    limits: Limits, enriched: str, state: str, max_event_bytes: int, max_group_bytes: int
) -> GroupBound:
    """The bound of one group's state for these topics and settings.

    ``max_group_bytes`` 0 takes the largest that fits, at most ``DEFAULT_MAX_GROUP_BYTES``.
    Raises ``ConfigError`` when an explicit value does not fit the topics, and
    ``TopicError`` when the topics leave no useful room at all.
    """
    rooms = {
        enriched: limits.record_bytes(enriched) - _CALL_COPIES * max_event_bytes - _FIXED_FIELDS,
        # The state record repeats the groupId (up to a call's size) beside the traits.
        state: limits.record_bytes(state) - max_event_bytes - _FIXED_FIELDS,
    }
    topic, room = min(rooms.items(), key=lambda item: item[1])
    if room < _MIN_GROUP_BYTES:
        raise TopicError(
            f"topic {topic} takes records of at most {limits.record_bytes(topic)} bytes: too "
            f"small for group state beside calls of up to {max_event_bytes} bytes "
            "(raise its max.message.bytes or lower worker.max_event_bytes)"
        )
    if max_group_bytes == 0:
        return GroupBound(min(room, DEFAULT_MAX_GROUP_BYTES), room)
    if max_group_bytes > room:
        raise ConfigError(
            f"config: worker.max_group_bytes must be at most {room} so that group state fits "
            f"topic {topic} (records up to {limits.record_bytes(topic)} bytes), "
            f"got {max_group_bytes}"
        )
    return GroupBound(max_group_bytes, room)
