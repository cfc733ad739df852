"""The stages (worker.processor): merging into state, duplicates, repartitioning, changelog."""

from __future__ import annotations

from typing import Any

from tests.fakes import FakeClock, FakeSink
from worker import codec
from worker.events import Record
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.store import InMemoryStateStore

ROUTES = Routes(input="in", enriched="out", dlq="dlq", state="state", members="members")
T0 = "2015-02-23T22:28:55.111Z"


def call(message_id: str, group: str = "g1", user: str = "u1", **traits: Any) -> bytes:
    return codec.encode(
        {
            "type": "group",
            "messageId": message_id,
            "userId": user,
            "groupId": group,
            "timestamp": T0,
            "traits": traits,
        }
    )


def make(routes: Routes = ROUTES) -> tuple[Processor, FakeSink, InMemoryStateStore]:
    sink = FakeSink(transactional=False)
    store = InMemoryStateStore()
    processor = Processor(routes, Settings(), store, sink, FakeClock(), dedupe_window_ms=3_600_000)
    return processor, sink, store


def records(*values: bytes, partition: int = 2, topic: str = "in") -> list[Any]:
    return [Record(topic, partition, n, v) for n, v in enumerate(values)]


def emitted(sink: FakeSink, topic: str) -> list[Any]:
    return [codec.decode(p.value) for p in sink.open if p.topic == topic]


def test_enriched_call_carries_the_group_after_the_merge() -> None:
    """Each enriched call shows the group's merged traits and counts after it."""
    processor, sink, _ = make()
    processor.process(records(call("m1", name="Initech"), call("m2", user="u2", plan="pro")))
    first, second = emitted(sink, "out")
    assert first["group"] == {
        "id": "g1",
        "traits": {"name": "Initech"},
        "memberCount": 1,
        "eventCount": 1,
        "firstSeenAt": T0,
        "lastSeenAt": T0,
    }
    assert second["group"]["traits"] == {"name": "Initech", "plan": "pro"}
    assert (second["group"]["memberCount"], second["group"]["eventCount"]) == (2, 2)


def test_duplicate_is_counted_and_not_emitted() -> None:
    """A messageId the group already applied is a duplicate: counted, not re-emitted."""
    processor, sink, store = make()
    tally = processor.process(records(call("m1", name="A"), call("m1", name="A")))
    assert tally.outcomes == {"enriched": 1, "duplicate": 1}
    assert len(emitted(sink, "out")) == 1
    state = store.get(2, "g1")
    assert state is not None
    assert state.event_count == 1


def test_changelog_is_coalesced_and_co_partitioned() -> None:
    """At a commit only the newest state per group is written, on the input's partition."""
    processor, sink, _ = make()
    processor.process(
        records(
            call("m1", name="A"),
            call("m2", name="B"),
            call("m3", group="g2", user="u1"),
            partition=4,
        )
    )
    assert processor.write_changelog() == 2 + 2  # two groups, two memberships
    states = [p for p in sink.open if p.topic == "state"]
    assert [(p.key, p.partition) for p in states] == [(b"g1", 4), (b"g2", 4)]
    g1 = codec.decode(states[0].value)
    assert g1["traits"] == {"name": "B"}
    assert g1["eventCount"] == 2
    assert "merge" in g1
    members = [p for p in sink.open if p.topic == "members"]
    assert [p.key for p in members] == [b'["g1","userId","u1"]', b'["g2","userId","u1"]']
    assert {p.partition for p in members} == {4}
    assert codec.decode(members[0].value) == {
        "groupId": "g1",
        "userId": "u1",
        "firstSeenAt": T0,
        "lastSeenAt": T0,
    }


def test_membership_is_written_again_only_when_last_seen_moves() -> None:
    """A member seen again at a later time gets a new record; at the same time, none."""
    processor, sink, store = make()
    processor.process(records(call("m1")))
    processor.write_changelog()
    store.commit()
    sink.open.clear()
    processor.process(records(call("m2")))  # same event time: nothing moves
    processor.write_changelog()
    assert emitted(sink, "members") == []
    later = codec.encode(
        {
            "type": "group",
            "messageId": "m3",
            "userId": "u1",
            "groupId": "g1",
            "timestamp": "2015-02-24T00:00:00.000Z",
        }
    )
    processor.process(records(later))
    processor.write_changelog()
    assert [m["lastSeenAt"] for m in emitted(sink, "members")] == ["2015-02-24T00:00:00.000Z"]


def test_first_stage_forwards_group_calls_keyed_by_group_id() -> None:
    """With a repartition topic, valid group calls are re-keyed there and not merged yet."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, store = make(routes)
    tally = processor.process(records(call("m1", group="acme"), b"{bad", partition=0))
    [forwarded] = [p for p in sink.open if p.topic == "rep"]
    assert forwarded.key == b"acme"
    assert forwarded.partition is None  # the producer's murmur2 partitioner places it
    assert tally.forwarded == 1
    assert tally.outcomes == {"dead_letter": 1}
    assert store.group_count() == 0

    tally = processor.process([Record("rep", 5, 0, forwarded.value)])
    [out] = emitted(sink, "out")
    assert tally.outcomes == {"enriched": 1}
    assert out["group"]["id"] == "acme"
    assert out["enrichment"]["source"] == {"topic": "in", "partition": 0, "offset": 0}
    assert store.get(5, "acme") is not None


def test_corrupt_repartition_record_is_a_dead_letter() -> None:
    """A repartition record that is not a forwarded call is dead-lettered, not fatal."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, _ = make(routes)
    tally = processor.process([Record("rep", 0, 0, b'{"groupId": 1}')])
    assert tally.outcomes == {"dead_letter": 1}
    assert emitted(sink, "dlq")[0]["source"]["topic"] == "rep"
