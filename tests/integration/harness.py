"""Helpers for tests against the real local broker: worker processes, topics, readers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)
from prometheus_client.parser import text_string_to_metric_families

from worker import codec
from worker.kafka import produce_all

__all__ = [
    "BOOTSTRAP",
    "Topics",
    "WorkerProcess",
    "cli",
    "create_topic",
    "produce",
    "read_topic",
    "wait_until",
]

BOOTSTRAP = os.environ.get("KAFKA_TEST_BOOTSTRAP", "127.0.0.1:9092")
ROOT = Path(__file__).resolve().parents[2]
# Partitions of the input a worker creates, unless a test sets TOPICS_PARTITIONS.
PARTITIONS = 3


@dataclass(frozen=True)
class Topics:
    """Unique topic names and group id for one test, so tests never share data.

    With ``name_repartition`` false the worker is not told the repartition topic and
    derives it from the group id, which gives the same name.
    """

    input: str
    enriched: str
    state: str
    members: str
    dlq: str
    repartition: str
    group_id: str
    name_repartition: bool = True

    @classmethod
    def unique(
        cls, name_repartition: bool = True, prefix: str = "it", group_prefix: str = ""
    ) -> Topics:
        """Fresh names ``<prefix>-<tag>.raw``...; the group id (and with it the internal
        topics) ``<group_prefix>-<tag>``, by default under ``prefix`` too."""
        tag = uuid.uuid4().hex[:10]
        group = f"{group_prefix or prefix}-{tag}"
        name = f"{prefix}-{tag}"
        return cls(
            f"{name}.raw",
            f"{name}.enriched",
            f"{name}.state",
            f"{name}.members",
            f"{name}.dlq",
            f"{group}.repartition",
            group,
            name_repartition,
        )

    @property
    def dedupe(self) -> str:
        """The dedupe ids' changelog, named after the group id by the worker."""
        return f"{self.group_id}.dedupe"

    def environ(self) -> dict[str, str]:
        environ = {
            "GROUP_WORKER_TOPICS_INPUT": self.input,
            "GROUP_WORKER_TOPICS_ENRICHED": self.enriched,
            "GROUP_WORKER_TOPICS_STATE": self.state,
            "GROUP_WORKER_TOPICS_MEMBERS": self.members,
            "GROUP_WORKER_TOPICS_DLQ": self.dlq,
            "GROUP_WORKER_WORKER_GROUP_ID": self.group_id,
        }
        if self.name_repartition:
            environ["GROUP_WORKER_TOPICS_REPARTITION"] = self.repartition
        return environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerProcess:
    """``group-worker run`` in a child process, with its own HTTP port and log file."""

    def __init__(
        self, topics: Topics, log_dir: Path, name: str = "worker", **settings: str | None
    ) -> None:
        self.port = free_port()
        # The TOML file given to --config; a test may point it elsewhere before start().
        self.config = ROOT / "config" / "worker.toml"
        self.log_path = log_dir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
        env.update(topics.environ())
        env.update(
            {
                "GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
                "GROUP_WORKER_HTTP_PORT": str(self.port),
                "GROUP_WORKER_TOPICS_PARTITIONS": str(PARTITIONS),
                # The broker's minimum: a killed worker's partitions move on in seconds.
                "GROUP_WORKER_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
                # Its own local store, found again by a worker of the same name.
                "GROUP_WORKER_WORKER_STATE_DIR": str(log_dir / f"{name}.state"),
            }
        )
        for key, value in settings.items():  # None: unset it
            if value is None:
                env.pop(f"GROUP_WORKER_{key.upper()}", None)
            else:
                env[f"GROUP_WORKER_{key.upper()}"] = value
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        """Start the process and, with ``wait``, wait until it is ready."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "--config",
                    str(self.config),
                    "run",
                ],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        if wait:
            wait_until(self.ready, 60, f"the worker to be ready (log: {self.log_path})")
        return self

    def wait_assigned(self, *topics: str, partitions: int = PARTITIONS) -> None:
        """Wait until this worker holds all ``partitions`` of each of ``topics``.

        Ready means the worker has joined its group, not that every subscribed topic
        was assigned: a test that needs stage two running waits for this as well.
        """
        wait_until(
            lambda: all(
                self.sample("group_worker_assigned_partitions", topic=t) == partitions
                for t in topics
            ),
            10,
            f"{self.log_path.stem} to hold {partitions} partitions of each of {topics}",
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return self.get("/readyz")[0] == 200

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by name and sorted labels."""
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def progress(self) -> float:
        """Calls read from the input plus calls finished by the stateful stage."""
        metrics = self.metrics()
        names = ("group_worker_calls_consumed_total", "group_worker_outcomes_total")
        return sum(v for (name, _), v in metrics.items() if name in names)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log(self) -> str:
        """The log's last 5,000 characters (for assertion messages)."""
        return self.log_path.read_text(errors="replace")[-5000:]

    def logged(self, event: str) -> bool:
        """Whether the worker has logged ``event`` anywhere in its log."""
        return f'"event":"{event}"' in self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def create_topic(name: str, partitions: int, **configs: str) -> None:
    """Create ``name`` on the test broker (replication factor 1)."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(name, partitions, 1, config=configs)])[name].result(30)


def set_topic_config(name: str, key: str, value: str) -> None:
    """Change one setting of topic ``name`` on the test broker, as an operator would, and
    wait until the broker describes the topic with it."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(30)

    def applied() -> bool:
        described = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, name)])
        return bool(next(iter(described.values())).result(30)[key].value == value)

    wait_until(applied, 30, f"{name} to take {key}={value}")


def produce(
    topic: str, values: Iterable[tuple[bytes | None, bytes | None]], max_bytes: int = 1_000_000
) -> int:
    """Produce (key, value) pairs to ``topic`` and wait for every delivery."""
    producer = Producer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "enable.idempotence": True,
            "message.max.bytes": max_bytes + 1000,
            # As the Java client places keys: what a keyed input must be partitioned by.
            "partitioner": "murmur2_random",
        }
    )
    count, errors = produce_all(producer, topic, values)
    assert not errors, errors
    return count


def read_topic(
    topic: str,
    expect: int = 0,
    idle: float = 3.0,
    timeout: float = 60.0,
    client: Mapping[str, Any] | None = None,
    distinct: Callable[[Message], object] | None = None,
) -> list[Message]:
    """Every committed record of ``topic``: at least ``expect`` (waiting up to ``timeout``
    seconds for them), then until ``idle`` seconds pass without a new one. ``client`` is
    the consumer's connection settings (default: the test broker's). With ``distinct``,
    ``expect`` counts records of distinct keys by it: repeats (at least once) do not
    stand in for records still to come."""
    consumer = Consumer(
        {
            **(client or {"bootstrap.servers": BOOTSTRAP}),
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        records: list[Message] = []
        keys: set[object] = set()
        start = last = time.monotonic()
        while time.monotonic() - last < idle or (
            len(keys if distinct else records) < expect and time.monotonic() - start < timeout
        ):
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    records.append(message)
                    if distinct:
                        keys.add(distinct(message))
                    last = time.monotonic()
        return records
    finally:
        consumer.close()


def values(records: Iterable[Message]) -> list[Any]:
    """The decoded JSON values of ``records``."""
    return [codec.decode(r.value() or b"") for r in records]


def cli(topics: Topics, *args: str, **environ: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``group-worker ARGS`` against the test broker with ``topics``."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        check=False,
        env=cli_environ(topics, **environ),
    )


def cli_environ(topics: Topics, **environ: str) -> dict[str, str]:
    """The environment of ``cli``: the test broker, ``topics``, and ``GROUP_WORKER_``
    before each of ``environ``'s names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
    env.update(topics.environ(), GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS=BOOTSTRAP)
    env.update({f"GROUP_WORKER_{k}": v for k, v in environ.items()})
    return env
