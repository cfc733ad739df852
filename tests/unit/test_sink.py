"""Tests for worker.sink.KafkaSink on librdkafka's mock cluster: which records report."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import KafkaError as ClientError

from tests.fakes import FakeClock, FakeSource
from worker.clock import SystemClock
from worker.config import ProcessingGuarantee
from worker.errors import AbortableError, KafkaError, ProducerHungError, RetriableError
from worker.events import Record
from worker.sink import KafkaSink
from worker.source import Source

# librdkafka's in-process mock cluster: transactions work, topics are created on use.
_MOCK = {"test.mock.num.brokers": "1"}


def sink(guarantee: ProcessingGuarantee) -> KafkaSink:
    return KafkaSink("", _MOCK, guarantee, "sink-test", SystemClock(), commit_timeout=10)


def batch(s: KafkaSink, *, report_log: bool) -> dict[tuple[str, int], int]:
    """One batch: two outputs and a changelog record; returns what the commit reached."""
    s.begin()
    s.produce("out", b"k", b"1", partition=0)
    s.produce("out", b"k", b"2", partition=0)
    s.produce("log", b"k", b"v", partition=0, report=report_log)
    return dict(s.commit({}, cast(Source, FakeSource(FakeClock()))))


@pytest.mark.parametrize(("guarantee", "second"), [("exactly_once", 3), ("at_least_once", 2)])
def test_a_record_produced_to_report_gives_its_offset(
    guarantee: ProcessingGuarantee, second: int
) -> None:
    """The commit returns, per topic partition, the offset after the last record reported
    (exactly once, the first transaction's commit marker took offset 1)."""
    s = sink(guarantee)
    try:
        assert batch(s, report_log=True)[("log", 0)] == 1
        assert batch(s, report_log=True)[("log", 0)] == second
    finally:
        s.close()


def test_exactly_once_reports_only_what_was_asked_until_an_abort() -> None:
    """A transaction vouches for its records: after the first one (which a producer
    rebuilt after a failure must learn from), no reports but the ones asked for, until
    a batch aborts; its replay reports every record (to learn which one failed it)."""
    s = sink("exactly_once")
    try:
        assert set(batch(s, report_log=False)) == {("out", 0), ("log", 0)}
        assert batch(s, report_log=False) == {}
        assert set(batch(s, report_log=True)) == {("log", 0)}
        s.begin()
        s.produce("out", b"k", b"lost", partition=0)
        s.abort()
        assert set(batch(s, report_log=False)) == {("out", 0), ("log", 0)}  # the replay
        assert batch(s, report_log=False) == {}  # committed: back to what was asked
    finally:
        s.close()


def test_at_least_once_reports_every_record() -> None:
    """Without a transaction a failed delivery is found by its report only."""
    s = sink("at_least_once")
    try:
        assert set(batch(s, report_log=False)) == {("out", 0), ("log", 0)}
    finally:
        s.close()


class _GroupSource(FakeSource):
    """A source whose group metadata is a real consumer's, so offsets can be sent."""

    def __init__(self) -> None:
        super().__init__(FakeClock())
        self.consumer = Consumer({**_MOCK, "group.id": "sink-test"})

    def group_metadata(self) -> Any:
        return self.consumer.consumer_group_metadata()


def test_the_last_records_join_the_transaction_while_its_offsets_are_sent() -> None:
    """``last_records`` runs as the offsets go to the transaction, and what it produces
    commits with them."""
    s, source = sink("exactly_once"), _GroupSource()
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        running: list[str] = []

        def last_records() -> None:
            running.extend(t.name for t in threading.enumerate())
            s.produce("log", b"k", b"v", partition=0, report=True)

        reached = s.commit({("out", 0): 1}, cast(Source, source), last_records)
        assert "transaction-call" in running  # the send was under way meanwhile
        assert reached[("log", 0)] == 1
    finally:
        s.close()
        source.consumer.close()


def test_the_group_metadata_is_read_on_the_committing_thread() -> None:
    """The consumer's group metadata is read on the thread that commits, not the one
    that sends the offsets: a revoke commits from inside consume(), and the client lets
    no other thread call the consumer until consume() returns, which waited for the
    commit (a hang until the deadline, and a rebuild, at one join in three)."""
    readers: list[str] = []

    class Watched(_GroupSource):
        def group_metadata(self) -> Any:
            readers.append(threading.current_thread().name)
            return super().group_metadata()

    s, source = sink("exactly_once"), Watched()
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        s.commit({("out", 0): 1}, cast(Source, source))
        assert readers == [threading.current_thread().name]
    finally:
        s.close()
        source.consumer.close()


class _Gated:
    """A producer whose ``commit_transaction`` first waits (5 s at most) for ``opened``."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.opened = threading.Event()
        self.waited = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def commit_transaction(self, *args: Any) -> None:
        self.waited = self.opened.wait(5)
        self._producer.commit_transaction(*args)


def test_meanwhile_runs_after_the_last_records_while_the_transaction_commits() -> None:
    """``meanwhile`` (the store's prepare) runs once, after ``last_records``, while
    ``commit_transaction`` runs: that commit waits for it here, in vain if ``meanwhile``
    ran only once the commit had returned."""
    s, source = sink("exactly_once"), _GroupSource()
    gate = _Gated(s._producer)
    s._producer = cast(Any, gate)
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        calls: list[str] = []

        def meanwhile() -> None:
            calls.append("meanwhile")
            gate.opened.set()

        s.commit({("out", 0): 1}, cast(Source, source), lambda: calls.append("last"), meanwhile)
        assert (calls, gate.waited) == (["last", "meanwhile"], True)
    finally:
        s.close()
        source.consumer.close()


def test_last_records_failing_fails_the_commit_once_the_offsets_are_sent() -> None:
    """An error of ``last_records`` is raised after the send returns, and the batch can
    then be aborted and committed again."""
    s, source = sink("exactly_once"), _GroupSource()
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)

        def last_records() -> None:
            raise AbortableError("produce refused")

        with pytest.raises(AbortableError, match="produce refused"):
            s.commit({("out", 0): 1}, cast(Source, source), last_records)
        s.abort()  # librdkafka refuses it while another transactional call runs
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        assert set(s.commit({("out", 0): 1}, cast(Source, source))) == {("out", 0)}
    finally:
        s.close()
        source.consumer.close()


def test_one_thread_runs_every_transactional_call_and_ends_with_the_sink() -> None:
    """The transactional calls of every commit run on one long-lived thread (starting a
    thread per call cost the loop about 2%), which ends when the sink closes."""
    others = set(threading.enumerate())
    s, source = sink("exactly_once"), _GroupSource()
    try:
        for n in range(3):
            s.begin()
            s.produce("out", b"k", b"%d" % n, partition=0)
            s.commit({("out", 0): n + 1}, cast(Source, source))
        callers = [t for t in set(threading.enumerate()) - others if t.name == "transaction-call"]
        assert len(callers) == 1
    finally:
        s.close()
        source.consumer.close()
    callers[0].join(5)
    assert not callers[0].is_alive()


class _Stuck:
    """A producer whose call ``hangs`` blocks until ``released``, as librdkafka's
    transactional calls did after a broker restart."""

    def __init__(self, producer: Any, hangs: str, released: threading.Event) -> None:
        self._producer, self._hangs, self._released = producer, hangs, released

    def __getattr__(self, name: str) -> Any:
        if name == self._hangs:
            return lambda *args: self._released.wait(30)
        return getattr(self._producer, name)


def test_after_a_transactional_call_hangs_every_later_one_fails_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transactional call that hangs past its deadline breaks the sink: the commit
    raises, and so does every later call at once instead of waiting behind it (the
    revoke's commit as the loop closes waited a second deadline)."""
    monkeypatch.setattr("worker.sink._DEADLINE_MARGIN", 0.0)
    released = threading.Event()
    s = KafkaSink("", _MOCK, "exactly_once", "sink-test", SystemClock(), commit_timeout=2)
    producer = s._producer
    s._producer = cast(Any, _Stuck(producer, "send_offsets_to_transaction", released))
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        with pytest.raises(KafkaError, match="hung"):
            s.commit({("in", 0): 1}, cast(Source, FakeSource(FakeClock())))
        started = time.monotonic()
        with pytest.raises(KafkaError, match="hung"):
            s.commit({("in", 0): 1}, cast(Source, FakeSource(FakeClock())))
        with pytest.raises(KafkaError, match="hung"):
            s.abort()
        assert time.monotonic() - started < 1  # not behind the hung call's deadline (2 s)
    finally:
        released.set()
        s._producer = producer
        s.close()


def test_a_sink_whose_producer_hung_goes_on_with_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """renew() gives up a producer that hung for a new one: its transactions commit
    again, while the old one's call is still held on the thread it was left on."""
    monkeypatch.setattr("worker.sink._DEADLINE_MARGIN", 0.0)
    released = threading.Event()
    s = KafkaSink("", _MOCK, "exactly_once", "sink-test", SystemClock(), commit_timeout=2)
    s._producer = cast(Any, _Stuck(s._producer, "commit_transaction", released))
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        with pytest.raises(ProducerHungError, match="hung"):
            s.commit({}, cast(Source, FakeSource(FakeClock())))
        report_of_old = s._report
        s.renew()
        # The old producer's report, served late by its hung call, is not the new one's.
        report_of_old(ClientError(ClientError._MSG_TIMED_OUT), cast(Any, Record("out", 0, 7, b"1")))
        assert (s._failed, s._refused) == ([], [])
        assert batch(s, report_log=True)[("log", 0)] == 1  # its first record
    finally:
        released.set()
        s.close()


class _TimingOut:
    """A producer whose sends of offsets time out, as librdkafka's did for minutes after
    a broker restart (a coordinator request queued for a connection never made)."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def send_offsets_to_transaction(self, *args: Any) -> None:
        self.calls += 1
        raise KafkaException(ClientError(ClientError._TIMED_OUT, "Local: Timed out"))


def test_a_transactional_call_timing_out_breaks_the_sink() -> None:
    """A timeout and the producer is given up, for the service to build a new one
    (which found the coordinator at once), where retrying took minutes; every later
    call fails at once, the abort too."""
    s = sink("exactly_once")
    producer = _TimingOut(s._producer)
    s._producer = cast(Any, producer)
    try:
        s.begin()
        s.produce("out", b"k", b"1", partition=0)
        with pytest.raises(KafkaError, match="timed out"):
            s.commit({("out", 0): 1}, cast(Source, FakeSource(FakeClock())))
        with pytest.raises(KafkaError, match="timed out"):
            s.abort()
        assert producer.calls == 1
    finally:
        s._producer = producer._producer
        s.close()


def test_a_producer_that_cannot_start_transactions_is_destroyed_at_once() -> None:
    """While the broker is away each build's ``init_transactions`` times out. That
    producer must not outlive its failure until a collection (the worker collects
    rarely): alive, it fenced the next one as soon as the broker was back."""
    threads = _librdkafka_threads()
    gc.disable()
    try:
        with pytest.raises(RetriableError):
            KafkaSink("127.0.0.1:1", {}, "exactly_once", "t", SystemClock(), commit_timeout=1)
        # Its threads ended (an earlier test's client may end some of its own meanwhile).
        assert _librdkafka_threads() <= threads
    finally:
        gc.enable()


def _librdkafka_threads() -> set[str]:
    """This process's threads that librdkafka started (named ``rdk:...``)."""
    found = set()
    for task in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        if name.startswith("rdk:"):
            found.add(task)
    return found
