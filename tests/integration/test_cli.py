"""Command failures on the real local broker: one line on standard error, no traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration.harness import Topics, cli, create_topic, read_topic
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
        f"group-worker: send: 1 of 3 calls not sent to {topics.input}: record 2: "
        "Unable to produce message: Broker: Message size too large "
        f"({len(big)} bytes; the producer's limit is message.max.bytes=1000000)"
    ]
    assert [r.value() for r in read_topic(topics.input, expect=2)] == [GROUP, GROUP]


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
