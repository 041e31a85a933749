"""Lint and type-check, with the configuration in pyproject.toml: `ruff check` on the repository (docstrings on
every public function and class of the package) and `mypy` on the package. Skipped only where the tool is not
installed (`pip install -e ".[test]"` installs both)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_passes():
    p = _run("ruff", "check", "--no-cache", ".")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_mypy_passes_on_the_package():
    p = _run("mypy", "mergekit_lite")  # incremental cache in .mypy_cache: seconds after the first run
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
