"""Record limits: what each output topic accepts, and how large one group may grow.

The broker refuses a record batch larger than its topic's ``max.message.bytes``, and the
producer refuses a record larger than its own ``message.max.bytes``. A refused record
aborts its transaction, and replaying the batch produces it again: a loop that stalls
every group. So the worker reads the real limits at start (``topics.ensure_topics``),
checks every output against them before handing it to the producer, bounds each
group's state so that its state record and the group snapshot of an enriched call
always fit (``GroupBound``), and bounds the warnings one enriched call lists
(``add_warnings``), so that the rest of the call fits the room the bound leaves it.

Pure: no Kafka. ``Limits`` is the one mutable value here: ``update`` takes limits read
again after the broker refused a record as too large (a topic's limit was lowered while
the worker ran).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from worker import codec
from worker.errors import ConfigError, TopicError

__all__ = [
    "DEFAULT_MAX_GROUP_BYTES",
    "ENVELOPE_ROOM",
    "MAX_WARNINGS",
    "PRODUCER_MAX_DEFAULT",
    "WARNINGS_TRUNCATED",
    "GroupBound",
    "Limits",
    "add_warnings",
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
# What an enriched call holds beside the group snapshot's traits, each at most
# max_event_bytes: the call itself (its normalised traits in place of its own), its
# warnings quoting what it sent (``add_warnings``), and the snapshot's id repeating its
# groupId. The fixed part: the fields the worker adds (timestamp, messageId, source,
# the snapshot's counts and times) and the one warning counting those left out. Not
# covered: a call of one record is measured as sent, and a number written back longer
# than sent (1e15 as 1000000000000000.0) can take it past its three copies.
_CALL_COPIES = 3
_FIXED_FIELDS = 8_192
# What a batch envelope's fields (sentAt, context.library...) may add to one of its calls
# beyond max_event_bytes. Libraries hold each call to the limit as they send it, then
# wrap the batch: analytics-java's 32,700-byte call is 32,802 bytes with its envelope's.
ENVELOPE_ROOM: Final = 2_048
# The most warnings one enriched call lists; the rest are counted by one last warning of
# this code. A 32 KB call can hold thousands of spellings of "email" (each a warning) or
# name a 15,000-character address key in each of hundreds of sub-field warnings: listed
# in full, its warnings took megabytes, and the valid call became output_too_large.
MAX_WARNINGS: Final = 100
WARNINGS_TRUNCATED: Final = "warnings_truncated"
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
    # Each record is keyed by the groupId (up to a call's size), counted in its size.
    rooms = {
        enriched: limits.record_bytes(enriched)
        - (_CALL_COPIES + 1) * max_event_bytes
        - ENVELOPE_ROOM
        - _FIXED_FIELDS,
        # The state record repeats the groupId beside the traits.
        state: limits.record_bytes(state) - 2 * max_event_bytes - _FIXED_FIELDS,
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


def add_warnings(
    warnings: list[dict[str, Any]], new: Iterable[dict[str, Any]], max_bytes: int
) -> None:
    """Append ``new`` to a call's ``enrichment.warnings``, within the call's bound.

    In order, as long as the list holds fewer than ``MAX_WARNINGS`` and takes at most
    ``max_bytes`` as JSON (``worker.max_event_bytes``: warnings quote the call, so they
    take no more room than it may); the rest are left out, and one last warning
    ``{"code": "warnings_truncated", "trait": None, "value": <how many>}`` counts them,
    also when a later step appends to a list already cut. Counting warnings by code is
    the caller's, from every warning, listed or not.
    """
    last = warnings[-1] if warnings else None
    if last is not None and last["code"] == WARNINGS_TRUNCATED and type(last["value"]) is int:
        last["value"] += sum(1 for _ in new)
        return
    room = max_bytes - len(codec.encode(warnings))
    left_out = 0
    for warning in new:
        if not left_out:
            size = len(codec.encode(warning)) + 1  # and its comma
            if len(warnings) < MAX_WARNINGS and size <= room:
                warnings.append(warning)
                room -= size
                continue
        left_out += 1
    if left_out:
        warnings.append({"code": WARNINGS_TRUNCATED, "trait": None, "value": left_out})
