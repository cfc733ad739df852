"""A group's records out: the snapshot in an enriched call and the state record.

Pure, like ``worker.state``, whose ``GroupState`` these are made from. The state record
is the group profile downstream reads and the changelog a restore reads back
(``state_from_record`` returns exactly the state ``state_record`` was made from).

The ``merge`` member of a state record (``state_record``) is what the next merge needs::

    {"format": 3,
     "deployment": "group-worker",                     # worker.group_id of the writer
     "stamps": {trait: i, ...},                        # every top-level trait but address
     "address": {"null": i, "object": i, "fields": {sub: i, ...}},
     "calls": [[event_ms, messageId], ...]}            # the stamps, each once

Each ``i`` indexes ``calls``: the traits a call wrote share its stamp, written once
(a call usually writes several traits, and a messageId is the longest part of a stamp).
``address`` is there only when the trait is; ``null`` and ``object`` only when set.
Formats 1 and 2 wrote each stamp in place, ``[event_ms, messageId]``; format 1 (no
``format``) also carried the group's recent messageIds (``recent``, ``recentFrom``).
Both are still read (format 1's ids ignored). Any other format raises
``StateFormatError``: the record was written by a worker this one cannot follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from worker.state import NO_STAMPS, AddressStamps, GroupState, Stamp
from worker.times import format_time, parse_iso_time

__all__ = [
    "FORMAT",
    "StateFormatError",
    "check_format",
    "group_snapshot",
    "record_field",
    "record_time",
    "state_from_record",
    "state_record",
]

# The state record format written; ``state_from_record`` reads this one, 2 and 1.
FORMAT: Final = 3
_READABLE_FORMATS: Final = (1, 2, FORMAT)
# The largest count a record may hold: exact in JavaScript, and far from the 64 bits
# JSON writers take (no group counts that far).
_MAX_COUNT: Final = 2**53 - 1


def group_snapshot(state: GroupState) -> dict[str, Any]:
    """The ``group`` object of an enriched call (docs/design.md, "Records").

    Trait values are shared with the state: the caller encodes them, never mutates them.
    """
    return {
        "id": state.group_id,
        "traits": _traits_out(state.traits),
        "memberCount": state.member_count,
        "eventCount": state.event_count,
        "firstSeenAt": format_time(state.first_seen_ms),
        "lastSeenAt": format_time(state.last_seen_ms),
    }


def state_record(state: GroupState, deployment: str = "") -> dict[str, Any]:
    """The state-topic record of a group: its profile plus ``merge`` (module docstring),
    which names the ``deployment`` (``worker.group_id``) that wrote it, when given.

    JSON-ready (dicts, lists, strings, ints); ``state_from_record`` reads it back exactly.
    """
    # Each distinct stamp once, oldest first, so the record is a function of the state
    # alone (not of the order its traits were merged in).
    regs = state.address
    written = set(state.stamps.values())
    if regs is not None:
        written.update(s for s in (regs.null_stamp, regs.object_stamp) if s is not None)
        written.update(regs.field_stamps.values())
    calls = sorted(written)
    index = {s: i for i, s in enumerate(calls)}
    merge: dict[str, Any] = {"format": FORMAT}
    if deployment:
        merge["deployment"] = deployment
    merge["stamps"] = {k: index[s] for k, s in state.stamps.items()}
    if regs is not None:
        address: dict[str, Any] = {}
        if regs.null_stamp is not None:
            address["null"] = index[regs.null_stamp]
        if regs.object_stamp is not None:
            address["object"] = index[regs.object_stamp]
        address["fields"] = {k: index[s] for k, s in regs.field_stamps.items()}
        merge["address"] = address
    merge["calls"] = [[ms, mid] for ms, mid in calls]
    return {
        "groupId": state.group_id,
        "traits": _traits_out(state.traits),
        "memberCount": state.member_count,
        "eventCount": state.event_count,
        "firstSeenAt": format_time(state.first_seen_ms),
        "lastSeenAt": format_time(state.last_seen_ms),
        "updatedAt": format_time(state.updated_ms),
        "merge": merge,
    }


class StateFormatError(ValueError):
    """A state record this worker must not read: in a format it does not know (a newer
    worker wrote it), or written by another deployment."""


def check_format(record: Any, deployment: str = "") -> None:
    """Raise ``StateFormatError`` when ``record`` (a decoded state record) says it is in a
    format this worker does not read, or was written by a deployment other than
    ``deployment`` (when given; a record naming none passes). Anything else passes: a
    malformed record is found by ``state_from_record``."""
    merge = record.get("merge") if isinstance(record, dict) else None
    if not isinstance(merge, dict):
        return
    _check_newer(merge.get("format", 1))
    writer = merge.get("deployment")
    if deployment and writer is not None and writer != deployment:
        raise StateFormatError(
            f"a group profile written by deployment {writer!r} (its worker.group_id), not "
            f"by this one ({deployment!r}): each deployment needs state and members topics "
            "of its own, or it applies the other's calls again"
        )


def _check_version(version: Any) -> None:
    if type(version) is not int or version not in _READABLE_FORMATS:
        _check_newer(version)
        raise ValueError(f"state record: merge.format {version!r} is not a format")


def _check_newer(version: Any) -> None:
    """Raise ``StateFormatError`` for the format of a newer worker: a whole number past
    this one's. Any other value is no format at all (a malformed record, skipped)."""
    if type(version) is int and version > FORMAT:
        raise StateFormatError(
            f"state record format {version!r}: this worker reads formats "
            f"{', '.join(map(str, _READABLE_FORMATS))}"
        )


def state_from_record(record: Mapping[str, Any], *, group_id: str | None = None) -> GroupState:
    """Read a state record (as decoded from JSON) back into the state it was made from.

    ``group_id``, when given, is the record's key. Raises ``StateFormatError`` for a
    format it does not read, and ``ValueError`` naming the first problem when the record
    is malformed or its parts disagree (a trait without a stamp, an address contradicting
    its registers, a groupId other than its key's).
    """
    merge = record_field(record, "merge", dict)
    version = merge.get("format", 1)
    _check_version(version)
    if group_id is not None and record.get("groupId") != group_id:
        # Restored under its key, it would be merged with another group's calls.
        raise ValueError("state record: its groupId is not its key's")
    # One tuple per distinct stamp: a restored state takes the memory of a merged one.
    interned: dict[Stamp, Stamp] = {}

    # Restores read millions of stamps: the valid case costs no message and no call.
    def stamp_of(value: Any, where: str) -> Stamp:
        if type(value) is list and len(value) == 2:
            ms, mid = value
            if (type(ms) is int or _is_int(ms)) and isinstance(mid, str):
                key = (ms, mid)
                return interned.setdefault(key, key)
        raise ValueError(f"state record: {where} is not [event_ms, messageId]")

    # Format 3 refers to its stamps by their index in "calls"; formats 1 and 2 hold them.
    calls: list[Stamp] | None = None
    if version == FORMAT:
        raw_calls = record_field(merge, "calls", list)
        calls = [stamp_of(v, f"merge.calls[{i}]") for i, v in enumerate(raw_calls)]

    def stamp(value: Any, where: str) -> Stamp:
        if calls is None:
            return stamp_of(value, where)
        if type(value) is int and 0 <= value < len(calls):
            return calls[value]
        raise ValueError(f"state record: {where} is not an index of merge.calls")

    def stamps_of(raw: dict[str, Any], where: str) -> dict[str, Stamp]:
        if calls is not None:
            n = len(calls)
            if all(type(v) is int and 0 <= v < n for v in raw.values()):
                return {k: calls[v] for k, v in raw.items()}
        return {k: stamp(v, f"{where}[{k!r}]") for k, v in raw.items()}

    # Built by insertion: decoded dicts are presized larger than merged ones.
    traits = {k: v for k, v in record_field(record, "traits", dict).items()}
    stamps = stamps_of(record_field(merge, "stamps", dict), "merge.stamps")
    if set(traits) - {"address"} != set(stamps):
        raise ValueError("state record: traits and merge.stamps name different traits")
    address: AddressStamps | None = None
    if ("address" in merge) != ("address" in traits):
        raise ValueError("state record: traits.address and merge.address disagree")
    if "address" in merge:
        raw = record_field(merge, "address", dict)
        null = stamp(raw["null"], "merge.address.null") if "null" in raw else None
        obj = stamp(raw["object"], "merge.address.object") if "object" in raw else None
        fields = stamps_of(record_field(raw, "fields", dict), "merge.address.fields")
        address = AddressStamps(null, obj, fields or NO_STAMPS)
        shown = traits["address"]
        if isinstance(shown, dict):
            shown = traits["address"] = {k: v for k, v in shown.items()}
        if not _canonical(address, shown):
            raise ValueError("state record: traits.address contradicts merge.address")
    first, last = record_time(record, "firstSeenAt"), record_time(record, "lastSeenAt")
    if first > last:
        raise ValueError("state record: firstSeenAt is after lastSeenAt")
    return GroupState(
        group_id=record_field(record, "groupId", str),
        traits=traits,
        stamps=stamps,
        address=address,
        member_count=_count(record, "memberCount"),
        event_count=_count(record, "eventCount"),
        first_seen_ms=first,
        last_seen_ms=last,
        updated_ms=record_time(record, "updatedAt"),
    )


def _canonical(regs: AddressStamps, shown: Any) -> bool:
    """Whether the registers are in canonical form and agree with the shown address."""
    null, obj, fields = regs.null_stamp, regs.object_stamp, regs.field_stamps
    if obj is None:
        return null is not None and not fields and shown is None
    return (
        # null == obj: written by workers before 2026-12 for a null and an object with one
        # stamp; read as written (the next merge cannot tell it from null < obj).
        (null is None or null <= obj)
        and all((null is None or null < s) and s <= obj for s in fields.values())
        and isinstance(shown, dict)
        and shown.keys() == fields.keys()
    )


def _traits_out(traits: Mapping[str, Any]) -> dict[str, Any]:
    # Copies the two levels a merge writes, so a caller cannot change the state.
    out = dict(traits)
    address = out.get("address")
    if address is not None:
        out["address"] = dict(address)
    return out


def record_field(record: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    """``record[key]`` when it is a ``kind``; raises ``ValueError`` naming the key otherwise."""
    value = record.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"record: {key} is missing or not a {kind.__name__}")
    return value


def _int(value: Any, where: str) -> int:
    if not _is_int(value):
        raise ValueError(f"record: {where} is not an integer")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(record: Mapping[str, Any], key: str) -> int:
    value = _int(record.get(key), key)
    if value < 0:
        raise ValueError(f"record: {key} is negative")
    if value > _MAX_COUNT:  # a forged one: counting on would overflow the record's JSON
        raise ValueError(f"record: {key} is over 2^53 - 1")
    return value


def record_time(record: Mapping[str, Any], key: str) -> int:
    """``record[key]`` as epoch ms; raises ``ValueError`` unless it is an ISO-8601 time."""
    ms = parse_iso_time(record.get(key))
    if ms is None:
        raise ValueError(f"record: {key} is missing or not an ISO-8601 time")
    return ms
