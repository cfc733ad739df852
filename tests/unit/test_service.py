"""The supervisor (worker.service): rebuilding failed loops, and when to give up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException

from tests.fakes import FakeClock
from worker import service
from worker.config import load_config
from worker.errors import ConfigError, FatalClientError, FatalError, KafkaError, RetriableError
from worker.limits import GroupBound, Limits
from worker.metrics import Metrics
from worker.server import Probes
from worker.service import Loop, Supervisor


class FakeLoop:
    """A loop whose run() raises ``error``, or calls ``on_run`` and returns."""

    def __init__(self, error: Exception | None = None, on_run: Callable[[], None] | None = None):
        self.error = error
        self.on_run = on_run
        self.last_progress = 0.0
        self.ready = True
        self.stopped = False

    def run(self) -> None:
        if self.on_run is not None:
            self.on_run()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopped = True


def supervise(
    *loops: FakeLoop, clock: FakeClock | None = None
) -> tuple[int, list[FakeLoop], FakeClock]:
    built: list[FakeLoop] = []
    pending = list(loops)

    def build() -> Loop:
        built.append(pending.pop(0))
        return built[-1]

    clock = clock or FakeClock()
    return Supervisor(build, clock).run(), built, clock


def test_a_failed_loop_is_rebuilt_after_a_backoff() -> None:
    """A loop that fails with a Kafka error is replaced, and a clean end exits 0."""
    code, built, clock = supervise(
        FakeLoop(KafkaError("stuck")), FakeLoop(RetriableError("x")), FakeLoop()
    )
    assert code == 0
    assert len(built) == 3
    assert clock.now_ms() - FakeClock().now_ms() == 3_000  # backoffs of 1 s and 2 s


def test_rebuilds_are_counted_by_kind() -> None:
    """Each rebuilt loop counts in ``loop_rebuilds_total``, the broker away apart."""
    loops = iter([FakeLoop(KafkaError("stuck")), FakeLoop(RetriableError("away")), FakeLoop()])
    metrics = Metrics()
    assert Supervisor(lambda: next(loops), FakeClock(), metrics).run() == 0
    counts = {
        kind: metrics.registry.get_sample_value("group_worker_loop_rebuilds_total", {"kind": kind})
        for kind in ("retriable", "other")
    }
    assert counts == {"retriable": 1.0, "other": 1.0}


class _Client:
    """Stands for a Kafka client in a failed loop's frame."""


def test_a_failed_loops_clients_go_before_the_next_is_built() -> None:
    """An error kept elsewhere (confluent-kafka keeps one its callback raised) must not
    keep the failed loop's clients alive through the frames it passed: a replaced
    producer would go on with its transactional id."""
    kept: list[BaseException] = []
    clients: list[weakref.ref[_Client]] = []

    def fail() -> None:
        client = _Client()
        clients.append(weakref.ref(client))
        try:
            raise KafkaError("refused")
        except KafkaError as e:
            kept.append(e)
            raise

    alive: list[bool] = []
    code, built, _ = supervise(
        FakeLoop(on_run=fail), FakeLoop(on_run=lambda: alive.append(clients[0]() is not None))
    )
    assert (code, len(built), alive) == (0, 2, [False])


def test_a_loop_that_ran_a_while_starts_the_backoff_afresh() -> None:
    """Failures in a row back off longer and longer; one after a loop ran for a while
    (a broker restart, minutes after the last) waits the shortest backoff again."""
    clock = FakeClock()
    loops = [FakeLoop(RetriableError("away")) for _ in range(4)]
    loops += [FakeLoop(KafkaError("hung"), on_run=lambda: clock.advance(60)), FakeLoop()]
    code, built, _ = supervise(*loops, clock=clock)
    assert code == 0
    assert len(built) == 6
    assert clock.now_ms() - FakeClock().now_ms() == (1 + 2 + 5 + 10 + 60 + 1) * 1000


@pytest.mark.parametrize(
    "error",
    [
        FatalError("not authorized"),
        KafkaException(ClientError(ClientError.TOPIC_AUTHORIZATION_FAILED, "no ACL")),
    ],
    ids=["translated", "client-error"],
)
def test_a_fatal_error_exits_1_without_rebuilding(error: Exception) -> None:
    """A fatal error ends the process with exit code 1, also when the client's error
    reaches the supervisor untranslated."""
    code, built, _ = supervise(FakeLoop(error), FakeLoop())
    assert code == 1
    assert len(built) == 1


@pytest.mark.parametrize(
    "error",
    [
        FatalClientError("fenced"),
        KafkaException(ClientError(ClientError._FENCED, "fenced by a newer instance", fatal=True)),
    ],
    ids=["translated", "client-error"],
)
def test_a_fenced_producer_is_rebuilt(error: Exception) -> None:
    """A client's own fatal error (a producer fenced because its transaction timed out
    while the process was paused) gets a new loop, not an exit."""
    code, built, _ = supervise(FakeLoop(error), FakeLoop())
    assert code == 0
    assert len(built) == 2


def test_fenced_again_and_again_exits_1() -> None:
    """Two processes given one transactional id fence each other at every rebuild: each
    fence counts as a rebuild, so it ends with exit code 1."""
    code, built, _ = supervise(*[FakeLoop(FatalClientError("fenced")) for _ in range(20)])
    assert code == 1
    assert len(built) == 11


def test_the_broker_away_is_waited_out_however_long() -> None:
    """Loops failing retriably (the broker away: each build times out) are rebuilt
    without limit, every 10 s at most; the worker goes on once the broker is back."""
    code, built, clock = supervise(
        *[FakeLoop(RetriableError("away")) for _ in range(30)], FakeLoop()
    )
    assert code == 0
    assert len(built) == 31
    assert clock.now_ms() - FakeClock().now_ms() == (1 + 2 + 5 + 10 * 27) * 1000


def test_too_many_rebuilds_exit_1() -> None:
    """More than ten rebuilds within ten minutes give up with exit code 1."""
    code, built, _ = supervise(*[FakeLoop(KafkaError("stuck")) for _ in range(20)])
    assert code == 1
    assert len(built) == 11


def test_stop_ends_the_current_loop_and_builds_no_other() -> None:
    """stop() reaches the running loop, and no loop is built after it. Its last commit
    failed here (the broker away): exit code 1, as nothing of its last batch committed."""
    clock = FakeClock()
    loops: list[FakeLoop] = []

    def build() -> Loop:
        loops.append(FakeLoop(KafkaError("stuck"), on_run=supervisor.stop))
        return loops[-1]

    supervisor = Supervisor(build, clock)
    assert supervisor.run() == 1
    assert len(loops) == 1
    assert loops[0].stopped


def test_a_stop_while_a_rebuild_fails_exits_0() -> None:
    """SIGTERM while a new loop is built (after a broker restart), and the build fails:
    nothing was open, so the process ends cleanly, exit code 0, and builds no other."""
    clock = FakeClock()
    builds = 0

    def build() -> Loop:
        nonlocal builds
        builds += 1
        if builds == 2:
            supervisor.stop()
            raise RetriableError("the broker is away")
        return FakeLoop(KafkaError("hung"))

    supervisor = Supervisor(build, clock)
    assert supervisor.run() == 0
    assert builds == 2


def test_probes_follow_the_current_loop() -> None:
    """Liveness needs a loop that came round, or a build begun, within a minute;
    readiness is the loop's."""
    clock = FakeClock()
    loop = FakeLoop()
    supervisor = Supervisor(lambda: loop, clock)
    assert supervisor.live()  # starting
    assert not supervisor.ready()
    supervisor.run()
    loop.last_progress = clock.monotonic()
    assert supervisor.live()
    assert supervisor.ready()
    clock.advance(61)
    assert not supervisor.live()


def test_rebuilds_while_the_broker_is_away_keep_the_worker_live() -> None:
    """Builds failing for as long as the broker is away (each waiting 10 s for the
    broker) keep liveness: a pod restarted for them would come back no sooner."""
    clock = FakeClock()
    lives: list[bool] = []
    supervisor: Supervisor

    def build() -> Loop:
        lives.append(supervisor.live())
        clock.advance(10)
        if len(lives) < 30:
            raise RetriableError("away")
        return FakeLoop()

    supervisor = Supervisor(build, clock)
    assert supervisor.run() == 0
    assert len(lives) == 30
    assert all(lives)


def test_a_sink_that_cannot_start_leaves_no_consumer_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """While the broker is away each build's ``init_transactions`` times out, every few
    seconds for as long as it is away: the consumer built before it is closed each time."""
    closed: list[bool] = []

    class Source:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    def no_sink(*_: Any, **__: Any) -> None:
        raise RetriableError("_TIMED_OUT: init_transactions")

    class _Limits:
        def batch_bytes(self) -> int:
            return 1_000_000

    monkeypatch.setattr(service, "KafkaSource", Source)
    monkeypatch.setattr(service, "KafkaSink", no_sink)
    with pytest.raises(RetriableError):
        service.build_runner(
            load_config(environ={}),
            Metrics(),
            FakeClock(),
            "0",
            cast(Limits, _Limits()),
            cast(GroupBound, None),
            tmp_path,
        )
    assert closed == [True]


def test_a_worker_waiting_for_its_brokers_serves_its_probes_and_stops_at_once(
    tmp_path: Path,
) -> None:
    """Started with no broker to answer, the worker serves /healthz 200 and /readyz 503
    while it waits, and SIGTERM ends it at once with exit code 0, a second signal on
    its heels too. Its configuration is logged before the brokers answer (when they do
    not, it is what an operator checks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUP_WORKER_")}
    env["GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # nothing listens there
    env["GROUP_WORKER_HTTP_PORT"] = str(port)
    env["GROUP_WORKER_WORKER_GROUP_ID"] = "staging"
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while (codes := _probes(port)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert codes == (200, 503)
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=5) == 0
        assert worker.stderr is not None
        events = [json.loads(line) for line in worker.stderr.read().splitlines()]
        # No broker ever answered; the deployment's names are there all the same.
        [loaded] = [e for e in events if e["event"] == "config_loaded"]
        assert loaded["group_id"] == "staging"
        assert loaded["topics"]["repartition"] == "staging.repartition"
        assert loaded["topics"]["enriched"] == "segment.group.enriched"
    finally:
        worker.kill()
        worker.wait()
        if worker.stderr is not None:
            worker.stderr.close()


def _probes(port: int) -> tuple[int, int] | None:
    """The /healthz and /readyz status codes, or None while nothing listens."""
    codes = []
    for path in ("/healthz", "/readyz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                codes.append(reply.status)
        except urllib.error.HTTPError as e:
            codes.append(e.code)
        except OSError:
            return None
    return codes[0], codes[1]


@pytest.mark.parametrize("host", ["256.1.1.1", "192.0.2.1"])
def test_an_http_host_that_cannot_be_listened_on_is_named(host: str) -> None:
    """A host that is no address, or not this machine's, is http.host's fault: the line
    named http.port, which was fine."""
    environ = {"GROUP_WORKER_HTTP_HOST": host, "GROUP_WORKER_HTTP_PORT": "0"}
    config = load_config(None, environ)
    with pytest.raises(ConfigError, match=rf"^config: http\.host: cannot listen on {host}:0: "):
        service._serve(config, Metrics(), Probes(lambda: True, lambda: True))


@pytest.mark.parametrize("host", ["\u00e9..x", "a\x00b"])
def test_an_http_host_that_is_no_host_name_is_named(host: str) -> None:
    """A host the resolver cannot even take (an empty label, a NUL) is one line naming
    http.host, not a traceback."""
    config = load_config(None, {"GROUP_WORKER_HTTP_HOST": host, "GROUP_WORKER_HTTP_PORT": "0"})
    with pytest.raises(ConfigError, match=r"^config: http\.host .* is not a host name"):
        service._serve(config, Metrics(), Probes(lambda: True, lambda: True))


# The main thread logs until its loop is stopped; its stderr is a pipe nobody reads yet, so
# it soon blocks in a write, inside the log line's lock, and the signal comes there.
_LOGGING_WHEN_SIGNALLED = """
import sys
from worker.logs import configure_logging, get_logger
from worker.service import Shutdown

class Loop:
    stopped = False
    def stop(self):
        Loop.stopped = True

configure_logging()
shutdown = Shutdown(budget=60)
shutdown.install()
shutdown.supervisor = Loop()
log = get_logger()
print("logging", flush=True)
while not Loop.stopped:
    log.info("filler", text="x" * 1000)
shutdown.finished()
log.info("loop_stopped")
"""


def test_a_signal_while_the_main_thread_writes_a_log_line_stops_the_loop() -> None:
    """SIGTERM while the main thread is inside a log line's write (a pipe the log
    collector is slow to read): the loop is stopped and the process ends once its
    lines are read; the signal is logged. The handler logged before, and waited for
    ever on the lock its own thread held."""
    worker = subprocess.Popen(
        [sys.executable, "-c", _LOGGING_WHEN_SIGNALLED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"logging\n"
        time.sleep(0.5)  # a 64 KiB pipe takes about 60 lines: the writer is blocked
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        _, err = worker.communicate(timeout=10)
        events = [json.loads(line)["event"] for line in err.splitlines()]
        assert worker.returncode == 0
        assert events.count("shutdown_requested") == 1
        assert events[-1] == "loop_stopped"
    finally:
        worker.kill()
        worker.wait()
