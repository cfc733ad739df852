"""Two deployments on one broker: each keeps its internal topics, and its calls, to itself."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.harness import (
    Topics,
    WorkerProcess,
    cli,
    free_port,
    produce,
    read_topic,
    values,
)
from worker import codec

pytestmark = pytest.mark.integration

CALLS = 300


def calls(prefix: str) -> list[tuple[bytes | None, bytes | None]]:
    """``CALLS`` group calls keyed by user, so stage one re-keys them, in five shared groups."""
    return [
        (
            f"u{n % 7}".encode(),
            codec.encode(
                {
                    "type": "group",
                    "messageId": f"{prefix}-{n}",
                    "userId": f"u{n % 7}",
                    "groupId": f"g{n % 5}",
                    "traits": {"plan": prefix},
                }
            ),
        )
        for n in range(CALLS)
    ]


def test_deployments_with_their_own_group_ids_never_read_each_others_calls(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Each deployment, repartition topic left to its default, enriches exactly its own calls."""
    deployments = [Topics.unique(name_repartition=False) for _ in range(2)]
    for name, topics in zip("ab", deployments, strict=True):
        worker = WorkerProcess(topics, tmp_path, name)
        workers.append(worker.start())
        worker.wait_assigned(topics.input, f"{topics.group_id}.repartition")
    for name, topics in zip("ab", deployments, strict=True):
        produce(topics.input, calls(name))

    for name, topics in zip("ab", deployments, strict=True):
        enriched = values(read_topic(topics.enriched, expect=CALLS))
        assert Counter(c["messageId"] for c in enriched) == Counter(
            f"{name}-{n}" for n in range(CALLS)
        )
        assert {c["group"]["traits"]["plan"] for c in enriched} == {name}


def test_a_deployment_refuses_state_topics_another_deployment_writes(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A second deployment (its own group id) pointed at the first's state and members
    topics stops at its restore, exit 2, naming the other: sharing them, it would apply
    the first's calls again and double their groups' event counts."""
    first = Topics.unique(name_repartition=False)
    worker = WorkerProcess(first, tmp_path, "first")
    workers.append(worker.start())
    produce(first.input, calls("a"))
    assert len(read_topic(first.enriched, expect=CALLS)) == CALLS
    assert worker.stop() == 0

    second = dataclasses.replace(first, group_id=f"{first.group_id}-second")
    settings = {"WORKER_STATE_DIR": str(tmp_path / "second"), "HTTP_PORT": str(free_port())}
    result = cli(second, "run", **settings)
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert re.search(rf"topic {re.escape(first.state)} partition \d+ offset \d+: ", lines[0])
    assert f"written by deployment {first.group_id!r}" in lines[0], lines


def test_a_deployment_refuses_a_dedupe_topic_another_deployment_writes(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Two deployments (their own group ids and state topics) told the same dedupe topic
    by name: the second stops at its restore, exit 2, naming the first. Sharing it, it
    took every call the first had applied as a duplicate and enriched none of them."""
    first = Topics.unique(name_repartition=False)
    shared = {"TOPICS_DEDUPE": f"{first.group_id}.shared-dedupe"}
    worker = WorkerProcess(first, tmp_path, "first", **shared)
    workers.append(worker.start())
    produce(first.input, calls("a"))
    assert len(read_topic(first.enriched, expect=CALLS)) == CALLS
    assert worker.stop() == 0

    second = Topics.unique(name_repartition=False)
    settings = {"WORKER_STATE_DIR": str(tmp_path / "second"), "HTTP_PORT": str(free_port())}
    result = cli(dataclasses.replace(second, input=first.input), "run", **shared, **settings)
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert re.search(
        rf"topic {re.escape(shared['TOPICS_DEDUPE'])} partition \d+ offset \d+: ", lines[0]
    )
    assert f"written by deployment {first.group_id!r}" in lines[0], lines


def test_a_deployment_given_anothers_repartition_topic_merges_only_its_own_calls(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A second deployment on the same input told the first's repartition topic (a copied
    config): each stage two reads both deployments' calls there and merges only its own
    (stage one names its deployment on each). Before, each took the other's calls as
    duplicates, and its outcomes outgrew the calls it consumed."""
    first = Topics.unique()
    second = dataclasses.replace(Topics.unique(), input=first.input, repartition=first.repartition)
    runs = [WorkerProcess(first, tmp_path, "first"), WorkerProcess(second, tmp_path, "second")]
    for run in runs:
        workers.append(run.start())
        run.wait_assigned(first.input, first.repartition)
    produce(first.input, calls("x"))
    for topics, run in zip((first, second), runs, strict=True):
        enriched = values(read_topic(topics.enriched, expect=CALLS))
        assert Counter(c["messageId"] for c in enriched) == Counter(f"x-{n}" for n in range(CALLS))
        metrics = run.metrics()
        outcomes = sum(
            v for (name, _), v in metrics.items() if name == "group_worker_outcomes_total"
        )
        assert outcomes == run.sample("group_worker_calls_consumed_total") == CALLS
        assert run.logged("repartition_call_of_another_deployment")
