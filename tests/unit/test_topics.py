"""Starting without a broker: the topic step waits for one (``topics.await_topics``)."""

from __future__ import annotations

import pytest

from worker import topics
from worker.config import load_config
from worker.errors import RetriableError
from worker.topics import Layout, await_topics, ensure_topics


def test_no_broker_answering_is_retriable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that does not answer is a retriable error, not bad configuration."""
    monkeypatch.setattr(topics, "_TIMEOUT", 0.5)
    config = load_config(None, {"GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    with pytest.raises(RetriableError, match="cannot reach Kafka"):
        ensure_topics(config)


def test_the_start_waits_for_a_broker_however_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` tries the topics again, backing off up to 10 s, until a broker answers."""
    layout = Layout({"segment.raw": 6}, {})
    answers: list[Layout | RetriableError] = [RetriableError("no broker")] * 6 + [layout]

    def ensure(_: object) -> Layout:
        answer = answers.pop(0)
        if isinstance(answer, RetriableError):
            raise answer
        return answer

    monkeypatch.setattr(topics, "ensure_topics", ensure)
    slept: list[float] = []
    assert await_topics(load_config(None, {}), slept.append) is layout
    assert slept == [1.0, 2.0, 5.0, 10.0, 10.0, 10.0]
