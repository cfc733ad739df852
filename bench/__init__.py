"""The group-worker benchmark: ``make bench`` runs ``python -m bench`` (``bench/__main__.py``).

Results and what they mean: ``bench/results/`` and ``bench/README-section.md``.
"""
