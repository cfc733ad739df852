"""bench.latency's summaries of the latencies it measured."""

from __future__ import annotations

from bench.latency import Latency


def test_the_p99_of_each_part_shows_where_the_tail_is() -> None:
    """A slow start shows in the first part only; too few records give no parts."""
    latency = Latency(rate=100, seconds=1, calls=200)
    latency.produce_ms = [900.0 + i for i in range(20)] + [100.0 + i % 7 for i in range(180)]
    parts = latency.p99_by_part()
    assert len(parts) == 10
    assert parts[0] == 919.0
    assert parts[1] < 200
    assert max(parts[2:]) == 106.0
    assert Latency(rate=1, seconds=1, calls=5, produce_ms=[1.0] * 5).p99_by_part() == []
