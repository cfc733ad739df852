"""A least-recently-used cache bounded by the approximate bytes of what it holds.

Used by ``RocksDBStateStore`` to keep the parsed states and memberships of hot groups.
Pure: no I/O. Not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class LRUCache(Generic[_K, _V]):
    """Values by key; once their costs add up past ``max_bytes``, the least recently used go.

    The cost of an entry is the caller's estimate of the bytes it keeps alive. An entry
    costing more than ``max_bytes`` is not kept at all, so ``bytes <= max_bytes`` always.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self._max = max_bytes
        self._entries: OrderedDict[_K, tuple[_V, int]] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """The summed cost of the entries held."""
        return self._bytes

    @property
    def max_bytes(self) -> int:
        """The bound on ``bytes``."""
        return self._max

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: _K) -> bool:
        """Whether ``key`` is held; does not count as a use."""
        return key in self._entries

    def get(self, key: _K) -> _V | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: _K, value: _V, cost: int) -> None:
        """Hold ``value`` under ``key`` as the most recently used, evicting as needed."""
        entry = self._entries.pop(key, None)  # discard(key), inlined: once per change
        if entry is not None:
            self._bytes -= entry[1]
        if cost > self._max:
            return
        self._entries[key] = (value, cost)
        self._bytes += cost
        while self._bytes > self._max:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def discard(self, key: _K) -> None:
        """Forget ``key`` if held."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

    def discard_where(self, doomed: Callable[[_K], bool]) -> None:
        """Forget every key for which ``doomed(key)`` holds; O(entries held)."""
        for key in [k for k in self._entries if doomed(k)]:
            self.discard(key)
