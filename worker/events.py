"""Value objects that flow through the worker, and the shape of a consumed record.

``SourceRecord`` stands in for ``confluent_kafka.Message``, which Python code cannot
construct: the real message satisfies it, and tests build ``events.Record`` instead.

Positions and outcomes are made per call: plain slotted dataclasses, not frozen ones,
whose ``__init__`` sets each field through ``object.__setattr__`` (0.9 against 0.18 µs
for six fields). Nothing mutates them once made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "DeadLetter",
    "Duplicate",
    "Enriched",
    "Outcome",
    "OutcomeKind",
    "Position",
    "Record",
    "Skipped",
    "SourceRecord",
]

OutcomeKind = Literal["enriched", "duplicate", "skipped", "dead_letter"]


# A record's headers as confluent-kafka's stubs type them (a consumed one has a list).
Headers = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]]


class SourceRecord(Protocol):
    """The part of a consumed Kafka message the pipeline reads."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> str | bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> Headers | None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A plain ``SourceRecord`` for tests and for the offline ``normalise`` command."""

    topic_: str
    partition_: int
    offset_: int
    value_: bytes | None
    key_: bytes | None = None
    timestamp_ms: int = 0
    headers_: Headers | None = None

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_ms)  # TIMESTAMP_CREATE_TIME

    def headers(self) -> Headers | None:
        return self.headers_


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Position:
    """Where a call came from: its record, and its index inside a batch envelope."""

    topic: str
    partition: int
    offset: int
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }
        if self.index is not None:
            out["index"] = self.index
        return out


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Enriched:
    """A valid group call, normalised; ``call`` is the enriched record's value."""

    group_id: str
    call: dict[str, Any]
    event_time_ms: int
    # The member: its userId when usable, else its anonymousId.
    member_kind: Literal["userId", "anonymousId"]
    member_id: str
    warnings: tuple[str, ...] = ()  # warning codes, for the metrics
    # ``call`` as JSON, exactly as read (a re-keyed call: stage one encoded it), when
    # it has no ``group`` key: the enriched value is these bytes with the group
    # appended, not the call encoded again. Changing ``call`` in any other way than
    # setting its ``group`` means dropping these bytes (a new ``Enriched`` without them).
    encoded: bytes | None = None
    # The call's own ``timestamp`` when it is there but no valid ISO-8601 time (the
    # event time fell back to the next source): for the metrics and a log line.
    invalid_timestamp: Any = None
    kind: Literal["enriched"] = "enriched"


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Duplicate:
    """A group call whose messageId its group already applied within the dedupe window."""

    group_id: str
    message_id: str
    kind: Literal["duplicate"] = "duplicate"


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Skipped:
    """A call of another type (track, identify...), counted and dropped."""

    call_type: str
    kind: Literal["skipped"] = "skipped"


@dataclass(slots=True)  # per call: not frozen (module docstring)
class DeadLetter:
    """A call that cannot be processed; ``letter`` is the dead-letter record's value."""

    reason: str
    key: bytes | None
    letter: dict[str, Any]
    kind: Literal["dead_letter"] = "dead_letter"


Outcome = Enriched | Duplicate | Skipped | DeadLetter
