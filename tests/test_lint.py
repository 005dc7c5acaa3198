"""The code passes ruff's lint and is in ruff's format (config: pyproject.toml [tool.ruff]); `ruff format .` fixes the
second, `ruff check --fix .` much of the first."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    out = subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_longest_files_exist():
    """conftest.LONGEST_FILES orders make test's work: a renamed file would silently drop to the end of it."""
    from conftest import LONGEST_FILES

    missing = [name for name in LONGEST_FILES if not (ROOT / name).is_file()]
    assert not missing, missing
