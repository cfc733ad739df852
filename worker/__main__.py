"""``python -m worker``: the same as the ``group-worker`` console script."""

from worker.cli import main

__all__: list[str] = []

raise SystemExit(main())
