"""The metrics' exposition (worker.metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from worker.metrics import Metrics
from worker.normalise import WARNING_CODES
from worker.pipeline import REASONS
from worker.state import GROUP_STATE_FULL


def test_every_label_value_known_in_advance_is_exported_at_zero() -> None:
    """Dead-letter reasons, warning codes, skipped types, rebalance and rebuild kinds
    exist from the start, so the first event after a start shows in rate() and increase()."""
    registry = Metrics(CollectorRegistry()).registry
    for name, label, values in (
        ("group_worker_dead_letters_total", "reason", REASONS),
        ("group_worker_trait_warnings_total", "code", (*WARNING_CODES, GROUP_STATE_FULL)),
        ("group_worker_skipped_calls_total", "type", ("track", "identify", "other")),
        ("group_worker_outcomes_total", "outcome", ("enriched", "dead_letter")),
        ("group_worker_rebalances_total", "kind", ("assign", "revoke", "lost")),
        ("group_worker_loop_rebuilds_total", "kind", ("retriable", "other")),
    ):
        for value in values:
            assert registry.get_sample_value(name, {label: value}) == 0, (name, value)
    assert registry.get_sample_value("group_worker_invalid_timestamps_total") == 0
