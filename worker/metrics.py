"""Every Prometheus metric of group-worker, defined once, each with what it means.

Names carry the ``group_worker_`` prefix and base units; counters end in ``_total``;
labels are low-cardinality only (never a groupId).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from worker import __version__
from worker.events import OutcomeKind
from worker.normalise import WARNING_CODES
from worker.pipeline import KNOWN_CALL_TYPES, REASONS
from worker.state import GROUP_STATE_FULL

__all__ = ["OUTCOMES", "ROUTES", "Metrics"]

OUTCOMES: tuple[OutcomeKind, ...] = ("enriched", "duplicate", "skipped", "dead_letter")
# Where outputs go, as the processor names them.
ROUTES = ("enriched", "repartition", "state", "members", "dedupe", "dlq")
_PREFIX = "group_worker"
# The *_created series double the exposition for no use on dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The worker's metrics, registered in ``registry`` (a fresh one per worker)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Kafka records read from the input topic.
        self.records_consumed = Counter(
            f"{_PREFIX}_records_consumed", "Kafka records consumed", registry=r
        )
        # Calls read (a batch envelope counts each call); equals the sum of outcomes.
        self.calls_consumed = Counter(
            f"{_PREFIX}_calls_consumed", "Calls consumed, envelopes split", registry=r
        )
        # Each call's single outcome: enriched, duplicate, skipped or dead_letter.
        self.outcomes = Counter(f"{_PREFIX}_outcomes", "Calls by outcome", ["outcome"], registry=r)
        # Skipped calls by their type (identify, track...; unknown types are "other").
        self.skipped = Counter(
            f"{_PREFIX}_skipped_calls", "Non-group calls skipped, by type", ["type"], registry=r
        )
        # Dead letters by reason code: calls', and the state or membership records a
        # commit dead-letters (not calls' outcomes: outcomes{dead_letter} counts calls).
        self.dead_letters = Counter(
            f"{_PREFIX}_dead_letters", "Dead letters by reason", ["reason"], registry=r
        )
        # Traits dropped or overridden during normalisation, by warning code.
        self.trait_warnings = Counter(
            f"{_PREFIX}_trait_warnings", "Trait warnings by code", ["code"], registry=r
        )
        # Time to process one consumed batch, decode to produce (not the commit).
        self.processing_duration = Histogram(
            f"{_PREFIX}_processing_duration_seconds",
            "Batch processing time",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        # Wall-clock time from a call's event time to its processing.
        self.event_age = Histogram(
            f"{_PREFIX}_event_age_seconds",
            "Age of calls when processed",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600, 86400),
        )
        # Time to commit: flush and offset commit, or the transaction commit.
        self.commit_duration = Histogram(
            f"{_PREFIX}_commit_duration_seconds",
            "Commit time",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # Commits that failed and were aborted or retried.
        self.commit_failures = Counter(f"{_PREFIX}_commit_failures", "Failed commits", registry=r)
        # Open batches aborted and read again (transactions, at exactly_once).
        self.aborts = Counter(
            f"{_PREFIX}_transaction_aborts", "Batches aborted and replayed", registry=r
        )
        # Partitions paused because the producer's backlog is too long (backpressure).
        self.paused_partitions = Gauge(
            f"{_PREFIX}_paused_partitions", "Partitions paused for backpressure", registry=r
        )
        # Output records the producer could not deliver.
        self.produce_errors = Counter(
            f"{_PREFIX}_produce_errors", "Undeliverable output records", registry=r
        )
        # Outputs that could not be written as they were, by route (enriched, repartition,
        # state, members, dlq): too large for their topic, or refused by the broker for
        # good. Each became a dead letter, except a dead letter itself (then dropped).
        self.unwritable_outputs = Counter(
            f"{_PREFIX}_unwritable_outputs",
            "Outputs dead-lettered or dropped instead of produced, by route",
            ["route"],
            registry=r,
        )
        # Batches aborted since the last commit (the same records tried again); 0 after a
        # commit. Above 1 the worker is replaying one batch again and again: see the log
        # line batch_aborted_again for its partitions and offsets.
        self.abort_streak = Gauge(
            f"{_PREFIX}_batch_abort_streak", "Batches aborted since the last commit", registry=r
        )
        # Loops the service built anew after one failed, by kind: "retriable" (the broker
        # away, waited out) or "other" (a fenced or broken client, a store failure...;
        # too many of those in 10 minutes end the process).
        self.loop_rebuilds = Counter(
            f"{_PREFIX}_loop_rebuilds", "Worker loops rebuilt after a failure", ["kind"], registry=r
        )
        # Producers replaced in place after one hung (a broker restart), the loop kept.
        self.producer_renewals = Counter(
            f"{_PREFIX}_producer_renewals", "Hung producers replaced in place", registry=r
        )
        # Partitions currently assigned to this worker, by topic (input, repartition).
        self.assigned_partitions = Gauge(
            f"{_PREFIX}_assigned_partitions", "Assigned partitions", ["topic"], registry=r
        )
        # Rebalance events by kind: assign, revoke, lost.
        self.rebalances = Counter(
            f"{_PREFIX}_rebalances", "Rebalance callbacks by kind", ["kind"], registry=r
        )
        # Records between this worker's read position and the end of each assigned
        # partition (its high watermark as last fetched), every few seconds.
        self.consumer_lag = Gauge(
            f"{_PREFIX}_consumer_lag", "Consumer lag in records", ["topic", "partition"], registry=r
        )
        # Valid group calls sent to the repartition topic by the first stage.
        self.repartitioned_calls = Counter(
            f"{_PREFIX}_repartitioned_calls", "Calls re-keyed by groupId", registry=r
        )
        # With input_keyed_by_group_id, valid group calls whose record key is not their
        # groupId, or not on the partition murmur2 gives it: their group's state may be
        # split over partitions (README).
        self.unkeyed_calls = Counter(
            f"{_PREFIX}_unkeyed_calls",
            "Group calls on an input said to be keyed by groupId, keyed or placed otherwise",
            registry=r,
        )
        # Group calls whose own timestamp is there but not a valid ISO-8601 time: their
        # event time fell back to receivedAt or the record's time (README, Event time).
        self.invalid_timestamps = Counter(
            f"{_PREFIX}_invalid_timestamps",
            "Group calls whose timestamp is not a valid ISO-8601 time",
            registry=r,
        )
        # State, membership and dedupe records written to the changelog topics (coalesced).
        self.changelog_records = Counter(
            f"{_PREFIX}_changelog_records", "Changelog records written", registry=r
        )
        # Group states held in memory, over every assigned partition.
        self.groups_in_state = Gauge(
            f"{_PREFIX}_groups_in_state", "Groups held in state", registry=r
        )
        # Memberships held in memory, over every assigned partition.
        self.members_in_state = Gauge(
            f"{_PREFIX}_members_in_state", "Memberships held in state", registry=r
        )
        # Dedupe ids (groupId, messageId) held, over every assigned partition.
        self.dedupe_ids_in_state = Gauge(
            f"{_PREFIX}_dedupe_ids_in_state", "Dedupe ids held in state", registry=r
        )
        # Changelog records replayed while restoring assigned partitions: only those
        # after the local store's offsets, all of them when it is rebuilt.
        self.restored_records = Counter(
            f"{_PREFIX}_restored_records", "Records restored from changelogs", registry=r
        )
        # Partitions whose local store was unusable (corrupt, stale, from other topics)
        # and was rebuilt from the beginning of their changelogs.
        self.store_rebuilds = Counter(
            f"{_PREFIX}_store_rebuilds", "Partition stores rebuilt from scratch", registry=r
        )
        # RocksDB failing a read or write of a partition's local files (a damaged block, an
        # I/O error): each is followed by a rebuild of that partition.
        self.store_failures = Counter(
            f"{_PREFIX}_store_failures",
            "Partition stores that RocksDB failed to read or write, then rebuilt",
            registry=r,
        )
        # Partitions being restored or waiting for it, paused (not ready while > 0).
        self.restoring_partitions = Gauge(
            f"{_PREFIX}_restoring_partitions", "Partitions being restored", registry=r
        )
        # Time restoring one partition from its changelogs: its slices, not the waits.
        self.restore_duration = Histogram(
            f"{_PREFIX}_restore_duration_seconds",
            "Restore time per partition",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        # The running version, as a label on a constant 1.
        self.build = Info(f"{_PREFIX}_build", "Build information", registry=r)
        self.build.info({"version": __version__})
        # Export zeros for every label value known in advance, so rate() and increase()
        # see the first event after a start (a series born at 1 shows no increase).
        known = (
            (self.outcomes, OUTCOMES),
            (self.unwritable_outputs, ROUTES),
            (self.dead_letters, REASONS),
            (self.trait_warnings, (*WARNING_CODES, GROUP_STATE_FULL)),
            (self.skipped, (*sorted(KNOWN_CALL_TYPES - {"group"}), "other")),
            (self.rebalances, ("assign", "revoke", "lost")),
            (self.loop_rebuilds, ("retriable", "other")),
        )
        for counter, values in known:
            for value in values:
                counter.labels(value)
