"""`make serve` and `make test` install .venv only when it is missing or its inputs changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ("requirements.lock", "pyproject.toml", "scripts/setup.sh")
INSTALL = "bash scripts/setup.sh"


def planned(directory: Path, target: str) -> str:
    """The commands `make` would run (a dry run)."""
    return subprocess.run(["make", "-n", target], cwd=directory, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_install_runs_only_on_a_fresh_clone_or_when_an_input_changed(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in INPUTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert INSTALL in planned(tmp_path, "serve") and INSTALL in planned(tmp_path, "test")  # fresh clone

    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").write_text("")
    assert INSTALL not in planned(tmp_path, "serve") and INSTALL not in planned(tmp_path, "test")

    for name in INPUTS:
        later = (tmp_path / ".venv" / ".installed").stat().st_mtime + 10
        os.utime(tmp_path / name, (later, later))
        assert INSTALL in planned(tmp_path, "serve"), f"{name} changed"
        os.utime(tmp_path / ".venv" / ".installed", (later + 1, later + 1))
