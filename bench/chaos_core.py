"""The pure parts of ``bench.chaos``: its plan, its clocks over offsets, its verdict.

- ``draw_faults``: the faults a seed draws for a plan, with their waits and durations;
- ``Recovery`` and ``Stalls``: a consumer group's progress, judged from snapshots of its
  committed offsets and the high watermarks (``Offsets``);
- ``Expected`` and ``verify``: what a deployment must have written for the calls
  produced, and what it wrote instead;
- ``format_table``: a run's summary for people.

No Kafka and no clock here: snapshots and times come in as plain values.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from bench.generator import Kind

__all__ = [
    "Expected",
    "Fault",
    "FaultKind",
    "Offsets",
    "Recovery",
    "Stalls",
    "Verification",
    "draw_faults",
    "format_table",
    "verify",
]

FaultKind = Literal["kill", "kill2", "stop", "broker", "join_leave"]
# (topic, partition) -> (the offset of the group's next record, the high watermark): the
# committed offset, moved past what a read_committed consumer skips there (transaction
# markers, aborted records), so a group that consumed everything is at the watermark.
Offsets = dict[tuple[str, int], tuple[int, int]]
# Each fault's duration range in seconds: the pause before a restart, a SIGSTOP's, the
# broker's absence, a joiner's stay.
_SECONDS: dict[FaultKind, tuple[float, float]] = {
    "kill": (0, 4),
    "kill2": (0, 3),
    "stop": (10, 25),
    "broker": (5, 60),
    "join_leave": (8, 20),
}
_STALL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One step of a plan: ``kind`` after ``wait`` seconds, for ``seconds``, on ``targets``:
    (deployment, worker) indexes; none for the broker; for ``join_leave`` the spare slot."""

    kind: FaultKind
    wait: float
    seconds: float
    targets: tuple[tuple[int, int], ...]


def draw_faults(
    kinds: Sequence[str], seed: int, gap: float, deployments: int, workers: int
) -> list[Fault]:
    """The faults of a plan, drawn from ``seed``; raises ``ValueError`` on an unknown kind."""
    rng = random.Random(seed)
    faults = []
    for name in kinds:
        if name not in _SECONDS:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(_SECONDS)})")
        kind: FaultKind = name
        wait = round(gap * rng.uniform(0.5, 1.5), 1)
        seconds = round(rng.uniform(*_SECONDS[kind]), 1)
        targets: tuple[tuple[int, int], ...] = ()
        if kind == "kill2":
            targets = tuple((d, rng.randrange(workers)) for d in range(deployments))
        elif kind == "join_leave":
            targets = ((rng.randrange(deployments), workers),)
        elif kind != "broker":
            targets = ((rng.randrange(deployments), rng.randrange(workers)),)
        faults.append(Fault(kind, wait, seconds, targets))
    return faults


def _highs(offsets: Offsets, topic: str) -> dict[tuple[str, int], int]:
    return {tp: high for tp, (_, high) in offsets.items() if tp[0] == topic}


def _reached(offsets: Offsets, targets: Mapping[tuple[str, int], int]) -> bool:
    return all(tp in offsets and offsets[tp][0] >= high for tp, high in targets.items())


class Recovery:
    """A deployment's recovery from a fault that ended at ``ended`` (monotonic seconds).

    Stage 1: its group consumed the input as far as the first snapshot's watermarks;
    stage 2: then the repartition topic as far as that moment's.
    ``stage1`` and ``stage2`` are seconds from ``ended``, ``None`` until reached.
    """

    def __init__(self, ended: float, input_topic: str, repartition: str) -> None:
        self.ended, self.input, self.repartition = ended, input_topic, repartition
        self.stage1: float | None = None
        self.stage2: float | None = None
        self._targets: dict[tuple[str, int], int] | None = None

    def update(self, now: float, offsets: Offsets) -> bool:
        """Take the snapshot ``offsets`` seen at ``now``; whether both stages are done."""
        if self._targets is None:
            self._targets = _highs(offsets, self.input)
        if self.stage1 is None:
            if not _reached(offsets, self._targets):
                return False
            self.stage1 = round(now - self.ended, 1)
            self._targets = _highs(offsets, self.repartition)
        if _reached(offsets, self._targets):
            self.stage2 = round(now - self.ended, 1)
        return self.stage2 is not None


class Stalls:
    """Partitions behind whose group's offset has not moved for 30 s: the clock starts
    when a partition falls behind, not when its offset last moved."""

    def __init__(self) -> None:
        self._since: dict[tuple[str, int], tuple[int, float]] = {}
        self._reported: set[tuple[str, int]] = set()

    def restart(self) -> None:
        """Start every clock afresh (after the broker's absence)."""
        self._since.clear()

    def update(self, now: float, offsets: Offsets) -> list[tuple[str, int]]:
        """Take the snapshot ``offsets`` seen at ``now``; the partitions newly stalled."""
        stalled = []
        for tp, (at, high) in offsets.items():
            since = self._since.get(tp)
            if at >= high:
                self._since.pop(tp, None)
                self._reported.discard(tp)
            elif since is None or since[0] != at:
                self._since[tp] = (at, now)
                self._reported.discard(tp)
            elif now - since[1] > _STALL_SECONDS and tp not in self._reported:
                self._reported.add(tp)
                stalled.append(tp)
        return stalled


@dataclass(slots=True)
class Expected:
    """What every deployment must write for the calls produced; ``add`` each call."""

    message_ids: set[str] = field(default_factory=set)
    events: Counter[str] = field(default_factory=Counter)  # valid calls by groupId
    members: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    bad: int = 0

    def add(self, value: bytes, kind: Kind) -> None:
        if kind == "bad":
            self.bad += 1
        elif kind == "group":
            call = orjson.loads(value)
            self.message_ids.add(call["messageId"])
            self.events[call["groupId"]] += 1
            self.members[call["groupId"]].add(call["userId"])


@dataclass(frozen=True, slots=True)
class Verification:
    """What one deployment wrote, against ``Expected``: ``ok`` when exactly once."""

    enriched: int
    lost: int  # valid calls never enriched
    unexpected: int  # enriched messageIds never produced
    duplicated: int  # messageIds enriched more than once
    duplicated_sources: int  # input positions enriched more than once
    dead_letters: int
    dead_letters_expected: int
    duplicated_letters: int  # input positions dead-lettered more than once
    wrong_states: int  # groups whose last state record has the wrong counts
    examples: dict[str, list[Any]]
    problems: list[str]  # each count above that should be 0 and is not, and why

    @property
    def ok(self) -> bool:
        return not self.problems


def _position(source: Mapping[str, Any]) -> tuple[Any, ...]:
    return source["topic"], source["partition"], source.get("offset"), source.get("index")


def verify(
    expected: Expected,
    enriched: Iterable[bytes],
    letters: Iterable[bytes],
    states: Iterable[tuple[bytes | None, bytes | None]],
) -> Verification:
    """Check the values of the enriched and dead-letter topics and the state topic's
    records (``(key, value)``, in order: the last of a group counts) against ``expected``."""
    ids: Counter[str] = Counter()
    sources: Counter[tuple[Any, ...]] = Counter()
    for value in enriched:
        call = orjson.loads(value)
        ids[call["messageId"]] += 1
        sources[_position(call["enrichment"]["source"])] += 1
    letter_sources = Counter(_position(orjson.loads(v)["source"]) for v in letters)
    last = {key: value for key, value in states if key is not None and value is not None}
    wrong = []
    for group, events in sorted(expected.events.items()):
        record = last.get(group.encode())
        state = orjson.loads(record) if record else {}
        members = len(expected.members[group])
        got = (state.get("eventCount"), state.get("memberCount"))
        if got != (events, members):
            wrong.append([group, {"events": events, "members": members}, list(got)])
    lost = sorted(expected.message_ids - ids.keys())
    doubled = sorted(k for k, n in ids.items() if n > 1)
    counts = {
        "lost": len(lost),
        "unexpected": len(ids.keys() - expected.message_ids),
        "duplicated": len(doubled),
        "duplicated_sources": sum(1 for n in sources.values() if n > 1),
        "duplicated_letters": sum(1 for n in letter_sources.values() if n > 1),
        "wrong_states": len(wrong),
    }
    letters_total = sum(letter_sources.values())
    problems = [f"{name} {n}" for name, n in counts.items() if n]
    if letters_total != expected.bad:
        problems.append(f"{letters_total} dead letters for {expected.bad} bad calls")
    return Verification(
        enriched=sum(ids.values()),
        dead_letters=letters_total,
        dead_letters_expected=expected.bad,
        examples={"lost": lost[:5], "duplicated": doubled[:5], "wrong_states": wrong[:5]},
        problems=problems,
        **counts,
    )


def format_table(summary: Mapping[str, Any]) -> str:
    """A run's summary for people: each fault's recovery (seconds per deployment and
    stage; - when it took over 300 s), then each deployment's verdict."""
    labels = list(summary["verification"])
    head = ["fault", *[f"{label} stage {s} s" for label in labels for s in (1, 2)]]
    rows = [head]
    for recovery in [*summary["recoveries"], summary["drained"]]:
        cells = [recovery[label][f"stage{s}_s"] for label in labels for s in (1, 2)]
        rows.append([recovery["fault"], *("-" if c is None else f"{c:.1f}" for c in cells)])
    width = max(len(row[0]) for row in rows) + 2
    lines = [f"{row[0]:<{width}}" + "".join(f"{c:>13}" for c in row[1:]) for row in rows]
    for label, v in summary["verification"].items():
        verdict = "exactly once" if v["ok"] else f"FAILED: {', '.join(v['problems'])}"
        lines.append(
            f"{label}: {verdict} ({v['enriched']:,} enriched, {v['dead_letters']:,} dead letters"
            f" of {v['dead_letters_expected']:,} bad calls)"
        )
    lines.append(f"workers exited unasked: {len(summary['unexpected_exits'])}")
    return "\n".join(lines)
