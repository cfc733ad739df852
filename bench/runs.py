"""The benchmark's runs against a real broker: fill, ceiling, worker drains.

Every run gets topics and a consumer group of its own (``bench-<tag>.*``), deleted
afterwards, so runs never see each other's data. The worker is the real
``group-worker run`` process (``bench.process``), started as the integration tests start it
(environment overrides of ``config/worker.toml``), and watched through its ``/metrics``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.generator import Kind, Mix, generate_calls, group_id_of
from bench.process import ROOT, Topics, WorkerProcess, outcome_total
from worker import kafka

__all__ = [
    "Drain",
    "Fill",
    "PeerRun",
    "bare_read",
    "create_topic",
    "delete_topics",
    "drain_worker",
    "fast_producer",
    "fill_topic",
    "produce_all",
    "run_ceiling",
    "run_peer",
]

# The peer's interpreter (``bench.peer``), built by ``make bench`` from requirements/peer.txt.
PEER_PYTHON = ROOT / ".cache" / "peer-quixstreams" / "bin" / "python"
PARTITIONS = 6  # the worker's default topics.partitions
# How often /metrics is read while a worker drains: each read costs the worker a
# rendering of its registry, so not much more often than a Prometheus would.
_POLL = 0.25


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topic(
    bootstrap: str, name: str, partitions: int = PARTITIONS, config: Mapping[str, str] | None = None
) -> None:
    """Create ``name`` and wait until it exists."""
    admin = _admin(bootstrap)  # kept alive until the futures resolve
    futures = admin.create_topics(
        [NewTopic(name, partitions, 1, config=dict(config or {}))], request_timeout=30
    )
    for future in futures.values():
        future.result(30)


def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    """Delete the topics that exist among ``names``; errors are ignored."""
    admin = _admin(bootstrap)
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [n for n in names if n in existing]
    if wanted:
        for future in admin.delete_topics(wanted, request_timeout=30).values():
            try:
                future.result(30)
            except Exception:  # noqa: S112 - best effort cleanup
                continue


def fast_producer(bootstrap: str, **extra: Any) -> Producer:
    """A producer tuned to load data quickly (big batches), not the worker's settings."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "queue.buffering.max.kbytes": 1_048_576,
    }
    config.update(extra)
    return Producer(config)


def produce_all(producer: Producer, topic: str, pairs: Iterable[tuple[bytes, bytes]]) -> int:
    """Produce every ``(key, value)``; waits for delivery; raises on the first error."""
    count, errors = kafka.produce_all(producer, topic, pairs, timeout=120)
    if errors:
        raise RuntimeError(f"producing to {topic} failed: {errors[:3]}")
    return count


@dataclass(frozen=True, slots=True)
class Fill:
    """A pre-filled input topic."""

    topic: str
    mix: Mix
    bytes: int
    seconds: float


def fill_topic(bootstrap: str, topic: str, calls: int, seed: int, *, by_group: bool) -> Fill:
    """Create ``topic`` and produce ``calls`` generated calls to it.

    Keyed by the sender (``userId``) like a raw topic, or by ``groupId`` when
    ``by_group`` (for the worker's ``input_keyed_by_group_id`` mode).
    """
    create_topic(bootstrap, topic)
    counts: dict[Kind, int] = {
        "group": 0,
        "other": 0,
        "bad": 0,
        "duplicate": 0,
        "late_duplicate": 0,
    }
    size = 0

    def pairs() -> Iterable[tuple[bytes, bytes]]:
        nonlocal size
        for key, value, kind in generate_calls(calls, seed):
            counts[kind] += 1
            size += len(value)
            yield (group_id_of(value) if by_group else key), value

    started = time.perf_counter()
    produce_all(fast_producer(bootstrap), topic, pairs())
    mix = Mix(**counts)
    return Fill(topic, mix, size, time.perf_counter() - started)


def bare_read(bootstrap: str, topics: Iterable[str]) -> tuple[int, float]:
    """Records in ``topics`` and the seconds a bare consumer takes to read them all.

    ``read_committed``, every partition of every topic assigned from its beginning, read
    until each reports its end; nothing done with the records. Blocks.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    assigned = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        assigned += [TopicPartition(topic, p, 0) for p in metadata.partitions]
    records = ends = 0
    started = time.perf_counter()
    consumer.assign(assigned)
    while ends < len(assigned):
        for message in consumer.consume(10_000, 0.05):
            error = message.error()
            if error is None:
                records += 1
            elif error.code() == KafkaError._PARTITION_EOF:
                ends += 1
            else:
                raise RuntimeError(f"bare consumer: {error.str()}")
    seconds = time.perf_counter() - started
    consumer.close()
    return records, seconds


def run_ceiling(
    bootstrap: str,
    input_topic: str,
    guarantee: str,
    expect: int,
    *,
    shape: str = "copy",
    stages: int = 2,
) -> float:
    """Seconds the pass-through loop (``bench.ceiling``) takes to copy ``expect`` records;
    ``shape="worker"``: into the worker's records, through ``stages`` (``WorkerShaped``)."""
    topics = Topics.fresh("ceiling")
    output = topics.name("out")
    created = [output]
    if shape == "worker":
        created += [f"{output}.{role}" for role in ("state", "members", "dedupe", "repartition")]
    for name in created:
        create_topic(bootstrap, name)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.ceiling",
                "--bootstrap",
                bootstrap,
                "--input",
                input_topic,
                "--output",
                output,
                "--guarantee",
                guarantee,
                "--expect",
                str(expect),
                "--shape",
                shape,
                "--stages",
                str(stages),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
    finally:
        delete_topics(bootstrap, created)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["seconds"] is None:
        raise RuntimeError(f"the ceiling did not finish: {done.stderr[-2000:]}")
    return float(result["seconds"])


@dataclass(frozen=True, slots=True)
class Drain:
    """One worker run over a pre-filled topic."""

    guarantee: str
    keyed: bool
    calls: int
    seconds: float
    peak_rss_bytes: int
    outcomes: dict[str, float]
    groups_in_state: float
    # The worker's own time processing batches and committing them (its histograms).
    processing_seconds: float
    commit_seconds: float

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def drain_worker(
    bootstrap: str,
    input_topic: str,
    expect: int,
    guarantee: str,
    log_dir: Path,
    *,
    keyed: bool = False,
    timeout: float = 900,
    extra: Mapping[str, str] | None = None,
    variant: Sequence[str] = (),
    on_start: Callable[[WorkerProcess], None] | None = None,
    root: Path = ROOT,
) -> Drain:
    """Start a worker on ``input_topic`` and time it until every call has an outcome.

    The clock starts when ``/metrics`` first shows a consumed call (``on_start`` is then
    called with the worker) and stops when the outcomes add up to ``expect`` (polled
    every 250 ms, so within 0.25 s). ``root``: the checkout the worker runs from.
    """
    topics = Topics.fresh("eos" if guarantee == "exactly_once" else "alo")
    worker = WorkerProcess(
        bootstrap,
        topics,
        input_topic,
        log_dir,
        variant,
        settings={
            "worker_processing_guarantee": guarantee,
            "worker_input_keyed_by_group_id": "true" if keyed else "false",
            **(extra or {}),
        },
        root=root,
    )
    try:
        started: float | None = None
        deadline = time.monotonic() + timeout
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            worker.check_alive()
            samples = worker.samples()
            now = time.perf_counter()
            if started is None and samples.get("group_worker_calls_consumed_total", 0) > 0:
                started = now
                if on_start is not None:
                    on_start(worker)
            if started is not None and outcome_total(samples) >= expect:
                outcomes = {
                    k.split('"')[1]: v
                    for k, v in samples.items()
                    if k.startswith("group_worker_outcomes_total{")
                }
                return Drain(
                    guarantee,
                    keyed,
                    expect,
                    now - started,
                    worker.peak_rss_bytes(),
                    outcomes,
                    samples.get("group_worker_groups_in_state", 0.0),
                    samples.get("group_worker_processing_duration_seconds_sum", 0.0),
                    samples.get("group_worker_commit_duration_seconds_sum", 0.0),
                )
            time.sleep(_POLL)
        done = outcome_total(samples)
        raise RuntimeError(f"worker drained {done:.0f} of {expect} calls in {timeout:.0f}s")
    finally:
        worker.stop()
        delete_topics(bootstrap, topics.all)


@dataclass(frozen=True, slots=True)
class PeerRun:
    """One run of the peer (``bench.peer``, Quix Streams) over a pre-filled keyed topic."""

    library: str
    calls: int
    seconds: float
    committed_seconds: float
    peak_rss_bytes: int
    outputs: int

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def run_peer(
    bootstrap: str,
    input_topic: str,
    expect: int,
    log_dir: Path,
    *,
    python: Path = PEER_PYTHON,
    commit_interval: float | None = None,
    timeout: float = 1800,
    wrapper: Sequence[str] = (),
) -> PeerRun:
    """Run the peer in its own interpreter until it processed ``expect`` input records.

    Then checks, from here, that its consumer group committed the input topic to its
    end, and counts its outputs with a ``read_committed`` consumer. Raises with the tail
    of its log when it fails. ``wrapper``: a command to run it under (a profiler).
    """
    if not python.exists():
        raise RuntimeError(f"no peer interpreter at {python.relative_to(ROOT)}: run make bench")
    topics = Topics.fresh("peer")
    output = topics.name("out")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{topics.tag}.log"
    create_topic(bootstrap, output)
    command = [*wrapper, str(python), "-m", "bench.peer", "--bootstrap", bootstrap]
    command += ["--input", input_topic]
    command += ["--output", output, "--group", topics.tag, "--expect", str(expect)]
    if commit_interval is not None:
        command += ["--commit-interval", str(commit_interval)]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-peer-") as state_dir,
            open(log_path, "wb") as log,
        ):
            done = subprocess.run(
                [*command, "--state-dir", state_dir],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=timeout,
                check=False,
            )
        # Its result is the last JSON line (a ``wrapper`` may print lines of its own).
        lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
        if result.get("seconds") is None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the peer exited with {done.returncode}: {tail}")
        behind = _uncommitted(bootstrap, topics.tag, input_topic)
        if behind:
            raise RuntimeError(f"the peer left {behind} input records uncommitted")
        outputs, _ = bare_read(bootstrap, [output])
    finally:
        admin = _admin(bootstrap)
        mine = [t for t in admin.list_topics(timeout=10).topics if topics.tag in t]
        delete_topics(bootstrap, mine)
    return PeerRun(
        result["library"],
        expect,
        float(result["seconds"]),
        float(result["committed_seconds"]),
        int(result["peak_rss_bytes"]),
        outputs,
    )


def _uncommitted(bootstrap: str, group: str, topic: str) -> int:
    """Records of ``topic`` past the offsets ``group`` committed."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        behind = 0
        for tp in consumer.committed(partitions, timeout=10):
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            behind += high - max(tp.offset, 0)
        return behind
    finally:
        consumer.close()
