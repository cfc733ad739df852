"""Tests for bench.peer's job functions (the Quix Streams peer), without Quix Streams:
a dict stands in for one group's ``State``."""

from __future__ import annotations

from typing import Any

from bench.peer import enrich, is_group_call, lenient_loads, merge

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


class DictState:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def exists(self, key: str) -> bool:
        return key in self.data


def _call(message_id: str, when: str, traits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    call = {
        "type": "group",
        "groupId": "g1",
        "userId": "u1",
        "messageId": message_id,
        "timestamp": when,
        "traits": traits,
    }
    return call | extra


def test_bad_and_other_calls_are_filtered_out() -> None:
    assert lenient_loads(b"{not json") is None
    assert lenient_loads(b'{"a": 1}') == {"a": 1}
    assert not is_group_call(None)
    assert not is_group_call(_call("m", "2024-01-01T00:00:00Z", {}, type="track"))
    assert not is_group_call(_call("m", "2024-01-01T00:00:00Z", {}, groupId=" "))
    assert not is_group_call(_call("m", "2024-01-01T00:00:00Z", {}, userId=None))
    assert not is_group_call(_call("m", "2024-01-01T00:00:00Z", {}) | {"traits": []})
    assert is_group_call(_call("m", "2024-01-01T00:00:00Z", {}, type=" Group "))
    assert is_group_call(_call("m", "2024-01-01T00:00:00Z", {}, userId=None, anonymousId="a"))


def test_enrich_normalises_traits_and_the_event_time() -> None:
    call = _call("m1", "2024-01-01T01:00:00+01:00", {"Created At": 0, "E-mail": "x@y.io"})
    out = enrich(call, b"g1", T0, None)
    assert out["timestamp"] == "2024-01-01T00:00:00.000Z"
    assert out["traits"] == {"createdAt": "1970-01-01T00:00:00.000Z", "email": "x@y.io"}
    assert out["enrichment"] == {"warnings": []}


def test_merge_keeps_the_newest_value_per_trait_counts_and_drops_repeats() -> None:
    state = DictState()
    newer = enrich(_call("m2", "2024-01-02T00:00:00Z", {"name": "New"}), b"g1", T0, None)
    older = enrich(
        _call("m1", "2024-01-01T00:00:00Z", {"name": "Old", "plan": "pro"}, userId="u2"),
        b"g1",
        T0,
        None,
    )
    merge(newer, state)
    out = merge(older, state)
    assert out is not None
    assert out["group"] == {
        "id": "g1",
        "traits": {"name": "New", "plan": "pro"},
        "memberCount": 2,
        "eventCount": 2,
        "firstSeenAt": "2024-01-01T00:00:00.000Z",
        "lastSeenAt": "2024-01-02T00:00:00.000Z",
    }
    again = enrich(_call("m1", "2024-01-01T00:00:00Z", {"name": "Old"}), b"g1", T0, None)
    assert merge(again, state) is None
    assert state.data["profile"]["eventCount"] == 2
