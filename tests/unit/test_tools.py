"""The data commands without Kafka: reading input files, and ``normalise`` (worker.tools)."""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker import codec, tools
from worker.cli import main
from worker.config import load_config
from worker.errors import WorkerError
from worker.events import Headers, Record
from worker.tools import read_calls

GROUP = b'{"type":"group","groupId":"g1","userId":"u1","traits":{"name":"Acme"}}'
NOT_UTF8 = b'{"type":"group","groupId":"g\xff","userId":"u1"}'


def group_worker(cwd: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[bytes]:
    """``group-worker ARGS`` in ``cwd``, with no ``GROUP_WORKER_`` variables but ``environ``."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        cwd=cwd,
        env=own_environ(**environ),
        timeout=60,
        check=False,
    )


def own_environ(**environ: str) -> dict[str, str]:
    """This process's environment without its ``GROUP_WORKER_`` variables, plus ``environ``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
    return {**env, **environ}


def calls_in(data: bytes) -> list[bytes]:
    return [value for _, value in read_calls(io.BytesIO(data))]


def test_read_calls_keeps_a_line_that_is_not_utf8_verbatim() -> None:
    """Each non-blank line is a value, byte for byte, even one that is not UTF-8; a line
    may end in \\n, \\r\\n or \\r."""
    data = GROUP + b"\r\n\n" + NOT_UTF8 + b"\r" + GROUP + b"\n"
    assert calls_in(data) == [GROUP, NOT_UTF8, GROUP]


@pytest.mark.parametrize(
    ("data", "numbers"),
    [
        (b"\n\r\n" + GROUP + b"\n\n" + GROUP + b"\r\r" + GROUP, [3, 5, 7]),
        (b"\n\n[1,\n\n 2]", [1, 2]),  # an array's elements: their place in it
        (b"\n\n[1,\n\n 2", [3, 5]),  # not an array after all: lines again
    ],
)
def test_read_calls_numbers_each_value_by_its_line(data: bytes, numbers: list[int]) -> None:
    """Each value comes with its line's number in the file, blank lines counted (what
    `normalise` gives as the source offset, so a bad line can be found), or with its
    place in a JSON array."""
    assert [number for number, _ in read_calls(io.BytesIO(data))] == numbers


@pytest.mark.parametrize("data", [b' [{"a": 1}, 2]', b'\n\n[\n  {"a": 1},\n  2\n]\n'])
def test_read_calls_splits_a_json_array_into_calls(data: bytes) -> None:
    """A JSON array gives one value per element, on one line or pretty-printed."""
    assert calls_in(data) == [b'{"a":1}', b"2"]


def test_read_calls_reads_an_array_with_half_a_character_as_the_worker_reads_a_call() -> None:
    """An escaped lone surrogate (a string cut inside an emoji) leaves the array an
    array, its character read as U+FFFD: the calls are not sent as one line."""
    assert calls_in(b'[{"a": "x\\ud83d"}, 2]') == ['{"a":"x\ufffd"}'.encode(), b"2"]


def test_read_calls_names_an_element_too_deep_to_send() -> None:
    """An element nested past what JSON is written to is one line naming it."""
    data = b"[1, " + b"[" * 300 + b"]" * 300 + b"]"
    with pytest.raises(WorkerError, match=r"^element 1 of the array nests too deeply to send$"):
        calls_in(data)


def test_read_calls_reads_an_endless_line_a_bounded_part_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line longer than _MAX_LINE comes in parts, so /dev/zero cannot fill the memory."""
    monkeypatch.setattr(tools, "_MAX_LINE", 4)
    assert calls_in(b"abcdefghij\n") == [b"abcd", b"efgh", b"ij"]


def test_normalise_reads_a_json_array_as_send_does(tmp_path: Path) -> None:
    """`normalise` splits a JSON array into its calls, as `send` does (it read the array
    as one record: not_an_object, where the worker enriched both calls)."""
    calls = tmp_path / "calls.json"
    calls.write_bytes(b"[" + GROUP + b", " + GROUP.replace(b"u1", b"u2") + b"]\n")
    result = group_worker(tmp_path, "normalise", "--summary", str(calls))
    assert (result.returncode, result.stderr) == (0, b"")
    assert b"outcome enriched\t2" in result.stdout
    assert b"timestamp invalid" not in result.stdout


def test_normalise_summary_counts_calls_whose_timestamp_is_unusable(tmp_path: Path) -> None:
    """A call whose own timestamp is no ISO-8601 time (its event time falls back) is
    counted in the summary, as the worker counts it on its metrics."""
    calls = tmp_path / "calls.jsonl"
    bad = GROUP.replace(b'"type"', b'"timestamp":"2021-10-17T12:30:45.123:Z","type"')
    calls.write_bytes(bad + b"\n" + GROUP + b"\n")
    result = group_worker(tmp_path, "normalise", "--summary", str(calls))
    assert (result.returncode, result.stderr) == (0, b"")
    assert b"outcome enriched\t2\ntimestamp invalid\t1\n" in result.stdout


def test_normalise_dead_letters_a_line_that_is_not_utf8_and_goes_on(tmp_path: Path) -> None:
    """`normalise` turns a line that is not UTF-8 into an invalid_json dead letter."""
    calls = tmp_path / "calls.jsonl"
    calls.write_bytes(NOT_UTF8 + b"\n" + GROUP + b"\n")
    result = group_worker(tmp_path, "normalise", str(calls))
    assert (result.returncode, result.stderr) == (0, b"")
    letter, enriched = (codec.decode(line) for line in result.stdout.splitlines())
    assert letter["topic"] == "segment.group.dlq"
    assert letter["value"]["reason"] == "invalid_json"
    assert letter["value"]["encoding"] == "base64"
    assert enriched["topic"] == "segment.group.enriched"
    assert enriched["value"]["groupId"] == "g1"


@pytest.mark.parametrize("command", ["send", "normalise"])
def test_a_file_that_cannot_be_read_is_named_in_one_line(tmp_path: Path, command: str) -> None:
    """A missing file, or a directory, ends the command with one line naming it (for
    `send`, before any broker is asked: the port below has none)."""
    no_broker = {"GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    for path, why in ((tmp_path / "missing.jsonl", "No such file"), (tmp_path, "directory")):
        result = group_worker(tmp_path, command, str(path), **no_broker)
        lines = result.stderr.decode().splitlines()
        assert result.returncode == 1
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"group-worker: cannot read {path}: "), lines
        assert why in lines[0], lines


@pytest.mark.parametrize("command", ["send", "normalise"])
def test_standard_input_closed_is_named_in_one_line(tmp_path: Path, command: str) -> None:
    """`-` with standard input closed (`<&-`) is one line, exit 1 (it was a traceback)."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", command, "-"],
        capture_output=True,
        cwd=tmp_path,
        env=own_environ(GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9"),
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(0),
    )
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "group-worker: cannot read standard input: it is closed"
    ]


def test_ctrl_c_before_anything_is_sent_says_so(tmp_path: Path) -> None:
    """Ctrl-C while `send` still asks for its topic (here a broker that never answers)
    prints the count, none (it printed nothing), exit 130."""
    (tmp_path / "calls.jsonl").write_bytes(GROUP + b"\n")
    send = subprocess.Popen(
        [sys.executable, "-m", "worker", "send", "calls.jsonl", "--topic", "t"],
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=own_environ(GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    try:
        assert send.stderr is not None
        first = send.stderr.readline()  # the client's first line: it asks the broker
        send.send_signal(signal.SIGINT)
        _, stderr = send.communicate(timeout=30)
    finally:
        send.kill()
    assert send.returncode == 130, first + stderr
    assert stderr.decode().splitlines()[-1] == (
        "group-worker: send: interrupted: 0 of the 0 records read so far confirmed delivered "
        "to t; the rest may or may not have been"
    )


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--max", "0"], "--max: must be at least 1, not 0"),
        (["--max", "-3"], "--max: must be at least 1, not -3"),
        (["--max", "1.5"], "--max: '1.5' is not a valid int"),
        (["--timeout", "0"], "--timeout: must be at least 0.1, not 0"),
        (["--timeout", "-1"], "--timeout: must be at least 0.1, not -1"),
        (["--timeout", "nan"], "--timeout: must be at least 0.1, not nan"),
    ],
)
def test_tail_refuses_a_bound_it_cannot_keep(
    args: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tail --max` below 1 or `--timeout` below 0.1 is a usage error (exit 2, one line
    naming the option), before any broker is asked. A timeout of 0 used to stop before
    the first poll and print nothing, records or not."""
    with pytest.raises(SystemExit) as stopped:
        main(["tail", "some.topic", *args])
    assert stopped.value.code == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "variable", "value", "why"),
    [
        (["run"], "GROUP_WORKER_KAFKA_CLIENT_IDD", "x", '"client.idd"'),
        (["run"], "GROUP_WORKER_KAFKA_SECURITY_PROTOCOL", "BOGUS", '"security.protocol"'),
        (["run"], "GROUP_WORKER_KAFKA_CONSUMER_FETCH_MAX_BYTES", "12", "fetch.max.bytes"),
        (["tail", "t"], "GROUP_WORKER_KAFKA_LINGER_MS", "soon", "queue.buffering.max.ms"),
        (["send", "-"], "GROUP_WORKER_KAFKA_NOT_A_PROPERTY", "1", '"not.a.property"'),
    ],
)
def test_a_kafka_property_librdkafka_refuses_is_bad_configuration(
    tmp_path: Path, command: list[str], variable: str, value: str, why: str
) -> None:
    """An unknown librdkafka property, or a value it does not take, stops any Kafka
    command at start with exit 2 and one line naming the property."""
    no_broker = {"GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", variable: value}
    result = group_worker(tmp_path, *command, **no_broker)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("group-worker: config: kafka: "), lines
    assert why in lines[0], lines


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_taken_before_or_after_the_command(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config FILE` works on either side of the command (here a file that is missing)."""
    option = ["--config", str(tmp_path / "missing.toml")]
    command = ["state", "get", "g"]
    assert main(option + command if where == "before" else command + option) == 2
    assert f"cannot read {tmp_path / 'missing.toml'}" in capsys.readouterr().err


def test_an_empty_config_or_topic_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--config ""`` (an unset variable) used the default file, unseen; ``--topic ""``
    sent to the input topic. Both are usage errors now, exit 2."""
    for argv in (["--config", "", "normalise"], ["send", "x", "--topic", ""]):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
    assert "--config: an empty file name" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """Output to a full disk ends the command with one line and exit 1 (a traceback)."""
    calls = tmp_path / "calls.jsonl"
    calls.write_bytes(GROUP + b"\n")
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "normalise", str(calls)],
            stdout=full,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["group-worker: No space left on device"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [(b'{"a": 1}', {"a": 1}), (b"not json \xff", "not json \ufffd"), (b"", ""), (None, None)],
)
def test_tail_prints_any_record_as_one_json_line(value: bytes | None, shown: object) -> None:
    """`tail` prints any record: an empty value (it raised on it, and stopped), none (a
    tombstone), text that is not JSON; a header with no value, and one sent twice."""
    headers: Headers = [("reason", b"invalid_json"), ("x", None), ("twice", b"1"), ("twice", b"2")]
    record = Record("t", 2, 7, value, headers_=headers)
    line = codec.encode(tools._printable(record))
    assert codec.decode(line) == {
        "partition": 2,
        "offset": 7,
        "key": None,
        "headers": {"reason": "invalid_json", "x": None, "twice": ["1", "2"]},
        "value": shown,
    }


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (b'{"userId": "u1", "anonymousId": "a1"}', b"u1"),
        (b'{"userId": 42}', b"42"),
        (b'{"userId": {"a": 1}, "anonymousId": "a1"}', b"a1"),
        (b'{"userId": "  ", "anonymousId": "a1"}', b"a1"),
        (b'{"userId": true, "anonymousId": 7}', b"7"),
        (b'{"userId": [1]}', None),
        (b"[1]", None),
        (b"not json", None),
    ],
)
def test_send_keys_a_call_by_its_first_usable_id(call: bytes, key: bytes | None) -> None:
    """`send` keys a record by its userId, else its anonymousId: a text that is not blank
    or an integer, as the worker reads an ID (an object userId gave no key at all)."""
    assert tools._key(call, "userId") == key


def test_state_dump_names_a_profile_that_is_not_json_and_prints_the_rest(
    monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    """Anyone who may write the state topic can put bytes there that are not JSON, or
    JSON over several lines: `state dump` prints JSON lines all the same, names the
    group whose record is not JSON, exits 1."""
    profiles = {
        b"g1": b'{"groupId":"g1"}',
        b"g\n2": b"\xffnot json",
        b"g3": b'{"groupId":\r\n"g3"}\n',  # JSON, but not one line
    }
    monkeypatch.setattr(tools, "_profiles", lambda config: profiles)
    config = load_config(environ={})
    assert tools._state_dump(config, argparse.Namespace()) == 1
    out, err = capfdbinary.readouterr()
    assert out.splitlines() == [b'{"groupId":"g1"}', b'{"groupId":"g3"}']
    assert b'group "g\\n2" in segment.group.state' in err
    assert b"byte 0xff at offset 0" in err
    assert tools._state_get(config, argparse.Namespace(group_id="g1")) == 0
    assert tools._state_get(config, argparse.Namespace(group_id="g\n2")) == 1
