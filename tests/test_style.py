"""The code has one style: ruff's formatter and linter, configured in pyproject.toml, pass on the whole tree."""

from __future__ import annotations

import subprocess
import sys

from fclib.runs import PROJECT_ROOT


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = _ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_ruff_format_is_clean():
    result = _ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, "run `.venv/bin/ruff format .`:\n" + result.stdout[-3000:] + result.stderr[-1000:]


def test_fmt_skip_markers_are_few():
    """A handful of tables may keep their hand layout; everything else is the formatter's."""
    marker = "fmt: " + "skip"
    files = [
        *PROJECT_ROOT.glob("fclib/**/*.py"),
        *PROJECT_ROOT.glob("tests/*.py"),
        *PROJECT_ROOT.glob("benchmarks/*.py"),
    ]
    marked = [
        f"{path.relative_to(PROJECT_ROOT)}:{n}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if marker in line
    ]
    assert len(marked) <= 5, marked
