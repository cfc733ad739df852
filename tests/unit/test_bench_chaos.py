"""bench.chaos's rules (bench.chaos_core): its plans, its clocks over offsets, its verdict."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench.chaos_core import Expected, Offsets, Recovery, Stalls, draw_faults, verify

PLAN = ["kill", "kill2", "stop", "broker", "join_leave", "kill", "broker"]


def test_a_seed_draws_the_same_plan_twice_and_another_seed_another() -> None:
    """The same seed gives the same faults, waits, durations and victims."""
    faults = draw_faults(PLAN, 7, 10.0, deployments=2, workers=3)
    assert faults == draw_faults(PLAN, 7, 10.0, deployments=2, workers=3)
    assert faults != draw_faults(PLAN, 8, 10.0, deployments=2, workers=3)
    assert [f.kind for f in faults] == PLAN
    assert all(5.0 <= f.wait <= 15.0 for f in faults)
    kill2, stop, broker, join = faults[1:5]
    assert [d for d, _ in kill2.targets] == [0, 1]  # one worker of each deployment
    assert 10 <= stop.seconds <= 25
    assert len(stop.targets) == 1
    assert 5 <= broker.seconds <= 60
    assert broker.targets == ()
    assert join.targets[0][1] == 3  # the spare slot, after the deployment's workers


def test_an_unknown_fault_is_refused() -> None:
    """A plan naming a fault that does not exist raises before anything runs."""
    with pytest.raises(ValueError, match="sigterm"):
        draw_faults(["kill", "sigterm"], 1, 10.0, deployments=1, workers=2)


def _offsets(input_: tuple[int, int], repartition: tuple[int, int]) -> Offsets:
    return {("in", 0): input_, ("in.repartition", 0): repartition}


def test_recovery_times_the_input_then_the_repartition_topic_as_they_stood() -> None:
    """Stage 1 waits for the input's watermark at the first look, not for later records;
    stage 2 for the repartition topic's when stage 1 was done."""
    recovery = Recovery(100.0, "in", "in.repartition")
    assert not recovery.update(101.0, _offsets((5, 10), (0, 3)))
    assert not recovery.update(102.0, _offsets((9, 12), (2, 4)))
    assert not recovery.update(103.0, _offsets((10, 14), (1, 6)))  # 10 reached; 14 is later
    assert recovery.stage1 == 3.0
    assert not recovery.update(104.0, _offsets((12, 16), (5, 9)))  # 6 not yet reached
    assert recovery.update(104.5, _offsets((12, 16), (6, 9)))
    assert (recovery.stage1, recovery.stage2) == (3.0, 4.5)


def test_recovery_is_immediate_for_a_group_already_caught_up() -> None:
    """A deployment the fault did not touch recovers at its first look."""
    recovery = Recovery(50.0, "in", "in.repartition")
    assert recovery.update(50.2, _offsets((10, 10), (7, 7)))
    assert (recovery.stage1, recovery.stage2) == (0.2, 0.2)


def test_a_stall_is_a_partition_behind_and_unmoved_for_30_seconds_reported_once() -> None:
    """The clock starts when a partition falls behind (an idle one is not stalled), and
    ``restart`` starts every clock anew."""
    stalls = Stalls()
    assert stalls.update(0.0, _offsets((10, 10), (7, 7))) == []
    assert stalls.update(40.0, _offsets((10, 12), (7, 7))) == []  # just fell behind
    assert stalls.update(65.0, _offsets((10, 12), (7, 7))) == []
    assert stalls.update(71.0, _offsets((10, 12), (7, 7))) == [("in", 0)]
    assert stalls.update(90.0, _offsets((10, 12), (7, 7))) == []  # reported already
    assert stalls.update(91.0, _offsets((11, 12), (7, 7))) == []  # it moved
    stalls.restart()
    assert stalls.update(125.0, _offsets((11, 12), (7, 7))) == []


def _call(message_id: str, group: str, user: str) -> bytes:
    return orjson.dumps(
        {"type": "group", "messageId": message_id, "groupId": group, "userId": user}
    )


def _enriched(message_id: str, offset: int) -> bytes:
    source = {"topic": "in", "partition": 0, "offset": offset}
    return orjson.dumps({"messageId": message_id, "enrichment": {"source": source}})


def _letter(offset: int) -> bytes:
    return orjson.dumps(
        {"reason": "invalid_json", "source": {"topic": "in", "partition": 0, "offset": offset}}
    )


def _state(group: str, events: int, members: int) -> tuple[bytes, bytes]:
    return group.encode(), orjson.dumps({"eventCount": events, "memberCount": members})


@pytest.fixture
def expected() -> Expected:
    expected = Expected()
    expected.add(_call("m1", "g1", "u1"), "group")
    expected.add(_call("m2", "g1", "u2"), "group")
    expected.add(_call("m3", "g2", "u1"), "group")
    expected.add(_call("m1", "g1", "u1"), "duplicate")
    expected.add(b"{not json", "bad")
    return expected


GOOD: dict[str, Any] = {
    "enriched": [_enriched("m1", 0), _enriched("m2", 1), _enriched("m3", 2)],
    "letters": [_letter(4)],
    "states": [_state("g1", 1, 1), _state("g2", 1, 1), _state("g1", 2, 2)],
}


def test_outputs_written_exactly_once_pass(expected: Expected) -> None:
    """Each call enriched once, the bad one dead-lettered once, the last states right."""
    result = verify(expected, GOOD["enriched"], GOOD["letters"], GOOD["states"])
    assert result.ok
    assert (result.enriched, result.dead_letters, result.dead_letters_expected) == (3, 1, 1)


def test_a_lost_call_fails(expected: Expected) -> None:
    """A valid call missing from the enriched topic is counted lost, and named."""
    result = verify(expected, GOOD["enriched"][:2], GOOD["letters"], GOOD["states"])
    assert not result.ok
    assert result.lost == 1
    assert result.examples["lost"] == ["m3"]
    assert result.problems == ["lost 1"]


def test_a_call_enriched_twice_fails(expected: Expected) -> None:
    """The same call enriched again (same messageId, same input position) is a duplicate."""
    enriched = [*GOOD["enriched"], _enriched("m2", 1)]
    result = verify(expected, enriched, GOOD["letters"], GOOD["states"])
    assert not result.ok
    assert (result.duplicated, result.duplicated_sources, result.lost) == (1, 1, 0)
    assert result.examples["duplicated"] == ["m2"]


def test_a_bad_call_dead_lettered_twice_or_never_fails(expected: Expected) -> None:
    """Dead letters must number the bad calls, each input position once."""
    twice = verify(expected, GOOD["enriched"], [_letter(4), _letter(4)], GOOD["states"])
    assert not twice.ok
    assert twice.duplicated_letters == 1
    assert not verify(expected, GOOD["enriched"], [], GOOD["states"]).ok


def test_a_wrongly_counted_group_fails(expected: Expected) -> None:
    """The last state record of a group is what counts: a stale one is wrong."""
    states = [_state("g1", 2, 2), _state("g2", 1, 1), _state("g1", 2, 1)]
    result = verify(expected, GOOD["enriched"], GOOD["letters"], states)
    assert not result.ok
    assert result.wrong_states == 1
    assert result.examples["wrong_states"][0][0] == "g1"
