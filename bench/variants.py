"""The worker with a proposed change applied, to measure it before anyone makes it.

``python -m bench.variants [--gc-freeze] [--poll-timeout S] -- WORKER ARGS`` runs
``worker.cli.main(WORKER ARGS)`` after patching, in this process only:

- ``--gc-freeze``: raise the cyclic garbage collector's first threshold to 50,000 and
  move everything alive after restore into the permanent generation (``gc.freeze()``
  when the runner's first batch arrives), so collections stop rescanning the state store;
- ``--poll-timeout S``: the runner's consume timeout (``RunnerSettings.poll_timeout``,
  0.1 s by default). ``consume()`` waits for a full batch or the timeout, so at
  low rates every stage waits this long per loop.

Nothing here changes the worker's code; docs/performance.md (Changes outside the hot path)
cites these runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Sequence
from typing import Any

import worker.cli
from worker.processor import Processor, Tally
from worker.runner import Runner, RunnerSettings

__all__ = ["main"]


def _freeze_after_first_batch() -> None:
    original = Processor.process_some
    frozen = False

    def process_some(self: Processor, records: Any, tally: Tally, *args: Any) -> Any:
        nonlocal frozen
        if not frozen:
            gc.collect()
            gc.freeze()
            frozen = True
        return original(self, records, tally, *args)

    Processor.process_some = process_some  # type: ignore[method-assign,assignment]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(prog="python -m bench.variants")
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--poll-timeout", type=float)
    options = parser.parse_args(args[:split])
    if options.gc_freeze:
        gc.set_threshold(50_000, 20, 20)
        _freeze_after_first_batch()
    if options.poll_timeout is not None:
        timeout = options.poll_timeout
        original = Runner.__init__

        def init(self: Runner, settings: RunnerSettings, *args: Any, **kwargs: Any) -> None:
            original(self, dataclasses.replace(settings, poll_timeout=timeout), *args, **kwargs)

        Runner.__init__ = init  # type: ignore[method-assign]
    return worker.cli.main(args[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
