"""The worker as a service: wiring it from configuration, and keeping it running.

``run_service`` serves the HTTP endpoints, builds a ``Runner`` over real Kafka clients
and runs it until SIGTERM or Ctrl-C, under a ``Supervisor``. When the Kafka clients end
up in a state they cannot leave (a transaction that cannot be aborted, a call that
hangs after a broker restart), it closes them and builds fresh ones, as an orchestrator
would restart the process, but faster; uncommitted work is replayed from the committed
offsets, so nothing is lost or duplicated. So does a client's own fatal error
(``FatalClientError``: a producer fenced when its transaction outlived its timeout while
the process was paused). Another ``FatalError`` (a refused login, an ACL) or too many
rebuilds end the process with exit code 1 instead.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaException

from worker.clock import Clock, SystemClock
from worker.config import Config, redact
from worker.errors import ConfigError, FatalClientError, FatalError, KafkaError, RetriableError
from worker.kafka import client_config, producer_max_bytes, release_frames, translate
from worker.limits import GroupBound, Limits, group_bound
from worker.metrics import Metrics
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.restore import KafkaRestorer
from worker.runner import Runner, RunnerSettings
from worker.server import Probes, serve
from worker.sink import KafkaSink
from worker.source import KafkaSource
from worker.store import RocksDBStateStore
from worker.store.directory import claim
from worker.topics import Layout, await_topics, read_limits

__all__ = [
    "Loop",
    "Supervisor",
    "build_runner",
    "record_limits",
    "run_service",
    "runner_settings",
    "tune_allocator",
    "tune_collector",
]

log = structlog.get_logger("worker.service")
# Liveness fails when the loop has not come round for this long.
_LIVENESS = 60.0
# After SIGTERM the worker has its shutdown budget plus this to finish; then it exits
# anyway, before the orchestrator's SIGKILL (make deploy-check keeps the grace period at
# least 10 s above the budget).
_SHUTDOWN_MARGIN = 5.0
# At most this many rebuilds within the window, then exit and let the orchestrator act.
_MAX_REBUILDS = 10
_REBUILD_WINDOW = 600.0
_REBUILD_BACKOFF = (1.0, 2.0, 5.0, 10.0)
# A loop that failed after running this long starts the backoff afresh.
_STEADY = 30.0
# glibc's mallopt parameter for the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3


class Loop(Protocol):
    """What the supervisor needs of a ``Runner``."""

    last_progress: float

    @property
    def ready(self) -> bool: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...


class Supervisor:
    """Runs loops made by ``build`` one after another until one ends cleanly.

    A loop that fails with a ``KafkaError`` other than ``FatalError``, or with
    ``FatalClientError``, is replaced by a fresh one after a backoff; another ``FatalError``,
    or too many rebuilds for errors other than retriable ones (the broker away), end
    with exit code 1. A producer fenced by another process with its transactional.id
    (two processes given one ``worker.instance_id``) fences it back when rebuilt: the
    two rebuild in turn until one has rebuilt too often.
    """

    def __init__(
        self, build: Callable[[], Loop], clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self._build = build
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()
        self._current: Loop | None = None
        self._stopping = False
        self._building = clock.monotonic()  # when the latest build began (or this start)

    def live(self) -> bool:
        """The current loop came round, or a new one began to be built, within the
        liveness window: rebuilds while the broker is away are not a hung process (a
        pod restarted for them comes back no sooner, after its restart backoff)."""
        loop = self._current
        latest = max(self._building, loop.last_progress if loop is not None else 0.0)
        return self._clock.monotonic() - latest < _LIVENESS

    def ready(self) -> bool:
        """The current loop is ready (joined and restored)."""
        return self._current is not None and self._current.ready

    def stop(self) -> None:
        """Ask the current loop to finish and build no other; safe from a signal handler."""
        self._stopping = True
        if self._current is not None:
            self._current.stop()

    def run(self) -> int:
        """Run loops until one returns or a stop; returns the exit code. Blocks."""
        rebuilds: list[float] = []  # of loops that failed otherwise than retriably
        failures = 0  # in a row, for the backoff
        while not self._stopping:
            self._building = self._clock.monotonic()
            self._current = None
            try:
                self._current = self._build()
                if self._stopping:  # a signal while building
                    self._current.stop()
                self._current.run()
                return 0
            except (KafkaError, KafkaException) as e:
                release_frames(e)  # the failed loop's clients go before new ones start
                # A client call that was not translated where it was made: its error may
                # be fatal all the same (a fenced producer's next call).
                if isinstance(e, KafkaException):
                    e = translate(e.args[0])
                if isinstance(e, FatalError) and not isinstance(e, FatalClientError):
                    log.error("fatal_kafka_error", error=str(e))
                    return 1
                if self._stopping and self._current is None:  # the build failed: nothing open
                    log.info("stopped_while_building", error=str(e))
                    return 0
                if self._stopping:  # its last commit failed: the next start reads it again
                    log.error("stopped_uncommitted", error=str(e))
                    return 1
                now = self._clock.monotonic()
                # After a broker restart each loop can fail once, minutes apart: that
                # waits 1 s, not the 10 s of failures in a row (the broker still away).
                failures = 1 if now - self._building >= _STEADY else failures + 1
                # The broker away (a retriable error) is waited out however long it lasts:
                # a restart would find it away too, and come back later than a rebuild.
                retriable = isinstance(e, RetriableError)
                if not retriable:
                    rebuilds = [t for t in rebuilds if now - t < _REBUILD_WINDOW] + [now]
                if len(rebuilds) > _MAX_REBUILDS:
                    log.error("too_many_rebuilds", error=str(e), window_seconds=_REBUILD_WINDOW)
                    return 1
                backoff = _REBUILD_BACKOFF[min(failures, len(_REBUILD_BACKOFF)) - 1]
                log.warning("worker_rebuilding", error=str(e), backoff=backoff)
                self._metrics.loop_rebuilds.labels("retriable" if retriable else "other").inc()
                self._clock.sleep(backoff)
        return 0


def run_service(config: Config) -> int:
    """Serve the HTTP endpoints and run the worker until a signal; returns the exit code.

    Blocks. Steps: (1) serve ``/metrics`` and the probes, and take SIGTERM and SIGINT;
    (2) wait for the brokers and the topics (``topics.await_topics``), live but not
    ready meanwhile, and a signal then ends the process at once with 0 (there is nothing
    to finish); (3) claim the state directory and run the loop under a ``Supervisor``.
    Raises ``ConfigError`` when the HTTP port cannot be had, or one group's state cannot
    fit the output topics' record limits, and what ``await_topics`` raises.
    """
    tune_allocator()
    tune_collector()
    metrics, clock = Metrics(), SystemClock()
    supervisor: Supervisor | None = None
    probes = Probes(
        live=lambda: supervisor is None or supervisor.live(),
        ready=lambda: supervisor is not None and supervisor.ready(),
    )
    server = _serve(config, metrics, probes)  # (1)
    # Before the brokers answer: when they do not, this is what an operator checks.
    log.info(
        "config_loaded",
        bootstrap_servers=config.kafka.bootstrap_servers,
        kafka=redact(config.kafka.properties),
        group_id=config.worker.group_id,  # an environment variable wins over the file's
        topics=asdict(config.topics),
        guarantee=config.worker.processing_guarantee,
        keyed=config.worker.input_keyed_by_group_id,
    )
    shutdown = Shutdown(config.worker.shutdown_timeout_seconds + _SHUTDOWN_MARGIN)
    shutdown.install()
    try:
        layout = await_topics(config)  # (2)
        limits, bound = _limits(config, layout)
        partitions = layout.partitions[config.topics.input]
        # One transactional.id for the process: a rebuilt producer fences the one it
        # replaces.
        instance = config.worker.instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        state = claim(Path(config.worker.state_dir), config.worker.group_id)  # (3)
        log.info("state_dir_claimed", path=str(state.path))
        try:
            supervisor = shutdown.supervisor = Supervisor(
                lambda: build_runner(
                    config, metrics, clock, instance, limits, bound, state.path, partitions
                ),
                clock,
                metrics,
            )
            return supervisor.run()
        finally:
            state.release()
    except _Stopped:
        log.info("worker_stopped")
        return 0
    finally:
        shutdown.finished()
        server.shutdown()


class _Stopped(Exception):
    """A signal before the loop was built: the process ends with nothing to finish."""


def _serve(config: Config, metrics: Metrics, probes: Probes) -> ThreadingHTTPServer:
    http = config.http
    try:
        server = serve(http.host, http.port, metrics.registry, probes)
    except OSError as e:  # the port is taken, or the host is not this machine's
        taken = e.errno in (errno.EADDRINUSE, errno.EACCES)
        raise ConfigError(
            f"config: {'http.port' if taken else 'http.host'}: cannot listen on "
            f"{http.host}:{http.port}: {e.strerror or e}"
        ) from None
    except (TypeError, UnicodeError) as e:  # no host name at all: a NUL, an empty label
        raise ConfigError(f"config: http.host {http.host!r} is not a host name: {e}") from None
    log.info("http_listening", host=http.host, port=server.server_address[1])
    return server


def _limits(config: Config, layout: Layout) -> tuple[Limits, GroupBound]:
    """The output topics' record limits and one group's bound, logged."""
    limits = record_limits(config, layout)
    routes = runner_settings(config).routes
    w = config.worker
    bound = group_bound(limits, routes.enriched, routes.state, w.max_event_bytes, w.max_group_bytes)
    log.info("group_bound", max_group_bytes=bound.new_keys, max_group_growth_bytes=bound.any_growth)
    return limits, bound


class Shutdown:
    """What SIGTERM and SIGINT do to ``run_service``: stop its ``supervisor``, or end the
    wait for the brokers while there is none (``_Stopped``); and end the process with 1
    when it has not finished ``budget`` seconds after the first signal.

    Python runs the handler in the main thread between two of its bytecodes, maybe while
    that thread holds a lock: a log line's, half written to a full pipe. So the handler
    takes no lock and writes nothing (a log line there waited for ever on the lock its
    own thread held). A thread of its own learns of the signal from Python's wakeup file
    descriptor, written when the signal comes even while the main thread is inside a
    client call; it logs the signal and keeps the deadline. A final commit stuck on an
    unreachable broker would otherwise run into the orchestrator's SIGKILL. Nothing
    committed is lost at the deadline: the open transaction is aborted by the broker or
    fenced by the next start, and its records are read again.
    """

    def __init__(self, budget: float) -> None:
        self.supervisor: Supervisor | None = None
        self._budget = budget
        self._waiting = True  # for the brokers: a signal ends the wait, once
        self._signalled = False
        self._logged = threading.Event()  # the signal's line is written
        self._finished = threading.Event()

    def install(self) -> None:
        """Take SIGTERM and SIGINT, from the main thread."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), name="signals", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def finished(self) -> None:
        """The process ends on its own: no deadline any more, and a signal changes nothing.
        The signal's log line, if one came, is written first (up to a second)."""
        self._waiting = False
        self._finished.set()
        if self._signalled:
            self._logged.wait(1.0)

    def _on_signal(self, *_: Any) -> None:
        self._signalled = True
        if self.supervisor is not None:
            self.supervisor.stop()  # sets flags, nothing more
        elif self._waiting:
            self._waiting = False
            raise _Stopped

    def _watch(self, read: int) -> None:
        signum = os.read(read, 1)[0]  # the first signal; later ones keep its deadline
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        self._logged.set()
        if not self._finished.wait(self._budget):
            log.error("shutdown_timed_out", seconds=self._budget)
            sys.stderr.flush()
            os._exit(1)


def tune_allocator() -> None:
    """Serve allocations of 4 MiB and more from their own mappings, given back when freed.

    glibc raises this threshold as such blocks are freed (up to 32 MiB), so that the
    restorer's 12 MiB fetches come to live in per-thread arenas it keeps: peak RSS of a
    rebuild of 1,000,000 groups 364-373 MB before, 339-346 MB after, its rate unchanged
    (``python -m bench.restart --groups 1000000``, README). A no-op without glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 4 << 20)


def tune_collector() -> None:
    """Set the cyclic garbage collector for a long-lived worker (``bench.hotpath`` too).

    Each call allocates many short-lived dicts: collect the young generation less often
    (bench: about +7% drained calls/s; with the freeze after restores, +31%).
    """
    gc.set_threshold(50_000, 20, 20)


def build_runner(
    config: Config,
    metrics: Metrics,
    clock: Clock,
    instance: str,
    limits: Limits,
    bound: GroupBound,
    state_dir: Path,
    partitions: int = 0,
) -> Runner:
    """A runner over new Kafka clients and a store in ``state_dir``. Raises ``KafkaError``.

    ``instance`` names the process in its producer's ``transactional.id``; ``limits``
    and ``bound`` are what the output topics accept (``record_limits``, ``group_bound``);
    ``state_dir`` is this process's own (``store.directory.claim``); ``partitions`` the
    input's partition count at start (``RunnerSettings.partitions``).
    """
    kafka, w = config.kafka, config.worker
    source = KafkaSource(
        kafka.bootstrap_servers,
        w.group_id,
        kafka.properties,
        group_instance_id=w.group_instance_id,
        on_error=lambda e: log.warning("consumer_error", error=str(e)),
    )
    try:
        sink = KafkaSink(
            kafka.bootstrap_servers,
            kafka.properties,
            w.processing_guarantee,
            f"{w.group_id}-{instance}",
            clock,
            commit_timeout=w.shutdown_timeout_seconds,
            on_delivery_error=metrics.produce_errors.inc,
            batch_bytes=limits.batch_bytes(),
        )
    except BaseException:
        # The broker away (its init_transactions timed out): the supervisor builds
        # again, every few seconds while it is away, so no consumer may be left behind.
        source.close()
        raise
    store = RocksDBStateStore(state_dir, w.state_cache_mb << 20, deployment=w.group_id)
    settings = replace(runner_settings(config), partitions=partitions)
    processor = Processor(
        settings.routes,
        Settings.from_config(w),
        store,
        sink,
        clock,
        dedupe_window_ms=w.dedupe_window_seconds * 1000,
        limits=limits,
        bound=bound,
        on_unwritable=lambda route: metrics.unwritable_outputs.labels(route).inc(),
        read_limits=lambda: read_limits(config),
        deployment=w.group_id,
        partitions=partitions if w.input_keyed_by_group_id else 0,
    )
    restorer = KafkaRestorer(kafka.bootstrap_servers, w.group_id, kafka.properties)
    return Runner(settings, source, sink, processor, store, restorer, metrics, clock)


def record_limits(config: Config, layout: Layout) -> Limits:
    """What each output topic accepts: its ``max.message.bytes``, within the producer's
    own ``message.max.bytes`` (a ``kafka`` property; librdkafka's default otherwise)."""
    producer = client_config(config.kafka.bootstrap_servers, config.kafka.properties, "producer")
    return Limits(layout.max_message_bytes, producer_max_bytes(producer))


def runner_settings(config: Config) -> RunnerSettings:
    """The runner's share of ``config``."""
    t, w = config.topics, config.worker
    routes = Routes(
        input=t.input,
        enriched=t.enriched,
        dlq=t.dlq,
        state=t.state,
        members=t.members,
        repartition=None if w.input_keyed_by_group_id else t.repartition,
        dedupe=t.dedupe,
    )
    return RunnerSettings(
        routes,
        w.batch_size,
        w.commit_interval_ms / 1000,
        w.commit_max_records,
        w.commit_max_bytes,
        commit_min_interval=w.commit_min_interval_ms / 1000,
    )
