"""bench.compare on stand-in checkouts whose bench.hotpath prints a fixed rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compare import main


def checkout(root: Path, rate: str, code: int = 0) -> Path:
    """A directory whose ``python -m bench.hotpath`` prints ``rate`` and exits ``code``."""
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "__init__.py").write_text("")
    printed = f"hot path, 1 stage(s): 100 calls in 1.00 s CPU (1.00 s wall): {rate} calls/s"
    (root / "bench" / "hotpath.py").write_text(f"print({printed!r})\nraise SystemExit({code})\n")
    return root


def test_prints_each_sides_median_and_the_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each checkout runs once per pair; the ratio is after's median over before's."""
    before = checkout(tmp_path / "before", "10,000")
    after = checkout(tmp_path / "after", "12,500")
    main([str(before), str(after), "--pairs", "2"])
    out = capsys.readouterr().out
    assert "before: median 10,000 calls/s (10,000, 10,000)" in out
    assert "after / before: 1.25x" in out


def test_a_failing_run_is_an_error(tmp_path: Path) -> None:
    """A checkout whose hot path fails stops the comparison, naming the checkout."""
    before = checkout(tmp_path / "before", "10,000", code=1)
    after = checkout(tmp_path / "after", "12,500")
    with pytest.raises(RuntimeError, match="before"):
        main([str(before), str(after), "--pairs", "1"])
