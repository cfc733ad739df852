"""The ``group-worker`` command: run the worker, manage topics, and look at data.

Exit codes: 0 success, 1 runtime failure (a fatal Kafka error), 2 bad usage or
configuration (one line on standard error naming the problem).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import KafkaException

from worker import __version__, tools
from worker.config import Config, load_config
from worker.errors import ConfigError, RetriableError, TopicError, WorkerError
from worker.kafka import check_properties, release_frames, translate
from worker.logs import configure_logging
from worker.service import run_service
from worker.topics import ensure_topics

__all__ = ["main"]

# Errors of a write that no retry mends: one line, not a traceback.
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config == "":  # an unset variable ($CFG): not the default file, unseen
        parser.error("--config: an empty file name")
    try:
        config = load_config(args.config) if args.config else load_config(_default_config())
        configure_logging(config.log.level)  # before any Kafka client: its lines are JSON too
        if args.uses_kafka:
            check_properties(config.kafka.bootstrap_servers, config.kafka.properties)
        try:
            result: int = args.command(config, args)
        except BaseException as e:
            release_frames(e)  # the command's clients go before the process ends
            raise
        return result
    except (ConfigError, TopicError) as e:
        print(f"group-worker: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"group-worker: {e}", file=sys.stderr)
        return 1
    except KafkaException as e:  # a client call of a data command (tail, state) failed
        error = translate(e.args[0])
        where = ""
        if isinstance(error, RetriableError):  # a wrong address, most likely: name it
            where = f" (kafka.bootstrap_servers = {config.kafka.bootstrap_servers})"
        print(f"group-worker: {error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `group-worker tail ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        # The output cannot be written (a full disk, /dev/full), nor flushed at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"group-worker: {e.strerror}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="group-worker", description=summary)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration (default: config/worker.toml if present)",
    )
    parser.set_defaults(uses_kafka=True)
    # After the command too (`group-worker run --config FILE`), where it wins.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML configuration (default: config/worker.toml if present)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the worker until SIGTERM or Ctrl-C", parents=[config]
    )
    run.set_defaults(command=_run)

    topics = commands.add_parser("topics", help="manage the worker's topics")
    topic_commands = topics.add_subparsers(required=True, metavar="ACTION")
    create = topic_commands.add_parser(
        "create", help="create missing topics, check the rest", parents=[config]
    )
    create.set_defaults(command=_topics_create)

    tools.add_commands(commands, config)
    return parser


def _default_config() -> Path | None:
    path = Path("config/worker.toml")
    return path if path.is_file() else None


def _topics_create(config: Config, _: argparse.Namespace) -> int:
    layout = ensure_topics(config)
    for name, partitions in layout.partitions.items():
        limit = layout.max_message_bytes.get(name)
        print(
            f"{name}: {partitions} partitions" + (f", max.message.bytes={limit}" if limit else "")
        )
    return 0


def _run(config: Config, _: argparse.Namespace) -> int:
    return run_service(config)
