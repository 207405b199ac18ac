"""One folder per computation: a job whose signature already has a folder under its
experiment's folder runs there, whatever name its command line would give it (issue 27)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from isodiff.config import PRETRAINED
from isodiff.runs.identity import signature
from isodiff.runs.status import DONE, RUNNING, weights_record, write_status
from isodiff.sweep import plan
from isodiff.sweep.specs import expand, load_spec
from tests.conftest import compose_train, job_dir, run_cli


@pytest.mark.slow
def test_a_job_runs_once_whatever_its_command_line_named_it(tmp_path: Path) -> None:
    run_root = tmp_path / "runs"
    # named as the sweep names its jobs (name_keys): trained once, here
    first = run_cli(
        "isodiff.train",
        "tier=smoke",
        "name_keys=[data.name,lambda_iso,seed]",
        "train.progress=false",
        f"run_root={run_root}",
    )
    assert first.returncode == 0, first.stderr[-2000:]
    [folder] = (run_root / "smoke" / "default").iterdir()
    assert folder.name.startswith("data.name=shapes,lambda_iso=0,seed=0-")
    # the same job by the command lines of a user: `lambda_iso=0`, then no override at all
    for args in (["lambda_iso=0"], []):
        again = run_cli("isodiff.train", "tier=smoke", *args, f"run_root={run_root}")
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"{folder} is done already: skipped" in again.stdout + again.stderr
    assert list((run_root / "smoke" / "default").iterdir()) == [folder]
    # a name= the user gives is the folder's name, as given
    named = compose_train(["tier=smoke", "name=mine"], run_root)
    assert job_dir(named).name == "mine"


def test_the_readme_fine_tune_is_the_sweep_s_job_in_the_sweep_s_folder(tmp_path: Path) -> None:
    """`isodiff.train stage=finetune lambda_iso=0.1` fine-tunes the shipped base as Table 1's
    sweep does: the same signature and experiment; once either has run, the same folder."""
    run_root = tmp_path / "runs"
    spec = load_spec("table_1")
    base = str(PRETRAINED / "quick" / "shapes")
    common = plan.finetune_common(spec, "quick", "shapes", base, [f"run_root={run_root}"])
    [point] = [
        job.overrides
        for job in expand(spec, "quick")
        if job.dataset == "shapes" and {"lambda_iso=0.1", "seed=0"} <= set(job.overrides)
    ]
    swept = plan.job_dir([*common, *point])
    readme = ["stage=finetune", "lambda_iso=0.1", f"run_root={run_root}"]
    mine = plan.job_dir(readme)
    assert (signature(mine), mine.parent) == (signature(swept), swept.parent)
    assert mine.parent == run_root.resolve() / "quick" / "shapes"
    swept.mkdir(parents=True)
    write_status(swept, RUNNING)  # the sweep's job has started: the train command joins it
    assert plan.job_dir(readme) == swept


def _job(folder: Path, state: str, mtime: int) -> None:
    folder.mkdir(parents=True)
    if state == DONE:
        (folder / "final" / "unet").mkdir(parents=True)
        (folder / "final" / "unet" / "weights.bin").write_bytes(b"w")
    write_status(folder, state, weights=weights_record(folder) if state == DONE else None)
    os.utime(folder / "status.json", ns=(mtime, mtime))


def test_of_several_folders_of_one_job_the_done_then_the_oldest_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_root = tmp_path / "runs"
    cfg = compose_train(["tier=smoke"], run_root)
    parent, signed = job_dir(cfg).parent, signature(job_dir(cfg))
    _job(parent / f"b-{signed}", RUNNING, 1_000_000_000)
    _job(parent / f"a-{signed}", RUNNING, 2_000_000_000)
    (parent / f"empty-{signed}").mkdir()  # no status.json: a folder, not a job
    assert job_dir(compose_train(["tier=smoke"], run_root)).name == f"b-{signed}"  # oldest
    _job(parent / f"c-{signed}", DONE, 3_000_000_000)
    with caplog.at_level(logging.WARNING, "isodiff.runs.identity"):
        assert job_dir(compose_train(["tier=smoke"], run_root)).name == f"c-{signed}"  # done
    assert f"3 folders of one job (c-{signed}, b-{signed}, a-{signed}): using c-" in caplog.text


def test_a_fine_tune_is_in_its_dataset_s_experiment_and_names_a_missing_base(
    tmp_path: Path,
) -> None:
    """stage=finetune puts a job where the sweep puts it: its data's folder, its preset's
    at the paper tier (or its data's when it brings its own model); with no base shipped
    and no init_from=, one line naming init_from and how to train a base, nothing written."""
    folders = {
        "data=mnist": "mnist",
        "tier=paper preset=ddpm_cifar10": "ddpm_cifar10",
        "tier=paper init_from=/models/mine data.root=/data/mine": "folder",
    }
    for overrides, experiment in folders.items():
        cfg = compose_train(["stage=finetune", *overrides.split()], tmp_path)
        assert job_dir(cfg).parent.name == experiment, overrides
    assert compose_train(["stage=finetune", "data=mnist"]).init_from == str(
        PRETRAINED / "quick" / "mnist"
    )
    run_root = tmp_path / "runs"
    result = run_cli("isodiff.train", "tier=smoke", "stage=finetune", f"run_root={run_root}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "init_from is not set: stage=finetune fine-tunes a base and tier=smoke" in result.stderr
    assert "python -m isodiff.train tier=smoke data=shapes stage=base" in result.stderr
    assert not run_root.exists()
