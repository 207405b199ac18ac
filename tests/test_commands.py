"""The console commands the project installs (pyproject's [project.scripts]) exist in the
environment `make install` built, and each answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_command_is_installed() -> None:
    missing = [n for n in SCRIPTS if not (Path(sys.executable).parent / n).is_file()]
    assert not missing, f"{missing} not installed: run `make install`"


# One Hydra command and one key=value command: each kind imports its module and answers
# --help from outside the repository (the analysis commands' --help: tests/test_faults.py).
@pytest.mark.parametrize("name", ["isodiff-train", "isodiff-sweep"])
def test_console_commands_answer_help_from_any_folder(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / name), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
