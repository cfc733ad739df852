"""The consumer's settings (worker.source.KafkaSource), without a broker."""

from __future__ import annotations

from typing import Any

import pytest

from worker import source
from worker.source import KafkaSource


def consumer_config(monkeypatch: pytest.MonkeyPatch, properties: dict[str, str]) -> Any:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(source, "Consumer", lambda config: seen.append(config))
    KafkaSource("127.0.0.1:1", "g", properties)
    [config] = seen
    return config


def test_prefetch_is_small_and_a_full_partition_fetches_again_soon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small prefetch keeps a hot partition's backlog from queueing ahead of other
    partitions' calls, and only with a short backoff: librdkafka's 1 s default after a
    partition's share fills cut a hot partition's drain to a fifth. A scoped property
    still wins."""
    config = consumer_config(monkeypatch, {})
    assert config["queued.max.messages.kbytes"] <= 8_192
    assert config["queued.min.messages"] <= 5_000
    assert config["fetch.queue.backoff.ms"] <= 50
    config = consumer_config(monkeypatch, {"consumer.queued.min.messages": "100000"})
    assert config["queued.min.messages"] == "100000"
    assert config["fetch.queue.backoff.ms"] <= 50
