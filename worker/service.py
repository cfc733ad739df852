"""The worker as a service: wiring it from configuration, and keeping it running.

``run_service`` serves the HTTP endpoints, builds a ``Runner`` over real Kafka clients
and runs it until SIGTERM or Ctrl-C. When the Kafka clients end up in a state they
cannot leave (a transaction that cannot be aborted, a broker gone for long), it closes
them and builds fresh ones, as an orchestrator would restart the process, but faster;
uncommitted work is replayed from the committed offsets, so nothing is lost or
duplicated. A fenced producer (``FatalError``) or too many rebuilds end the process
with exit code 1 instead.
"""

from __future__ import annotations

import signal
import socket
import uuid
from typing import Any

import structlog
from confluent_kafka import KafkaException

from worker.clock import Clock, SystemClock
from worker.config import Config, redact
from worker.errors import FatalError, KafkaError
from worker.metrics import Metrics
from worker.pipeline import Settings
from worker.processor import Processor, Routes
from worker.restore import KafkaRestorer
from worker.runner import Runner, RunnerSettings
from worker.server import Probes, serve
from worker.sink import KafkaSink
from worker.source import KafkaSource
from worker.store import InMemoryStateStore
from worker.topics import ensure_topics

__all__ = ["build_runner", "run_service"]

log = structlog.get_logger("worker.service")
# Liveness fails when the loop has not come round for this long.
_LIVENESS_SECONDS = 60.0
# At most this many rebuilds within the window, then exit and let the orchestrator act.
_MAX_REBUILDS = 10
_REBUILD_WINDOW = 600.0
_REBUILD_BACKOFF = (1.0, 2.0, 5.0, 10.0)


def run_service(config: Config) -> int:
    """Run the worker until a signal; returns the exit code. Blocks.

    Raises ``TopicError`` when the topic layout is wrong.
    """
    log.info(
        "config_loaded",
        bootstrap_servers=config.kafka.bootstrap_servers,
        kafka=redact(config.kafka.properties),
        input=config.topics.input,
        guarantee=config.worker.processing_guarantee,
    )
    ensure_topics(config)
    metrics, clock = Metrics(), SystemClock()
    current: list[Runner] = []
    stopping = False

    def live() -> bool:
        return bool(current) and clock.monotonic() - current[-1].last_progress < _LIVENESS_SECONDS

    server = serve(
        config.http.host,
        config.http.port,
        metrics.registry,
        Probes(live=live, ready=lambda: bool(current) and current[-1].ready),
    )
    log.info("http_listening", host=config.http.host, port=server.server_address[1])

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stopping
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stopping = True
        if current:
            current[-1].stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # One transactional.id for the process: a rebuilt producer fences the one it replaces.
    instance = config.worker.instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    rebuilds: list[float] = []
    try:
        while not stopping:
            try:
                current[:] = [build_runner(config, metrics, clock, instance)]
                if stopping:  # a signal while building
                    current[0].stop()
                current[0].run()
                return 0
            except FatalError as e:
                log.error("fatal_kafka_error", error=str(e))
                return 1
            except (KafkaError, KafkaException) as e:
                now = clock.monotonic()
                rebuilds = [t for t in rebuilds if now - t < _REBUILD_WINDOW] + [now]
                if len(rebuilds) > _MAX_REBUILDS:
                    log.error("too_many_rebuilds", error=str(e), window_seconds=_REBUILD_WINDOW)
                    return 1
                backoff = _REBUILD_BACKOFF[min(len(rebuilds), len(_REBUILD_BACKOFF)) - 1]
                log.warning("worker_rebuilding", error=str(e), backoff=backoff)
                clock.sleep(backoff)
        return 0
    finally:
        server.shutdown()


def build_runner(config: Config, metrics: Metrics, clock: Clock, instance: str) -> Runner:
    """A runner over new Kafka clients and an empty store. Raises ``KafkaError``.

    ``instance`` names the process in its producer's ``transactional.id``.
    """
    kafka, w = config.kafka, config.worker
    source = KafkaSource(
        kafka.bootstrap_servers,
        w.group_id,
        kafka.properties,
        group_instance_id=w.group_instance_id,
        on_error=lambda e: log.warning("consumer_error", error=str(e)),
    )
    sink = KafkaSink(
        kafka.bootstrap_servers,
        kafka.properties,
        w.processing_guarantee,
        f"{w.group_id}-{instance}",
        clock,
        on_delivery_error=metrics.produce_errors.inc,
    )
    store = InMemoryStateStore()
    settings = runner_settings(config)
    processor = Processor(
        settings.routes,
        Settings.from_config(w),
        store,
        sink,
        clock,
        dedupe_window_ms=w.dedupe_window_seconds * 1000,
    )
    restorer = KafkaRestorer(kafka.bootstrap_servers, w.group_id, kafka.properties)
    return Runner(settings, source, sink, processor, store, restorer, metrics, clock)


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
    )
    return RunnerSettings(routes, w.batch_size, w.commit_interval_ms / 1000, w.commit_max_records)
