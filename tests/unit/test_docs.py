"""The repository stands alone: what users read points only inside it, and exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Ways text has pointed at the team's folder outside the repository.
_OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|shared folder|segment-group-spec")


def _user_facing() -> list[Path]:
    tracked = subprocess.run(
        ["git", "ls-files", "README.md", "docs", "worker", "config", "deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in tracked if (ROOT / name).is_file()]


def test_nothing_users_read_points_outside_the_repository() -> None:
    """README, docs, code and configuration never refer to files outside the repository."""
    files = _user_facing()
    assert any(f.name == "design.md" for f in files)
    found = [
        f"{f.relative_to(ROOT)}: {m.group(0)}"
        for f in files
        for m in _OUTSIDE.finditer(f.read_text(errors="replace"))
    ]
    assert found == []


def test_files_the_readme_names_exist() -> None:
    """Every repository path in README.md's links and code spans is a real file or folder."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\]\(((?:docs|deploy|config|worker|bench|tests)/[^)#\s]+)\)", text))
    named |= set(re.findall(r"`((?:docs|deploy|config)/[\w./-]+\.\w+)`", text))
    assert named, "the README names no repository files"
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
