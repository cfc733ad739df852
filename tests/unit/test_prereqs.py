"""Tests for deploy/prereqs.sh: the check make runs before run, test, deploy-check and bench."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "prereqs.sh"
BASH = shutil.which("bash") or "/bin/bash"
# What the script itself runs (besides the tools it checks for), kept on the stripped PATH.
UTILITIES = (
    "cat",
    "cut",
    "dirname",
    "sed",
    "sha256sum",
    "flock",
    "setsid",
    "mvn",
    "apt-get",
    "sudo",
    "go",
)


def run_prereqs(*targets: str, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script on ``targets`` with ``PATH=path`` and no JAVA_HOME."""
    environ = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "PYTHON", "VENV")}
    environ.update(PATH=path, **env)
    return subprocess.run(
        [BASH, str(SCRIPT), *targets],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def path_without_java(tmp_path: Path) -> str:
    """A PATH of one directory with symlinks to every tool the script needs but java."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The interpreter itself, not a version manager's shim (which needs its own PATH).
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    for tool in UTILITIES:
        found = shutil.which(tool)
        if found is not None:
            (bin_dir / tool).symlink_to(found)
    assert shutil.which("java", path=str(bin_dir)) is None
    return str(bin_dir)


def test_missing_java_is_named_on_one_line(path_without_java: str) -> None:
    """Without java on PATH, `run` fails with exit 2 and one stderr line naming java."""
    result = run_prereqs("run", path=path_without_java)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prereqs: java 17+ not found")
    assert "install OpenJDK 17" in lines[0]


def test_missing_java_fails_every_target_that_starts_a_broker(path_without_java: str) -> None:
    """`test` and `bench` start a broker too, so they fail the same way without java."""
    for target in ("test", "bench"):
        result = run_prereqs(target, path=path_without_java)
        assert result.returncode == 2, target
        assert result.stderr.startswith("prereqs: java 17+ not found"), result.stderr


def test_unknown_target_is_refused() -> None:
    """An unknown target is one line naming it, exit 2."""
    result = run_prereqs("deploy", path=os.environ["PATH"])
    assert result.returncode == 2
    assert result.stderr == "prereqs: unknown target 'deploy' (run, test, deploy-check, bench)\n"


@pytest.mark.skipif(
    shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
    reason="no java on this machine: `make run` cannot run here either",
)
def test_run_passes_silently_on_this_machine() -> None:
    """With the real PATH, the prerequisites of `run` are met and nothing is printed."""
    result = subprocess.run(
        [BASH, str(SCRIPT), "run"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
