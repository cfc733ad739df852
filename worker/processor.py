"""What happens to consumed records, stage by stage, and the changelog they leave.

Stage one (records of the input topic) runs the pure pipeline: dead letters and skipped
calls end there. A valid group call then goes either to the repartition topic, keyed
by groupId, when the input is keyed by something else, or straight to stage two.
Stage two (records of the repartition topic, or stage one's calls) merges each call
into its group's state and emits the enriched call, or counts a duplicate.
State and membership changes are written to their compacted topics at each commit,
coalesced, on the partition number of the stateful input (co-partitioning).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from worker import codec
from worker.clock import Clock
from worker.events import DeadLetter, Duplicate, Enriched, Outcome, SourceRecord
from worker.members import membership_key, membership_record, merge_membership
from worker.pipeline import Settings, process_forwarded, process_record
from worker.sink import Sink
from worker.state import MAX_RECENT_IDS, Applied, group_snapshot, merge_call, state_record
from worker.store import StateStore

__all__ = ["Processor", "Routes", "Tally"]


@dataclass(frozen=True, slots=True)
class Routes:
    """The topics records come from and go to."""

    input: str
    enriched: str
    dlq: str
    state: str
    members: str
    # None when the input is keyed by groupId: stage two then reads the input itself.
    repartition: str | None = None

    @property
    def stateful_input(self) -> str:
        """The topic whose partitions own group state."""
        return self.repartition or self.input


@dataclass(slots=True)
class Tally:
    """What one batch did, for the metrics."""

    records: int = 0
    calls: int = 0
    forwarded: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    event_times_ms: list[int] = field(default_factory=list)


class Processor:
    """Turns records into outputs on ``sink`` and state in ``store``; never raises for input."""

    def __init__(
        self,
        routes: Routes,
        settings: Settings,
        store: StateStore,
        sink: Sink,
        clock: Clock,
        *,
        dedupe_window_ms: int,
        dedupe_max_ids: int = MAX_RECENT_IDS,
    ) -> None:
        self._routes = routes
        self._settings = settings
        self._store = store
        self._sink = sink
        self._clock = clock
        self._window_ms = dedupe_window_ms
        self._max_ids = dedupe_max_ids

    def process(self, records: list[SourceRecord]) -> Tally:
        """Produce every output of ``records`` and update the store; returns the tally."""
        tally = Tally()
        now_ms = self._clock.now_ms()
        repartition = self._routes.repartition
        for record in records:
            partition = record.partition() or 0
            if record.topic() == repartition:
                self._finish(process_forwarded(record), partition, now_ms, tally)
                continue
            tally.records += 1
            for outcome in process_record(record, self._settings):
                tally.calls += 1
                if isinstance(outcome, Enriched):
                    tally.warnings.update(outcome.warnings)
                    if repartition is not None:
                        tally.forwarded += 1
                        self._sink.produce(
                            repartition, outcome.group_id.encode(), codec.encode(outcome.call)
                        )
                        continue
                self._finish(outcome, partition, now_ms, tally)
        return tally

    def write_changelog(self) -> int:
        """Produce the newest state and membership of everything changed; returns how many.

        Called just before a commit, so the changelog commits with the outputs.
        """
        produce, routes = self._sink.produce, self._routes
        changed = self._store.changed()
        for partition, state in changed:
            produce(
                routes.state,
                state.group_id.encode(),
                codec.encode(state_record(state)),
                partition=partition,
            )
        members = self._store.changed_members()
        for partition, key, membership in members:
            produce(
                routes.members,
                key.encode(),
                codec.encode(membership_record(membership)),
                partition=partition,
            )
        return len(changed) + len(members)

    def _finish(self, outcome: Outcome, partition: int, now_ms: int, tally: Tally) -> None:
        if isinstance(outcome, Enriched):
            outcome = self._merge(outcome, partition, now_ms)
        tally.outcomes[outcome.kind] += 1
        if isinstance(outcome, Enriched):
            tally.event_times_ms.append(outcome.event_time_ms)
            self._sink.produce(
                self._routes.enriched, outcome.group_id.encode(), codec.encode(outcome.call)
            )
        elif isinstance(outcome, DeadLetter):
            tally.reasons[outcome.reason] += 1
            self._sink.produce(
                self._routes.dlq,
                outcome.key,
                codec.encode(outcome.letter),
                [("reason", outcome.reason.encode())],
            )
        elif not isinstance(outcome, Duplicate):
            tally.skipped[outcome.call_type] += 1

    def _merge(self, enriched: Enriched, partition: int, now_ms: int) -> Enriched | Duplicate:
        """Apply a call to its group's state; the enriched call gains the group snapshot."""
        call = enriched.call
        applied = Applied(
            enriched.group_id,
            call["messageId"],
            enriched.event_time_ms,
            enriched.member_kind,
            enriched.member_id,
            call["traits"],
        )
        key = membership_key(applied.group_id, applied.member_kind, applied.member_id)
        membership = self._store.get_member(partition, key)
        state = merge_call(
            self._store.get(partition, applied.group_id),
            applied,
            new_member=membership is None,
            window_ms=self._window_ms,
            max_ids=self._max_ids,
            now_ms=now_ms,
        )
        if state is None:
            return Duplicate(applied.group_id, applied.message_id)
        self._store.put(partition, state)
        moved = merge_membership(membership, applied)
        if moved is not None:
            self._store.put_member(partition, key, moved)
        call["group"] = group_snapshot(state)
        return enriched
