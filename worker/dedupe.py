"""Dedupe by arrival: which calls a group already applied, and the records that say so.

A call is a duplicate when its group already applied its messageId within the dedupe
window of *arrival* time: the Kafka timestamp of the input record that brought it
(carried through the repartition topic in a header, ``pipeline.forward_headers``).
Event time plays no part: a call a phone queued offline for days, then retried, is
still caught, and a group's busy day needs no bound. Segment dedupes the same way.

The applied ids live in the store (``StateStore.seen``), one entry per (groupId,
messageId), and in the dedupe changelog topic: key ``["<groupId>","<messageId>"]`` (the
compact JSON text, unambiguous), value the arrival time in ms, stamped when written,
so the topic's ``retention.ms`` (window plus a margin) expires them a window after
their writing, however old the backlog the worker was catching up.

Pure: no Kafka, no clock.
"""

from __future__ import annotations

from typing import Any

from worker import codec
from worker.events import SourceRecord
from worker.times import MAX_MS

__all__ = [
    "arrival_ms",
    "arrival_or_now",
    "arrival_value",
    "is_duplicate",
    "record_timestamp",
    "seen_key",
    "seen_record_key",
]

# confluent-kafka's TIMESTAMP_NOT_AVAILABLE.
_NO_TIMESTAMP = 0
# A timestamp further ahead of the worker's clock is no clock skew but a producer's bug
# or a hostile one: taken as the arrival, it would keep its ids from ever expiring and
# set every retry of them a window apart.
_AHEAD_MS = 86_400_000


def arrival_ms(record: SourceRecord, now_ms: int) -> int:
    """When ``record`` arrived: its ``record_timestamp``, else (none, or one more than a
    day ahead of ``now_ms``) ``now_ms``."""
    return arrival_or_now(record_timestamp(record), now_ms)


def arrival_or_now(ms: int | None, now_ms: int) -> int:
    """``ms``, or ``now_ms`` when there is none or it is more than a day ahead of it."""
    return now_ms if ms is None or ms > now_ms + _AHEAD_MS else ms


def record_timestamp(record: SourceRecord) -> int | None:
    """``record``'s Kafka timestamp; ``None`` when it has none, or one no time can be
    written for (below 1, or past ``MAX_MS``, year 9999: a producer writing microseconds)."""
    kind, ms = record.timestamp()
    return ms if kind != _NO_TIMESTAMP and 0 < ms <= MAX_MS else None


def is_duplicate(applied_ms: int | None, arrival: int, window_ms: int) -> bool:
    """Whether a call arriving at ``arrival`` repeats one applied at ``applied_ms``.

    Within the window either way: records of one partition need not be in timestamp
    order (several producers, clock skew).
    """
    return applied_ms is not None and abs(arrival - applied_ms) < window_ms


def seen_record_key(group_id: str, message_id: str) -> str:
    """The dedupe-topic key of an applied call, as text."""
    return codec.encode([group_id, message_id]).decode()


def seen_key(text: str) -> tuple[str, str]:
    """``(groupId, messageId)`` from a dedupe-topic key (as text); raises ``ValueError``
    when it is not one the worker wrote."""
    try:
        group_id, message_id = codec.decode(text)
    except (codec.DecodeError, TypeError, ValueError):
        raise ValueError("dedupe record: the key is not [groupId, messageId]") from None
    if not (isinstance(group_id, str) and isinstance(message_id, str)):
        raise ValueError("dedupe record: the key is not [groupId, messageId]")
    return group_id, message_id


def arrival_value(value: Any) -> int:
    """The arrival time of a dedupe-topic value (decoded from JSON); raises ``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("dedupe record: the value is not an arrival time in ms")
    return value
