"""Tests for worker.store.cache: the least-recently-used cache bounded by bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.store.cache import LRUCache


def test_the_least_recently_used_go_first() -> None:
    """Past the bound, entries go in order of last use: a get counts as a use."""
    cache: LRUCache[str, int] = LRUCache(max_bytes=30)
    for key in "abc":
        cache.put(key, ord(key), 10)
    assert cache.get("a") == ord("a")
    cache.put("d", 4, 10)
    assert [cache.get(k) for k in "abcd"] == [ord("a"), None, ord("c"), 4]
    assert (len(cache), cache.bytes) == (3, 30)


def test_membership_is_not_a_use() -> None:
    """`in` does not make an entry recent."""
    cache: LRUCache[str, int] = LRUCache(max_bytes=20)
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    assert "a" in cache
    cache.put("c", 3, 10)
    assert ("a" in cache, "b" in cache) == (False, True)


def test_an_entry_larger_than_the_bound_is_not_kept() -> None:
    """An entry costing more than max_bytes is dropped, and so is what it replaced."""
    cache: LRUCache[str, int] = LRUCache(max_bytes=10)
    cache.put("a", 1, 5)
    cache.put("a", 2, 11)
    assert (cache.get("a"), cache.bytes) == (None, 0)


def test_discard_where_forgets_matching_keys() -> None:
    """discard_where() forgets exactly the keys it is asked to, and their bytes."""
    cache: LRUCache[tuple[int, str], int] = LRUCache(max_bytes=100)
    for partition in range(3):
        cache.put((partition, "g"), partition, 7)
    cache.discard_where(lambda key: key[0] == 1)
    assert [cache.get((p, "g")) for p in range(3)] == [0, None, 2]
    assert cache.bytes == 14


def test_a_negative_bound_is_refused() -> None:
    """max_bytes < 0 raises ValueError."""
    with pytest.raises(ValueError, match="max_bytes"):
        LRUCache[str, int](max_bytes=-1)


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40)), max_size=60))
def test_bytes_are_the_sum_of_costs_and_stay_bounded(puts: list[tuple[int, int]]) -> None:
    """bytes is the summed cost of the entries held and never exceeds max_bytes."""
    cache: LRUCache[int, int] = LRUCache(max_bytes=64)
    costs: dict[int, int] = {}
    for key, cost in puts:
        cache.put(key, key, cost)
        costs[key] = cost
        held = [k for k in costs if k in cache]
        assert cache.bytes == sum(costs[k] for k in held) <= 64
    if puts:
        key, cost = puts[-1]
        assert (cache.get(key) is not None) == (cost <= 64)
