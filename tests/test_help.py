"""Every command's --help says what it does, shows how to call it and where its keys are, in
a page, not a config dump (issue 27, item 7): the console commands' entry points, in process;
one subprocess shows that a Hydra command answers --help without composing its config."""

from __future__ import annotations

import importlib
import re
import sys
import time

import pytest
import tomllib

from tests.conftest import ROOT, run_cli

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HYDRA = ("isodiff.train.command", "isodiff.evaluate.command", "isodiff.analysis.toy")


def _command_module(entry: str) -> str:
    """The module a console script runs: isodiff.commands wraps each command's module."""
    module, _, function = entry.partition(":")
    return getattr(getattr(importlib.import_module(module), function), "module", module)


def _help(entry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    module, _, function = entry.partition(":")
    monkeypatch.setattr(sys, "argv", [entry, "--help"])
    try:
        getattr(importlib.import_module(module), function)()
    except SystemExit as done:
        assert done.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_says_what_it_does_then_examples_then_where_the_keys_are(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    entry = SCRIPTS[script]
    module = _command_module(entry).removesuffix(".command")
    text = _help(entry, monkeypatch, capsys)
    lines = text.strip().splitlines()
    assert len(lines) < 40, f"{script} --help is {len(lines)} lines"
    # a sentence saying what it does, not a usage line, a backquoted synopsis or Hydra's banner
    assert re.fullmatch(r"[A-Z][a-z]+[ ,].+", lines[0]), lines[0]
    assert "powered by Hydra" not in text and "== Config ==" not in text
    examples = lines.index("Examples:")
    assert examples < 4 and lines[examples + 1].startswith(f"  python -m {module} "), text
    if _command_module(entry) in HYDRA:
        assert f"python -m {module} --cfg job" in text  # the full config, on request
    else:
        assert "Keys:" in text or "positional arguments" in text or "no keys" in text


def test_a_hydra_command_answers_help_without_composing_its_config() -> None:
    """Hydra's own --help composes every config group of conf/ (seconds) and prints the whole
    config; ours prints the docstring and the groups' option files."""
    start = time.monotonic()
    result = run_cli("isodiff.evaluate", "--help")
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Evaluate a finished training run")
    assert "  eval: base, paper, quick, smoke (default: quick)" in result.stdout
    assert "batch_size" not in result.stdout  # no config dump
    assert seconds < 30, seconds  # a loaded 2-core CI machine; about a second on a laptop
