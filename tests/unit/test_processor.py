"""The stages (worker.processor): merging into state, duplicates, repartitioning, changelog."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from bench.generator import generate_calls
from tests.fakes import FakeClock, FakeRestorer, FakeSink
from worker import codec
from worker.errors import KafkaError, TopicError
from worker.events import Record, SourceRecord
from worker.limits import WARNINGS_TRUNCATED, GroupBound, Limits
from worker.pipeline import Settings, process_record
from worker.placement import partition_of
from worker.processor import Processor, Routes, Tally
from worker.restore import Changelogs, restore_partition
from worker.sink import Refusal
from worker.source import Cut, fingerprint
from worker.state import GROUP_STATE_FULL
from worker.store import InMemoryStateStore, RocksDBStateStore
from worker.times import format_time

ROUTES = Routes(input="in", enriched="out", dlq="dlq", state="state", members="members")
T0 = "2015-02-23T22:28:55.111Z"
# Where stage one read a call: its enriched call's enrichment.source.
SOURCE = {"topic": "in", "partition": 0, "offset": 0}


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


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


def make(
    routes: Routes = ROUTES, clock: FakeClock | None = None, **options: Any
) -> tuple[Processor, FakeSink, InMemoryStateStore]:
    """A processor over fakes; ``options`` are the Processor's keyword arguments."""
    sink = FakeSink(transactional=False)
    store = InMemoryStateStore()
    clock = clock or FakeClock()
    processor = Processor(
        routes, Settings(), store, sink, clock, dedupe_window_ms=3_600_000, **options
    )
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
    assert processor.write_changelog() == 2 + 2 + 3  # groups, memberships, dedupe ids
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


def test_stage_two_passes_over_calls_another_deployment_wrote() -> None:
    """Stage one names its deployment on each re-keyed call; stage two passes over a call
    another deployment wrote (one given this deployment's repartition topic, with the same
    input: its own stage two merges it), with a warning, and takes one without the
    header (a worker before it) as its own."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    ours, sink, store = make(routes, deployment="a")
    theirs, their_sink, _ = make(routes, deployment="c")
    ours.process(records(call("m1", group="acme")))
    theirs.process(records(call("m2", group="acme")))
    [mine] = [p for p in sink.open if p.topic == "rep"]
    [other] = [p for p in their_sink.open if p.topic == "rep"]
    assert ("deployment", b"a") in (mine.headers or [])
    named: list[Any] = [list(mine.headers or []), list(other.headers or [])]
    named.append([h for h in named[0] if h[0] != "deployment"])
    read: list[Any] = [
        Record("rep", 5, n, p.value, p.key, 0, headers)
        for n, (p, headers) in enumerate(zip((mine, other, mine), named, strict=True))
    ]
    with structlog.testing.capture_logs() as logs:
        tally = ours.process(read)
    assert tally.outcomes == {"enriched": 1, "duplicate": 1}  # the unnamed copy of m1
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1"]
    [warning] = [e for e in logs if e["event"] == "repartition_call_of_another_deployment"]
    assert (warning["deployment"], warning["offset"]) == ("c", 1)
    state = store.get(5, "acme")
    assert state is not None
    assert state.event_count == 1


def test_both_layouts_write_the_same_enriched_calls() -> None:
    """Stage two writes a re-keyed call's bytes as read with the group appended, where one
    stage encodes the call whole: the enriched records must not differ by a byte. Over
    the benchmark's mix, a call with a ``group`` of its own (which the merge replaces),
    calls whose traits the group's bound drops (a warning is added to the call), and calls
    nested to the limit whose warnings hold a trait's value deeper than the call did."""
    raw = [value for _, value, _ in generate_calls(3_000, seed=7)]
    own_group = codec.decode(call("own", group="g-own", plan="pro"))
    own_group["group"] = {"id": "sent by the client"}
    full = [
        call(f"full{n}", group="g-full", **{f"k{n}_{i}": "v" * 90 for i in range(30)})
        for n in range(6)
    ]
    # 200 levels in all: the call, its traits, then the trait's value.
    deep = codec.decode(nested_json(codec.MAX_DEPTH - 2))
    deep_address = codec.decode(nested_json(codec.MAX_DEPTH - 3))
    limit = [call("deep-name", name=deep), call("deep-city", address={"city": deep_address})]
    raw += [codec.encode(own_group), *full, *limit]
    bound = GroupBound(new_keys=4_000, any_growth=8_000)

    def enriched(routes: Routes) -> list[bytes]:
        processor, sink, _ = make(routes, bound=bound)
        inputs: list[SourceRecord] = [
            Record("in", 0, n, value, None, 1_000 + n) for n, value in enumerate(raw)
        ]
        for start in range(0, len(inputs), 500):
            processor.process(inputs[start : start + 500])
            forwarded = [p for p in sink.open if p.topic == "rep"]
            sink.open = [p for p in sink.open if p.topic != "rep"]
            processor.process(
                [Record("rep", 0, n, p.value, p.key, p.timestamp) for n, p in enumerate(forwarded)]
            )
        return [p.value for p in sink.open if p.topic == "out"]

    one = enriched(ROUTES)
    two = enriched(Routes("in", "out", "dlq", "state", "members", repartition="rep"))
    assert len(one) > 2_000
    assert two == one
    decoded = [codec.decode(v) for v in one]
    assert any(c["messageId"] == "own" and c["group"]["id"] == "g-own" for c in decoded)
    assert any(
        w["code"] == "group_state_full" for c in decoded for w in c["enrichment"]["warnings"]
    )
    deep_ones = [c for c in decoded if c["messageId"].startswith("deep-")]
    assert [w["code"] for c in deep_ones for w in c["enrichment"]["warnings"]] == [
        "invalid_type",
        "invalid_type",
    ]


@pytest.mark.parametrize("kind", ["memory", "rocksdb"])
def test_restored_records_of_another_group_are_skipped_not_merged(
    kind: str, tmp_path: Path
) -> None:
    """A changelog record whose key and content disagree never reaches a merge."""
    store = InMemoryStateStore() if kind == "memory" else RocksDBStateStore(tmp_path, 1 << 20)
    sink = FakeSink(transactional=False)
    processor = Processor(ROUTES, Settings(), store, sink, FakeClock(), dedupe_window_ms=1_000)
    processor.process(records(call("m0", group="other", plan="x")))
    processor.write_changelog()
    store.commit()
    changelog = {
        topic: [p for p in sink.open if p.topic == topic] for topic in ("state", "members")
    }
    member_key = b'["g1","userId","u1"]'
    store.apply_changelog(2, "state", [(0, b"g1", changelog["state"][0].value, 0)], 1)
    store.apply_changelog(2, "members", [(0, member_key, changelog["members"][0].value, 0)], 1)
    tally = processor.process(records(call("m1", plan="pro")))
    assert tally.outcomes == {"enriched": 1}
    assert emitted(sink, "out")[-1]["group"]["traits"] == {"plan": "pro"}


def test_corrupt_repartition_record_is_a_dead_letter() -> None:
    """A repartition record that is not a forwarded call is dead-lettered, not fatal."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, _ = make(routes)
    tally = processor.process([Record("rep", 0, 0, b'{"groupId": 1}')])
    assert tally.outcomes == {"dead_letter": 1}
    assert emitted(sink, "dlq")[0]["source"]["topic"] == "rep"
    # Written by something else than a worker: each a dead letter, none a crash.
    good = {"groupId": "g", "userId": "u", "messageId": "m", "timestamp": T0, "traits": {}}
    good["enrichment"] = {"warnings": [], "source": SOURCE}
    bad = [
        {k: v for k, v in good.items() if k != "messageId"},
        {**good, "messageId": 7},
        {**good, "traits": ["x"]},
        {**good, "traits": {"address": "Oslo"}},
        {k: v for k, v in good.items() if k != "enrichment"},
        {**good, "enrichment": {"warnings": None}},
        {**good, "enrichment": {"warnings": ["x"]}},
        {**good, "enrichment": {"warnings": [{}]}},
        {**good, "enrichment": {"warnings": []}},  # no source: its letter could not say
        {**good, "enrichment": {"warnings": [], "source": {"topic": "in", "offset": 0}}},
        {**good, "enrichment": {"warnings": [], "source": "in"}},
        ["not", "a", "call"],
    ]
    # Nested deeper than could be written again.
    deep = codec.encode(good).replace(b'"traits":{}', b'"traits":{"d":' + nested_json(300) + b"}")
    values = [codec.encode(v) for v in bad] + [deep, codec.encode(good)]
    tally = processor.process([Record("rep", 0, n + 1, v) for n, v in enumerate(values)])
    assert tally.outcomes == {"dead_letter": len(bad) + 1, "enriched": 1}


def test_a_call_another_deployments_first_stage_read_stops_the_second_stage() -> None:
    """A re-keyed call read from a topic other than the input (another deployment with
    the same group id writes the repartition topic) raises TopicError naming both
    topics and where the call is (to move past it): merged, each deployment took half of
    the other's calls into its state."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, store = make(routes)
    call = {"groupId": "g", "userId": "u", "messageId": "m", "timestamp": T0, "traits": {}}
    call["enrichment"] = {"warnings": [], "source": {**SOURCE, "topic": "other.raw"}}
    good = dict(call, groupId="g0", enrichment={"warnings": [], "source": SOURCE})
    records: list[SourceRecord] = [
        Record("rep", 0, 6, codec.encode(good)),
        Record("rep", 0, 7, codec.encode(call)),
    ]
    expected = r"topic rep partition 0 offset 7 holds a call read from topic other\.raw"
    with pytest.raises(TopicError, match=expected):
        processor.process(records)
    assert store.get(0, "g") is None
    assert {p.key for p in sink.open} <= {b"g0", b'["g0","userId","u"]', b'["g0","m"]'}


def test_a_full_group_adds_its_warnings_to_any_forwarded_list() -> None:
    """A re-keyed call whose warnings end in a count of its own that is not a number
    (not written by a worker) still gets its group_state_full warning when a trait does
    not fit its group, not a crash."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, _ = make(routes, bound=GroupBound(4_096, 8_192))
    odd: dict[str, Any] = {"code": WARNINGS_TRUNCATED, "trait": None, "value": "n"}
    forwarded: dict[str, Any] = {"groupId": "g", "userId": "u", "messageId": "m1"}
    forwarded |= {"timestamp": T0, "traits": {"a": "x" * 5_000}}
    forwarded["enrichment"] = {"warnings": [odd], "source": SOURCE}
    tally = processor.process([Record("rep", 0, 0, codec.encode(forwarded))])
    assert tally.outcomes == {"enriched": 1}
    codes = [w["code"] for w in emitted(sink, "out")[0]["enrichment"]["warnings"]]
    assert codes == [WARNINGS_TRUNCATED, GROUP_STATE_FULL]


# --- Outputs that do not fit, and outputs the broker refused --------------------------------


def test_a_hostile_group_is_bounded_and_other_groups_go_on() -> None:
    """Calls that keep adding keys fill one group up to its bound; every record still fits."""
    store = InMemoryStateStore()
    sink = FakeSink(transactional=False)
    limits = Limits({"out": 1_048_588, "state": 1_048_588, "dlq": 1_048_588})
    processor = Processor(
        ROUTES, Settings(), store, sink, FakeClock(), dedupe_window_ms=3_600_000, limits=limits
    )
    hostile = [
        call(f"h{n}", group="big", **{f"k{n}_{i}": "v" * 100 for i in range(150)})
        for n in range(40)
    ]
    tally = processor.process(records(*hostile, call("o1", group="ok", plan="pro")))
    processor.write_changelog()
    assert tally.outcomes == {"enriched": 41}
    assert tally.warnings["group_state_full"] > 0
    assert all(limits.fits(p.topic, p.key, p.value) for p in sink.open)
    last = emitted(sink, "out")[-2]
    assert last["groupId"] == "big"
    assert {"code": "group_state_full", "trait": "k39_0", "value": None} in last["enrichment"][
        "warnings"
    ]
    assert len(last["traits"]) == 150  # the call's own traits are kept
    assert emitted(sink, "out")[-1]["group"]["traits"] == {"plan": "pro"}


def test_a_state_record_dead_lettered_at_the_commit_is_counted_as_a_dead_letter() -> None:
    """A state record too large for its topic, dead-lettered as the changelog is written,
    is told to the tally (group_worker_dead_letters_total missed it, and the changelog
    counter took it as written)."""
    limits = Limits({"out": 100_000, "state": 300, "dlq": 100_000})
    processor, sink, _ = make(limits=limits, bound=GroupBound(10_000, 10_000))
    tally = processor.process(records(call("m1", name="x" * 400)))
    assert processor.write_changelog(tally) == 3  # a state, a membership, a dedupe id
    assert (tally.changelog, tally.changelog_letters) == (2, {"output_too_large": 1})
    [letter] = emitted(sink, "dlq")
    assert (letter["reason"], letter["source"]["topic"]) == ("output_too_large", "state")


def test_trait_warnings_are_counted_where_found_in_either_layout() -> None:
    """A trait warning is counted when its call is normalised, whatever becomes of the
    call, so both layouts count alike: a duplicate's (a redelivery brings the bad trait
    again) counted in two stages but not keyed, before."""
    bad = call("m1", email="not an email")
    keyed, _, _ = make()
    tally = keyed.process(records(bad, bad))
    assert tally.outcomes == {"enriched": 1, "duplicate": 1}
    assert tally.warnings == {"invalid_email": 2}
    stage_one, _, _ = make(Routes("in", "out", "dlq", "state", "members", repartition="rep"))
    assert stage_one.process(records(bad, bad)).warnings == {"invalid_email": 2}


def test_unusable_timestamps_are_counted_in_either_layout_and_logged_with_the_library() -> None:
    """A call whose own timestamp is no ISO-8601 time is counted where it is read (stage
    one, or the only one), a duplicate's too, and logged once per 10 s with its shape
    (never its digits or letters: a sender may put anything there) and the library that
    sent it, the rest counted in the next line."""
    bad = codec.decode(call("m1"))
    bad["timestamp"] = "2021-10-17T12:30:45.123:Z"
    bad["context"] = {"library": {"name": "analytics-swift", "version": "1.0.0"}}
    value = codec.encode(bad)
    clock = FakeClock()
    keyed, _, _ = make(clock=clock)
    library = {"name": "jane@example.com", "version": "1.0.0"}
    private = codec.encode(
        {**bad, "messageId": "m3", "timestamp": "+1 415-555-0100", "context": {"library": library}}
    )
    with structlog.testing.capture_logs() as logs:
        tally = keyed.process(records(value, value, call("m2")))
        clock.advance(10)
        keyed.process(records(value))
        clock.advance(10)
        keyed.process(records(private))
    assert tally.invalid_timestamps == 2
    lines = [e for e in logs if e["event"] == "invalid_timestamp"]
    assert [(e["shape"], e["library"], e["suppressed"]) for e in lines] == [
        ("9999-99-99T99:99:99.999:Z", "analytics-swift 1.0.0", 0),
        ("9999-99-99T99:99:99.999:Z", "analytics-swift 1.0.0", 1),
        ("+9 999-999-9999", "(not shown) 1.0.0", 0),  # a sender's text: no digit shown
    ]
    assert (lines[0]["topic"], lines[0]["partition"], lines[0]["offset"]) == ("in", 2, 0)
    stage_one, _, _ = make(Routes("in", "out", "dlq", "state", "members", repartition="rep"))
    assert stage_one.process(records(value, call("m2"))).invalid_timestamps == 1


def test_a_call_of_many_warnings_beside_a_full_group_still_fits() -> None:
    """A valid call whose traits make hundreds of warnings is enriched beside a full group."""
    sink = FakeSink(transactional=False)
    limits = Limits({"out": 100_000, "state": 100_000, "dlq": 100_000})
    processor = Processor(
        ROUTES,
        Settings(max_event_bytes=8_000),
        InMemoryStateStore(),
        sink,
        FakeClock(),
        dedupe_window_ms=3_600_000,
        limits=limits,
    )
    fill = [call(f"f{n}", **{f"k{n}_{i}": "v" * 1_000 for i in range(7)}) for n in range(12)]
    marks = "-_.:/+*!#$%&()<=>?@[]^`{|}~,;"
    spellings: list[str] = [f"e{a}m{b}ail" for a in marks for b in marks]
    traits: dict[str, Any] = dict.fromkeys(spellings[:655], 1)
    flood = call("flood", **traits)
    assert len(flood) <= 8_000
    tally = processor.process(records(*fill, flood))
    assert tally.warnings["group_state_full"] > 0  # the group reached its bound
    assert tally.outcomes == {"enriched": 13}
    assert tally.warnings["duplicate_trait"] == 654
    assert all(limits.fits(p.topic, p.key, p.value) for p in sink.open)


def test_the_merges_warnings_past_the_most_listed_are_counted_on() -> None:
    """Keys a full group leaves out add to the count of warnings not listed, not to the list."""
    processor, sink, _ = make(bound=GroupBound(new_keys=4_096, any_growth=8_192))
    spellings: dict[str, Any] = {"email" + "_" * n: n for n in range(1, 91)}
    new_keys = {f"k{i}": "v" * 100 for i in range(60)}
    tally = processor.process(records(call("m1", email="a@b.io", **spellings, **new_keys)))
    dropped = tally.warnings["group_state_full"]
    assert dropped > 20
    assert tally.warnings["duplicate_trait"] == 90
    listed = emitted(sink, "out")[0]["enrichment"]["warnings"]
    assert len(listed) == 101
    assert [w["code"] for w in listed[90:100]] == ["group_state_full"] * 10
    assert listed[-1] == {"code": "warnings_truncated", "trait": None, "value": dropped - 10}


def test_an_enriched_call_too_large_for_its_topic_is_dead_lettered() -> None:
    """An output over its topic's limit becomes an output_too_large letter carrying the call."""
    store = InMemoryStateStore()
    sink = FakeSink(transactional=False)
    unwritable: list[str] = []
    processor = Processor(
        ROUTES,
        Settings(max_event_bytes=2_000),
        store,
        sink,
        FakeClock(),
        dedupe_window_ms=3_600_000,
        limits=Limits({"out": 1_000, "dlq": 100_000}),
        bound=GroupBound(10_000, 10_000),
        on_unwritable=unwritable.append,
    )
    tally = processor.process(records(call("m1", name="x" * 600), call("m2", plan="pro")))
    assert tally.outcomes == {"dead_letter": 2}
    assert tally.reasons == {"output_too_large": 2}
    assert unwritable == ["enriched", "enriched"]
    [first, _] = emitted(sink, "dlq")
    assert first["reason"] == "output_too_large"
    assert "a record may take there (the topic's max.message.bytes" in first["message"]
    assert first["source"]["offset"] == 0
    carried = codec.decode(first["value"])
    assert (carried["messageId"], "group" in carried) == ("m1", False)
    assert store.get(2, "g1") is not None  # the call was applied; only its record is missing


def test_a_dead_letter_is_cut_to_fit_its_topic() -> None:
    """A dead letter larger than the dead-letter topic accepts is truncated, and says so."""
    sink = FakeSink(transactional=False)
    limits = Limits({"dlq": 2_000})
    processor = Processor(
        ROUTES,
        Settings(),
        InMemoryStateStore(),
        sink,
        FakeClock(),
        dedupe_window_ms=1,
        limits=limits,
        bound=GroupBound(1_000, 1_000),
    )
    processor.process(records(b"\x01" * 20_000 + b"not json"))
    [letter] = sink.open
    assert limits.fits(letter.topic, letter.key, letter.value, letter.headers)
    decoded = codec.decode(letter.value)
    assert (decoded["reason"], decoded["truncated"]) == ("invalid_json", True)


@pytest.mark.parametrize("key", [b"\xff" * 20_000, b"k" * 20_000], ids=["base64", "text"])
def test_a_letter_too_large_for_its_key_keeps_its_value(key: bytes) -> None:
    """A letter over the dead-letter topic's limit for its input key's sake has the key
    cut, not its small value, and a base64 key cut still decodes."""
    processor, sink, _ = make(limits=Limits({"dlq": 2_000}))
    processor.process([Record("in", 0, 0, b"{bad", key)])
    [letter] = emitted(sink, "dlq")
    assert (letter["value"], letter["truncated"]) == ("{bad", True)
    kept = letter["source"]["key"]
    assert 0 < len(kept) < 2_000
    if letter["source"].get("keyEncoding") == "base64":
        assert set(base64.b64decode(kept, validate=True)) == {0xFF}
    else:
        assert set(kept) == {"k"}


def test_an_envelope_with_a_huge_key_makes_small_letters_counted_against_the_budget() -> None:
    """A record key of 520 KB on an envelope of 2,000 bad calls: its letters do not each
    carry the key (1 GB in one transaction, past its timeout, an abort loop that held up
    every group); a call sent alone keeps it. Letters' bytes count toward
    ``commit_max_bytes``, so the envelope is cut once they reach it."""
    processor, sink, _ = make()
    key = b"k" * 520_000
    envelope = codec.encode({"batch": [1] * 2_000})
    tally = Tally()
    inputs: list[Any] = [Record("in", 0, n, envelope, key) for n in range(3)]
    done, calls, cut = processor.process_some(inputs, tally, max_bytes=100_000)
    letters = [p for p in sink.open if p.topic == "dlq"]
    assert (done, len(letters)) == (0, calls)
    assert cut == calls
    assert 100 < calls < 1_000
    assert all(p.key is None and len(p.value) < 1_000 for p in letters)
    assert codec.decode(letters[0].value)["source"]["key"] is None
    assert 100_000 <= tally.produced_bytes < 101_000
    sink.open.clear()
    processor.process([Record("in", 0, 3, b"not json", key)])
    [alone] = emitted(sink, "dlq")
    assert alone["source"]["key"] == key.decode()


@pytest.mark.parametrize("layout", ["one stage", "two stages"])
@pytest.mark.parametrize("max_bytes", [1, 500, 3_000, 10_000])
def test_envelopes_cut_anywhere_give_what_they_give_whole(max_bytes: int, layout: str) -> None:
    """Records processed until ``max_bytes`` of outputs at a time (a commit between),
    each cut going on where the last stopped (``cuts``), give every output, byte for
    byte and in order, and the same counts, as when processed whole: no call of a
    record cut is done twice or left out."""
    two = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    routes = ROUTES if layout == "one stage" else two
    sent = [codec.decode(call(f"m{n}", user=f"u{n % 5}", n=n)) for n in range(45)]
    sent[3], sent[20] = {"type": "page"}, {"type": "group", "messageId": "bad", "userId": "u"}
    inputs: list[Any] = records(
        call("m-alone"), codec.encode({"batch": sent[:30]}), codec.encode({"batch": sent[30:]})
    )

    whole, whole_sink, _ = make(routes)
    expected = Tally()
    assert whole.process_some(inputs, expected) == (3, 46, 0)

    cut_up, sink, _ = make(routes)
    counts: Counter[str] = Counter()
    rest, commits = inputs, 0
    cuts: dict[tuple[str, int], Cut] = {}
    while rest:
        tally = Tally()  # a commit between: the bytes count from 0
        done, calls, cut = cut_up.process_some(rest, tally, 0, max_bytes, cuts)
        assert calls > 0
        counts.update(records=tally.records, calls=calls, **tally.outcomes)
        commits += 1
        if cut:
            cuts = {("in", 2): Cut(rest[done].offset(), fingerprint(rest[done].value()), cut)}
        rest = rest[done:]
    assert commits >= {1: 45, 500: 15, 3_000: 3, 10_000: 1}[max_bytes]  # cut, most of them
    assert [(p.topic, p.key, p.value) for p in sink.open] == [
        (p.topic, p.key, p.value) for p in whole_sink.open
    ]
    assert counts == Counter(records=3, calls=46, **expected.outcomes)


def test_a_record_cut_goes_on_without_being_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The calls after a cut are handled from the outcomes computed before it, not by
    parsing the envelope and normalising them again at each cut; going back to an
    earlier cut (an abort) computes them anew."""
    parsed: list[int] = []

    def counting(record: Any, settings: Settings, arrival: int, skip: int = 0) -> Any:
        parsed.append(skip)
        return process_record(record, settings, arrival, skip)

    monkeypatch.setattr("worker.processor.process_record", counting)
    processor, _, _ = make()
    [envelope] = records(codec.encode({"batch": [codec.decode(call(f"m{n}")) for n in range(30)]}))
    cuts: dict[tuple[str, int], Cut] = {}
    done_at = []
    for _ in range(3):
        done, _calls, cut = processor.process_some([envelope], Tally(), 0, 2_000, cuts)
        assert (done, cut > 0) == (0, True)
        done_at.append(cut)
        cuts = {("in", 2): Cut(envelope.offset(), fingerprint(envelope.value()), cut)}
    assert parsed == [0]
    cuts = {("in", 2): Cut(envelope.offset(), fingerprint(envelope.value()), done_at[0])}
    processor.process_some([envelope], Tally(), 0, 0, cuts)  # back to the first cut
    assert parsed == [0, done_at[0]]


def test_a_record_timestamp_out_of_range_is_not_a_poison_pill() -> None:
    """A Kafka timestamp past year 9999 (microseconds) or below 1 is not used as a time:
    a call without one of its own takes the clock's, and a dead letter's is null."""
    processor, sink, store = make()
    now = FakeClock().now_ms()
    timeless = codec.encode({"type": "group", "messageId": "m1", "userId": "u", "groupId": "g"})
    for n, ms in enumerate((253_402_300_800_000, 1_700_000_000_000_000, -1)):
        tally = processor.process(
            [Record("in", 2, 2 * n + i, v, timestamp_ms=ms) for i, v in enumerate((timeless, b"{"))]
        )
        assert tally.outcomes == {"enriched" if n == 0 else "duplicate": 1, "dead_letter": 1}
        [letter] = emitted(sink, "dlq")[n:]
        assert letter["source"]["timestamp"] is None
    [enriched] = emitted(sink, "out")
    assert enriched["timestamp"] == format_time(now)
    assert store.seen(2, ("g", "m1")) == now


def test_a_redelivery_within_the_window_of_arrival_is_a_duplicate_however_old() -> None:
    """Dedupe is by arrival: a call retried hours later is caught, whatever its event time."""
    processor, sink, store = make()
    day = 86_400_000
    old = call("m1", name="A")  # event time in 2015: days older than any window
    processor.process([Record("in", 2, 0, old, timestamp_ms=10 * day)])
    processor.process(
        [
            Record("in", 2, 1, old, timestamp_ms=10 * day + 3_599_000),
            Record("in", 2, 2, call("m2", name="B"), timestamp_ms=10 * day + 3_600_000),
        ]
    )
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1", "m2"]
    assert store.seen(2, ("g1", "m1")) == 10 * day
    tally = processor.process([Record("in", 2, 3, old, timestamp_ms=10 * day + 3_600_000)])
    assert tally.outcomes == {"enriched": 1}  # an hour later: the window has passed
    state = store.get(2, "g1")
    assert state is not None
    assert state.event_count == 3


def test_dedupe_ids_expire_a_window_after_the_latest_arrival() -> None:
    """Ids older than the window, counted from the latest arrival processed, are forgotten
    (checked each quarter of a window of arrival time)."""
    clock = FakeClock()
    processor, _, store = make(clock=clock)  # a one-hour window
    hour = 3_600_000
    for offset, (mid, arrival) in enumerate(
        [("m1", 1_000), ("m2", 1_000 + hour), ("m3", 1_000 + hour + hour // 4)]
    ):
        clock.now = arrival / 1000  # processed as it arrives
        processor.process([Record("in", 0, offset, call(mid), timestamp_ms=arrival)])
        processor.write_changelog()
        store.commit()
        processor.expire_seen()
        if mid == "m2":
            assert store.seen(0, ("g1", "m1")) == 1_000  # exactly a window old: kept
    assert store.seen(0, ("g1", "m1")) is None
    assert store.seen(0, ("g1", "m2")) == 1_000 + hour


def test_a_partition_behind_the_others_keeps_the_ids_its_retries_need() -> None:
    """Ids expire by each partition's own latest arrival: a partition a day behind the
    others (catching up) still catches a retry an hour after its first delivery."""
    processor, sink, store = make()  # a one-hour window
    hour = 3_600_000
    start = 1_424_730_535_111
    steps = [(1, "m1", "g1", start), (0, "a", "g0", start + 30 * hour)]
    steps.append((1, "m1", "g1", start + hour // 2))
    for offset, (partition, mid, group, arrival) in enumerate(steps):
        record = Record("in", partition, offset, call(mid, group), timestamp_ms=arrival)
        processor.process([record])
        processor.write_changelog()
        store.commit()
        processor.expire_seen()
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1", "a"]
    state = store.get(1, "g1")
    assert state is not None
    assert state.event_count == 1


def test_an_id_applied_out_of_arrival_order_is_kept_for_its_retry() -> None:
    """An id is kept a window after it was written, however far the partition's arrivals
    ran ahead of it: a partition mixing a backlog's calls with newer ones (stage two
    reads every input partition's) catches a retry of a backlog call."""
    hour = 3_600_000
    start = 1_424_730_535_111
    clock = FakeClock(start + 40 * hour)  # draining a backlog, a minute per record
    processor, sink, store = make(clock=clock)  # a one-hour window
    steps = [("m1", "g1", start), ("a", "g0", start + 30 * hour), ("m1", "g1", start + hour // 2)]
    for offset, (mid, group, arrival) in enumerate(steps):
        processor.process([Record("in", 0, offset, call(mid, group), timestamp_ms=arrival)])
        processor.write_changelog()
        store.commit()
        processor.expire_seen()
        clock.advance(60)
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1", "a"]
    clock.advance(3_600)  # a window after its writing, the id goes
    processor.process([Record("in", 0, 3, call("b", "g0"), timestamp_ms=start + 40 * hour)])
    processor.write_changelog()
    store.commit()
    processor.expire_seen()
    assert store.seen(0, ("g1", "m1")) is None


def test_calls_of_a_keyed_input_keyed_otherwise_are_counted_and_logged_once() -> None:
    """With the input said to be keyed by groupId, a group call whose record key is not
    its groupId is counted (its group's state may be split over partitions), and the
    first is logged; the call is still enriched."""
    processor, sink, _ = make()  # ROUTES: no repartition topic, so the input is keyed
    batch: list[Any] = [
        Record("in", 0, 0, call("m1", "g1"), b"g1"),
        Record("in", 0, 1, call("m2", "g1"), b"u1"),
        Record("in", 0, 2, call("m3", "g2"), None),
    ]
    with structlog.testing.capture_logs() as logs:
        tally = processor.process(batch)
        again = processor.process([Record("in", 0, 3, call("m4", "g2"), b"u9")])
    assert (tally.unkeyed, again.unkeyed) == (2, 1)
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1", "m2", "m3", "m4"]
    unkeyed = [e for e in logs if e["event"] == "input_not_keyed_by_group_id"]
    assert [(e["partition"], e["offset"]) for e in unkeyed] == [(0, 1)]


def test_calls_of_a_keyed_input_off_their_groups_partition_are_counted() -> None:
    """Keyed by groupId but not on the partition murmur2 gives it (a producer with
    librdkafka's default partitioner, CRC32): counted as not keyed by groupId, as the
    group's calls may be on two partitions, each keeping a state of its own."""
    processor, _, _ = make(partitions=6)
    home = partition_of(b"g1", 6)
    elsewhere = (home + 1) % 6
    batch: list[Any] = [
        Record("in", home, 0, call("m1", "g1"), b"g1"),
        Record("in", elsewhere, 0, call("m2", "g1"), b"g1"),
        Record("in", home, 1, call("m3", "g1"), b"g1"),
    ]
    assert processor.process(batch).unkeyed == 1
    assert make()[0].process(batch).unkeyed == 0  # the partition count unknown: not checked


def test_an_arrival_ahead_of_the_clock_expires_no_id_early() -> None:
    """A record stamped ahead of the worker's clock (its producer's clock is fast; the
    broker takes up to an hour ahead) counts as arriving now for expiry: the ids of the
    window's last hour stay, and their retries are still duplicates."""
    processor, sink, store = make()  # a one-hour window
    now, minute = 1_700_000_000_000, 60_000  # FakeClock's
    steps = [("m1", now - 50 * minute), ("x", now + 50 * minute), ("m1", now)]
    for offset, (mid, arrival) in enumerate(steps):
        processor.process([Record("in", 0, offset, call(mid), timestamp_ms=arrival)])
        processor.write_changelog()
        store.commit()
        processor.expire_seen()
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m1", "x"]


def test_an_expiry_pass_runs_a_slice_after_each_commit(tmp_path: Path) -> None:
    """Each call scans ``expire_slice`` ids, so many ids held stall no commit; the pass
    logs once, when done, how many ids it forgot."""
    store = RocksDBStateStore(tmp_path, cache_bytes=1 << 20)
    clock = FakeClock()
    processor = Processor(
        ROUTES, Settings(), store, FakeSink(transactional=False), clock,
        dedupe_window_ms=3_600_000, expire_slice=2,
    )  # fmt: skip
    hour = 3_600_000

    def commit(offset: int, *calls: tuple[str, int]) -> None:
        batch: list[SourceRecord] = [
            Record("in", 0, offset + i, call(m), timestamp_ms=t) for i, (m, t) in enumerate(calls)
        ]
        processor.process(batch)
        processor.write_changelog()
        store.commit()

    commit(0, *[(f"m{i}", 1_000) for i in range(5)])
    clock.advance(2 * 3_600)  # and a window and more of the clock
    with capture_logs() as logs:
        commit(5, ("n9", 2_000 + hour))  # after the others in key order
        processor.expire_seen()
        assert store.seen_count() == 4  # m0, m1 scanned and gone
        for _ in range(2):
            processor.expire_seen()
    assert store.seen_count() == 1
    assert [(e["event"], e["ids"]) for e in logs] == [("dedupe_ids_expired", 5)]
    store.close()


def test_a_restored_id_keeps_the_time_it_was_written() -> None:
    """Restored onto an empty store, a backlog call's id keeps its dedupe record's
    timestamp as its write time, so the partition's later arrivals do not expire it
    before its retry."""
    hour = 3_600_000
    start = 1_424_730_535_111
    clock = FakeClock(start + 40 * hour)  # draining a backlog
    sink = FakeSink(clock=clock)
    first = Processor(ROUTES, Settings(), InMemoryStateStore(), sink, clock, dedupe_window_ms=hour)
    sink.begin()
    first.process([Record("in", 0, 0, call("m1"), timestamp_ms=start)])
    first.write_changelog()
    sink.commit({}, None)  # type: ignore[arg-type]
    clock.advance(60)
    store = InMemoryStateStore()  # the partition moved to a worker without its files
    restore_partition(FakeRestorer(sink), store, Changelogs("state", "members", "dedupe"), 0)
    out = FakeSink(transactional=False)
    processor = Processor(ROUTES, Settings(), store, out, clock, dedupe_window_ms=hour)
    steps = [("a", "g0", start + 30 * hour), ("m1", "g1", start + hour // 2)]
    for offset, (mid, group, arrival) in enumerate(steps, 1):
        tally = processor.process([Record("in", 0, offset, call(mid, group), timestamp_ms=arrival)])
        processor.write_changelog()
        store.commit()
        processor.expire_seen()
        clock.advance(60)
    assert tally.outcomes == {"duplicate": 1}


def test_a_record_stamped_days_ahead_arrives_now() -> None:
    """A record stamped more than a day ahead of the worker's clock (a producer's bug)
    arrives when it is read, so a retry stamped right is still its duplicate; a day
    ahead or less is clock skew, and the stamp is kept. An arrival carried to stage two
    that far ahead (by an older stage one) is taken as now too."""
    processor, _, store = make()
    now, day = 1_700_000_000_000, 86_400_000  # FakeClock's
    processor.process([Record("in", 0, 0, call("m1"), timestamp_ms=now + 300 * day)])
    processor.process([Record("in", 0, 1, call("m2"), timestamp_ms=now + day)])
    assert (store.seen(0, ("g1", "m1")), store.seen(0, ("g1", "m2"))) == (now, now + day)
    tally = processor.process([Record("in", 0, 2, call("m1"), timestamp_ms=now + 1)])
    assert tally.outcomes == {"duplicate": 1}
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    stage_two, _, store = make(routes)
    enrichment = {"warnings": [], "source": SOURCE}
    written = codec.encode({**codec.decode(call("m3")), "enrichment": enrichment})
    ahead: list[tuple[str, str | bytes | None]] = [("arrival", b"%d" % (now + 300 * day))]
    stage_two.process([Record("rep", 0, 0, written, b"g1", now, ahead)])
    assert store.seen(0, ("g1", "m3")) == now


def test_a_call_without_times_of_its_own_stamped_days_ahead_happens_now() -> None:
    """A call with no time of its own takes its record's timestamp as its event time,
    but not one more than a day ahead of the clock: the group's lastSeenAt would stay in
    the future for good. Its dead letters still show the record's timestamp."""
    processor, sink, _ = make()
    now, day = 1_700_000_000_000, 86_400_000  # FakeClock's
    timeless = codec.decode(call("m1"))
    del timeless["timestamp"]
    records: list[SourceRecord] = [
        Record("in", 0, 0, codec.encode(timeless), timestamp_ms=now + 300 * day),
        Record("in", 0, 1, codec.encode({**timeless, "messageId": "m2"}), timestamp_ms=now + day),
        Record("in", 0, 2, b"{", timestamp_ms=now + 300 * day),
    ]
    processor.process(records)
    assert [c["timestamp"] for c in emitted(sink, "out")] == [
        format_time(now),
        format_time(now + day),
    ]
    assert emitted(sink, "out")[-1]["group"]["lastSeenAt"] == format_time(now + day)
    [letter] = emitted(sink, "dlq")
    assert letter["source"]["timestamp"] == format_time(now + 300 * day)


def test_dedupe_ids_are_written_with_their_arrival_time() -> None:
    """Each applied id goes to the dedupe topic once, on its partition, its arrival as its
    value. The record is stamped when written (0: the producer's now), not with the
    arrival: a backlog a day old is not deleted by the topic's retention as it is written."""
    processor, sink, _ = make()
    processor.process(
        [
            Record("in", 5, 0, call("m1"), timestamp_ms=1_000),
            Record("in", 5, 1, call("m1"), timestamp_ms=2_000),
            Record("in", 5, 2, call("m2", group="g2"), timestamp_ms=3_000),
        ]
    )
    processor.write_changelog()
    ids = [(p.key, p.value, p.partition, p.timestamp) for p in sink.open if p.topic == "dedupe"]
    assert ids == [(b'["g1","m1"]', b"1000", 5, 0), (b'["g2","m2"]', b"3000", 5, 0)]
    [state] = [codec.decode(p.value) for p in sink.open if p.key == b"g1" and p.topic == "state"]
    assert "recent" not in state["merge"]


def test_a_re_keyed_call_keeps_its_arrival_time() -> None:
    """Stage one carries a call's arrival (its input record's timestamp) in a header of
    the re-keyed record, which is stamped when written (0: the producer's now): stamped
    with an old arrival, a backlog could be deleted by the repartition topic's retention
    before stage two read it. Stage two takes the arrival from the header, and from the
    record's timestamp when a record of an older version has none."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    processor, sink, _ = make(routes)
    processor.process([Record("in", 0, 0, call("m1"), b"user-7", timestamp_ms=1_234)])
    [forwarded] = sink.open
    assert (forwarded.topic, forwarded.timestamp) == ("rep", 0)
    assert forwarded.headers == [("arrival", b"1234"), ("input-key", b"user-7")]
    sink.open.clear()
    enrichment = {"warnings": [], "source": SOURCE}
    written = {**codec.decode(call("m2", group="g2")), "enrichment": enrichment}
    older = Record("rep", 0, 1, codec.encode(written), b"g2", 5_678, [("input-key", b"u")])
    processor.process(
        [Record("rep", 0, 0, forwarded.value, forwarded.key, 9_999, forwarded.headers), older]
    )
    processor.write_changelog()
    ids = [(p.key, p.value) for p in sink.open if p.topic == "dedupe"]
    assert ids == [(b'["g1","m1"]', b"1234"), (b'["g2","m2"]', b"5678")]


def test_a_record_the_broker_refused_is_dead_lettered_on_replay() -> None:
    """After learning of a refusal the same call is dead-lettered as output_refused."""
    processor, sink, store = make()
    batch = records(call("m1", name="A"), call("m2", group="g2"))
    processor.process(batch)
    [refused, _] = [p for p in sink.open if p.topic == "out"]
    sink.open.clear()
    store.rollback()
    processor.learn(
        [Refusal("out", refused.key, refused.value, 10, "Broker: Invalid record", False)]
    )
    tally = processor.process(batch)
    assert tally.outcomes == {"dead_letter": 1, "enriched": 1}
    [letter] = emitted(sink, "dlq")
    assert letter["reason"] == "output_refused"
    assert "Invalid record" in letter["message"]
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m2"]


def test_a_refusal_for_size_reads_the_limits_again() -> None:
    """After a too-large refusal the topic's new limit applies: larger records are letters."""
    sink = FakeSink(transactional=False)
    processor = Processor(
        ROUTES,
        Settings(),
        InMemoryStateStore(),
        sink,
        FakeClock(),
        dedupe_window_ms=1,
        read_limits=lambda: {"out": 2_000},
    )
    processor.learn([Refusal("out", b"g1", b"x", 5_000, "Broker: Message size too large", True)])
    tally = processor.process(records(call("m1", name="x" * 2_000), call("m2", group="g2")))
    assert tally.reasons == {"output_too_large": 1}
    assert [c["messageId"] for c in emitted(sink, "out")] == ["m2"]


def test_a_refused_batch_within_the_limit_asks_for_a_new_producer() -> None:
    """A too-large refusal of a record that fits the topic means batches outgrew it."""
    processor = Processor(
        ROUTES,
        Settings(),
        InMemoryStateStore(),
        FakeSink(),
        FakeClock(),
        dedupe_window_ms=1,
        read_limits=lambda: {"out": 100_000},
    )
    with pytest.raises(KafkaError, match="batches"):
        processor.learn([Refusal("out", b"g1", b"x", 500, "Broker: Message size too large", True)])


def test_dead_letters_are_logged_without_values_and_rate_limited() -> None:
    """Each reason logs at most one line per interval, naming its position, never the value."""
    processor, _, _ = make()
    with capture_logs() as logs:
        processor.process(records(b"secret-value-1", b"secret-value-2", b"[1]"))
    lines = [e for e in logs if e["event"] == "dead_letter"]
    assert [(e["reason"], e["offset"]) for e in lines] == [
        ("invalid_json", 0),
        ("not_an_object", 2),
    ]
    assert "secret" not in repr(logs)
    assert "timestamp" not in lines[0]  # the line's own time, which the renderer sets
    with capture_logs() as logs:  # a reason not logged yet: missing_type
        processor.process([Record("in", 2, 9, b'{"a": 1}', timestamp_ms=1_424_730_535_111)])
    assert logs[0]["record_timestamp"] == T0


def test_a_dead_letter_of_stage_two_is_keyed_by_its_input_record() -> None:
    """A call too large once enriched in stage two is dead-lettered under its input
    record's key and timestamp (carried through the repartition topic in headers), as in
    one stage, an empty key as empty; a null key, or one over 1 KiB, leaves the letter
    without one."""
    routes = Routes("in", "out", "dlq", "state", "members", repartition="rep")
    limits = Limits({"out": 1_000, "dlq": 100_000, "rep": 100_000})
    processor, sink, _ = make(routes, limits=limits, bound=GroupBound(10_000, 10_000))
    keys = [b"user-7", None, b"", b"k" * 1_025]
    big = [call(f"m{n}", name="x" * 600) for n in range(len(keys))]
    sent = 1_700_000_000_000
    processor.process([Record("in", 3, n, big[n], key, sent + n) for n, key in enumerate(keys)])
    forwarded = [p for p in sink.open if p.topic == "rep"]
    assert [p.key for p in forwarded] == [b"g1"] * 4
    sink.open.clear()

    processor.process(
        [
            Record("rep", 1, n, p.value, p.key, p.timestamp, list(p.headers or ()))
            for n, p in enumerate(forwarded)
        ]
    )
    letters = [p for p in sink.open if p.topic == "dlq"]
    assert [p.key for p in letters] == [b"user-7", None, b"", None]
    sources = [codec.decode(p.value)["source"] for p in letters]
    assert [s["key"] for s in sources] == ["user-7", None, "", None]
    assert [(s["topic"], s["partition"], s["offset"], s["timestamp"]) for s in sources] == [
        ("in", 3, n, format_time(sent + n)) for n in range(4)
    ]


def test_membership_and_dedupe_records_name_their_deployment_in_a_header() -> None:
    """Membership and dedupe records carry a header naming the deployment that wrote
    them (a restore of another deployment's stops at it); a state record names it in
    its value, with no header, and without a deployment nothing carries one."""
    processor, sink, _ = make(deployment="prod-eu")
    processor.process(records(call("m1", name="Initech")))
    processor.write_changelog()
    headers = {p.topic: p.headers for p in sink.open if p.topic != "out"}
    assert headers == {
        "state": None,
        "members": [("deployment", b"prod-eu")],
        "dedupe": [("deployment", b"prod-eu")],
    }
    processor, sink, _ = make()
    processor.process(records(call("m1", name="Initech")))
    processor.write_changelog()
    assert {p.headers for p in sink.open} == {None}
