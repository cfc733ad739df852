"""Fixtures for tests against the real local broker (``make test`` starts it), and the
secured one (``secure_broker`` starts it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, Topics, WorkerProcess
from tests.integration.secure import KAFKA_SH, SECURE_PORT, SecureBroker


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


@pytest.fixture(scope="session")
def secure_broker() -> Iterator[SecureBroker]:
    """The secured broker, started for the session unless already running; stopped after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    env.update(KAFKA_SECURITY="sasl_ssl", KAFKA_PORT=str(SECURE_PORT))
    kafka_sh = ["bash", str(KAFKA_SH)]
    running = subprocess.run([*kafka_sh, "status"], env=env, capture_output=True, check=False)
    started = running.returncode != 0
    try:
        if started:
            up = subprocess.run(
                [*kafka_sh, "up"], env=env, capture_output=True, timeout=300, check=False
            )
            assert up.returncode == 0, up.stderr.decode(errors="replace")[-3000:]
        yield SecureBroker(
            f"127.0.0.1:{SECURE_PORT}", ROOT / ".cache" / f"kafka-sasl_ssl-state-{SECURE_PORT}"
        )
    finally:
        if started:
            subprocess.run([*kafka_sh, "down"], env=env, capture_output=True, check=False)
