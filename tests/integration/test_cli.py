"""Command failures on the real local broker: one line on standard error, no traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, Topics, cli, cli_environ, create_topic, read_topic
from worker import codec

pytestmark = pytest.mark.integration

GROUP = b'{"type":"group","groupId":"g1","userId":"u1","traits":{"name":"Acme"}}'


def test_send_sends_a_line_that_is_not_utf8_verbatim(topics: Topics, tmp_path: Path) -> None:
    """`send` produces a line that is not UTF-8 byte for byte, beside the others."""
    create_topic(topics.input, 1)
    not_utf8 = b'{"type":"group","groupId":"g\xff","userId":"u1"}'
    calls = tmp_path / "calls.jsonl"
    calls.write_bytes(GROUP + b"\n" + not_utf8 + b"\n")
    result = cli(topics, "send", str(calls))
    assert result.returncode == 0, result.stderr
    assert [r.value() for r in read_topic(topics.input, expect=2)] == [GROUP, not_utf8]


def test_send_of_an_oversized_call_says_which_in_one_line_and_sends_the_rest(
    topics: Topics, tmp_path: Path
) -> None:
    """A call over message.max.bytes is named in the one error line; the others are sent."""
    create_topic(topics.input, 1)
    big = codec.encode({"type": "group", "groupId": "g2", "traits": {"blob": "x" * 2_000_000}})
    calls = tmp_path / "calls.jsonl"
    calls.write_bytes(b"\n".join([GROUP, big, GROUP]) + b"\n")
    result = cli(topics, "send", str(calls))
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"group-worker: send: 1 of 3 records not sent to {topics.input}: record 2: "
        "Unable to produce message: Broker: Message size too large "
        f"({len(big)} bytes; the producer's limit is message.max.bytes=1000000)"
    ]
    assert [r.value() for r in read_topic(topics.input, expect=2)] == [GROUP, GROUP]


def test_send_sends_standard_input_as_it_comes_and_an_interrupt_counts_what_it_read(
    topics: Topics,
) -> None:
    """`send -` sends each line as it is read (it read the whole input first: a stream
    sent nothing until it ended), and Ctrl-C while it waits for more says how many of
    the calls read were delivered (it said nothing)."""
    create_topic(topics.input, 1)
    send = subprocess.Popen(
        [sys.executable, "-m", "worker", "send", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=cli_environ(topics),
        # As in a terminal: a test run in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert send.stdin is not None
        send.stdin.write(GROUP + b"\n")
        send.stdin.flush()
        assert [r.value() for r in read_topic(topics.input, expect=1)] == [GROUP]
        send.send_signal(signal.SIGINT)  # while it waits for the next line
        _, stderr = send.communicate(timeout=30)
    finally:
        send.kill()
    assert send.returncode == 130
    assert stderr.decode().splitlines() == [
        f"group-worker: send: interrupted: 1 of the 1 records read so far confirmed delivered "
        f"to {topics.input}; the rest may or may not have been"
    ]


def test_send_to_a_topic_that_does_not_exist_names_it(topics: Topics, tmp_path: Path) -> None:
    """`send` to a missing topic says so before sending (it waited 30 s for the
    producer's timeout, then named a record), exit 2 as for the worker's own topics."""
    calls = tmp_path / "calls.jsonl"
    calls.write_bytes(GROUP + b"\n")
    result = cli(topics, "send", "--topic", f"{topics.input}-missing", str(calls))
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"group-worker: send: no topic {topics.input}-missing"
    ]


@pytest.mark.parametrize(
    "command",
    [("send", "calls.jsonl"), ("state", "get", "g1"), ("tail", "x"), ("topics", "create")],
    ids=" ".join,
)
def test_a_broker_that_does_not_answer_is_named_by_its_setting(
    topics: Topics, tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A wrong address ends each data command with one line that names the setting and
    the address tried, not a bare transport error."""
    (tmp_path / "calls.jsonl").write_bytes(GROUP + b"\n")
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in command]
    result = cli(topics, *args, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9")
    assert result.returncode == 1
    lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("group-worker: ")
    assert "kafka.bootstrap_servers" in lines[0]
    assert "127.0.0.1:9" in lines[0]


def test_run_with_its_http_port_taken_exits_2_with_one_line(topics: Topics) -> None:
    """`run` on a taken HTTP port exits 2 with one line naming the address and http.port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(topics, "run", HTTP_HOST="127.0.0.1", HTTP_PORT=str(port))
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    # Besides the error, only JSON log lines (the configuration logged at start).
    lines = stderr.splitlines()
    assert [line for line in lines if not line.startswith("{")] == [
        f"group-worker: config: http.port: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ]
    assert all(isinstance(codec.decode(line), dict) for line in lines if line.startswith("{"))
