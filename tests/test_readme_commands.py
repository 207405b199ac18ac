"""Every command of README.md's code blocks does what its comment says.

The commands are read from README.md when the test runs: each `python -m isodiff.*`,
`.venv/bin/python -m ...` or `isodiff-*` line of a code block (fenced, or indented by four
spaces), with its continuation lines and its `# comment`. Each one has its check below
(CHECKS, keyed by the command as written), or is in UNCHECKED with why; a command in
neither, or a check whose command is no longer in the README, fails. A Hydra command is
composed as the command composes it (what `--cfg job --resolve` prints, `-m` expanded into
its jobs); a sweep is run with `--plan` (its dry run). Commands that need data or
checkpoints that are not here are checked for their config alone.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

import isodiff.evaluate.command  # noqa: F401  (the evaluate schema)
from isodiff.config import PRETRAINED, compose
from isodiff.runs.identity import signature
from isodiff.sweep import command as sweep
from tests.conftest import ROOT, compose_train

PREFIXES = ("python -m isodiff.", ".venv/bin/python -m ", "isodiff-")


@dataclass(frozen=True)
class Command:
    line: int  # README.md's line number of its first line
    text: str  # the command, continuation lines joined
    comment: str


def readme_commands(path: Path = ROOT / "README.md") -> list[Command]:
    """The commands of the README's code blocks."""
    commands: list[Command] = []
    fenced, indented, previous_blank = False, False, True
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        if raw.lstrip().startswith("```"):
            fenced = not fenced
        # an indented block starts after a blank line and lasts while lines stay indented
        indented = raw.startswith("    ") and (indented or previous_blank)
        previous_blank = not raw.strip()
        start, text = i, raw.strip()
        while text.endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        if (fenced or indented) and text.startswith(PREFIXES):
            command, _, comment = text.partition(" # ")
            commands.append(Command(start + 1, " ".join(command.split()), comment.strip()))
    return commands


def _hydra_args(text: str) -> tuple[str, list[str]]:
    """(module, overrides) of a Hydra command line."""
    words = shlex.split(text)
    module = words[words.index("-m") + 1] if "-m" in words[:3] else words[0]
    return module, [w for w in words[words.index(module) + 1 :] if w != "-m"]


def jobs(text: str, run_root: Path) -> list[DictConfig]:
    """The configs of a train command's jobs: one, or a multirun's (-m), composed."""
    module, overrides = _hydra_args(text)
    assert module == "isodiff.train"
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for o in parsed
    ]
    keys = [o.get_key_element() for o in parsed]
    return [
        compose_train([f"{k}={v}" for k, v in zip(keys, values, strict=True)], run_root)
        for values in itertools.product(*choices)
    ]


def evaluation(text: str) -> DictConfig:
    module, overrides = _hydra_args(re.sub(r"<(\w+)>", r"\1", text))  # <job>: a placeholder
    assert module == "isodiff.evaluate"
    return compose("evaluate", overrides)


_DRY_RUNS: dict[tuple[str, ...], list[str]] = {}  # a sweep with --plan added, and as written


def plan_of(text: str, run_root: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A sweep command's dry run: its `--plan` output (run once), nothing launched."""
    words = shlex.split(text)
    args = words[words.index("isodiff.sweep") + 1 :]
    args += [] if "--plan" in args else ["--plan"]
    if tuple(args) not in _DRY_RUNS:
        capsys.readouterr()
        assert sweep.main([*args, f"run_root={run_root}"]) == 0
        assert not list(run_root.rglob("status.json")), "a --plan launched a job"
        _DRY_RUNS[tuple(args)] = capsys.readouterr().out.splitlines()
    return _DRY_RUNS[tuple(args)]


SHIPPED_SHAPES = str(PRETRAINED / "quick" / "shapes")
REGULARISED = ".venv/bin/python -m isodiff.train stage=finetune lambda_iso=0.1"


def _smoke(c: Command, run_root: Path, _: object) -> None:
    [cfg] = jobs(c.text, run_root)
    assert (cfg.tier.name, cfg.model.name, cfg.stage) == ("smoke", "tiny", "none")
    assert cfg.train.steps <= 10 and cfg.init_from is None


def _regularised(c: Command, run_root: Path, _: object) -> None:
    [cfg] = jobs(c.text, run_root)
    assert (cfg.tier.name, cfg.stage, cfg.init_from) == ("quick", "finetune", SHIPPED_SHAPES)
    assert cfg.train.steps == 600 and cfg.lambda_iso > 0 and cfg.iso.metric != "none"
    assert cfg.experiment == "shapes"  # where Table 1's sweep puts the same job


def _one_job_each(c: Command, run_root: Path, _: object) -> None:
    configs = jobs(c.text, run_root)
    assert [cfg.lambda_iso for cfg in configs] == [0, 0.1]
    assert {(cfg.stage, cfg.init_from, cfg.train.steps) for cfg in configs} == {
        ("finetune", SHIPPED_SHAPES, 600)
    }
    assert len({cfg.hydra.run.dir for cfg in configs}) == 2


def _latent(c: Command, run_root: Path, _: object) -> None:
    # config only: the autoencoder and CelebA-HQ are not here
    [cfg] = jobs(c.text, run_root)
    assert cfg.latent.autoencoder and cfg.data.name == "folder" and not cfg.diffusion.clip_sample
    assert cfg.model.sample_size * 4 == cfg.data.resolution  # the VQ-f4 latent


def _evaluate_run(c: Command, run_root: Path, _: object) -> None:
    cfg = evaluation(c.text)  # config only: <experiment>/<job> is the reader's run
    assert cfg.run.startswith("runs/quick/") and cfg.eval.name == "quick"


def _evaluate_released(c: Command, run_root: Path, _: object) -> None:
    cfg = evaluation(c.text)  # config only: the released model and its images are not here
    assert cfg.released and cfg.data.name == "folder" and cfg.eval.name == "paper"


def _sweep_table_1(c: Command, run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_of(c.text, run_root, capsys)
    assert "a sweep would launch the jobs of shapes, mnist" in out[0]
    # `<state> finetune <experiment>/<job>`, then a line of what is left of it
    finetunes = [words for line in out if (words := line.split())[1:2] == ["finetune"]]
    assert len(finetunes) == 20 and {job[0] for job in finetunes} == {"pending"}
    # the fine-tunes start from the shipped bases: the README's train command is one of them
    [regularised] = jobs(REGULARISED, run_root)
    mine = f"shapes/*-{signature(regularised.hydra.run.dir)}"
    assert sum(Path(job[2]).match(mine) for job in finetunes) == 1


def _sweep_one_dataset(c: Command, run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_of(c.text, run_root, capsys)
    assert out[0].endswith("a sweep would launch the jobs of shapes)")


def _sweep_plan(c: Command, run_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_of(c.text, run_root, capsys)  # asserts that nothing ran
    assert "nothing is launched" in out[0] and out[1].startswith("table_1 (tier quick)")


# The command as written -> (words its comment must hold, the check of what they claim).
Check = Callable[[Command, Path, pytest.CaptureFixture[str]], None]
CHECKS: dict[str, tuple[tuple[str, ...], Check]] = {
    ".venv/bin/python -m isodiff.train tier=smoke": (("seconds", "tiny"), _smoke),
    REGULARISED: (("quick tier", "regularised", "600 steps", "shipped base"), _regularised),
    ".venv/bin/python -m isodiff.train -m stage=finetune lambda_iso=0,0.1": (
        ("one job each",),
        _one_job_each,
    ),
    ".venv/bin/python -m isodiff.train latent.autoencoder=checkpoints/ldm-celebahq-256/vqvae "
    "model.sample_size=64 model.in_channels=3 model.out_channels=3 diffusion.clip_sample=false "
    "data=folder data.root=/data/celebahq256 data.resolution=256": ((), _latent),
    ".venv/bin/python -m isodiff.evaluate run=runs/quick/<experiment>/<job> eval=quick": (
        (),
        _evaluate_run,
    ),
    ".venv/bin/python -m isodiff.evaluate released=/models/ddpm-ema-celebahq-256 data=folder "
    "data.root=/data/celebahq256 data.resolution=256 eval=paper": ((), _evaluate_released),
    ".venv/bin/python -m isodiff.sweep table_1 tier=quick": (
        ("base", "fine-tunes", "evaluation"),
        _sweep_table_1,
    ),
    ".venv/bin/python -m isodiff.sweep table_1 tier=quick datasets=shapes": (
        ("one dataset",),
        _sweep_one_dataset,
    ),
    ".venv/bin/python -m isodiff.sweep table_1 tier=quick --plan": (
        ("the plan", "nothing launched"),
        _sweep_plan,
    ),
}
SLOW = {_sweep_table_1, _sweep_one_dataset, _sweep_plan}  # a compile of Table 1's 20 jobs
# Commands this test cannot check, and why.
UNCHECKED = {
    "python -m isodiff.train -m lambda_iso=0,1e-4,1e-3 tier=paper preset=ddpm_celebahq256 "
    "cluster=mycluster": "cluster=mycluster is the profile the reader writes from "
    "conf/cluster/example.yaml (tests/test_cluster.py checks the shipped profiles)",
}


def test_every_readme_command_is_checked_or_listed_with_why() -> None:
    written = {c.text for c in readme_commands()}
    assert written, "no command found in README.md's code blocks"
    unknown = sorted(written - CHECKS.keys() - UNCHECKED.keys())
    assert not unknown, f"README commands with no check here (add one, or to UNCHECKED): {unknown}"
    gone = sorted((CHECKS.keys() | UNCHECKED.keys()) - written)
    assert not gone, f"checked here but no longer in README.md: {gone}"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(t, marks=pytest.mark.slow) if check in SLOW else t
        for t, (_, check) in CHECKS.items()
    ],
)
def test_a_readme_command_does_what_its_comment_says(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = [c for c in readme_commands() if c.text == text]
    if not found:
        pytest.skip("not in README.md (test_every_readme_command_is_checked_or_listed_with_why)")
    says, check = CHECKS[text]
    for command in found:
        missing = [w for w in says if w not in command.comment]
        assert not missing, f"README.md:{command.line}: its comment no longer says {missing}"
        check(command, tmp_path / "runs", capsys)


def test_the_reader_finds_commands_in_both_kinds_of_code_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "Prose with `python -m isodiff.train` inline.\n\n"
        "    .venv/bin/python -m isodiff.train a=1 \\\n        b=2   # two keys\n"
        "    make test\n\n"
        "```\nisodiff-sweep table_1\n```\n"
        "1. a list\n   python -m isodiff.sweep table_2\n"
    )
    assert readme_commands(readme) == [
        Command(3, ".venv/bin/python -m isodiff.train a=1 b=2", "two keys"),
        Command(8, "isodiff-sweep table_1", ""),
    ]
