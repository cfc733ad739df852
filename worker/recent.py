"""The messageIds a group applied within the dedupe window, as a persistent mapping.

A busy group holds tens of thousands of recent messageIds, and every merge adds one.
Copying them on each merge made a merge O(recent); ``RecentIds`` makes adding one
O(1) amortised while every state keeps behaving as a value.

How: the ids live in an append-only ``dict`` (``messageId -> event_ms``, insertion
ordered) shared by the successive states of a group. A ``RecentIds`` is a view of that
log: its first ``size`` entries whose event time is at or after ``cutoff``. Adding to
the newest view (the one whose ``size`` is the log's length) appends to the log and
returns a longer view; older views still see exactly their prefix. Adding to an older
view (a state put back by a rollback) copies what it sees into a new log first. Ids that
fell out of the window stay in the log, hidden by the cutoff, until the log has grown by
a quarter since it was last built; it is then rebuilt with the visible entries only, so
each id is copied O(1) times on average. A state record stores the log as it is, with
the cutoff when it hides ids (``to_record``), so writing one costs no Python-level loop.

Pure and not thread-safe, like the rest of the state: one runner thread owns it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping
from typing import Any, Final

__all__ = ["RecentIds"]

# Below any event time the parsers return (worker.times.MIN_MS): a view that hides nothing.
_NO_CUTOFF: Final = -(2**63)
# Above any event time: the floor of a view without entries.
_NO_FLOOR: Final = 2**63 - 1
# Smallest log length at which a rebuild is considered: tiny logs are not worth it.
_MIN_REBUILD: Final = 8


def _next_rebuild(size: int) -> int:
    # A log is rebuilt once a quarter of it may be hidden ids: each id is copied about
    # four times over its life, and a state record carries at most a fifth hidden ids.
    return max(size + size // 4, _MIN_REBUILD)


class RecentIds(Mapping[str, int]):
    """``messageId -> event_ms`` of the ids within the window; immutable (see module doc).

    Compares equal to any mapping with the same items (a plain ``dict`` included).
    """

    __slots__ = ("_cutoff", "_floor", "_log", "_rebuild_at", "_size")

    def __init__(
        self,
        # Owned from here on: appended to by ``added``, so never a dict anyone else holds.
        log: dict[str, int],
        size: int,
        cutoff: int = _NO_CUTOFF,
        rebuild_at: int = _MIN_REBUILD,
        floor: int | None = None,
    ) -> None:
        self._log = log
        self._size = size
        self._cutoff = cutoff
        self._rebuild_at = rebuild_at
        # The least event time among the view's entries, hidden ones included.
        self._floor = floor if floor is not None else min(log.values(), default=_NO_FLOOR)

    @classmethod
    def of(cls, ids: Mapping[str, int]) -> RecentIds:
        """``ids`` as a ``RecentIds``: itself when it is one, else a copy."""
        if isinstance(ids, RecentIds):
            return ids
        log = dict(ids)
        return cls(log, len(log), _NO_CUTOFF, _next_rebuild(len(log)))

    @classmethod
    def restored(cls, ids: dict[str, int], since: int | None) -> RecentIds:
        """The set a state record holds: ``ids`` (owned from here on), minus those
        older than ``since`` (``to_record``'s second value)."""
        cutoff = _NO_CUTOFF if since is None else since
        return cls(ids, len(ids), cutoff, _next_rebuild(len(ids)))

    def added(self, message_id: str, event_ms: int, cutoff: int, limit: int) -> RecentIds:
        """This set with ``message_id`` added, hiding ids older than ``cutoff``.

        The id is added only when ``event_ms >= cutoff``. ``cutoff`` never moves back:
        the greater of it and this set's cutoff applies. When more than ``limit`` ids
        are visible (checked once the log passes a quarter over it) the cutoff rises to
        keep the ``limit`` newest by event time (ties kept). O(1) amortised on the
        newest view of a log.
        """
        cutoff = max(cutoff, self._cutoff)
        log = self._log
        if event_ms < cutoff:
            return RecentIds(log, self._size, cutoff, self._rebuild_at, self._floor)
        floor = min(self._floor, event_ms)
        if self._size == len(log) and message_id not in log and len(log) < limit + limit // 4:
            if len(log) < self._rebuild_at:
                log[message_id] = event_ms
                return RecentIds(log, len(log), cutoff, self._rebuild_at, floor)
            if self._floor >= cutoff:  # grown, but nothing is hidden: no need to copy
                log[message_id] = event_ms
                return RecentIds(log, len(log), cutoff, _next_rebuild(len(log)), floor)
        # An older view, an id back after it left the window, or a log holding enough
        # hidden ids: build a new log from what is visible (O(visible)).
        log = {m: ms for m, ms in self._visible() if ms >= cutoff}
        log[message_id] = event_ms
        if len(log) > limit:
            cutoff = max(cutoff, heapq.nlargest(limit, log.values())[-1])
            log = {m: ms for m, ms in log.items() if ms >= cutoff}
        return RecentIds(log, len(log), cutoff, _next_rebuild(len(log)))

    def to_record(self) -> tuple[dict[str, int], int | None]:
        """What a state record stores: ids, and the cutoff when some of them are hidden.

        A new ``dict`` of the view's entries, hidden ones included (copied at C speed:
        filtering in Python cost more than encoding), and ``None`` or the event time below
        which those ids are expired. ``restored`` reads the pair back.
        """
        log = self._log
        if self._size == len(log):
            ids = dict(log)
        else:
            ids = dict(itertools.islice(log.items(), self._size))
        return ids, (self._cutoff if self._floor < self._cutoff else None)

    def as_dict(self) -> dict[str, int]:
        """A new plain ``dict`` of the visible ids."""
        ids, since = self.to_record()
        if since is None:
            return ids
        return {m: ms for m, ms in ids.items() if ms >= since}

    def _visible(self) -> Iterator[tuple[str, int]]:
        items: Iterator[tuple[str, int]] = iter(self._log.items())
        if self._size != len(self._log):
            items = itertools.islice(items, self._size)
        cutoff = self._cutoff
        return ((m, ms) for m, ms in items if ms >= cutoff)

    def __contains__(self, message_id: object) -> bool:
        ms = self._log.get(message_id)  # type: ignore[call-overload]
        if ms is None or ms < self._cutoff:
            return False
        if self._size == len(self._log):
            return True
        return any(m == message_id for m, _ in itertools.islice(self._log.items(), self._size))

    def __getitem__(self, message_id: str) -> int:
        if message_id not in self:
            raise KeyError(message_id)
        return self._log[message_id]

    def __iter__(self) -> Iterator[str]:
        return (m for m, _ in self._visible())

    def __len__(self) -> int:
        return sum(1 for _ in self._visible())

    def __bool__(self) -> bool:
        return any(True for _ in self._visible())

    def items(self) -> Any:
        """``(messageId, event_ms)`` pairs, oldest insertion first."""
        return dict(self._visible()).items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.as_dict() == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecentIds({self.as_dict()!r})"
