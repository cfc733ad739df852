"""A worker process for the benchmark, and the topics of one run (``Topics``).

``WorkerProcess`` launches the real ``group-worker run`` as the integration tests do
(environment overrides of ``config/worker.toml``) from a checkout (``ROOT`` by default),
and watches it through its ``/metrics`` and ``/readyz``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "Topics", "WorkerProcess", "outcome_total"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics and consumer group of one run."""

    tag: str

    @classmethod
    def fresh(cls, what: str) -> Topics:
        return cls(f"bench-{what}-{uuid.uuid4().hex[:6]}")

    def name(self, role: str) -> str:
        return f"{self.tag}.{role}"

    @property
    def all(self) -> list[str]:
        roles = ("raw", "enriched", "state", "members", "dedupe", "dlq", "repartition", "out")
        return [self.name(r) for r in roles]

    def worker_environ(self, input_topic: str) -> dict[str, str]:
        return {
            "GROUP_WORKER_TOPICS_INPUT": input_topic,
            "GROUP_WORKER_TOPICS_ENRICHED": self.name("enriched"),
            "GROUP_WORKER_TOPICS_STATE": self.name("state"),
            "GROUP_WORKER_TOPICS_MEMBERS": self.name("members"),
            "GROUP_WORKER_TOPICS_DLQ": self.name("dlq"),
            "GROUP_WORKER_TOPICS_REPARTITION": self.name("repartition"),
            "GROUP_WORKER_TOPICS_DEDUPE": self.name("dedupe"),
            "GROUP_WORKER_WORKER_GROUP_ID": self.tag,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerProcess:
    """``python -m worker --config config/worker.toml run`` with environment overrides.

    ``settings`` are config keys (``worker_batch_size``), or librdkafka properties
    (``kafka_consumer_session_timeout_ms``), and their values. Its state
    lives in ``state_dir`` when given (kept, for a restart), else in a
    temporary directory deleted by ``stop``. ``started`` is when the process was
    launched (``time.perf_counter``). ``root`` is the checkout it runs from.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        input_topic: str,
        log_dir: Path,
        variant: Sequence[str] = (),
        *,
        state_dir: Path | None = None,
        log_name: str = "",
        settings: Mapping[str, str] | None = None,
        root: Path = ROOT,
    ) -> None:
        self.port = _free_port()
        self.log_path = log_dir / f"{topics.tag}{log_name}.log"
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="bench-state-")
            state_dir = Path(self._temporary.name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
        env.update(topics.worker_environ(input_topic))
        env["GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
        env["GROUP_WORKER_HTTP_PORT"] = str(self.port)
        env["GROUP_WORKER_WORKER_STATE_DIR"] = str(state_dir)
        env.update({f"GROUP_WORKER_{k.upper()}": v for k, v in (settings or {}).items()})
        known = _settings_known(root)  # an older checkout runs without newer settings
        # Any other GROUP_WORKER_KAFKA_* sets a librdkafka property, which every checkout takes.
        known |= {k for k in env if k.startswith("GROUP_WORKER_KAFKA_")}
        env = {k: v for k, v in env.items() if not k.startswith("GROUP_WORKER_") or k in known}
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # A variant (bench.variants) runs the same CLI with a proposed change applied.
            launcher = ["bench.variants", *variant, "--"] if variant else ["worker"]
            self.started = time.perf_counter()
            self.process = subprocess.Popen(
                [sys.executable, "-m", *launcher, "--config", "config/worker.toml", "run"],
                env=env,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _get(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=2) as r:
                return int(r.status), r.read().decode()
        except OSError:
            return 0, ""

    def check_alive(self) -> None:
        """Raise with the log's tail when the worker has exited."""
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{tail}")

    def wait_ready(self, timeout: float = 120, poll: float = 0.1) -> float:
        """Wait for ``/readyz`` to answer 200; returns the seconds since the launch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self._get("/readyz")[0] == 200:
                return time.perf_counter() - self.started
            time.sleep(poll)
        raise RuntimeError(f"worker not ready after {timeout:.0f}s (log: {self.log_path})")

    def samples(self) -> dict[str, float]:
        """``name{labels}`` -> value for every sample of ``/metrics``."""
        status, text = self._get("/metrics")
        out: dict[str, float] = {}
        if status != 200:
            return out
        for line in text.splitlines():
            if line and line[0] != "#":
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def peak_rss_bytes(self) -> int:
        """The process's peak resident set size (``VmHWM``)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; returns the exit code (``None``: killed)."""
        code: int | None = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._temporary is not None:
            self._temporary.cleanup()
        return code


def outcome_total(samples: Mapping[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("group_worker_outcomes_total{"))


def _settings_known(root: Path) -> set[str]:
    """The environment variables that set a key of ``root``'s ``config/worker.toml``."""
    with open(root / "config" / "worker.toml", "rb") as f:  # lists every key (test_config)
        config = tomllib.load(f)
    return {
        f"GROUP_WORKER_{section}_{key}".upper() for section, keys in config.items() for key in keys
    }
