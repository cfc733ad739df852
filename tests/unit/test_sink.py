"""Tests for worker.sink.KafkaSink on librdkafka's mock cluster: which records report."""

from __future__ import annotations

from typing import cast

import pytest

from tests.fakes import FakeClock, FakeSource
from worker.clock import SystemClock
from worker.config import ProcessingGuarantee
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
