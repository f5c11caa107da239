"""Project tooling, run with the suite so that CI and a contributor run it the same way: the import
layers (import-linter's contract in pyproject.toml), lint and format (ruff, configured there too)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SOURCES = ["attnkit", "tests", "scripts"]


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(
            f"{tool} is not installed next to {sys.executable}; install the test extra: pip install -e '.[test]'"
        )
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_import_downward_only():
    done = run("lint-imports", "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_ruff_lint():
    done = run("ruff", "check", *SOURCES)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format():
    done = run("ruff", "format", "--check", *SOURCES)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
