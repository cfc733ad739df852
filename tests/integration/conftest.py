"""Fixtures for tests against the real local broker (``make test`` starts it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Topics, WorkerProcess


@pytest.fixture
def topics() -> Topics:
    """Fresh topic names and consumer group for this test."""
    return Topics.unique()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; any left running are killed at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()
