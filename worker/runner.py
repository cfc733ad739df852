"""The loop: consume a batch, process it, produce the outputs, commit on an interval.

The runner owns no Kafka client: it drives a ``Source`` and a ``Sink`` and is tested
with fakes. It is the ``RebalanceListener`` of its source, so it commits (or aborts)
before partitions move.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from worker import codec
from worker.clock import Clock
from worker.errors import AbortableError, RetriableError
from worker.events import DeadLetter, Enriched, SourceRecord
from worker.metrics import Metrics
from worker.pipeline import Settings, process_record
from worker.sink import Sink
from worker.source import Partition, Source

__all__ = ["Runner", "RunnerSettings"]

log = structlog.get_logger("worker.runner")
_LAG_INTERVAL = 5.0
_ERROR_BACKOFF = 0.5


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Topics and pacing of the loop."""

    input_topic: str
    enriched_topic: str
    dlq_topic: str
    batch_size: int = 1_000
    commit_interval: float = 0.1
    poll_timeout: float = 0.1
    pipeline: Settings = field(default_factory=Settings)


class Runner:
    """Runs one worker's loop until ``stop()``; see ``run``."""

    def __init__(
        self, settings: RunnerSettings, source: Source, sink: Sink, metrics: Metrics, clock: Clock
    ) -> None:
        self._settings = settings
        self._source = source
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._stopping = False
        # Next offset to commit per partition, and where the uncommitted batch started.
        self._pending: dict[Partition, int] = {}
        self._batch_start: dict[Partition, int] = {}
        self._batch_opened: float | None = None
        self._assigned: set[Partition] = set()
        self._lag_checked = 0.0
        self.joined = False
        self.last_progress = clock.monotonic()

    @property
    def ready(self) -> bool:
        """Joined the consumer group (and, later, restored every assigned partition)."""
        return self.joined and not self._stopping

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler. Returns at once."""
        self._stopping = True

    def run(self) -> None:
        """Consume, process and commit until ``stop()``, then commit and leave the group.

        Blocks. Retriable Kafka errors are logged and retried; an abortable commit is
        aborted and the uncommitted records are read again; ``FatalError`` propagates.
        """
        self._source.subscribe([self._settings.input_topic], self)
        log.info("worker_started", topic=self._settings.input_topic)
        try:
            while not self._stopping:
                self.last_progress = self._clock.monotonic()
                try:
                    records = self._source.consume(
                        self._settings.batch_size, self._settings.poll_timeout
                    )
                    if records:
                        self._process(records)
                    self._sink.poll()
                    if self._commit_due():
                        self._commit()
                    self._export_lag()
                except RetriableError as e:
                    log.warning("kafka_retriable_error", error=str(e))
                    self._clock.sleep(_ERROR_BACKOFF)
                except AbortableError as e:
                    log.warning("transaction_aborted", error=str(e))
                    self._abort_and_rewind(set())
            self._commit_final()
        finally:
            self._source.close()
            self._sink.close()
        log.info("worker_stopped")

    # RebalanceListener: called from inside Source.consume.

    def on_assign(self, partitions: Sequence[Partition]) -> None:
        self._assigned.update(partitions)
        self.joined = True
        self._metrics.rebalances.labels("assign").inc()
        self._metrics.assigned_partitions.set(len(self._assigned))
        log.info("partitions_assigned", partitions=_names(partitions))

    def on_revoke(self, partitions: Sequence[Partition]) -> None:
        self._metrics.rebalances.labels("revoke").inc()
        try:
            self._commit()
        except (AbortableError, RetriableError) as e:
            # The new owner reads from the committed offsets; rewind what we keep.
            log.warning("commit_failed_on_revoke", error=str(e))
            self._abort_and_rewind(set(partitions))
        self._forget(partitions)
        log.info("partitions_revoked", partitions=_names(partitions))

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        self._metrics.rebalances.labels("lost").inc()
        # Offsets of lost partitions can no longer be committed by this member.
        self._abort_and_rewind(set(partitions))
        self._forget(partitions)
        log.warning("partitions_lost", partitions=_names(partitions))

    def _process(self, records: list[SourceRecord]) -> None:
        started = self._clock.monotonic()
        if self._batch_opened is None:
            self._sink.begin()
            self._batch_opened = started
        settings = self._settings
        outcomes: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        warnings: Counter[str] = Counter()
        now_ms = self._clock.now_ms()
        ages = []
        for record in records:
            for outcome in process_record(record, settings.pipeline):
                outcomes[outcome.kind] += 1
                if isinstance(outcome, Enriched):
                    warnings.update(outcome.warnings)
                    ages.append(now_ms - outcome.event_time_ms)
                    self._sink.produce(
                        settings.enriched_topic,
                        outcome.group_id.encode(),
                        codec.encode(outcome.call),
                    )
                elif isinstance(outcome, DeadLetter):
                    reasons[outcome.reason] += 1
                    source = outcome.letter["source"]
                    log.info(
                        "dead_letter",
                        reason=outcome.reason,
                        topic=source["topic"],
                        partition=source["partition"],
                        offset=source["offset"],
                    )
                    self._sink.produce(
                        settings.dlq_topic,
                        outcome.key,
                        codec.encode(outcome.letter),
                        [("reason", outcome.reason.encode())],
                    )
                else:
                    skipped[outcome.call_type] += 1
            partition = (record.topic() or "", record.partition() or 0)
            offset = record.offset() or 0
            self._batch_start.setdefault(partition, offset)
            self._pending[partition] = offset + 1
        self._count(len(records), outcomes, reasons, skipped, warnings)
        for age in ages:
            self._metrics.event_age.observe(max(age, 0) / 1000)
        self._metrics.processing_duration.observe(self._clock.monotonic() - started)

    def _count(
        self,
        records: int,
        outcomes: Counter[str],
        reasons: Counter[str],
        skipped: Counter[str],
        warnings: Counter[str],
    ) -> None:
        m = self._metrics
        m.records_consumed.inc(records)
        m.calls_consumed.inc(sum(outcomes.values()))
        for labels, counter in (
            (outcomes, m.outcomes),
            (reasons, m.dead_letters),
            (skipped, m.skipped),
            (warnings, m.trait_warnings),
        ):
            for label, n in labels.items():
                counter.labels(label).inc(n)

    def _commit_due(self) -> bool:
        opened = self._batch_opened
        return opened is not None and (
            self._clock.monotonic() - opened >= self._settings.commit_interval
        )

    def _commit(self) -> None:
        """Commit every output and input offset since the last commit (no-op if none).

        Steps: (1) the sink makes outputs durable and commits the offsets with them;
        (2) the batch is forgotten. On an error nothing is forgotten, so a retry commits
        the same batch, and an abort rewinds to its start.
        """
        if self._batch_opened is None:
            return
        started = self._clock.monotonic()
        try:
            self._sink.commit(self._pending, self._source)  # (1)
        except Exception:
            self._metrics.commit_failures.inc()
            raise
        self._metrics.commit_duration.observe(self._clock.monotonic() - started)
        self._pending.clear()  # (2)
        self._batch_start.clear()
        self._batch_opened = None

    def _commit_final(self) -> None:
        try:
            self._commit()
        except (AbortableError, RetriableError) as e:
            log.warning("final_commit_failed", error=str(e))
            self._sink.abort()

    def _abort_and_rewind(self, gone: set[Partition]) -> None:
        """Abort the open batch and read its records again, except those of ``gone``."""
        self._sink.abort()
        rewind = {p: o for p, o in self._batch_start.items() if p not in gone}
        if rewind:
            self._source.seek(rewind)
            log.info("partitions_rewound", partitions=_names(rewind))
        self._pending.clear()
        self._batch_start.clear()
        self._batch_opened = None

    def _forget(self, partitions: Sequence[Partition]) -> None:
        for partition in partitions:
            self._assigned.discard(partition)
            self._pending.pop(partition, None)
            self._batch_start.pop(partition, None)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(*map(str, partition))
        self._metrics.assigned_partitions.set(len(self._assigned))

    def _export_lag(self) -> None:
        now = self._clock.monotonic()
        if now - self._lag_checked < _LAG_INTERVAL:
            return
        self._lag_checked = now
        for partition in self._assigned:
            lag = self._source.lag(partition)
            if lag is not None:
                self._metrics.consumer_lag.labels(*map(str, partition)).set(lag)


def _names(partitions: Sequence[Partition] | dict[Partition, int]) -> list[str]:
    return [f"{t}[{p}]" for t, p in partitions]
