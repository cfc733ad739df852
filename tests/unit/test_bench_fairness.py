"""bench.fairness's calls: real group calls that compress no better than real ones."""

from __future__ import annotations

import zlib

import orjson

from bench.fairness import _backlog, _percentiles


def test_a_backlog_call_is_a_group_call_of_about_800_bytes_that_compresses_little() -> None:
    """A padding of one repeated letter let a 1 MB fetch bring ten times the records,
    which made the wait behind a backlog look five times longer than with real calls."""
    calls = list(_backlog(100, 1, 0))
    call = orjson.loads(calls[0])
    assert (call["type"], call["groupId"], call["messageId"]) == ("group", "hot", "hot-0")
    assert all(700 <= len(c) <= 900 for c in calls)
    text = b"".join(calls)
    assert len(zlib.compress(text)) > len(text) / 3


def test_a_backlog_in_envelopes_holds_every_call_once() -> None:
    envelopes = [orjson.loads(e) for e in _backlog(1_200, 500, 0)]
    assert [len(e["batch"]) for e in envelopes] == [500, 500, 200]
    ids = [c["messageId"] for e in envelopes for c in e["batch"]]
    assert ids == [f"hot-{i}" for i in range(1_200)]


def test_each_call_of_a_large_backlog_brings_a_new_trait_of_its_size() -> None:
    calls = [orjson.loads(c) for c in _backlog(3, 1, 1_000)]
    new = [{k: v for k, v in c["traits"].items() if k.startswith("t")} for c in calls]
    assert [list(t) for t in new] == [["t0"], ["t1"], ["t2"]]
    assert all(len(v) == 1_000 for t in new for v in t.values())


def test_percentiles_of_the_waits() -> None:
    assert _percentiles([]) == "none seen"
    waits = [float(i) for i in range(1, 101)]
    assert _percentiles(waits) == "p50 51.00 s, p99 100.00 s, max 100.00 s (100)"
