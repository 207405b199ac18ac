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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_command_is_installed_and_answers_help(name: str, tmp_path: Path) -> None:
    command = Path(sys.executable).parent / name
    assert command.is_file(), f"{name} is not installed: run `make install`"
    result = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
