"""The package metadata in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_license_is_an_spdx_string_built_by_a_setuptools_that_reads_it() -> None:
    """`project.license` is an SPDX expression string and the build needs setuptools>=77."""
    document = tomllib.loads(PYPROJECT.read_text())
    assert document["project"]["license"] == "Apache-2.0"
    requires = document["build-system"]["requires"]
    setuptools = [r for r in requires if re.match(r"setuptools\b", r)]
    assert len(setuptools) == 1
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0].replace(" ", ""))
    assert minimum is not None, setuptools
    assert int(minimum.group(1)) >= 77
