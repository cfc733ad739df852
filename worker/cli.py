"""The ``group-worker`` command: run the worker, manage topics, and look at data.

Exit codes: 0 success, 1 runtime failure (a fatal Kafka error), 2 bad usage or
configuration (one line on standard error naming the problem).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from worker import __version__, tools
from worker.clock import SystemClock
from worker.config import Config, load_config, redact
from worker.errors import ConfigError, FatalError, TopicError, WorkerError
from worker.logs import configure_logging
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

__all__ = ["main"]

# Liveness fails when the loop has not come round for this long.
_LIVENESS_SECONDS = 60.0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config) if args.config else load_config(_default_config())
        result: int = args.command(config, args)
        return result
    except (ConfigError, TopicError) as e:
        print(f"group-worker: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"group-worker: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `group-worker tail ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="group-worker", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration (default: config/worker.toml if present)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the worker until SIGTERM or Ctrl-C")
    run.set_defaults(command=_run)

    topics = commands.add_parser("topics", help="manage the worker's topics")
    topic_commands = topics.add_subparsers(required=True, metavar="ACTION")
    create = topic_commands.add_parser("create", help="create missing topics, check the rest")
    create.set_defaults(command=_topics_create)

    tools.add_commands(commands)
    return parser


def _default_config() -> Path | None:
    path = Path("config/worker.toml")
    return path if path.is_file() else None


def _topics_create(config: Config, _: argparse.Namespace) -> int:
    for name, partitions in ensure_topics(config).items():
        print(f"{name}: {partitions} partitions")
    return 0


def _run(config: Config, _: argparse.Namespace) -> int:
    configure_logging(config.log.level)
    log = structlog.get_logger("worker.cli")
    log.info(
        "config_loaded",
        kafka=redact(config.kafka.properties),
        bootstrap_servers=config.kafka.bootstrap_servers,
        input=config.topics.input,
        guarantee=config.worker.processing_guarantee,
    )
    ensure_topics(config)
    metrics = Metrics()
    clock = SystemClock()
    kafka, w = config.kafka, config.worker
    instance = w.instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
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
    settings = _runner_settings(config)
    processor = Processor(
        settings.routes,
        Settings.from_config(w),
        store,
        sink,
        clock,
        dedupe_window_ms=w.dedupe_window_seconds * 1000,
    )
    restorer = KafkaRestorer(kafka.bootstrap_servers, w.group_id, kafka.properties)
    runner = Runner(settings, source, sink, processor, store, restorer, metrics, clock)
    probes = Probes(
        live=lambda: clock.monotonic() - runner.last_progress < _LIVENESS_SECONDS,
        ready=lambda: runner.ready,
    )
    server = serve(config.http.host, config.http.port, metrics.registry, probes)
    log.info("http_listening", host=config.http.host, port=server.server_address[1])

    def on_signal(signum: int, _: Any) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run()
    except FatalError as e:
        log.error("fatal_kafka_error", error=str(e))
        return 1
    finally:
        server.shutdown()
    return 0


def _runner_settings(config: Config) -> RunnerSettings:
    t, w = config.topics, config.worker
    routes = Routes(
        input=t.input,
        enriched=t.enriched,
        dlq=t.dlq,
        state=t.state,
        members=t.members,
        repartition=None if w.input_keyed_by_group_id else t.repartition,
    )
    return RunnerSettings(routes, w.batch_size, w.commit_interval_ms / 1000)
