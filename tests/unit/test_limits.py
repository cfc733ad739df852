"""Record limits and the bound of one group (worker.limits)."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError, TopicError
from worker.limits import DEFAULT_MAX_GROUP_BYTES, GroupBound, Limits, group_bound


def test_a_record_fits_the_smaller_of_the_topic_and_producer_limits() -> None:
    """A topic's max.message.bytes (less batch overhead) and the producer's limit both bind."""
    limits = Limits({"small": 10_000, "big": 5_000_000}, producer_max=1_000_000)
    assert 9_000 < limits.record_bytes("small") < 10_000
    assert 999_000 < limits.record_bytes("big") < 1_000_000
    assert limits.record_bytes("unknown") == limits.record_bytes("big")
    room = limits.record_bytes("small")
    assert limits.fits("small", b"k", b"v" * (room - 1))
    assert not limits.fits("small", b"k", b"v" * room)
    assert not limits.fits("small", None, b"v" * (room - 5), [("reason", b"too_large")])


def test_limits_read_again_replace_the_old_ones_and_bound_batches() -> None:
    """update takes new max.message.bytes; a producer batch fits the smallest topic."""
    limits = Limits({"t": 1_048_588, "u": 1_048_588})
    assert 999_000 < limits.batch_bytes() < 1_000_000
    limits.update({"t": 50_000})
    assert not limits.fits("t", None, b"x" * 50_000)
    assert 999_000 < limits.record_bytes("u") < 1_000_000
    assert limits.batch_bytes() == limits.record_bytes("t") < 50_000


def test_default_bound_fits_the_topics_and_is_capped() -> None:
    """max_group_bytes 0 takes what fits, at most the default; growth may use all of it."""
    limits = Limits({"enriched": 1_048_588, "state": 1_048_588})
    bound = group_bound(limits, "enriched", "state", 32_768, 0)
    assert bound.new_keys == DEFAULT_MAX_GROUP_BYTES
    assert DEFAULT_MAX_GROUP_BYTES < bound.any_growth < 1_000_000 - 3 * 32_768
    small = Limits({"enriched": 200_000, "state": 1_048_588})
    bound = group_bound(small, "enriched", "state", 32_768, 0)
    assert bound.new_keys == bound.any_growth < 200_000 - 3 * 32_768


def test_an_explicit_bound_that_does_not_fit_is_refused() -> None:
    """An explicit max_group_bytes larger than the topics allow fails at start, naming it."""
    limits = Limits({"enriched": 1_048_588, "state": 300_000})
    assert group_bound(limits, "enriched", "state", 32_768, 100_000) == GroupBound(
        100_000, group_bound(limits, "enriched", "state", 32_768, 0).any_growth
    )
    with pytest.raises(ConfigError, match=r"worker\.max_group_bytes.*topic state"):
        group_bound(limits, "enriched", "state", 32_768, 500_000)


def test_topics_too_small_for_any_group_are_refused() -> None:
    """Topics whose limit leaves no room for state beside a call fail at start."""
    with pytest.raises(TopicError, match="topic enriched"):
        group_bound(Limits({"enriched": 100_000}), "enriched", "state", 32_768, 0)
