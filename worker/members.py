"""Group memberships: when each member was first and last seen in a group.

Pure, like ``worker.state``. A membership record is emitted when a member is first seen
in a group, and whenever its first or last seen moves (calls can arrive out of order).

A ``Membership`` is made per call, so it is a plain dataclass, not a frozen one
(``worker.events`` says why). Nothing mutates one once made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker import codec
from worker.profile import record_field, record_time
from worker.state import Applied, MemberKind
from worker.times import format_time

__all__ = [
    "Membership",
    "membership_from_record",
    "membership_key",
    "membership_record",
    "merge_membership",
]


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Membership:
    """One member of one group: when the group first and last saw it (event time)."""

    group_id: str
    member_kind: MemberKind
    member_id: str
    first_seen_ms: int
    last_seen_ms: int


def merge_membership(current: Membership | None, call: Applied) -> Membership | None:
    """The membership after ``call``, or ``None`` when nothing moved (nothing to emit).

    ``current`` is the stored membership of the call's member in the call's group, or
    ``None`` when the member is new. Raises ``ValueError`` when it is another member's.
    """
    if current is None:
        return Membership(
            call.group_id, call.member_kind, call.member_id, call.event_ms, call.event_ms
        )
    if (current.group_id, current.member_kind, current.member_id) != (
        call.group_id,
        call.member_kind,
        call.member_id,
    ):
        raise ValueError("merge_membership: the membership is not the call's member's")
    if current.first_seen_ms <= call.event_ms <= current.last_seen_ms:
        return None
    return Membership(
        current.group_id,
        current.member_kind,
        current.member_id,
        min(current.first_seen_ms, call.event_ms),
        max(current.last_seen_ms, call.event_ms),
    )


def membership_record(m: Membership) -> dict[str, Any]:
    """The members-topic record: ``{"groupId", "userId"|"anonymousId", "firstSeenAt", ...}``."""
    return {
        "groupId": m.group_id,
        m.member_kind: m.member_id,
        "firstSeenAt": format_time(m.first_seen_ms),
        "lastSeenAt": format_time(m.last_seen_ms),
    }


def membership_from_record(record: Mapping[str, Any], *, key: str | None = None) -> Membership:
    """Read a membership record back; raises ``ValueError`` when it is malformed, or
    names another group or member than ``key`` (its members-topic key, when given)."""
    kinds = [k for k in ("userId", "anonymousId") if k in record]
    if len(kinds) != 1:
        raise ValueError("membership record: needs exactly one of userId and anonymousId")
    kind: MemberKind = "userId" if kinds[0] == "userId" else "anonymousId"
    first, last = record_time(record, "firstSeenAt"), record_time(record, "lastSeenAt")
    if first > last:
        raise ValueError("membership record: firstSeenAt is after lastSeenAt")
    group_id, member_id = record_field(record, "groupId", str), record_field(record, kind, str)
    if key is not None and membership_key(group_id, kind, member_id) != key:
        # Restored under its key, it would be taken for another member's.
        raise ValueError("membership record: its group and member are not its key's")
    return Membership(group_id, kind, member_id, first, last)


def membership_key(group_id: str, member_kind: MemberKind, member_id: str) -> str:
    """The members-topic key: the compact JSON text ``["<groupId>","<kind>","<memberId>"]``.

    Unambiguous (JSON strings are escaped), readable, and distinct for a userId and an
    anonymousId that happen to be equal.
    """
    return codec.encode([group_id, member_kind, member_id]).decode()
