"""Tests for worker.state and worker.profile: merges, records, memberships and their keys."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import codec
from worker import state as state_module
from worker.limits import GroupBound, Limits, group_bound
from worker.members import (
    Membership,
    membership_from_record,
    membership_key,
    membership_record,
    merge_membership,
)
from worker.profile import StateFormatError, group_snapshot, state_from_record, state_record
from worker.state import AddressStamps, Applied, GroupState, MemberKind, group_size, merge_call
from worker.times import MAX_MS, MIN_MS

T0 = 1_424_730_535_111  # 2015-02-23T22:28:55.111Z
WINDOW = 86_400_000
NOW = 1_700_000_000_000

States = dict[str, GroupState]
Members = dict[str, Membership]


def call(
    mid: str = "m1",
    ms: int = T0,
    traits: Mapping[str, Any] | None = None,
    *,
    group: str = "g1",
    kind: MemberKind = "userId",
    member: str = "u1",
) -> Applied:
    """A call; times are given relative to T0 by callers that pass small numbers."""
    return Applied(group, mid, ms, kind, member, traits if traits is not None else {})


def merged(state: GroupState | None, c: Applied) -> GroupState:
    """Merge a call that is known not to be a duplicate."""
    return merge_call(state, c, new_member=False, now_ms=NOW)


def fold(
    calls: Iterable[Applied],
    states: States | None = None,
    members: Members | None = None,
    seen: set[tuple[str, str]] | None = None,
    *,
    in_place: bool = False,
) -> tuple[States, Members]:
    """Apply calls in order, as the processor does: each messageId once per group (``seen``,
    updated in place when given), with a membership dict for new_member; ``in_place``
    merges into the states themselves, else into copies."""
    states, members = dict(states or {}), dict(members or {})
    seen = set() if seen is None else seen
    for now, c in enumerate(calls):
        if (c.group_id, c.message_id) in seen:
            continue
        seen.add((c.group_id, c.message_id))
        key = membership_key(c.group_id, c.member_kind, c.member_id)
        state = merge_call(
            states.get(c.group_id),
            c,
            new_member=key not in members,
            now_ms=NOW + now,
            in_place=in_place,
        )
        states[c.group_id] = state
        membership = merge_membership(members.get(key), c)
        if membership is not None:
            members[key] = membership
    return states, members


def timeless(states: States) -> States:
    """States with processing time removed: the part that is a function of the call set."""
    return {g: replace(s, updated_ms=0) for g, s in states.items()}


def traits_after(calls: Iterable[Applied]) -> Mapping[str, Any]:
    return fold(calls)[0]["g1"].traits


# --- Registers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param(
            call("m2", T0, {"name": "A"}), call("m1", T0 + 1, {"name": "B"}), "B", id="later-wins"
        ),
        pytest.param(
            call("m1", T0, {"name": "A"}), call("m2", T0, {"name": "B"}), "B", id="tie-mid-wins"
        ),
        pytest.param(
            call("m1", T0, {"name": "A"}), call("m2", T0 + 1, {"name": None}), None, id="null-wins"
        ),
        pytest.param(
            call("m1", T0 + 1, {"name": "A"}), call("m2", T0, {"name": None}), "A", id="old-null"
        ),
        pytest.param(
            call("m1", T0, {"name": None}), call("m2", T0 + 1, {"name": "A"}), "A", id="after-null"
        ),
        pytest.param(
            call("m1", T0, {"name": "A"}), call("m2", T0 + 1, {"plan": "p"}), "A", id="left-out"
        ),
    ],
)
def test_trait_is_last_writer_wins_by_time_then_message_id(
    first: Applied, second: Applied, expected: Any
) -> None:
    """A trait holds the value of the call with the greatest (event time, messageId)."""
    assert traits_after([first, second])["name"] == expected
    assert traits_after([second, first])["name"] == expected


def test_traits_merge_key_by_key() -> None:
    """Each trait is its own register: a call changes only the traits it carries."""
    calls = [
        call("m1", T0, {"name": "A", "plan": "free", "x": [1]}),
        call("m2", T0 + 5, {"plan": "pro", "y": None}),
        call("m3", T0 + 2, {"name": "C", "plan": "old"}),
    ]
    for order in itertools.permutations(calls):
        assert traits_after(order) == {"name": "C", "plan": "pro", "x": [1], "y": None}


def addr(*writes: tuple[int, Any]) -> list[Applied]:
    return [call(f"m{i}", T0 + ms, {"address": a}) for i, (ms, a) in enumerate(writes)]


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        pytest.param(addr((1, {"city": "X"}), (2, {"street": "S"})), {"city": "X", "street": "S"}),
        pytest.param(addr((1, {"city": "X"}), (2, {"city": "Y"})), {"city": "Y"}, id="sub-lww"),
        pytest.param(addr((1, {"city": "X"}), (2, {"city": None})), {"city": None}, id="sub-null"),
        pytest.param(addr((1, None)), None, id="only-null"),
        pytest.param(addr((1, {})), {}, id="only-empty"),
        pytest.param(addr((1, {"city": "X"}), (2, None)), None, id="null-newest"),
        pytest.param(addr((1, None), (2, {"city": "X"})), {"city": "X"}, id="null-oldest"),
        pytest.param(
            addr((1, {"city": "X", "street": "S"}), (2, None), (3, {"city": "Y"})),
            {"city": "Y"},
            id="null-clears-older-sub-fields",
        ),
        pytest.param(
            addr((3, {"city": "X"}), (2, None), (1, {"street": "S"})),
            {"city": "X"},
            id="object-before-null-ignored",
        ),
        pytest.param(addr((1, None), (2, {})), {}, id="empty-after-null"),
        pytest.param(addr((1, {}), (2, None)), None, id="null-after-empty"),
        pytest.param(addr((1, {"city": "X"}), (2, None), (3, {})), {}, id="empty-hides-cleared"),
    ],
)
def test_address_sub_fields_and_null_merge_in_any_order(
    calls: list[Applied], expected: Any
) -> None:
    """Address sub-fields are registers; address null clears those written before it."""
    for order in itertools.permutations(calls):
        states, _ = fold(order)
        assert states["g1"].traits["address"] == expected
        assert timeless(states) == timeless(fold(calls)[0])


def test_address_that_is_not_an_object_raises() -> None:
    """merge_call refuses an address that is neither None nor a mapping."""
    with pytest.raises(ValueError, match="address"):
        merge_call(None, call(traits={"address": "x"}), new_member=True, now_ms=1)


def test_call_for_another_group_raises() -> None:
    """merge_call refuses to merge a call into another group's state."""
    with pytest.raises(ValueError, match="another group"):
        merged(merged(None, call()), call("m2", group="g2"))


# --- Counters, times, dedupe --------------------------------------------------------------


def test_first_and_last_seen_are_min_and_max_event_time() -> None:
    """firstSeen and lastSeen are the least and greatest event times, whatever the order."""
    states, _ = fold([call("m1", T0 + 5), call("m2", T0 + 2), call("m3", T0 + 9)])
    assert (states["g1"].first_seen_ms, states["g1"].last_seen_ms) == (T0 + 2, T0 + 9)


def test_counts_and_processing_time() -> None:
    """eventCount counts calls, memberCount new members, and updated_ms is now_ms."""
    state = merge_call(None, call("m1"), new_member=True, now_ms=7)
    state = merge_call(state, call("m2"), new_member=False, now_ms=9)
    state = merge_call(state, call("m3", member="u2"), new_member=True, now_ms=8)
    assert state is not None
    assert (state.event_count, state.member_count, state.updated_ms) == (3, 2, 8)


# --- Records ------------------------------------------------------------------------------


def rich_state() -> GroupState:
    calls = [
        call("m1", T0, {"name": "Initech", "plan": "free", "address": {"city": "A", "x": 1}}),
        call("m2", T0 + 10, {"plan": None, "address": None}),
        call("m3", T0 + 20, {"address": {"street": "S"}, "total billed": 830}, member="u2"),
    ]
    return fold(calls)[0]["g1"]


def test_group_snapshot_shape() -> None:
    """The enriched call's group object carries id, traits, counts and RFC 3339 times."""
    assert group_snapshot(rich_state()) == {
        "id": "g1",
        "traits": {
            "name": "Initech",
            "plan": None,
            "address": {"street": "S"},
            "total billed": 830,
        },
        "memberCount": 2,
        "eventCount": 3,
        "firstSeenAt": "2015-02-23T22:28:55.111Z",
        "lastSeenAt": "2015-02-23T22:28:55.131Z",
    }


def test_state_record_shape() -> None:
    """The state record is the profile plus its format, merge stamps and address registers."""
    record = state_record(rich_state())
    assert record["groupId"] == "g1"
    assert record["updatedAt"] == "2023-11-14T22:13:20.002Z"
    assert record["merge"] == {
        "format": 3,
        "stamps": {"name": 0, "plan": 1, "total billed": 2},
        "address": {"null": 1, "object": 2, "fields": {"street": 2}},
        "calls": [[T0, "m1"], [T0 + 10, "m2"], [T0 + 20, "m3"]],
    }


def stamps_in_place(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as formats 1 and 2 wrote it: each stamp in place of its index."""
    merge = record["merge"]
    calls = merge.pop("calls")
    merge["format"] = 2
    merge["stamps"] = {k: calls[i] for k, i in merge["stamps"].items()}
    if "address" in merge:
        address = merge["address"]
        for register in ("null", "object"):
            if register in address:
                address[register] = calls[address[register]]
        address["fields"] = {k: calls[i] for k, i in address["fields"].items()}
    return record


def test_a_format_2_record_is_read() -> None:
    """A record of the previous format (stamps in place) restores the same state."""
    record = stamps_in_place(codec.decode(codec.encode(state_record(rich_state()))))
    assert record["merge"]["stamps"]["plan"] == [T0 + 10, "m2"]
    assert state_from_record(record) == rich_state()


def test_outputs_do_not_share_writable_dicts_with_the_state() -> None:
    """Changing a snapshot or record's traits leaves the state as it was."""
    state = rich_state()
    before = state_record(state)
    for out in (group_snapshot(state)["traits"], state_record(state)["traits"]):
        out["name"] = "changed"
        out["address"]["street"] = "changed"
    assert state_record(state) == before


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(merged(None, call()), id="no-traits"),
        pytest.param(merged(None, call(traits={"address": None})), id="address-null"),
        pytest.param(merged(None, call(traits={"address": {}})), id="address-empty"),
        pytest.param(rich_state(), id="rich"),
    ],
)
def test_record_round_trips(state: GroupState) -> None:
    """state_from_record(state_record(s)) == s, also through JSON."""
    assert state_from_record(state_record(state)) == state
    assert state_from_record(codec.decode(codec.encode(state_record(state)))) == state


def test_restored_state_shares_stamps_like_a_merged_one() -> None:
    """Restoring interns stamps: traits written by one call share one stamp tuple."""
    state = state_from_record(codec.decode(codec.encode(state_record(rich_state()))))
    assert state.address is not None
    assert state.stamps["total billed"] is state.address.field_stamps["street"]


def test_a_format_1_record_is_read_without_its_ids() -> None:
    """A record of the previous format (recent ids, no format) restores the same state."""
    record = stamps_in_place(codec.decode(codec.encode(state_record(rich_state()))))
    del record["merge"]["format"]
    record["merge"]["recent"] = {"m1": T0, "m2": T0 + 10}
    record["merge"]["recentFrom"] = T0
    assert state_from_record(record) == rich_state()


def test_a_record_in_a_newer_format_is_refused() -> None:
    """A state record in a newer worker's format raises StateFormatError."""
    with pytest.raises(StateFormatError, match="format 4"):
        state_from_record(_broken("merge.format", 4))


@pytest.mark.parametrize("version", ["3", None, True, 0, -4, 3.0, {"a": 1}, [4]])
def test_a_format_that_is_no_format_is_malformed(version: Any) -> None:
    """Only a whole number past this worker's is a newer format; any other value makes
    the record malformed (skipped where it is read), not a reason to stop the worker."""
    with pytest.raises(ValueError, match=r"merge\.format") as raised:
        state_from_record(_broken("merge.format", version))
    assert not isinstance(raised.value, StateFormatError)


_DELETE = object()


def _broken(path: str, value: Any) -> dict[str, Any]:
    """A valid record of rich_state() with the value at a dotted path replaced (or removed)."""
    record: dict[str, Any] = codec.decode(codec.encode(state_record(rich_state())))
    *parents, last = path.split(".")
    target: Any = record
    for key in parents:
        target = target[key]
    index: str | int = int(last) if isinstance(target, list) else last
    if value is _DELETE:
        del target[index]
    else:
        target[index] = value
    return record


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("groupId", _DELETE),
        ("groupId", 7),
        ("traits", []),
        ("memberCount", -1),
        ("memberCount", True),
        ("eventCount", "3"),
        ("eventCount", 2**64 - 1),  # the next call's count would not encode
        ("memberCount", 2**53),
        ("firstSeenAt", "yesterday"),
        ("firstSeenAt", "2030-01-01T00:00:00.000Z"),
        ("updatedAt", None),
        ("merge", None),
        ("merge.stamps", _DELETE),
        ("merge.stamps.name", [T0, "m1"]),
        ("merge.stamps.name", 3),
        ("merge.stamps.name", -1),
        ("merge.stamps.name", True),
        ("merge.stamps.extra", 0),
        ("merge.calls", _DELETE),
        ("merge.calls", {}),
        ("merge.calls.0", [T0]),
        ("merge.calls.0", [T0, 5]),
        ("merge.calls.0", ["1", "m1"]),
        ("merge.address", _DELETE),
        ("merge.address.fields", _DELETE),
        ("merge.address.null", 2),
        ("merge.address.null", 7),
        ("merge.address.object", _DELETE),
        ("merge.address.fields.city", 0),
        ("traits.address", None),
        ("traits.address", "street"),
        ("traits.name", _DELETE),
    ],
)
def test_malformed_state_record_raises(path: str, value: Any) -> None:
    """A state record with a missing, mistyped or contradictory part raises ValueError."""
    with pytest.raises(ValueError, match="record"):
        state_from_record(_broken(path, value))


# --- Memberships --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(50, None, id="inside"),
        pytest.param(10, None, id="at-first"),
        pytest.param(90, None, id="at-last"),
        pytest.param(95, (10, 95), id="last-moves"),
        pytest.param(5, (5, 90), id="first-moves"),
    ],
)
def test_membership_emitted_only_when_its_times_move(
    at: int, expected: tuple[int, int] | None
) -> None:
    """merge_membership returns a membership only when first or last seen moves."""
    current = Membership("g1", "userId", "u1", 10, 90)
    out = merge_membership(current, call(ms=at))
    assert (None if out is None else (out.first_seen_ms, out.last_seen_ms)) == expected


def test_new_member_is_emitted() -> None:
    """A member with no stored membership gets one, first and last seen at the call."""
    new = merge_membership(None, call(ms=T0, kind="anonymousId", member="a1"))
    assert new == Membership("g1", "anonymousId", "a1", T0, T0)


def test_membership_of_another_member_raises() -> None:
    """merge_membership refuses a membership that is not the call's member's."""
    with pytest.raises(ValueError, match="member"):
        merge_membership(Membership("g1", "userId", "u2", 1, 2), call())


@pytest.mark.parametrize("kind", ["userId", "anonymousId"])
def test_membership_record_round_trips(kind: MemberKind) -> None:
    """A membership record names the member by its kind and reads back exactly."""
    m = Membership("g1", kind, "u1", T0, T0 + 1)
    record = membership_record(m)
    assert record == {
        "groupId": "g1",
        kind: "u1",
        "firstSeenAt": "2015-02-23T22:28:55.111Z",
        "lastSeenAt": "2015-02-23T22:28:55.112Z",
    }
    assert membership_from_record(codec.decode(codec.encode(record))) == m


_MEMBER = {"groupId": "g", "userId": "u", "firstSeenAt": "2015-02-23", "lastSeenAt": "2015-02-24"}


@pytest.mark.parametrize(
    "record",
    [
        {k: v for k, v in _MEMBER.items() if k != "userId"},
        _MEMBER | {"anonymousId": "a"},
        _MEMBER | {"userId": 5},
        _MEMBER | {"groupId": None},
        _MEMBER | {"firstSeenAt": "2015-02-25"},
        {k: v for k, v in _MEMBER.items() if k != "lastSeenAt"},
    ],
)
def test_malformed_membership_record_raises(record: dict[str, Any]) -> None:
    """A membership record without exactly one identity, or with bad fields, raises."""
    with pytest.raises(ValueError, match="record"):
        membership_from_record(record)


_TRICKY_IDS = ['a"b', "a,b", "[a]", "a\\", "\\", '\\"', "é🙂", "a\nb\x00\x1f", ""]


@pytest.mark.parametrize("tricky", _TRICKY_IDS)
def test_membership_key_is_json_of_the_three_parts(tricky: str) -> None:
    """The key parses as the JSON array [groupId, kind, memberId] for tricky ids."""
    key = membership_key(tricky, "userId", tricky + "x")
    assert json.loads(key) == [tricky, "userId", tricky + "x"]


def test_membership_keys_are_distinct_where_naive_joins_collide() -> None:
    """Ids that a separator-joined key would confuse give different keys."""
    parts = [("a,b", "c"), ("a", "b,c"), ('a"', "b"), ("a", '"b'), ("a\\", "b"), ("a", "\\b")]
    keys = {membership_key(g, "userId", m) for g, m in parts}
    keys.add(membership_key("a", "anonymousId", "b"))
    keys.add(membership_key("a", "userId", "b"))
    assert len(keys) == len(parts) + 2


@given(st.text(), st.sampled_from(["userId", "anonymousId"]), st.text())
def test_membership_key_parses_back(group: str, kind: MemberKind, member: str) -> None:
    """Any ids give a key that parses back to them (so keys are unambiguous)."""
    assert json.loads(membership_key(group, kind, member)) == [group, kind, member]


@given(st.text(st.characters(exclude_categories=["Cs"])), st.text(st.characters(codec="utf-8")))
def test_membership_key_is_compact_json(group: str, member: str) -> None:
    """The key is exactly compact JSON with unescaped unicode."""
    expected = json.dumps([group, "userId", member], ensure_ascii=False, separators=(",", ":"))
    assert membership_key(group, "userId", member) == expected


# --- Properties ---------------------------------------------------------------------------

_VALUES = st.none() | st.sampled_from(["a", "b", ""]) | st.integers(0, 3)
_ADDRESS = st.none() | st.dictionaries(st.sampled_from(["city", "street", "zip"]), _VALUES)
_TRAITS = st.fixed_dictionaries(
    {}, optional={"name": _VALUES, "plan": _VALUES, "employees": _VALUES, "address": _ADDRESS}
)
# Ties on event time are likely, so messageIds decide; the whole range fits the window.
_EVENT_MS = st.integers(0, 2).map(lambda d: T0 + d) | st.integers(T0, T0 + WINDOW)


@st.composite
def call_sets(draw: st.DrawFn) -> list[Applied]:
    """Distinct calls (one content per messageId) over a few groups and members."""
    return [
        Applied(
            group_id=draw(st.sampled_from(["g1", "g2"])),
            message_id=f"m{i}",
            event_ms=draw(_EVENT_MS),
            member_kind=draw(st.sampled_from(["userId", "anonymousId"])),
            member_id=draw(st.sampled_from(["u1", "u2"])),
            traits=draw(_TRAITS),
        )
        for i in range(draw(st.integers(1, 8)))
    ]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Applied], list[Applied]]:
    """A call set, and the same calls delivered in some order with some of them repeated."""
    calls = draw(call_sets())
    repeats = draw(st.lists(st.sampled_from(calls), max_size=6))
    return calls, draw(st.permutations(calls + repeats))


@given(deliveries())
def test_merge_is_order_independent_and_idempotent(
    case: tuple[list[Applied], list[Applied]],
) -> None:
    """Any order of the calls, with any repeated, gives the same states and memberships,
    and the same state records (as a reader decodes them)."""
    calls, delivered = case
    states, members = fold(calls)
    again_states, again_members = fold(delivered)
    assert timeless(again_states) == timeless(states)
    assert again_members == members

    def records(states: States) -> dict[str, Any]:
        return {g: codec.decode(codec.encode(state_record(s))) for g, s in timeless(states).items()}

    assert records(again_states) == records(states)


@given(deliveries())
def test_a_merge_in_place_equals_a_merge_into_a_copy_which_leaves_the_state_alone(
    case: tuple[list[Applied], list[Applied]],
) -> None:
    """Merging in place (as the processor does, in the store's cache) gives the same
    states; merging into a copy leaves every state it started from as it was."""
    calls, delivered = case
    cut = len(delivered) // 2
    seen: set[tuple[str, str]] = set()
    start, members = fold(delivered[:cut], seen=seen)
    before = {g: codec.encode(state_record(s)) for g, s in start.items()}
    copied, _ = fold(delivered[cut:], start, members, set(seen))
    assert {g: codec.encode(state_record(s)) for g, s in start.items()} == before
    in_place, _ = fold(delivered[cut:], start, members, set(seen), in_place=True)
    assert in_place == copied
    assert timeless(in_place) == timeless(fold(calls)[0])


@given(call_sets(), st.data())
def test_merging_a_call_twice_equals_once(calls: list[Applied], data: st.DataObject) -> None:
    """Merging an applied call again (its dedupe id forgotten) changes no trait, only counts."""
    states, _ = fold(calls)
    c = data.draw(st.sampled_from(calls))
    state = states[c.group_id]
    again = merged(state, c)
    assert (again.traits, again.stamps, again.address) == (
        state.traits,
        state.stamps,
        state.address,
    )
    assert again.event_count == state.event_count + 1


@given(deliveries(), st.data())
def test_restoring_from_records_then_merging_equals_merging_everything(
    case: tuple[list[Applied], list[Applied]], data: st.DataObject
) -> None:
    """Records written after any prefix restore states that merge the rest identically."""
    calls, delivered = case
    cut = data.draw(st.integers(0, len(delivered)))
    seen: set[tuple[str, str]] = set()  # the dedupe ids, restored from their own topic
    states, members = fold(delivered[:cut], seen=seen)
    restored = {
        g: state_from_record(codec.decode(codec.encode(state_record(s)))) for g, s in states.items()
    }
    assert restored == states
    restored_members = {
        k: membership_from_record(codec.decode(codec.encode(membership_record(m))))
        for k, m in members.items()
    }
    final_states, final_members = fold(delivered[cut:], restored, restored_members, seen)
    expected_states, expected_members = fold(calls)
    assert timeless(final_states) == timeless(expected_states)
    assert final_members == expected_members


def test_address_stamps_are_canonical_after_null() -> None:
    """Once address null is newest the registers hold only its stamp."""
    state = fold(addr((1, {"city": "X"}), (2, None)))[0]["g1"]
    assert state.address == AddressStamps((T0 + 2, "m1"), None, {})


def test_address_null_and_object_under_one_stamp_keep_the_first_and_restore() -> None:
    """A sender redelivering one call (same messageId and time) with an address object,
    then null, or the reverse, keeps the first, as for any trait, and its record reads
    back; a record where the two stamps are equal (older workers wrote it) reads too."""
    for first, second in (({"city": "Oslo"}, None), (None, {"city": "Oslo"})):
        state = merged(
            merged(None, call("m1", T0, {"address": first})), call("m1", T0, {"address": second})
        )
        assert state.traits["address"] == first
        assert state_from_record(state_record(state)) == state
    record = state_record(merged(None, call("m1", T0, {"address": {}})))
    record["merge"]["address"]["null"] = record["merge"]["address"]["object"]
    state = state_from_record(record)
    assert state.address is not None
    assert state.address.null_stamp == state.address.object_stamp
    later = merged(state, call("m2", T0 + 1, {"address": {"city": "Bergen"}}))
    assert later.traits["address"] == {"city": "Bergen"}


# --- The bound on one group's state ------------------------------------------------------


def bounded(
    state: GroupState | None, c: Applied, bound: GroupBound, *, count: bool = False
) -> tuple[GroupState, list[str]]:
    """Merge ``c`` under ``bound``; ``count`` makes the merge count every write (as it
    does near the bound) however far from the bound the group is."""
    dropped: list[str] = []
    with (
        mock.patch.object(state_module, "_growth_bound", return_value=2**63)
        if count
        else (contextlib.nullcontext())
    ):
        out = merge_call(state, c, new_member=False, now_ms=NOW, bound=bound, dropped=dropped)
    return out, dropped


def test_a_full_group_drops_new_keys_and_still_updates_the_ones_it_has() -> None:
    """Past the bound a call's new trait keys are dropped and reported; known traits update."""
    bound = GroupBound(new_keys=2_000, any_growth=4_000)
    state: GroupState | None = None
    for n in range(50):
        state, _ = bounded(state, call(f"m{n}", T0 + n, {f"k{n}": "x" * 40}), bound)
    assert state is not None
    kept = set(state.traits)
    assert 10 < len(kept) < 50
    assert state.size == group_size(state) <= 2_000
    # "fresh" needs more room than any one more k-trait, even after k0's shrinks.
    state, dropped = bounded(state, call("late", T0 + 99, {"k0": "new", "fresh": "y" * 100}), bound)
    assert dropped == ["fresh"]
    assert state.traits["k0"] == "new"
    assert "fresh" not in state.traits
    assert state.size <= 2_000


def test_no_write_grows_a_group_past_the_hard_bound() -> None:
    """Even an update of a trait the group has is dropped when it would pass any_growth."""
    bound = GroupBound(new_keys=1_000, any_growth=1_500)
    state, _ = bounded(None, call("m1", T0, {"a": "", "b": ""}), bound)
    state, dropped = bounded(state, call("m2", T0 + 1, {"a": "x" * 1_200}), bound)
    assert dropped == []
    state, dropped = bounded(state, call("m3", T0 + 2, {"b": "x" * 1_200}), bound)
    assert dropped == ["b"]
    assert state.traits["b"] == ""
    assert group_size(state) <= 1_500


def test_address_sub_keys_count_as_new_keys() -> None:
    """New address sub-fields past the bound are left out one by one, and the same call
    still updates the sub-fields the group has."""
    bound = GroupBound(new_keys=600, any_growth=10_000)
    state, _ = bounded(None, call("m1", T0, {"address": {"city": "Paris"}}), bound)
    many = {f"line{n}": "x" * 30 for n in range(20)}
    update = call("m2", T0 + 1, {"address": {**many, "city": "Nice"}})
    state, dropped = bounded(state, update, bound)
    kept = [k for k in many if k in state.traits["address"]]
    assert kept
    assert dropped == [f"address.{k}" for k in many if k not in kept]
    assert state.traits["address"] == {"city": "Nice", **{k: many[k] for k in kept}}
    assert group_size(state) <= bound.new_keys < group_size(state) + 100
    assert state_from_record(state_record(state)) == state
    state, dropped = bounded(state, call("m3", T0 + 2, {"address": {"city": "Lyon"}}), bound)
    assert (dropped, state.traits["address"]["city"]) == ([], "Lyon")


def test_an_address_sub_field_named_address_is_reported_as_one() -> None:
    """A sub-field left out at the bound is named address.<sub-key>, even one called
    "address": reported as "address", it read as if the whole address was left out."""
    bound = GroupBound(new_keys=300, any_growth=300)
    sent = {"address": {"city": "Bergen", "address": "y" * 300}}
    state, dropped = bounded(None, call("m1", T0, sent), bound)
    assert dropped == ["address.address"]
    assert state.traits["address"] == {"city": "Bergen"}


@pytest.mark.parametrize("ms", [MAX_MS - 10**6, MIN_MS])
def test_a_group_filled_to_its_bound_fits_the_state_topic(ms: int) -> None:
    """The bound the topics give keeps the state record within the state topic's limit,
    keyed by a groupId as long as a call allows, with thousands of traits stamped with
    the longest times written (years 9999 and 1) by distinct calls."""
    # The enriched topic and the producer roomier: the state topic sets the hard bound.
    limits = Limits({"enriched": 4_000_000, "state": 1_048_588}, 4_000_000)
    bound = group_bound(limits, "enriched", "state", 32_768, 0)
    group = "g" * 32_700
    state: GroupState | None = None
    for n in itertools.count():  # a new small trait per call, until one is left out
        state, dropped = bounded(state, call(f"{n}", ms + n, {f"{n:x}": 0}, group=group), bound)
        if dropped:
            break
    assert state is not None
    assert len(state.traits) > 5_000
    for n in range(len(state.traits)):  # then each grows, until the hard bound holds it
        state, _ = bounded(
            state, call(f"u{n}", ms + 10**5 + n, {f"{n:x}": "x" * 150}, group=group), bound
        )
    record = codec.encode(state_record(state, "group-worker"))
    assert limits.fits("state", group.encode(), record)


def test_address_sub_keys_at_the_bound_cost_the_same_whatever_the_address_holds() -> None:
    """Merging new address sub-fields into a group at its bound encodes as many values
    for a group with 1,000 sub-fields as for one with 10."""
    roomy = GroupBound(new_keys=10**6, any_growth=10**6)
    encodes: dict[int, int] = {}
    for held in (10, 1_000):
        address = {f"a{n}": "x" for n in range(held)}
        state, _ = bounded(None, call("m1", T0, {"address": address}), roomy, count=True)
        full = replace(roomy, new_keys=state.size)
        sent = {f"b{n}": "y" for n in range(100)}
        with mock.patch.object(state_module, "_encode", wraps=codec.encode) as encode:
            state, dropped = bounded(state, call("m2", T0 + 1, {"address": sent}), full)
        assert dropped == [f"address.{k}" for k in sent]
        assert state.traits["address"] == address
        encodes[held] = encode.call_count
    assert encodes[10] == encodes[1_000]


def test_group_size_bounds_the_state_record() -> None:
    """A state record is its group size plus a small fixed part (and its dedupe ids)."""
    state = fold(addr((1, {"city": "X"}), (2, {"zip": "75001"})))[0]["g1"]
    state = merged(state, call("m9", T0 + 3, {"name": "\u0001" * 10, "plan": ["a", {"b": 1}]}))
    record = state_record(state)
    assert len(codec.encode(record)) <= group_size(state) + 400


@given(deliveries())
def test_size_carried_by_merges_equals_group_size(
    case: tuple[list[Applied], list[Applied]],
) -> None:
    """The size each merge carries forward is at least what group_size computes from
    scratch, and exactly it when the merge says so."""
    _, delivered = case
    states, _ = fold(delivered)
    for state in states.values():
        assert state.size >= group_size(state)
        restored = state_from_record(codec.decode(codec.encode(state_record(state))))
        assert group_size(restored) == group_size(state)
        exact = merge_call(
            state, call("late", T0, group=state.group_id), new_member=False, now_ms=NOW, bound=TIGHT
        )
        assert exact.size_exact
        assert exact.size == group_size(exact)


# Tight enough that the merges above must count every write.
TIGHT = GroupBound(new_keys=1, any_growth=10**6)


@given(deliveries(), st.integers(0, 3_000), st.integers(0, 3_000))
def test_a_bound_drops_the_same_traits_whether_or_not_a_merge_counts_them(
    case: tuple[list[Applied], list[Applied]], new_keys: int, extra: int
) -> None:
    """Merges that skip counting (no write could pass the bound) decide as counting ones."""
    _, delivered = case
    bound = GroupBound(new_keys=new_keys, any_growth=new_keys + extra)
    counted: dict[str, tuple[GroupState, list[str]]] = {}
    skipped: dict[str, tuple[GroupState, list[str]]] = {}
    for c in delivered:
        for states, always in ((counted, True), (skipped, False)):
            before = states.get(c.group_id)
            state, dropped = bounded(before[0] if before else None, c, bound, count=always)
            states[c.group_id] = state, dropped
            assert group_size(state) <= state.size
        assert counted[c.group_id] == skipped[c.group_id]
        assert group_size(counted[c.group_id][0]) <= bound.any_growth
