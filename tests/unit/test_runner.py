"""The loop (worker.runner) driven with fakes: commits, aborts, rebalances, accounting."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
from prometheus_client import CollectorRegistry

from tests.fakes import FakeClock, FakeRestorer, FakeSink, FakeSource, FlakyRestorer, Produced
from tests.unit.test_store_rocksdb import corrupt_blocks, on_disk
from worker import codec
from worker.errors import (
    AbortableError,
    FatalError,
    KafkaError,
    ProducerHungError,
    RetriableError,
    TopicError,
)
from worker.members import Membership
from worker.metrics import Metrics
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.restore import Entry
from worker.runner import Runner, RunnerSettings
from worker.source import Cut, Offsets, Partition, fingerprint
from worker.store import InMemoryStateStore, RocksDBStateStore, StateStore

ROUTES = Routes(input="in", enriched="out", dlq="dlq", state="state", members="members")
SETTINGS = RunnerSettings(ROUTES, batch_size=10, commit_interval=0.1, poll_timeout=0.1)


def group_call(n: int, **extra: Any) -> bytes:
    return codec.encode(
        {"type": "group", "messageId": f"m{n}", "userId": f"u{n}", "groupId": f"g{n % 3}", **extra}
    )


def envelope(r: int) -> bytes:
    """The ``r``-th batch envelope of 100 calls: m{100r} to m{100r + 99}."""
    return codec.encode({"batch": [codec.decode(group_call(100 * r + n)) for n in range(100)]})


def make(
    transactional: bool = True, partitions: int = 1
) -> tuple[Runner, FakeSource, FakeSink, Metrics]:
    source = FakeSource(FakeClock(), partitions)
    sink = FakeSink(transactional=transactional)
    runner, metrics = build(source, sink)
    return runner, source, sink, metrics


def build(
    source: FakeSource,
    sink: FakeSink,
    settings: RunnerSettings = SETTINGS,
    restorer: FakeRestorer | None = None,
    store: StateStore | None = None,
) -> tuple[Runner, Metrics]:
    """A runner over ``source`` and ``sink`` (which also restores), with ``store`` or a
    fresh in-memory one."""
    metrics = Metrics(CollectorRegistry())
    store = store or InMemoryStateStore()
    processor = Processor(
        settings.routes, Settings(), store, sink, source.clock, dedupe_window_ms=86_400_000
    )
    restorer = restorer or FakeRestorer(sink)
    runner = Runner(settings, source, sink, processor, store, restorer, metrics, source.clock)
    return runner, metrics


def run_for(runner: Runner, source: FakeSource, consumes: int) -> None:
    """Run the loop until ``consumes`` calls of consume() have happened."""
    source.on_consume = lambda n: runner.stop() if n >= consumes else None
    runner.run()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        k: sample(metrics, "group_worker_outcomes_total", outcome=k)
        for k in ("enriched", "skipped", "dead_letter", "duplicate")
    }


def message_ids(sink: FakeSink, topic: str = "out") -> list[str]:
    return [codec.decode(p.value)["messageId"] for p in sink.topic(topic)]


@pytest.mark.parametrize("transactional", [True, False], ids=["exactly_once", "at_least_once"])
def test_every_call_ends_in_one_outcome_and_offsets_commit(transactional: bool) -> None:
    """Good calls are enriched, bad ones dead-lettered, others skipped; then offsets commit."""
    runner, source, sink, metrics = make(transactional)
    for n in range(5):
        source.append(group_call(n))
    source.append(b"not json", key=b"bad")
    source.append(codec.encode({"type": "track", "userId": "u"}))
    source.append(codec.encode({"batch": [codec.decode(group_call(9)), {"type": "page"}]}))
    run_for(runner, source, 5)

    assert message_ids(sink) == ["m0", "m1", "m2", "m3", "m4", "m9"]
    [letter] = sink.topic("dlq")
    assert letter.key == b"bad"
    assert letter.headers == [("reason", b"invalid_json")]
    assert source.committed_offsets == {("in", 0): 8}
    if transactional:
        assert sink.offset_commits[-1] == {("in", 0): 8}
    assert outcomes(metrics) == {"enriched": 6, "skipped": 2, "dead_letter": 1, "duplicate": 0}
    assert sample(metrics, "group_worker_calls_consumed_total") == 9
    assert sample(metrics, "group_worker_records_consumed_total") == 8
    assert sample(metrics, "group_worker_dead_letters_total", reason="invalid_json") == 1
    assert sample(metrics, "group_worker_skipped_calls_total", type="page") == 1
    assert source.closed


def test_enriched_records_are_keyed_by_group_id() -> None:
    """The enriched topic is keyed by groupId."""
    runner, source, sink, _ = make()
    source.append(group_call(4))
    run_for(runner, source, 3)
    assert [p.key for p in sink.topic("out")] == [b"g1"]


def test_offsets_are_not_committed_until_outputs_are_delivered() -> None:
    """At least once: a failed delivery check leaves offsets uncommitted, and a retry commits."""
    runner, source, sink, metrics = make(transactional=False)
    source.append(group_call(1))
    sink.fail_next_commit = RetriableError("broker away")

    def check(n: int) -> None:
        if n == 2:
            assert source.commits == []
        if n >= 6:
            runner.stop()

    source.on_consume = check
    runner.run()
    assert source.committed_offsets == {("in", 0): 1}
    assert message_ids(sink) == ["m1"]
    assert sample(metrics, "group_worker_commit_failures_total") == 1


def test_commit_waits_for_the_interval() -> None:
    """Records consumed within one commit interval are committed together."""
    runner, source, sink, _ = make()
    source.append(group_call(1))
    source.append(group_call(2))
    run_for(runner, source, 4)
    assert sink.offset_commits == [{("in", 0): 2}]


def test_a_caught_up_loop_commits_before_the_interval() -> None:
    """Once a consume finds less than a full batch, a batch commits as soon as it is
    commit_min_interval old, not commit_interval: latency below the full rate."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    settings = RunnerSettings(
        ROUTES, 10, commit_interval=60, commit_min_interval=0.05, poll_timeout=0.1
    )
    runner, _ = build(source, sink, settings)
    source.append(group_call(1))
    source.append(group_call(2))
    commits: list[int] = []  # commits made before each consume

    def drive(n: int) -> None:
        commits.append(len(sink.offset_commits))
        if n >= 5:
            runner.stop()

    source.on_consume = drive
    runner.run()
    # Consume 1 assigns the partition (restored after it); consume 2 takes both calls
    # (the batch is 0 s old); consume 3 finds nothing (0.1 s old).
    assert commits == [0, 0, 0, 1, 1]
    assert sink.offset_commits[0] == {("in", 0): 2}


def test_an_early_commit_waits_as_long_as_the_last_commit_took() -> None:
    """Caught up, a batch commits early only once it is as old as the last commit took:
    slow commits (a loaded broker) never take more than half the loop's time."""
    source = FakeSource(FakeClock())

    class SlowSink(FakeSink):
        def commit(self, *args: Any, **kwargs: Any) -> Any:
            source.clock.advance(0.45)
            return super().commit(*args, **kwargs)

    sink = SlowSink()
    settings = RunnerSettings(
        ROUTES, 10, commit_interval=60, commit_min_interval=0.05, poll_timeout=0.1
    )
    runner, _ = build(source, sink, settings)
    source.append(group_call(1))
    commits: list[int] = []  # commits made before each consume

    def drive(n: int) -> None:
        commits.append(len(sink.offset_commits))
        if n == 4:
            source.append(group_call(2))
        if n >= 10:
            runner.stop()

    source.on_consume = drive
    runner.run()
    # Call 1, taken by consume 2 (consume 1 assigns), commits at 0.1 s (the commit takes
    # 0.45 s); call 2, taken by consume 4, waits five empty consumes (0.5 s), not one.
    assert commits == [0, 0, 0, 1, 1, 1, 1, 1, 1, 2]


def test_a_loop_behind_its_input_commits_by_the_interval() -> None:
    """Full batches mean the input is ahead: no early commit, however old the batch."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    settings = RunnerSettings(
        ROUTES, 2, commit_interval=60, commit_min_interval=0, poll_timeout=0.1
    )
    runner, _ = build(source, sink, settings)
    for n in range(6):
        source.append(group_call(n))
    run_for(runner, source, 5)  # three full batches, then nothing: one commit
    assert sink.offset_commits == [{("in", 0): 6}]


def test_abortable_commit_aborts_and_replays_exactly_once() -> None:
    """An aborted transaction discards its outputs and the records are processed again;
    the metrics count what commits, once (with two stages, a replay of the second alone
    counted its outcomes again, and never the calls consumed)."""
    runner, source, sink, metrics = make()
    for n in range(3):
        source.append(group_call(n, timestamp="not a time" if n == 1 else None))
    sink.fail_next_commit = AbortableError("fenced epoch bump")
    run_for(runner, source, 8)
    assert sink.aborts == 1
    assert message_ids(sink) == ["m0", "m1", "m2"]
    assert sink.offset_commits[-1] == {("in", 0): 3}
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 3
    assert sample(metrics, "group_worker_invalid_timestamps_total") == 1
    assert sample(metrics, "group_worker_calls_consumed_total") == 3
    assert sample(metrics, "group_worker_records_consumed_total") == 3
    # The aborted batch's changelog records were counted too, as they were produced.
    changelog = [p for p in sink.committed if p.topic in ("state", "members", "dedupe")]
    assert sample(metrics, "group_worker_changelog_records_total") == len(changelog) > 0


def test_a_produce_failing_half_way_through_a_batch_loses_no_record() -> None:
    """The transaction fails under a batch (a produce raises): the records after it were
    consumed but never processed, and the replay must read them too."""
    runner, source, sink, _ = make(partitions=2)
    for n in range(6):
        source.append(group_call(n), partition=n % 2)
    sink.fail_produce = (1, AbortableError("produce refused: erroneous state"))
    run_for(runner, source, 8)
    assert sink.aborts == 1
    assert sorted(message_ids(sink)) == [f"m{n}" for n in range(6)]
    assert sink.offset_commits[-1] == {("in", 0): 3, ("in", 1): 3}


def test_revoke_commits_before_partitions_move() -> None:
    """Partitions revoked in a rebalance have their processed offsets committed first."""
    runner, source, sink, metrics = make(partitions=2)
    source.append(group_call(1), partition=0)
    source.append(group_call(2), partition=1)

    def rebalance(n: int) -> None:
        if n == 3:  # consume 1 assigns, consume 2 reads both calls
            source.rebalance(revoke=[("in", 1)], assign=[])
        if n >= 5:
            runner.stop()

    source.on_consume = rebalance
    runner.run()
    assert sink.offset_commits[0] == {("in", 0): 1, ("in", 1): 1}
    assert message_ids(sink) == ["m1", "m2"]
    assert sample(metrics, "group_worker_rebalances_total", kind="revoke") >= 1


@pytest.mark.parametrize("hang", ["uncommitted", "committed"])
def test_a_producer_that_hangs_is_renewed_and_the_consumer_kept(
    hang: Literal["uncommitted", "committed"],
) -> None:
    """A commit whose producer hangs (after a broker restart) is neither lost nor done
    twice, whether the broker committed it or not: the sink takes a new producer, the
    loop and its consumer go on, and each partition is read again from its committed
    offset, its state caught up from the changelogs (the loop ended: a new consumer
    waited for the old one's session in the group)."""
    runner, source, sink, metrics = make(partitions=2)
    for n in range(6):
        source.append(group_call(n), partition=n % 3 % 2)  # a group's calls on one
    sink.hang_next_commit = hang

    def feed(n: int) -> None:
        if n == 8:
            for k in range(6, 9):
                source.append(group_call(k), partition=k % 3 % 2)
        if n >= 20:
            runner.stop()

    source.on_consume = feed
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert sink.renews == sample(metrics, "group_worker_producer_renewals_total") == 1
    assert sorted(message_ids(sink), key=lambda m: int(m[1:])) == [f"m{k}" for k in range(9)]
    assert source.committed_offsets == {("in", 0): 6, ("in", 1): 3}
    assert {g: s["eventCount"] for g, s in states(sink).items()} == {"g0": 3, "g1": 3, "g2": 3}
    assert outcomes(metrics)["duplicate"] == 0
    events = [e["event"] for e in logs]
    assert events.count("producer_renewing") == 1
    assert events.index("producer_renewed") < len(events) - 1  # the loop went on


def test_an_abort_that_hangs_renews_the_producer() -> None:
    """An abort whose call hangs (the broker gone as the batch failed) renews the
    producer too (it ended the loop), and the batch is read again, done once."""
    runner, source, sink, _ = make()
    for n in range(3):
        source.append(group_call(n))
    sink.fail_next_commit = AbortableError("53 message(s) failed delivery")
    sink.hang_next_abort = True
    run_for(runner, source, 12)
    assert sink.renews == 1
    assert message_ids(sink) == ["m0", "m1", "m2"]
    assert source.committed_offsets == {("in", 0): 3}


def test_a_new_producer_is_tried_again_while_the_broker_is_away() -> None:
    """While the new producer cannot start (the broker still away), the loop tries
    again, polling its consumer in between, and goes on once one starts."""
    runner, source, sink, _ = make()
    for n in range(3):
        source.append(group_call(n))
    sink.hang_next_commit = "uncommitted"
    sink.fail_renew = RetriableError("init_transactions: broker transport failure")
    waiting: list[bool] = []  # ready, at the consume while it waits for the broker

    def watch(n: int) -> None:
        if sink.renews == 1:
            waiting.append(runner.ready)
        if n >= 12:
            runner.stop()

    source.on_consume = watch
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert sink.renews == 2
    assert waiting == [False]
    assert message_ids(sink) == ["m0", "m1", "m2"]
    events = [e["event"] for e in logs]
    assert events.index("producer_renew_failed") < events.index("producer_renewed")


def test_partitions_lost_while_waiting_for_a_new_producer_do_not_end_the_loop() -> None:
    """Partitions lost while the broker is away (the consumer polled as a new producer
    is awaited) are let go without an abort (the stuck producer's would end the loop)."""
    runner, source, sink, _ = make(partitions=2)
    sink.hang_next_commit = "uncommitted"
    sink.fail_renew = RetriableError("init_transactions: broker transport failure")
    run_losing_partition_1(runner, source, lambda _: sink.renews == 1, last=12)
    assert sink.renews == 2
    assert message_ids(sink) == ["m1"]
    assert source.committed_offsets == {("in", 0): 1}


@pytest.mark.parametrize("stopped", [False, True], ids=["fatal", "stopped"])
def test_a_producer_that_cannot_be_renewed_for_good_ends_the_loop(stopped: bool) -> None:
    """A new producer refused for good (an ACL) ends the loop with its error; a stop
    while it waits for the broker ends it cleanly, nothing of the batch committed."""
    runner, source, sink, _ = make()
    source.append(group_call(1))
    sink.hang_next_commit = "uncommitted"
    if stopped:
        sink.fail_renew = RetriableError("init_transactions: broker transport failure")
        source.on_consume = lambda n: runner.stop() if sink.renews else None
        runner.run()
    else:
        sink.fail_renew = FatalError("transactional id (needs Write, Describe)")
        with pytest.raises(FatalError, match="needs Write"):
            run_for(runner, source, 10)
    assert sink.renews == 1
    assert (source.closed, message_ids(sink), source.committed_offsets) == (True, [], {})


def test_a_producer_that_hangs_in_a_revoke_ends_the_loop() -> None:
    """A hang inside a rebalance callback ends the loop (consume()'s records went with
    the callback's error): not a renewal."""
    runner, source, sink, _ = make(partitions=2)
    source.append(group_call(1), partition=0)
    source.append(group_call(2), partition=1)

    def rebalance(n: int) -> None:
        if n == 3:  # consume 1 assigns, consume 2 reads both calls
            sink.hang_next_commit = "uncommitted"
            source.rebalance(revoke=[("in", 1)], assign=[])
        if n >= 6:
            runner.stop()

    source.on_consume = rebalance
    with pytest.raises(KafkaError, match="aborting on revoke failed") as failed:
        runner.run()
    assert not isinstance(failed.value, ProducerHungError)
    assert sink.renews == 0


def test_a_partition_added_while_running_stops_the_worker() -> None:
    """A partition beyond the count the topics had at start (added while the worker
    ran: groups now hash elsewhere than their state) stops the loop with TopicError,
    before anything of it is restored or read; what was committed before stays."""
    settings = dataclasses.replace(SETTINGS, partitions=2)
    source = FakeSource(FakeClock(), 3)
    source.pending_assign = [("in", 0), ("in", 1)]
    sink = FakeSink()
    runner, _ = build(source, sink, settings)
    source.append(group_call(1), partition=0)
    source.append(group_call(2), partition=2)

    def add_partition(n: int) -> None:
        if n == 4:
            source.rebalance(revoke=[], assign=[("in", 2)])

    source.on_consume = add_partition
    with pytest.raises(TopicError, match=r"topic in has partition 2, beyond the 2 its topics"):
        runner.run()
    assert message_ids(sink) == ["m1"]
    assert sink.offset_commits[-1] == {("in", 0): 1}
    assert source.closed


def run_losing_partition_1(
    runner: Runner, source: FakeSource, when: Callable[[int], bool], last: int
) -> None:
    """Run the loop over m1 on partition 0 and m2 on partition 1, losing partition 1 (its
    read position with it) at the first consume where ``when(consumes)`` holds, and
    stopping at consume ``last``."""
    source.append(group_call(1), partition=0)
    source.append(group_call(2), partition=1)

    def lose(n: int) -> None:
        if when(n) and ("in", 1) in source.position:
            runner.on_lost([("in", 1)])
            source.position.pop(("in", 1))
        if n >= last:
            runner.stop()

    source.on_consume = lose
    runner.run()


def test_lost_partitions_abort_and_keep_the_rest() -> None:
    """Lost partitions abort the open batch; kept partitions are read again and committed."""
    runner, source, sink, _ = make(partitions=2)
    run_losing_partition_1(runner, source, lambda n: n == 2, last=5)
    assert sink.aborts == 1
    assert message_ids(sink) == ["m1"]
    assert sink.offset_commits[-1] == {("in", 0): 1}


def test_a_member_that_lost_its_partitions_is_not_ready_until_it_joins_again() -> None:
    """Partitions lost (its session expired, the broker away) leave the worker out of
    the group: /readyz said 200 for the 100 s a broker was down, with no partitions."""
    runner, source, _, _ = make()
    source.append(group_call(1))
    readiness: list[bool] = []

    def lose(n: int) -> None:
        assert runner is not None
        if n == 2:
            runner.on_lost([("in", 0)])
            source.position.pop(("in", 0))
            readiness.append(runner.ready)
            source.rebalance(revoke=[], assign=[("in", 0)])  # joined again
        if n == 4:
            readiness.append(runner.ready)
            runner.stop()

    source.on_consume = lose
    runner.run()
    assert readiness == [False, True]


def test_fatal_error_stops_the_loop_and_closes() -> None:
    """A fatal Kafka error propagates out of run() after the source is closed."""
    runner, source, sink, _ = make()
    source.append(group_call(1))
    sink.fail_next_commit = FatalError("producer fenced")
    with pytest.raises(FatalError):
        run_for(runner, source, 10)
    assert source.closed


class _FailingOnMember(InMemoryStateStore):
    """A store that raises, like a bug would, half way through applying ``u2``'s call
    (its group's state and dedupe id already put)."""

    def put_member(self, partition: int, key: str, m: Membership) -> None:
        if '"u2"' in key:
            raise RuntimeError("a bug half way through a record")
        super().put_member(partition, key, m)


def test_an_error_half_way_through_a_record_commits_nothing_of_its_batch() -> None:
    """An error the loop does not handle aborts the open batch: closing the consumer
    revokes its partitions, and the revoke committed the batch, with the failing
    record's state and dedupe id but not its offset, so its call was lost."""
    source, sink, store = FakeSource(FakeClock()), FakeSink(), _FailingOnMember()
    runner, _ = build(source, sink, store=store)
    source.append(group_call(1))
    source.append(group_call(2))
    with pytest.raises(RuntimeError, match="half way"):
        run_for(runner, source, 10)
    assert source.closed
    assert sink.offset_commits == []
    assert message_ids(sink) == []
    assert sink.topic("dedupe") == []
    assert store.seen(0, ("g2", "m2")) is None
    assert store.seen(0, ("g1", "m1")) is None


def test_readiness_follows_the_group() -> None:
    """The worker is ready once it has joined the group, and not once it is stopping."""
    runner, source, _, _ = make()
    assert not runner.ready
    states: list[bool] = []

    def watch(n: int) -> None:
        states.append(runner.ready)
        if n >= 3:
            runner.stop()

    source.on_consume = watch
    runner.run()
    assert states == [False, True, True]
    assert not runner.ready


def lagging() -> tuple[Runner, FakeSource, FakeSink, Metrics]:
    """A runner on two partitions, the first holding 15 calls and lag exported once the
    loop has read 10 of them: in its second consume (the first assigns the partitions),
    the clock past the lag interval."""
    runner, source, sink, metrics = make(partitions=2)
    for n in range(15):
        source.append(group_call(n), partition=0)
    source.on_consume = lambda n: source.clock.advance(10) if n == 2 else None
    return runner, source, sink, metrics


def also(source: FakeSource, then: Callable[[int], None]) -> None:
    """Run ``then`` at each consume too, after what ``source`` already ran."""
    first = source.on_consume

    def both(n: int) -> None:
        if first is not None:
            first(n)
        then(n)

    source.on_consume = both


def test_lag_is_exported_per_assigned_partition() -> None:
    """Consumer lag is exported per assigned partition and removed on revoke."""
    runner, source, _, metrics = lagging()

    def revoke(n: int) -> None:
        if n == 3:
            assert sample(metrics, "group_worker_consumer_lag", topic="in", partition="0") == 5
            source.rebalance(revoke=[("in", 0)], assign=[])
        if n >= 4:
            runner.stop()

    also(source, revoke)
    runner.run()
    assert (
        metrics.registry.get_sample_value(
            "group_worker_consumer_lag", {"topic": "in", "partition": "0"}
        )
        is None
    )


def test_a_loop_that_ends_on_an_error_leaves_no_partition_series_behind() -> None:
    """When the loop ends on an error (the service then builds a new one, on the same
    metrics), its partitions' lag and assignment series go with it."""
    runner, source, sink, metrics = lagging()

    def fail(n: int) -> None:
        if n == 3:
            assert sample(metrics, "group_worker_consumer_lag", topic="in", partition="0") == 5
            assert sample(metrics, "group_worker_assigned_partitions", topic="in") == 2
            source.clock.advance(10)

            def hung(*_: Any) -> Any:  # every commit from now on, the one at close too
                raise FatalError("a transactional call hung")

            sink.commit = hung  # type: ignore[method-assign, assignment]

    also(source, fail)
    with pytest.raises(FatalError):
        runner.run()
    lag = {"topic": "in", "partition": "0"}
    assert metrics.registry.get_sample_value("group_worker_consumer_lag", lag) is None
    assert sample(metrics, "group_worker_assigned_partitions", topic="in") == 0


def test_a_loop_whose_consumer_cannot_close_leaves_no_series_and_is_not_ready() -> None:
    """When the loop ends on an error and the consumer's close fails before any revoke
    (the broker away), the partitions' series go all the same, and the loop no longer
    says it is ready while the service builds the next one."""
    runner, source, sink, metrics = lagging()

    def fail(n: int) -> None:
        if n == 3:
            assert runner.ready
            assert sample(metrics, "group_worker_consumer_lag", topic="in", partition="0") == 5
            sink.fail_next_commit = FatalError("fenced")
            source.clock.advance(10)

    def close() -> None:
        raise RuntimeError("the consumer could not leave the group")

    also(source, fail)
    source.close = close  # type: ignore[method-assign]
    with pytest.raises(FatalError):
        runner.run()
    assert not runner.ready
    lag = {"topic": "in", "partition": "0"}
    assert metrics.registry.get_sample_value("group_worker_consumer_lag", lag) is None
    assert sample(metrics, "group_worker_assigned_partitions", topic="in") == 0


def states(sink: FakeSink) -> dict[str, Any]:
    """The newest committed state record per group, as a compacted topic reads."""
    return {p.key.decode(): codec.decode(p.value) for p in sink.topic("state") if p.key}


def test_restarted_runner_restores_state_and_keeps_counting() -> None:
    """A new runner restores state; counts go on and memberships are not sent again."""
    runner, source, sink, _ = make()
    for n in range(6):
        source.append(group_call(n, timestamp="2015-02-23T22:28:55.111Z"))
    run_for(runner, source, 4)
    assert states(sink)["g0"]["eventCount"] == 2
    members_before = len(sink.topic("members"))

    restarted = FakeSource(source.clock)
    restarted.log = source.log
    restarted.committed_offsets = dict(source.committed_offsets)
    source.append(group_call(3, messageId="again", timestamp="2015-02-23T22:28:55.111Z"))
    second, metrics = build(restarted, sink)
    held: list[float] = []

    def watch(n: int) -> None:
        held.append(sample(metrics, "group_worker_groups_in_state"))
        if n >= 4:
            second.stop()

    restarted.on_consume = watch
    second.run()

    assert held[1:] == [3, 3, 3]
    assert sample(metrics, "group_worker_groups_in_state") == 0  # revoked at close
    assert states(sink)["g0"]["eventCount"] == 3
    assert states(sink)["g0"]["memberCount"] == 2
    assert len(sink.topic("members")) == members_before
    # Three groups, six memberships, six dedupe ids.
    assert sample(metrics, "group_worker_restored_records_total") == 3 + 6 + 6


def test_replayed_duplicates_do_not_change_state() -> None:
    """Calls read twice (at least once after a failure) are duplicates, and state is unchanged."""
    runner, source, sink, metrics = make(transactional=False)
    source.append(group_call(1))
    run_for(runner, source, 3)
    source.committed_offsets.clear()  # as if the offset commit had been lost
    again = FakeSource(source.clock)
    again.log = source.log
    second, metrics = build(again, sink)
    run_for(second, again, 3)
    assert sample(metrics, "group_worker_outcomes_total", outcome="duplicate") == 1
    assert message_ids(sink) == ["m1"]
    assert states(sink)["g1"]["eventCount"] == 1


def test_abort_rolls_state_back_before_the_replay() -> None:
    """After an aborted transaction the replayed calls are merged once, not counted twice."""
    runner, source, sink, metrics = make()
    for n in range(3):
        source.append(group_call(n * 3))  # all in group g0
    sink.fail_next_commit = AbortableError("aborted")
    run_for(runner, source, 8)
    assert sink.aborts == 1
    assert states(sink)["g0"]["eventCount"] == 3
    assert sample(metrics, "group_worker_outcomes_total", outcome="duplicate") == 0


def test_a_long_producer_backlog_pauses_consumption_until_it_drains() -> None:
    """Backpressure: past the high mark every partition is paused, and resumed below the low."""
    runner, source, sink, metrics = make(partitions=2)
    seen: list[tuple[int, float]] = []

    def drive(n: int) -> None:
        seen.append((len(source.paused), sample(metrics, "group_worker_paused_partitions")))
        sink.queued = {2: 60_000, 4: 20_000, 5: 5_000}.get(n, sink.queued)
        if n >= 7:
            runner.stop()

    source.on_consume = drive
    runner.run()
    assert seen == [(0, 0), (0, 0), (2, 2), (2, 2), (2, 2), (0, 0), (0, 0)]


def test_commit_comes_early_when_the_record_bound_is_reached() -> None:
    """Past commit_max_records uncommitted records a commit happens before the interval."""
    source = FakeSource(FakeClock())
    sink = FakeSink()
    settings = RunnerSettings(ROUTES, 2, commit_interval=60, commit_max_records=4, poll_timeout=0.1)
    runner, _ = build(source, sink, settings)
    for n in range(6):
        source.append(group_call(n))
    run_for(runner, source, 4)
    assert sink.offset_commits[0] == {("in", 0): 4}


def event_count(store: StateStore, group_id: str) -> int | None:
    state = store.get(0, group_id)
    return None if state is None else state.event_count


def test_a_restart_on_the_same_store_replays_only_what_others_wrote(tmp_path: Path) -> None:
    """A durable store comes back at the offsets it committed: only the changelog records
    written since (here by another worker) are replayed, and the state is the fold."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    for n in range(6):
        source.append(group_call(n))
    first, _ = build(source, sink, store=RocksDBStateStore(tmp_path, 1 << 20))
    run_for(first, source, 4)
    committed = {role: sink.ends[(role, 0)] for role in ("state", "members", "dedupe")}
    written_first = sum(committed.values())

    def rerun(store: StateStore) -> Metrics:
        restarted = source.restarted()
        runner, metrics = build(restarted, sink, store=store)
        run_for(runner, restarted, 4)
        return metrics

    for n in range(6, 9):  # calls for g0..g2 again, and three new members
        source.append(group_call(n))
    rerun(InMemoryStateStore())  # another worker, which replays everything
    written_since = sum(sink.ends[(role, 0)] for role in committed) - written_first
    assert written_since == 3 + 3 + 3

    store = RocksDBStateStore(tmp_path, 1 << 20)
    source.append(group_call(9))
    metrics = rerun(store)
    assert sample(metrics, "group_worker_restored_records_total") == written_since
    assert states(sink)["g0"]["eventCount"] == 4  # calls 0, 3, 6 and 9
    reopened = RocksDBStateStore(tmp_path, 1 << 20)
    assert event_count(reopened, "g0") == 4
    assert reopened.stored_offsets(0) == {r: sink.ends[(r, 0)] for r in committed}
    reopened.close()


def test_an_aborted_transaction_leaves_the_store_exactly_as_before(tmp_path: Path) -> None:
    """A commit that fails aborts: the store's files and reads are as the last commit left
    them, and the replayed batch then commits with its changelog offsets."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    store = RocksDBStateStore(tmp_path, 1 << 20)
    runner, metrics = build(source, sink, store=store)
    for n in range(6):
        source.append(group_call(n))
    seen: dict[str, Any] = {}

    def step(n: int) -> None:
        if "files" not in seen and store.get(0, "g0") and not store.changes():
            # The first batch committed: fail the next commit.
            # Copies: the store's states change in place as calls merge into them.
            seen["files"], seen["g0"] = on_disk(store, 0), copy.deepcopy(store.get(0, "g0"))
            for k in range(6, 12):
                source.append(group_call(k))
            sink.fail_next_commit = AbortableError("transaction aborted by the broker")
        elif "files" in seen and "aborted" not in seen and sink.aborts:
            # Aborted and rewound, not replayed yet.
            seen["aborted"] = on_disk(store, 0)
            seen["aborted g0"] = copy.deepcopy(store.get(0, "g0"))
        if n >= 12:
            runner.stop()

    source.on_consume = step
    runner.run()
    assert sample(metrics, "group_worker_transaction_aborts_total") == 1
    assert seen["aborted"] == seen["files"]
    assert seen["aborted g0"] == seen["g0"]
    assert seen["g0"].event_count == 2  # calls 0 and 3
    reopened = RocksDBStateStore(tmp_path, 1 << 20)
    assert event_count(reopened, "g0") == 4
    assert reopened.stored_offsets(0) == {
        r: sink.ends[(r, 0)] for r in ("state", "members", "dedupe")
    }
    reopened.close()


def test_a_store_that_fails_to_prepare_still_commits_the_batch(tmp_path: Path) -> None:
    """The store's prepare runs while the transaction commits, which may succeed: its
    error is logged, not taken for the commit's (no abort, nothing replayed), and the
    store's commit prepares again."""
    failures: list[str] = []

    class FailingOnce(RocksDBStateStore):
        def prepare(self) -> None:
            if not failures:
                failures.append("prepare")
                raise MemoryError("no room")
            super().prepare()

    source, sink = FakeSource(FakeClock()), FakeSink()
    runner, metrics = build(source, sink, store=FailingOnce(tmp_path, 1 << 20))
    for n in range(6):
        source.append(group_call(n))
    with structlog.testing.capture_logs() as logs:
        run_for(runner, source, 4)
    assert [e["error"] for e in logs if e["event"] == "store_prepare_failed"] == ["no room"]
    assert sample(metrics, "group_worker_transaction_aborts_total") == 0
    assert len(message_ids(sink)) == 6
    reopened = RocksDBStateStore(tmp_path, 1 << 20)
    assert [event_count(reopened, g) for g in ("g0", "g1", "g2")] == [2, 2, 2]
    assert reopened.stored_offsets(0) == {
        r: sink.ends[(r, 0)] for r in ("state", "members", "dedupe")
    }
    reopened.close()


def test_a_partition_whose_files_fail_a_read_is_rebuilt_in_place(tmp_path: Path) -> None:
    """Damage that opening the files does not see, met by a read while processing: the
    batch aborts, the partition is rebuilt from its changelogs and the batch replayed,
    with no restart (which would only meet the same damage again)."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    settings = RunnerSettings(ROUTES, 1000, commit_interval=0.1, poll_timeout=0.1)
    calls = [group_call(n) for n in range(5_000)]
    for call in calls:
        source.append(call)
    first, _ = build(source, sink, settings, store=RocksDBStateStore(tmp_path, 1 << 20))
    run_for(first, source, 8)
    compacted = RocksDBStateStore(tmp_path, 1 << 20)
    compacted.compact(0)  # one table file: reopening starts no compaction that meets
    compacted.close()  # the damage before the reads do
    corrupt_blocks(tmp_path / "partition-0")
    # Every call again (its dedupe id is read), and a new call of every member (its
    # membership is read): one of them meets the damage.
    for n, call in enumerate(calls):
        source.append(call)
        source.append(group_call(n, messageId=f"again{n}"))
    restarted = source.restarted()
    store = RocksDBStateStore(tmp_path, 1 << 20)
    runner, metrics = build(restarted, sink, settings, store=store)
    with structlog.testing.capture_logs() as logs:
        run_for(runner, restarted, 14)
    assert [e["partitions"] for e in logs if e["event"] == "store_partition_failed"] == [(0,)]
    assert sample(metrics, "group_worker_store_rebuilds_total") == 1
    assert sample(metrics, "group_worker_store_failures_total") == 1
    assert sample(metrics, "group_worker_outcomes_total", outcome="duplicate") == 5_000
    assert len(message_ids(sink)) == 10_000
    assert {g: s["eventCount"] for g, s in states(sink).items()} == {
        "g0": 2 * 1667,
        "g1": 2 * 1667,
        "g2": 2 * 1666,
    }
    assert restarted.committed_offsets == {("in", 0): 15_000}


def test_a_partition_whose_commit_write_fails_is_rebuilt_not_replayed(tmp_path: Path) -> None:
    """The transaction committed, then the store's write failed: the batch stands (the
    changelogs hold it), and the partition's copy is rebuilt from them."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    settings = RunnerSettings(ROUTES, 1000, commit_interval=0.1, poll_timeout=0.1)
    store = RocksDBStateStore(tmp_path, 1 << 20)
    runner, metrics = build(source, sink, settings, store=store)
    for n in range(2_000):
        source.append(group_call(n))

    def step(n: int) -> None:
        if n == 4:  # two full batches processed (after the assigning consume), uncommitted
            store._part(0).db.close()  # RocksDB now fails every call on partition 0
        if n == 5:
            for k in range(2_000, 2_003):
                source.append(group_call(k))
        if n >= 7:
            runner.stop()

    source.on_consume = step
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert [e["partitions"] for e in logs if e["event"] == "store_partition_failed"] == [(0,)]
    assert sample(metrics, "group_worker_store_rebuilds_total") == 1
    assert sample(metrics, "group_worker_store_failures_total") == 1
    assert sample(metrics, "group_worker_transaction_aborts_total") == 0
    assert len(message_ids(sink)) == 2_003
    assert source.committed_offsets == {("in", 0): 2_003}
    reopened = RocksDBStateStore(tmp_path, 1 << 20)
    assert [event_count(reopened, g) for g in ("g0", "g1", "g2")] == [668, 668, 667]
    reopened.close()


def test_records_after_a_commit_whose_store_write_fails_wait_for_the_rebuild(
    tmp_path: Path,
) -> None:
    """A commit in the middle of a consumed batch (``commit_max_records``) whose store
    write fails: the batch's records after it wait for the partition's rebuild, and are
    merged into the rebuilt state, not into a wiped one."""
    store = RocksDBStateStore(tmp_path, 1 << 20)

    class ClosingSink(FakeSink):
        def commit(self, *args: Any, **kwargs: Any) -> Any:
            reached = super().commit(*args, **kwargs)
            if len(self.offset_commits) == 1:  # RocksDB fails every call from here
                store._part(0).db.close()
            return reached

    source, sink = FakeSource(FakeClock()), ClosingSink()
    settings = RunnerSettings(ROUTES, 1000, commit_max_records=300, poll_timeout=0.1)
    runner, metrics = build(source, sink, settings, store=store)
    for n in range(900):
        source.append(group_call(n))
    run_for(runner, source, 6)
    assert sample(metrics, "group_worker_store_rebuilds_total") == 1
    assert len(message_ids(sink)) == 900
    assert source.committed_offsets == {("in", 0): 900}
    assert [states(sink)[g]["eventCount"] for g in ("g0", "g1", "g2")] == [300, 300, 300]


def test_a_stop_during_a_long_restore_ends_it(tmp_path: Path) -> None:
    """SIGTERM in the middle of a rebuild: the worker leaves instead of reading on, and
    its store keeps what it replayed (a write batch at a time)."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    sink.begin()
    for n in range(25_000):
        sink.produce("state", f"g{n}".encode(), b"{}", partition=0)
    sink.commit({}, source)
    read: list[Entry] = []

    class Stopping(FakeRestorer):
        def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
            for entry in super().read(topic, partition, start):
                read.append(entry)
                if len(read) == 5_000:
                    runner.stop()
                yield entry

    store = RocksDBStateStore(tmp_path, 1 << 20)
    runner, _ = build(source, sink, restorer=Stopping(sink), store=store)
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert len(read) == 10_000  # up to the first progress report after the stop
    assert "restore_interrupted" in [e["event"] for e in logs]
    reopened = RocksDBStateStore(tmp_path, 1 << 20)
    assert reopened.stored_offsets(0) == {"state": 10_000}
    reopened.close()


def test_not_ready_while_restoring_and_restore_counts_as_progress() -> None:
    """During a restore after a rebalance the worker is not ready; records read are counted."""
    during: list[bool] = []

    class WatchingRestorer(FakeRestorer):
        def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
            for entry in super().read(topic, partition, start):
                during.append(runner.ready)
                yield entry

    source, sink = FakeSource(FakeClock()), FakeSink()
    runner, metrics = build(source, sink, restorer=WatchingRestorer(sink))
    for n in range(3):
        source.append(group_call(n))

    def rebalance(n: int) -> None:
        if n == 3:  # after a commit: the partition moves away and back
            source.rebalance(revoke=[("in", 0)], assign=[("in", 0)])
        if n >= 5:
            runner.stop()

    source.on_consume = rebalance
    runner.run()
    assert len(during) == 3 + 3 + 3  # three groups, three members, three dedupe ids
    assert not any(during)
    assert sample(metrics, "group_worker_restored_records_total") == len(during)


class SlowRestorer(FakeRestorer):
    """Takes ``seconds`` of the fake clock per changelog record read, and remembers the
    consume() calls made before each read (the loop going on meanwhile)."""

    def __init__(self, sink: FakeSink, source: FakeSource, seconds: float) -> None:
        super().__init__(sink)
        self.source, self.seconds = source, seconds
        self.consumes: list[int] = []
        self.starts: list[int] = []  # of the state topic's reads
        self.opened: list[tuple[str, int]] = []  # every read: its topic and start

    def read(self, topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        self.opened.append((topic, start))
        if topic == "state":
            self.starts.append(start)
        for entry in super().read(topic, partition, start):
            self.source.clock.advance(self.seconds)
            self.consumes.append(self.source.consumes)
            yield entry


def filled_state(sink: FakeSink, groups: int) -> None:
    """``groups`` state records committed on partition 0 of the state topic."""
    sink.begin()
    for n in range(groups):
        record = {"groupId": f"x{n}", "traits": {}, "eventCount": 1}
        sink.produce("state", f"x{n}".encode(), codec.encode(record), partition=0)
    sink.commit({}, FakeSource(FakeClock()))


def test_a_long_restore_runs_in_slices_between_consumes() -> None:
    """A restore of seconds is cut into slices of about 0.5 s: the loop consumes in
    between (the consumer stays in its group, other partitions go on), while the
    partition waits, paused, and the worker is not ready; then its calls are processed."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    filled_state(sink, 25_000)
    restorer = SlowRestorer(sink, source, 0.0006)  # 15 s in all
    runner, metrics = build(source, sink, restorer=restorer)
    source.append(group_call(1))
    ready: list[bool] = []

    def watch(n: int) -> None:
        ready.append(runner.ready)
        if n >= 12:
            runner.stop()

    source.on_consume = watch
    runner.run()
    # Three slices (the time is looked at every 10,000 records, 6 s here), each going on
    # from where the one before stopped, with a consume between them.
    assert restorer.starts == [0, 10_000, 20_000]
    assert len(set(restorer.consumes)) == 3
    restored_at = restorer.consumes[-1]  # in the loop round of this consume
    assert ready[:restored_at] == [False] * restored_at
    assert ready[restored_at]  # the next consume's
    assert message_ids(sink) == ["m1"]
    assert states(sink)["g1"]["eventCount"] == 1
    assert sample(metrics, "group_worker_restored_records_total") == 25_000
    assert sample(metrics, "group_worker_restoring_partitions") == 0


def test_a_restore_cut_in_a_later_changelog_goes_on_there(tmp_path: Path) -> None:
    """Cut short in the members changelog, the next slices go on in it: the state
    changelog, replayed to its end, is not read again (nor the store opened and checked)."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    filled_state(sink, 5)
    sink.begin()
    for n in range(25_000):
        sink.produce("members", b"m%d" % n, b"{}", partition=0)
    sink.commit({}, source)
    restorer = SlowRestorer(sink, source, 0.0006)
    runner, _ = build(source, sink, restorer=restorer, store=RocksDBStateStore(tmp_path, 0))
    run_for(runner, source, 6)
    assert restorer.opened == [
        ("state", 0),
        ("members", 0),
        ("members", 10_000),
        ("members", 20_000),
        ("dedupe", 0),
    ]


def test_records_fetched_before_the_pause_are_read_again_after_the_restore() -> None:
    """Records of a partition waiting for its restore that consume() returned all the
    same (fetched before the pause held) are not processed then, but after it."""

    class LatePause(FakeSource):
        def pause(self, partitions: Sequence[Partition]) -> None:
            if self.consumes > 1:
                super().pause(partitions)  # the assigning consume's pause comes too late

    source, sink = LatePause(FakeClock()), FakeSink()
    filled_state(sink, 30_000)
    restorer = SlowRestorer(sink, source, 0.0006)
    runner, _ = build(source, sink, restorer=restorer)
    for n in range(3):
        source.append(group_call(n))
    run_for(runner, source, 12)
    assert message_ids(sink) == ["m0", "m1", "m2"]
    assert source.committed_offsets == {("in", 0): 3}
    assert [states(sink)[g]["eventCount"] for g in ("g0", "g1", "g2")] == [1, 1, 1]


def test_a_partition_revoked_during_its_restore_goes_on_from_there_when_it_returns(
    tmp_path: Path,
) -> None:
    """Revoked half-way through its restore, a partition leaves the queue (and is not
    fetched); assigned again, its restore goes on from what the store kept."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    filled_state(sink, 30_000)
    restorer = SlowRestorer(sink, source, 0.0006)
    store = RocksDBStateStore(tmp_path, 1 << 20)
    runner, _ = build(source, sink, restorer=restorer, store=store)
    source.append(group_call(1))

    def move(n: int) -> None:
        if n == 3:
            source.rebalance(revoke=[("in", 0)], assign=[])
        if n == 5:
            source.rebalance(revoke=[], assign=[("in", 0)])
        if n >= 14:
            runner.stop()

    source.on_consume = move
    runner.run()
    assert restorer.starts[:3] == [0, 10_000, 20_000]  # the third after the revoke
    assert restorer.released == [0]  # what its parked read fetched ahead is let go
    assert message_ids(sink) == ["m1"]


@pytest.mark.parametrize("transactional", [True, False], ids=["exactly_once", "at_least_once"])
def test_a_record_refused_for_good_costs_one_abort_not_a_loop(transactional: bool) -> None:
    """A broker refusing one output aborts once; the replay dead-letters it and goes on."""
    runner, source, sink, metrics = make(transactional)
    for n in range(6):
        source.append(group_call(n))
    sink.refuse = lambda p: (
        "Broker: Invalid record" if p.topic == "out" and b'"m4"' in p.value else None
    )
    run_for(runner, source, 20)

    assert sink.aborts == 1
    ids = message_ids(sink)  # at least once, the replay sends the batch's outputs again
    assert (ids if transactional else sorted(set(ids))) == ["m0", "m1", "m2", "m3", "m5"]
    [letter] = [codec.decode(p.value) for p in sink.topic("dlq")]
    assert (letter["reason"], letter["source"]["offset"]) == ("output_refused", 4)
    assert source.committed_offsets == {("in", 0): 6}
    assert sample(metrics, "group_worker_dead_letters_total", reason="output_refused") == 1
    assert sample(metrics, "group_worker_batch_abort_streak") == 0


def streaks_while_commits_fail(
    made: tuple[Runner, FakeSource, FakeSink, Metrics],
    turns: int,
    failing: int | None = None,
    also: Callable[[int], None] = lambda n: None,
) -> list[float]:
    """Run the loop for ``turns`` consumes, every commit failing (only the first
    ``failing`` turns' when given), ``also(turn)`` at each; the abort streak at each."""
    runner, source, sink, metrics = made
    streaks: list[float] = []

    def turn(n: int) -> None:
        if failing is None or n < failing:
            sink.fail_next_commit = AbortableError("broker says no")
        also(n)
        streaks.append(sample(metrics, "group_worker_batch_abort_streak"))
        if n >= turns:
            runner.stop()

    source.on_consume = turn
    runner.run()
    return streaks


def test_a_batch_that_keeps_aborting_is_visible() -> None:
    """The same batch aborting again raises the abort streak and logs its offsets."""
    made = make()
    source = made[1]
    source.append(group_call(1))
    with structlog.testing.capture_logs() as logs:
        streaks = streaks_while_commits_fail(made, 12)
    assert max(streaks) >= 3
    again = [e for e in logs if e["event"] == "batch_aborted_again"]
    assert again
    assert again[-1]["offsets"] == ["in[0]@0"]
    assert source.commits == []


def test_the_abort_streak_ends_when_the_stuck_batch_leaves_with_its_partition() -> None:
    """A revoke that takes the aborting batch's partition away ends the streak: nothing
    is replayed any more, and the critical alert on it must not fire on for good."""
    made = make()
    source = made[1]
    source.append(group_call(1))

    def move(n: int) -> None:
        if n == 8:
            source.rebalance(revoke=[("in", 0)], assign=[])

    streaks = streaks_while_commits_fail(made, 12, failing=8, also=move)
    assert max(streaks) >= 3
    assert streaks[-1] == 0


def test_a_state_topic_in_an_unknown_format_stops_the_worker() -> None:
    """Restoring a state record of a format this worker does not read raises TopicError."""
    source = FakeSource(FakeClock())
    sink = FakeSink()
    record = {"groupId": "g1", "merge": {"format": 99}}
    sink.committed.append(Produced("state", b"g0", b"{}", None, 0))  # offset 0: malformed
    sink.committed.append(Produced("state", b"g1", codec.encode(record), None, 0))
    runner, _ = build(source, sink)
    expected = r"topic state partition 0 offset 1: state record format 99"
    with pytest.raises(TopicError, match=expected):
        run_for(runner, source, 3)


def test_the_abort_streak_counts_aborts_until_a_commit_whatever_joins_the_batch() -> None:
    """A stuck batch that takes in another partition's records keeps raising the streak."""
    made = make(partitions=2)
    source = made[1]
    source.append(group_call(1))

    def join(n: int) -> None:
        if n == 5:
            source.append(group_call(2), partition=1)

    streaks = streaks_while_commits_fail(made, 14, also=join)
    assert max(streaks) >= 4
    assert streaks == sorted(streaks)  # never back to 1 while nothing commits


# --- Failures inside rebalances and at shutdown -------------------------------------------


def test_a_restore_that_fails_is_retried_and_nothing_is_processed_before_it() -> None:
    """A partition whose restore fails (the broker away) stays paused and its restore is
    tried again by the loop: no call of it is processed without its state."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    timed = {"groupId": "g", "userId": "u", "type": "group"}
    source.append(codec.encode({**timed, "messageId": "m1", "timestamp": "2020-01-01T00:00:00Z"}))
    source.append(codec.encode({**timed, "messageId": "m2", "timestamp": "2020-01-02T00:00:00Z"}))
    run_for(build(source, sink)[0], source, 4)
    restarted = source.restarted()
    restarted.append(
        codec.encode({**timed, "messageId": "m1", "timestamp": "2020-01-01T00:00:00Z"})
    )
    restarted.append(
        codec.encode({**timed, "messageId": "m3", "timestamp": "2019-12-31T00:00:00Z"})
    )
    runner, _ = build(restarted, sink, restorer=FlakyRestorer(sink, fail=2))
    with structlog.testing.capture_logs() as logs:
        run_for(runner, restarted, 8)
    retried = [e["error"] for e in logs if e["event"] == "kafka_retriable_error"]
    assert retried == ["restore: broker transport failure"] * 2
    assert [codec.decode(p.value)["messageId"] for p in sink.topic("out")] == ["m1", "m2", "m3"]
    last = states(sink)["g"]
    assert (last["eventCount"], last["firstSeenAt"]) == (3, "2019-12-31T00:00:00.000Z")


def test_a_final_commit_that_fails_commits_no_offset_at_close() -> None:
    """At least once, a final commit whose outputs were not delivered leaves the input
    offsets where they were, so the next start reads those calls again."""

    class LosingSink(FakeSink):
        lose = False

        def commit(self, offsets: Any, source: Any, *steps: Any) -> Any:
            if self.lose:
                self.lose = False
                self.open.clear()  # the deliveries failed: the records are gone
                raise AbortableError("3 outputs undelivered: out: Local: Message timed out")
            return super().commit(offsets, source, *steps)

    source, sink = FakeSource(FakeClock()), LosingSink(transactional=False)
    late = dataclasses.replace(SETTINGS, commit_interval=60, commit_min_interval=60)
    runner, _ = build(source, sink, late)
    for n in range(3):
        source.append(group_call(n))

    def stop_while_deliveries_fail(n: int) -> None:
        if n == 3:
            sink.lose = True
            runner.stop()

    source.on_consume = stop_while_deliveries_fail
    runner.run()
    assert source.committed_offsets.get(("in", 0), 0) == 0
    assert sink.topic("out") == []


def test_a_stop_during_the_rebuild_of_a_failed_partition_ends_cleanly(tmp_path: Path) -> None:
    """SIGTERM while a partition whose files failed is being rebuilt ends the loop as a
    stop (run() returns), not with an exception out of the error handler."""
    source, sink = FakeSource(FakeClock()), FakeSink()
    store = RocksDBStateStore(tmp_path, 0)
    runner, _ = build(source, sink, store=store)
    for n in range(3):
        source.append(group_call(n))

    def fail_and_stop(n: int) -> None:
        if n == 4:  # committed; the disk fails and SIGTERM comes during this consume
            source.append(group_call(9))
            store._part(0).db.close()
            runner.stop()

    source.on_consume = fail_and_stop
    runner.run()
    assert source.closed


def test_offsets_settle_before_a_restore() -> None:
    """Assigned stateful partitions wait for a previous owner's open transaction to end
    (``Source.committed_cuts``) before their restore reads the changelogs."""
    source, sink = FakeSource(FakeClock(), partitions=2), FakeSink()
    restorer = FakeRestorer(sink)
    runner, _ = build(source, sink, restorer=restorer)
    steps: list[tuple[str, Any]] = []
    read = restorer.read

    def settle(partitions: Sequence[Partition], timeout: float) -> dict[Partition, Cut]:
        steps.append(("settle", list(partitions)))
        return {}

    def reading(topic: str, partition: int, start: int = 0) -> Iterator[Entry]:
        steps.append(("read", partition))
        return read(topic, partition, start)

    source.committed_cuts = settle  # type: ignore[method-assign]
    restorer.read = reading  # type: ignore[method-assign]
    run_for(runner, source, 2)
    assert steps[0] == ("settle", [("in", 0), ("in", 1)])
    assert sorted(set(steps[1:])) == [("read", 0), ("read", 1)]


@pytest.mark.parametrize("seconds", [0.5, 12.0])
def test_a_long_wait_for_settled_offsets_is_logged(seconds: float) -> None:
    """A wait for a previous owner's open transaction (up to 30 s) says so in the log,
    where nothing came between partitions_assigned and partition_restored."""
    clock = FakeClock()
    source, sink = FakeSource(clock, partitions=1), FakeSink()
    runner, _ = build(source, sink, restorer=FakeRestorer(sink))

    def settle(partitions: Sequence[Partition], timeout: float) -> dict[Partition, Cut]:
        clock.sleep(seconds)
        return {}

    source.committed_cuts = settle  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        run_for(runner, source, 2)
    settled = [e for e in logs if e["event"] == "offsets_settled"]
    if seconds < 1:
        assert settled == []
    else:
        assert [(e["partitions"], e["seconds"]) for e in settled] == [(["in[0]"], seconds)]


@pytest.mark.parametrize("transactional", [True, False], ids=["exactly_once", "at_least_once"])
def test_an_abort_that_ends_the_loop_commits_nothing_of_its_batch(transactional: bool) -> None:
    """An abort whose aftermath ends the loop (a refusal within the topic's limit: the
    producer must be rebuilt) leaves nothing of its batch to commit when the consumer's
    close revokes the partitions: at least once, that commit lost the refused outputs."""
    runner, source, sink, metrics = make(transactional)
    for n in range(3):
        source.append(group_call(n))
    sink.refuse = lambda p: "Broker: Message size too large" if p.topic == "out" else None
    with pytest.raises(KafkaError, match="within its limit"):
        run_for(runner, source, 20)
    assert source.committed_offsets == {}
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 0


def test_a_transaction_holds_about_commit_max_records_calls_however_records_hold_them() -> None:
    """Envelopes of many calls are committed a few records at a time, within one
    consume: a transaction holds commit_max_records calls, cut inside a record if need
    be (an envelope holds up to 16,384), not every call of the consumed records (which
    outlasted the transaction's timeout)."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    settings = dataclasses.replace(SETTINGS, commit_max_records=250, commit_interval=60.0)
    runner, metrics = build(source, sink, settings)
    for r in range(8):
        source.append(envelope(r), partition=r % 2)
    run_for(runner, source, 3)

    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(800))
    # 100 calls a record: a commit after each 250 calls, the third record cut at 50
    # (its offset committed, the cut in the metadata); after each commit the partition
    # that had no turn yet goes first.
    assert sink.offset_commits == [
        {("in", 0): 2},
        {("in", 1): 2},
        {("in", 0): 4, ("in", 1): 3},
        {("in", 1): 4},
    ]
    cuts = [{p: (c.offset, c.calls) for p, c in cut.items()} for cut in sink.commit_cuts]
    assert cuts == [{("in", 0): (2, 50)}, {("in", 1): (2, 50)}, {("in", 1): (3, 50)}, {}]
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 800


def test_a_transaction_holds_about_commit_max_bytes_of_calls() -> None:
    """Calls of a large group are large (each carries the group's profile): a consumed
    batch is committed a few records at a time once the calls produced reach
    commit_max_bytes, however few calls they are."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    settings = dataclasses.replace(SETTINGS, commit_max_bytes=20_000, commit_interval=60.0)
    runner, metrics = build(source, sink, settings)
    for n in range(10):  # one group, 3 KB more of traits a call: 6 KB, 9 KB... enriched
        source.append(group_call(3 * n, traits={f"t{n}": "x" * 3_000}))
    run_for(runner, source, 3)

    assert sorted(message_ids(sink)) == sorted(f"m{3 * n}" for n in range(10))
    # 6 + 9 + 12 KB, then 15 + 18 KB, then each call past 20 KB alone.
    ends = [3, 5, 6, 7, 8, 9, 10]
    assert sink.offset_commits == [{("in", 0): end} for end in ends]
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 10


def test_an_envelope_to_a_large_group_is_cut_into_transactions_of_commit_max_bytes() -> None:
    """One envelope of calls to a group whose profile is large: each enriched call
    carries the profile, so the envelope's outputs are many times commit_max_bytes
    (1.7 GB for 2,000 calls to a group near its bound). The envelope is cut between
    its calls, each transaction about commit_max_bytes, the offset left at the
    envelope with its calls done."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    settings = dataclasses.replace(SETTINGS, commit_max_bytes=20_000, commit_interval=60.0)
    runner, metrics = build(source, sink, settings)
    source.append(group_call(0, traits={"big": "x" * 5_000}))
    source.append(cut_envelope(1, 20))
    run_for(runner, source, 3)

    out = [p.value for p in sink.topic("out")]
    ids = ["m0", *(f"m{n}" for n in range(1, 21) if n not in (4, 11))]
    assert sorted(message_ids(sink)) == sorted(ids)
    assert all(len(value) > 5_000 for value in out)
    assert len(sink.offset_commits) >= 5
    for offsets, cuts in zip(sink.offset_commits[:-1], sink.commit_cuts[:-1], strict=True):
        assert offsets == {("in", 0): 1}
        assert 0 < cuts[("in", 0)].calls < 20
    assert (sink.offset_commits[-1], sink.commit_cuts[-1]) == ({("in", 0): 2}, {})
    assert sample(metrics, "group_worker_records_consumed_total") == 2
    assert sample(metrics, "group_worker_calls_consumed_total") == 21


# Commits after about 10 KB of output: 20-30 calls of ``cut_envelope``.
CUT_SETTINGS = dataclasses.replace(SETTINGS, commit_max_bytes=10_000, commit_interval=60.0)


def cut_envelope(first: int, calls: int) -> bytes:
    """An envelope of ``calls`` calls to g0 from message m{first}, its eleventh call
    invalid (a dead letter, which no dedupe would catch twice) and its fourth a page
    call (skipped)."""
    sent: list[Any] = [
        codec.decode(group_call(first + n)) | {"groupId": "g0"} for n in range(calls)
    ]
    sent[3] = {"type": "page", "messageId": "p"}
    sent[10] = {"type": "group", "messageId": "bad", "userId": "u"}
    return codec.encode({"batch": sent})


def fail_commit(sink: FakeSink, number: int, error: KafkaError) -> None:
    """Make ``sink``'s ``number``-th commit (from 1) fail with ``error``."""
    commit, commits = sink.commit, 0

    def failing(*args: Any, **kwargs: Any) -> Offsets:
        nonlocal commits
        commits += 1
        if commits == number:
            raise error
        return commit(*args, **kwargs)

    sink.commit = failing  # type: ignore[method-assign]


def test_an_abort_after_a_cut_replays_only_the_calls_after_it() -> None:
    """A batch aborted after a commit cut an envelope goes back to the cut, not to the
    envelope's first call: every call of the envelope ends in exactly one outcome (no
    dead letter twice, no call counted as its own duplicate)."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    runner, metrics = build(source, sink, CUT_SETTINGS)
    source.append(cut_envelope(0, 100))
    fail_commit(sink, 2, AbortableError("transaction aborted by the broker"))
    run_for(runner, source, 4)

    assert len(sink.offset_commits) >= 3  # cut, aborted, the replay's
    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(100) if n not in (3, 10))
    assert len(sink.topic("dlq")) == 1
    assert outcomes(metrics) == {"enriched": 98, "skipped": 1, "dead_letter": 1, "duplicate": 0}
    assert sample(metrics, "group_worker_calls_consumed_total") == 100
    assert sample(metrics, "group_worker_records_consumed_total") == 1
    assert states(sink)["g0"]["eventCount"] == 98


@pytest.mark.parametrize("transactional", [True, False], ids=["exactly_once", "at_least_once"])
def test_a_restart_after_a_cut_goes_on_from_the_committed_cut(transactional: bool) -> None:
    """A worker that stops for good inside an envelope (here a fatal error at its
    second commit) leaves the offset at the envelope with its calls done in the
    offset's metadata: the next worker reads it and does the rest only."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink(transactional=transactional)
    runner, _ = build(source, sink, CUT_SETTINGS)
    source.append(cut_envelope(0, 100))
    fail_commit(sink, 2, FatalError("fenced"))
    with pytest.raises(FatalError):
        run_for(runner, source, 4)
    cut = source.offset_cuts[("in", 0)].calls
    assert source.committed_offsets == {("in", 0): 0}
    assert 10 < cut < 50
    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(cut) if n not in (3, 10))

    restarted = source.restarted()
    source.append(group_call(100))
    runner, metrics = build(restarted, sink, CUT_SETTINGS)
    with structlog.testing.capture_logs() as logs:
        run_for(runner, restarted, 4)

    assert restarted.committed_reads == [[("in", 0)]]
    assert [e["calls_done"] for e in logs if e["event"] == "record_cut_resumed"] == [cut]
    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(101) if n not in (3, 10))
    assert len(sink.topic("dlq")) == 1
    assert sample(metrics, "group_worker_calls_consumed_total") == 100 - cut + 1
    assert sample(metrics, "group_worker_outcomes_total", outcome="duplicate") == 0
    assert (source.committed_offsets, source.offset_cuts) == ({("in", 0): 2}, {})


def test_sigterm_ends_a_run_of_commits_inside_a_consume() -> None:
    """A consume's records can take many commits (cut by bytes, a large group's
    envelopes): SIGTERM ends them after the commit it comes during, within the grace
    period, and the next start goes on from that cut."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    runner, _ = build(source, sink, CUT_SETTINGS)
    source.append(cut_envelope(0, 100))
    commit = sink.commit

    def commit_then_stop(*args: Any, **kwargs: Any) -> Offsets:
        runner.stop()  # SIGTERM while the first commit runs
        return commit(*args, **kwargs)

    sink.commit = commit_then_stop  # type: ignore[method-assign]
    runner.run()
    assert len(sink.offset_commits) == 1
    cut = source.offset_cuts[("in", 0)].calls
    assert 10 < cut < 50

    restarted = source.restarted()
    sink.commit = commit  # type: ignore[method-assign]
    runner, metrics = build(restarted, sink, CUT_SETTINGS)
    run_for(runner, restarted, 4)
    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(100) if n not in (3, 10))
    assert sample(metrics, "group_worker_calls_consumed_total") == 100 - cut


@pytest.mark.parametrize("same_record", [True, False])
def test_a_cut_that_cannot_be_read_yet_is_read_before_the_partition_is_processed(
    same_record: bool,
) -> None:
    """The committed cut of a newly assigned partition is read before its first records
    are processed; when the broker does not answer, they are read again later, not
    processed without it (which would do its calls twice) nor lost. A cut is of one
    record: another found at its offset (a neighbour, as offsets carried to another
    cluster may land on, with the same timestamp) is processed whole."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    source.append(cut_envelope(0, 100))
    cut_record = cut_envelope(0 if same_record else 1, 100)
    source.store_offsets({("in", 0): 0}, {("in", 0): Cut(0, fingerprint(cut_record), 60)})
    source.fail_committed = RetriableError("coordinator loading")
    runner, metrics = build(source, sink)
    run_for(runner, source, 6)

    assert source.committed_reads == [[("in", 0)], [("in", 0)]]
    first = 60 if same_record else 0
    assert sorted(message_ids(sink)) == sorted(
        f"m{n}" for n in range(first, 100) if n not in (3, 10)
    )
    assert sample(metrics, "group_worker_calls_consumed_total") == 100 - first


# Stage one of two: its partitions are not restored, their cuts are read when their
# first records come (the repartition topic's partitions are never assigned here).
STAGE_ONE = dataclasses.replace(
    SETTINGS, routes=dataclasses.replace(ROUTES, repartition="rep"), commit_interval=60.0
)


def forwarded_ids(sink: FakeSink) -> list[str]:
    return message_ids(sink, "rep")


def test_a_cut_read_waits_with_no_transaction_of_ours_open() -> None:
    """A partition assigned while a batch is open (stage one of two: no restore, no
    settle) has its cut read only once that batch is committed: the read waits for any
    transaction holding its offsets, and ours would outlive its timeout meanwhile."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    source.pending_assign = [("in", 0)]
    runner, _ = build(source, sink, STAGE_ONE)
    for n in range(20):
        source.append(group_call(n), partition=n % 2)
    batch_open_at_read: list[bool] = []
    read = source.committed_cuts

    def reading(partitions: Sequence[Partition], timeout: float) -> dict[Partition, Cut]:
        batch_open_at_read.append(sink.in_transaction)
        return read(partitions, timeout)

    source.committed_cuts = reading  # type: ignore[method-assign]
    source.on_consume = lambda n: (
        source.rebalance([], [("in", 1)]) if n == 2 else runner.stop() if n >= 6 else None
    )
    runner.run()

    assert source.committed_reads == [[("in", 0)], [("in", 1)]]
    assert batch_open_at_read == [False, False]
    assert sorted(forwarded_ids(sink)) == sorted(f"m{n}" for n in range(20))


def test_a_cut_read_that_fails_holds_back_only_its_partition() -> None:
    """Stage one: a partition whose cut cannot be read (the broker does not answer) is
    read again later; the other partitions' records go on meanwhile."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    source.pending_assign = [("in", 0)]
    runner, _ = build(source, sink, STAGE_ONE)
    for n in range(10):
        source.append(group_call(n), partition=0)

    def step(n: int) -> None:
        if n == 3:
            source.rebalance([], [("in", 1)])
            source.append(group_call(50), partition=1)
        if 3 <= n <= 5:  # three reads fail; partition 0 goes on meanwhile
            source.fail_committed = RetriableError("coordinator loading")
            source.append(group_call(100 + n), partition=0)
        if n >= 12:
            runner.stop()

    source.on_consume = step
    with structlog.testing.capture_logs() as logs:
        runner.run()

    failed = [e["partitions"] for e in logs if e["event"] == "cut_read_failed"]
    assert failed == [["in[1]"]] * 3
    assert sorted(forwarded_ids(sink)) == sorted(
        [*(f"m{n}" for n in range(10)), "m50", *(f"m{100 + n}" for n in range(3, 6))]
    )
    assert forwarded_ids(sink).index("m105") < forwarded_ids(sink).index("m50")
    assert Counter(forwarded_ids(sink)).most_common(1)[0][1] == 1


# Small consumes, commits by a budget of 250 calls only: envelopes of 100 cut batches.
HOT_SETTINGS = dataclasses.replace(  # commits between envelopes of 100 calls
    SETTINGS, batch_size=4, commit_max_records=300, commit_interval=60.0
)


def test_a_hot_partition_cut_by_a_commit_is_read_again_behind_the_others() -> None:
    """A consumed batch cut by commit_max_records (one partition's envelopes) reads its
    rest again, so that records of other partitions queued behind it are processed
    next, not after the whole prefetch of the hot one."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    runner, metrics = build(source, sink, HOT_SETTINGS)
    for r in range(8):  # the hot partition: 8 envelopes of 100 calls
        source.append(envelope(r), partition=0)
    source.append(group_call(900), partition=1)
    run_for(runner, source, 6)

    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in [*range(800), 900])
    # The first cut comes after 300 calls of partition 0; the other's call is next.
    assert message_ids(sink)[300] == "m900"
    # The second holds that call and 299 of partition 0's: its sixth record cut at 99.
    assert sink.offset_commits[:2] == [{("in", 0): 3}, {("in", 1): 1, ("in", 0): 5}]
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 801


def test_a_read_again_that_fails_ends_the_loop_and_loses_nothing() -> None:
    """After a commit cut a consumed batch, the rest of a hot partition is read again
    behind the others; when that seek fails the loop ends (a loop that went on read
    after the rest and committed beyond it), and the next reads from the commit."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    runner, _ = build(source, sink, HOT_SETTINGS)
    for r in range(8):
        source.append(envelope(r), partition=0)
    source.append(group_call(900), partition=1)

    def failing(offsets: Offsets) -> None:
        raise KafkaError("seek in[0] failed: Local: Erroneous state")

    source.seek = failing  # type: ignore[method-assign]
    with pytest.raises(KafkaError, match="seek"):
        run_for(runner, source, 6)
    assert len(message_ids(sink)) < 801

    restarted = source.restarted()
    runner, _ = build(restarted, sink, HOT_SETTINGS)
    run_for(runner, restarted, 12)
    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in [*range(800), 900])


@pytest.mark.parametrize("other_lag", [0, None])
def test_a_hot_partition_is_read_again_only_when_another_may_be_waiting(
    other_lag: int | None,
) -> None:
    """With nothing to read elsewhere the rest of a cut batch is processed as consumed
    (a read again would fetch it anew for nothing); a partition whose lag is unknown
    (nothing read from it since its assignment) may have records queued behind it."""
    source, sink = FakeSource(FakeClock(), 2), FakeSink()
    runner, _ = build(source, sink, HOT_SETTINGS)
    for r in range(4):
        source.append(envelope(r), partition=0)
    seeks: list[dict[Partition, int]] = []
    lag, seek = source.lag, source.seek

    def lag_elsewhere(partition: Partition) -> int | None:
        return lag(partition) if partition == ("in", 0) else other_lag

    def recorded_seek(offsets: Offsets) -> None:
        seeks.append(dict(offsets))
        seek(offsets)

    source.lag, source.seek = lag_elsewhere, recorded_seek  # type: ignore[method-assign]
    run_for(runner, source, 4)

    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(400))
    assert seeks == ([] if other_lag == 0 else [{("in", 0): 3}])


def test_a_commit_cut_into_a_consumed_batch_that_must_be_retried_loses_no_record() -> None:
    """A commit the runner makes inside a consumed batch (its calls reached the bound)
    that fails retriably is tried again later, and the records after it, consumed but
    not processed, are read again: none is skipped."""
    source, sink = FakeSource(FakeClock(), 1), FakeSink()
    settings = dataclasses.replace(SETTINGS, commit_max_records=250, commit_interval=60.0)
    runner, metrics = build(source, sink, settings)
    for r in range(6):
        source.append(envelope(r))
    sink.fail_next_commit = RetriableError("coordinator not available")
    run_for(runner, source, 6)

    assert sorted(message_ids(sink)) == sorted(f"m{n}" for n in range(600))
    assert source.committed_offsets == {("in", 0): 6}
    assert sample(metrics, "group_worker_outcomes_total", outcome="enriched") == 600
