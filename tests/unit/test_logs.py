"""librdkafka's lines as JSON log events (worker.logs), in-process and from the command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from worker import codec
from worker.logs import KafkaClientLogHandler, configure_logging, kafka_client_logger

# What confluent-kafka logs for each librdkafka line: facility, client name, message.
FORMAT = "%s [%s] %s"
REFUSED = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
# How long the commands run against a broker that is not there.
WINDOW = 6.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_logger(handler: logging.Handler) -> logging.Logger:
    """A stdlib logger like the one confluent-kafka is given, with only ``handler``."""
    logger = logging.Logger("test.kafka_client", logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_client_lines_are_events_at_their_syslog_level() -> None:
    """Each line is a kafka_client_log event with its client and facility, levels mapped."""
    logger = client_logger(KafkaClientLogHandler())
    # confluent-kafka maps syslog 0-2 to CRITICAL, 3 ERROR, 4 WARNING, 5-6 INFO, 7 DEBUG.
    levels = [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
    with capture_logs() as logs:
        for n, level in enumerate(levels):
            logger.log(level, FORMAT, f"FAC{n}", "rdkafka#producer-1", f"line {n}")
    assert [e["log_level"] for e in logs] == ["error", "error", "warning", "info", "debug"]
    assert logs[0] == {
        "event": "kafka_client_log",
        "log_level": "error",
        "client": "rdkafka#producer-1",
        "facility": "FAC0",
        "message": "line 0",
    }


def test_a_repeated_line_passes_once_per_window_and_then_counts_the_rest() -> None:
    """Lines alike but for numbers pass once per 30 s; the next says how many were dropped."""
    clock = Clock()
    logger = client_logger(KafkaClientLogHandler(window=30.0, clock=clock))
    with capture_logs() as logs:
        for n in range(5):
            logger.error(FORMAT, "FAIL", "rdkafka#consumer-2", f"{REFUSED} (after {n}ms)")
            clock.now += 1
        logger.error(FORMAT, "FAIL", "rdkafka#consumer-2", "another failure")
        logger.error(FORMAT, "OTHER", "rdkafka#consumer-2", f"{REFUSED} (after 0ms)")
        clock.now += 30
        logger.error(FORMAT, "FAIL", "rdkafka#consumer-2", f"{REFUSED} (after 9ms)")
    assert [(e["facility"], e["message"], e.get("suppressed")) for e in logs] == [
        ("FAIL", f"{REFUSED} (after 0ms)", None),
        ("FAIL", "another failure", None),
        ("OTHER", f"{REFUSED} (after 0ms)", None),
        ("FAIL", f"{REFUSED} (after 9ms)", 4),
    ]


@pytest.fixture
def reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    kafka_client_logger().setLevel(logging.INFO)


@pytest.mark.usefixtures("reset_logging")
def test_client_lines_follow_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    """Below the configured level a client line is dropped; at it, it is one JSON line."""
    configure_logging("warning")
    logger = kafka_client_logger()
    logger.info(FORMAT, "INFO", "rdkafka#producer-1", "not shown")
    logger.warning(FORMAT, "WARN", "rdkafka#producer-1", "shown")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert codec.decode(lines[0])["facility"] == "WARN"


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[bytes]]:
    """Standard error of each command run for WINDOW seconds against a closed port."""
    tmp = tmp_path_factory.mktemp("unreachable")
    calls = tmp / "calls.jsonl"
    calls.write_bytes(b'{"type":"group","groupId":"g1","userId":"u1"}\n')
    commands = {"run": ["run"], "topics create": ["topics", "create"], "send": ["send", str(calls)]}
    processes = {name: start(tmp, args) for name, args in commands.items()}
    time.sleep(WINDOW)
    errors: dict[str, list[bytes]] = {}
    for name, process in processes.items():
        process.send_signal(signal.SIGKILL)
        errors[name] = process.communicate(timeout=10)[1].splitlines()
    return errors


def start(cwd: Path, args: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
    env["GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # nothing listens there
    env["GROUP_WORKER_HTTP_PORT"] = "0"  # any free port
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("command", ["run", "topics create", "send"])
def test_an_unreachable_broker_gives_few_json_lines(
    unreachable: dict[str, list[bytes]], command: str
) -> None:
    """Against a broker that is not there, a command writes a few JSON lines, no raw ones."""
    lines = unreachable[command]
    assert not [line for line in lines if not line.startswith(b"{")], lines[:5]
    events = [codec.decode(line) for line in lines]
    assert all(isinstance(event, dict) for event in events)
    assert len(lines) <= 15, lines


def test_an_unreachable_broker_is_reported_by_the_client_log(
    unreachable: dict[str, list[bytes]],
) -> None:
    """`send` polls its producer, so librdkafka's connection failure is a JSON event."""
    events = [codec.decode(line) for line in unreachable["send"]]
    failures = [e for e in events if e["event"] == "kafka_client_log"]
    assert failures, events
    assert failures[0]["level"] == "error"
    assert "127.0.0.1:1" in failures[0]["message"]
