"""The group-worker benchmark: ``make bench`` runs ``python -m bench`` (``bench/__main__.py``).

Results: ``bench/results/``; what they mean: README.md, "Performance", and ``docs/performance.md``.
"""
