"""Group state: merging calls into it (docs/design.md); its records are ``worker.profile``.

Pure: no I/O, no clock (sizes come from ``worker.codec``). A group's state is a function
of the *set* of calls applied to it, in any order, with two exceptions: ``updated_ms``
(processing time) and the bound below. Dedupe is not here: the caller applies each
messageId once (``worker.processor``, with the ids in their own store), and the merge
itself is idempotent for the traits.

Registers. Every top-level trait is a last-writer-wins register stamped with the
``(event_ms, message_id)`` of the call that wrote it; the greater stamp (tuple order)
wins and ``None`` is a value like any other. Equal stamps mean the same call, which
always carries the same content.

``address`` is held as three kinds of register (``AddressStamps``):

- ``null_stamp``: the newest ``address: null``. It clears every sub-field written before it.
- ``object_stamp``: the newest ``address: {...}``, even ``{}``.
- one register per sub-field (``city``, ``postalCode``, custom sub-keys).

The merged ``address`` is ``None`` when ``null_stamp`` is newer than ``object_stamp``,
otherwise the object of the sub-fields written after ``null_stamp``. A sub-field written
before ``null_stamp`` can never show again, so it is dropped; an object written before
it is ignored. The registers held are therefore exactly the visible ones.

Bound. A group's ``size`` is what its traits and their stamps take in a state record
(``group_size``). Given a ``GroupBound``, a trait key new to the group is dropped when it
would take the size past ``bound.new_keys``, and no write (not even of a trait the group
already has) may grow it past ``bound.any_growth``; dropped keys are reported to the
caller. This is the one place where the order of calls matters: which keys get in
depends on which came first. Counting costs an encode per trait, so a merge whose whole
call cannot take the group past the bound (``_growth_bound``) skips it and carries an
upper bound of the size; near the bound the count is exact again, so the same keys drop.

``Applied``, ``GroupState`` and ``AddressStamps`` are made per call, so they are plain
dataclasses, not frozen ones (``worker.events`` says why). Only ``merge_call`` changes a
``GroupState``, and in place only when its caller asks (the store, which can undo it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from worker import codec
from worker.limits import GroupBound

__all__ = [
    "GROUP_STATE_FULL",
    "NO_STAMPS",
    "AddressStamps",
    "Applied",
    "GroupState",
    "MemberKind",
    "Stamp",
    "copy_state",
    "group_size",
    "merge_call",
]

Stamp = tuple[int, str]
"""``(event_ms, message_id)`` of the call that wrote a register."""

MemberKind = Literal["userId", "anonymousId"]

NO_STAMPS: Final[Mapping[str, Stamp]] = {}
"""Shared by every state without stamps of a kind; never mutated (states copy first)."""


GROUP_STATE_FULL: Final = "group_state_full"
"""The warning code of a trait (or address sub-field) the bound left out."""

_UNBOUNDED: Final = GroupBound(2**62, 2**62)
# What a stamp adds to a state record beside its key and messageId: its index in the
# record's stamps (``"k":12345,``, up to 6 digits), and in its calls an event time of up
# to 15 characters (years 1 to 9999, a minus before 1970) with brackets, quotes and commas
# (``[-62135596800000,"m"],``).
_STAMP_BYTES: Final = 29


@dataclass(slots=True)  # per call: not frozen (module docstring)
class Applied:
    """A valid, normalised group call as the merge sees it.

    ``member_id`` is the ``userId`` when present, else the ``anonymousId``. ``traits``
    are normalised: ``address``, when present and not ``None``, is a mapping.
    """

    group_id: str
    message_id: str
    event_ms: int
    member_kind: MemberKind
    member_id: str
    traits: Mapping[str, Any]


@dataclass(slots=True)  # per call: not frozen (module docstring)
class AddressStamps:
    """The registers behind the ``address`` trait (see the module docstring).

    Canonical form: either ``address`` is null (``object_stamp`` is ``None``,
    ``field_stamps`` empty), or it is an object (``object_stamp`` is newer than
    ``null_stamp`` and every field stamp is newer than ``null_stamp``).
    """

    null_stamp: Stamp | None
    object_stamp: Stamp | None
    field_stamps: Mapping[str, Stamp]


@dataclass(slots=True)  # per call: not frozen (module docstring)
class GroupState:
    """One group's merged profile and what the next merge needs.

    Changed only by ``merge_call``: in place when its caller asks (the store's undo rules
    cover it), else into a new state that shares what did not change.
    ``traits`` is the merged traits; ``stamps`` the stamp of each of them but ``address``,
    whose registers are in ``address`` (``None`` when never sent). Not hashable.
    """

    group_id: str
    traits: dict[str, Any]
    stamps: dict[str, Stamp]
    address: AddressStamps | None
    member_count: int
    event_count: int
    first_seen_ms: int
    last_seen_ms: int
    updated_ms: int
    # At least ``group_size``, carried from merge to merge (exactly it when
    # ``size_exact``); -1 until known (a restored state).
    size: int = field(default=-1, compare=False)
    size_exact: bool = field(default=False, compare=False)


def merge_call(
    state: GroupState | None,
    call: Applied,
    *,
    new_member: bool,
    now_ms: int,
    bound: GroupBound = _UNBOUNDED,
    dropped: list[str] | None = None,
    in_place: bool = False,
) -> GroupState:
    """Merge one call, not applied to the group before, into the group's state.

    ``state`` is ``None`` for a group never seen. ``new_member`` says whether the call's
    member is new to the group (the caller asks the membership store); ``now_ms``
    becomes ``updated_ms``. Traits the ``bound`` keeps out (module docstring) are
    appended to ``dropped`` when it is given. ``in_place`` updates ``state`` itself and
    returns it (no copy of its traits per call: the caller can undo it, as the store
    does on rollback); otherwise ``state`` is left as it was. The caller dedupes:
    merging a call again leaves the traits as they are but counts it again in
    ``event_count``. Raises ``ValueError`` when the call is for another group, or its
    ``address`` trait is neither ``None`` nor a mapping (before changing anything).
    """
    if state is not None and state.group_id != call.group_id:
        raise ValueError("merge_call: the call is for another group")
    address = call.traits.get("address")
    if address is not None and not isinstance(address, Mapping):
        raise ValueError(f"address must be a mapping or None, not {type(address).__name__}")
    if state is None:
        first = call.event_ms
        state = GroupState(call.group_id, {}, {}, None, 0, 0, first, first, 0, 0, size_exact=True)
    elif not in_place:
        state = copy_state(state)
    stamp = (call.event_ms, call.message_id)
    traits, stamps = state.traits, state.stamps
    if state.size < 0:
        state.size, state.size_exact = group_size(state), True
    growth = _growth_bound(call.traits, _json_bytes(call.message_id))
    if state.size + growth <= min(bound.new_keys, bound.any_growth):
        # No write can be dropped: apply them all, and carry an upper bound of the size.
        for name, value in call.traits.items():
            if name == "address":
                state.address = _merge_address(state.address, traits, value, stamp)
            else:
                old = stamps.get(name)
                if old is None or stamp > old:
                    traits[name] = value
                    stamps[name] = stamp
        state.size, state.size_exact = state.size + growth, False
    else:
        if not state.size_exact:
            state.size = group_size(state)
        drop = dropped.append if dropped is not None else _ignore
        state.address, state.size = _merge_bounded(
            traits, stamps, state.address, call.traits, stamp, state.size, bound, drop
        )
        state.size_exact = True
    state.member_count += new_member
    state.event_count += 1
    state.first_seen_ms = min(state.first_seen_ms, call.event_ms)
    state.last_seen_ms = max(state.last_seen_ms, call.event_ms)
    state.updated_ms = now_ms
    return state


def copy_state(state: GroupState) -> GroupState:
    """A copy of ``state`` to merge into in place without changing ``state``: its traits
    and stamps are copied, the rest (never written in place) is shared."""
    return replace(state, traits=dict(state.traits), stamps=dict(state.stamps))


def _growth_bound(traits: Mapping[str, Any], mid_bytes: int) -> int:
    """At most what a call with ``traits`` adds to a group's size (``group_size``).

    Each trait adds at most its key twice, its value and a stamp; ``address`` at most
    its sub-keys twice, their values, a stamp per sub-field and two more (null, object).
    All of that is within twice the traits' JSON and a stamp per key at either level.
    """
    address = traits.get("address")
    keys = len(traits) + 2 + (len(address) if isinstance(address, Mapping) else 0)
    return 2 * len(_encode(traits)) + keys * (mid_bytes + _STAMP_BYTES)


def _merge_bounded(
    traits: dict[str, Any],
    stamps: dict[str, Stamp],
    address: AddressStamps | None,
    written: Mapping[str, Any],
    stamp: Stamp,
    size: int,
    bound: GroupBound,
    drop: Callable[[str], None],
) -> tuple[AddressStamps | None, int]:
    """Apply the ``written`` traits in place, each only while the group stays within
    ``bound`` (module docstring); returns the address registers and the exact size."""
    mid_bytes = _json_bytes(stamp[1])
    for name, value in written.items():
        if name == "address":
            address, size = _merge_address_bounded(traits, address, value, stamp, size, bound, drop)
            continue
        old = stamps.get(name)
        if old is None:  # (_json_bytes inlined here: once per trait of every call)
            grown = 2 * len(_encode(name)) + len(_encode(value)) + mid_bytes + _STAMP_BYTES
            limit = bound.new_keys
        elif stamp > old:
            grown = len(_encode(value)) - len(_encode(traits[name])) + mid_bytes
            grown -= len(_encode(old[1]))
            limit = bound.any_growth
        else:
            continue
        if grown > 0 and size + grown > limit:
            drop(name)
            continue
        traits[name] = value
        stamps[name] = stamp
        size += grown
    return address, size


def _merge_address_bounded(
    traits: dict[str, Any],
    regs: AddressStamps | None,
    value: Mapping[str, Any] | None,
    stamp: Stamp,
    size: int,
    bound: GroupBound,
    drop: Callable[[str], None],
) -> tuple[AddressStamps | None, int]:
    """``_merge_bounded`` for the ``address`` trait: an object sub-field by sub-field
    (each its own register), so a new one left out does not keep the call from updating
    those the group has. Returns the registers and the exact size.

    Each sub-field's growth is what it adds to ``_address_bytes``, counted from its own
    key, value and stamps: measuring the whole address again for each sub-field cost
    (sub-fields in the call) x (sub-fields in the group), seconds for one call.
    """
    if not value:
        # None or {}: one write, measured whole (once per call). It adds no sub-field,
        # so it is a new key only to a group without an address.
        shown = traits.get("address")
        before = 0 if regs is None else _address_bytes(shown, regs)
        merged = _merge_address(regs, traits, value, stamp)
        grown = _address_bytes(traits["address"], merged) - before
        if grown > 0 and size + grown > (bound.new_keys if regs is None else bound.any_growth):
            if regs is None:
                del traits["address"]
            else:
                traits["address"] = shown
            drop("address")
            return regs, size
        return merged, size + grown
    if regs is None:
        null, obj, shown = None, None, None
        fields: dict[str, Stamp] = {}
        # The first sub-field in also brings the address itself: its key, twice, and
        # its shown value (``null`` until then).
        opening = 2 * len('"address"') + len(b"null")
    else:
        null, obj, shown = regs.null_stamp, regs.object_stamp, traits.get("address")
        fields, opening = dict(regs.field_stamps), 0
        if null is not None and stamp <= null:
            return regs, size  # cleared after this call was made
    # Copied once per call: the state's dicts may be shared (``copy_state``).
    out: dict[str, Any] = dict(shown) if shown is not None else {}
    shows_null, changed = shown is None, False
    mid_bytes = _json_bytes(stamp[1])
    for key, item in value.items():
        old = fields.get(key)
        write = old is None or stamp > old
        grown = opening - (len(b"null") - len(b"{}") if shows_null else 0)
        if obj is None:
            grown += mid_bytes + _STAMP_BYTES
        elif stamp > obj:
            grown += mid_bytes - _json_bytes(obj[1])
        if write:
            key_bytes = _json_bytes(key)
            if key in out:
                grown += _json_bytes(item) - _json_bytes(out[key])
            else:  # ``"key":item``, after a comma unless it is the first
                grown += key_bytes + 1 + _json_bytes(item) + (1 if out else 0)
            if old is None:
                grown += key_bytes + mid_bytes + _STAMP_BYTES
            else:
                grown += mid_bytes - _json_bytes(old[1])
        if grown > 0 and size + grown > (bound.new_keys if old is None else bound.any_growth):
            drop(f"address.{key}")  # a sub-field named "address" too
            continue
        size += grown
        opening, shows_null, changed = 0, False, True
        if obj is None or stamp > obj:
            obj = stamp
        if write:
            fields[key] = stamp
            out[key] = item
    if not changed:
        return regs, size
    traits["address"] = out
    return AddressStamps(null, obj, fields), size


def group_size(state: GroupState) -> int:
    """The bytes ``state``'s traits and their stamps take in its state record.

    What ``merge_call`` keeps under the bound: the traits (keys twice, with the stamps),
    the stamps' messageIds, and ``address`` with all its registers.
    """
    traits = state.traits
    size = sum(
        2 * _json_bytes(name) + _json_bytes(traits[name]) + _json_bytes(mid) + _STAMP_BYTES
        for name, (_, mid) in state.stamps.items()
    )
    if state.address is not None:
        size += _address_bytes(traits.get("address"), state.address)
    return size


def _address_bytes(shown: Any, regs: AddressStamps) -> int:
    stamps = [s for s in (regs.null_stamp, regs.object_stamp) if s is not None]
    fields = sum(_json_bytes(k) + _json_bytes(mid) for k, (_, mid) in regs.field_stamps.items())
    registers = len(stamps) + len(regs.field_stamps)
    return (
        2 * len('"address"')
        + _json_bytes(shown)
        + fields
        + sum(_json_bytes(mid) for _, mid in stamps)
        + registers * _STAMP_BYTES
    )


_encode = codec.encode


def _json_bytes(value: Any) -> int:
    return len(_encode(value))


def _ignore(_: str) -> None:
    pass


def _merge_address(
    regs: AddressStamps | None, traits: dict[str, Any], value: Any, stamp: Stamp
) -> AddressStamps:
    """Apply one ``address`` write; sets ``traits["address"]`` and returns the registers."""
    if regs is None:
        regs = AddressStamps(None, None, NO_STAMPS)
    null = regs.null_stamp
    shown: Any = traits.get("address")
    if value is None:
        # Not newer than the object: an equal stamp is the same call (a sender's
        # redelivery with other content), and the first content stays, as for traits.
        if (null is not None and stamp <= null) or (
            regs.object_stamp is not None and stamp == regs.object_stamp
        ):
            return regs
        if regs.object_stamp is None or stamp > regs.object_stamp:
            traits["address"] = None
            return AddressStamps(stamp, None, NO_STAMPS)
        fields = {k: s for k, s in regs.field_stamps.items() if s > stamp}
        traits["address"] = {k: shown[k] for k in fields}
        return AddressStamps(stamp, regs.object_stamp, fields or NO_STAMPS)
    if not isinstance(value, Mapping):
        raise ValueError(f"address must be a mapping or None, not {type(value).__name__}")
    if null is not None and stamp <= null:
        return regs  # cleared after this call was made
    obj = regs.object_stamp
    fields = dict(regs.field_stamps)
    out = dict(shown) if shown is not None else {}
    for key, item in value.items():
        old = fields.get(key)
        if old is None or stamp > old:
            fields[key] = stamp
            out[key] = item
    traits["address"] = out
    return AddressStamps(null, stamp if obj is None or stamp > obj else obj, fields or NO_STAMPS)
