"""Every user error stops before any folder exists, in one line naming the key, exit 2; an
error inside a job is one line (its traceback in train.log); SIGTERM and SIGINT mark the job
`interrupted`, which the same command resumes (issue 25, item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from isodiff import cli
from isodiff.config import DataConfig, DatasetName
from isodiff.errors import ConfigError
from isodiff.model.data import check_data, check_memory
from isodiff.runs.status import is_done, read_status
from isodiff.train.job import INTERRUPTED, run_job
from tests.conftest import ROOT, compose_train, job_dir, refusal, run_cli


def _images(tmp: Path) -> Path:
    folder = tmp / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"a{i}.png")
    return folder


def _bad_attributes(tmp: Path) -> Path:
    path = tmp / "list_attr.txt"
    path.write_text("3\nSmiling Male\na0.png 1 -1\na1.png 1\n")  # a value missing, line 4
    return path


FOLDER = ["data=folder", "data.resolution=16", "data.num_workers=0"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["data.seed=-3"], ["data.seed=-3", ">= 0"]),
        (["data.resolution=9"], ["data.resolution=9", "multiple of 2"]),
        (
            ["iso.metric=isodiff_compat", "iso.probe=rademacher", "lambda_iso=0.1"],
            ["iso.probe='rademacher'", "iso.probe=gaussian"],
        ),
        (["data.size=100000000"], ["data.size=100000000", "lower data.size"]),
        ([*FOLDER], ["data.root=None", "data.root=/path"]),
        ([*FOLDER, "data.root={tmp}/missing"], ["data.root=", "is not a folder"]),
        ([*FOLDER, "data.root={tmp}"], ["data.root=", "holds no images"]),
        (
            [*FOLDER, "data.root={images}", "data.attributes={attributes}"],
            ["data.attributes=", "line 4", "CelebA"],
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_exit_2_and_no_folder(
    args: list[str], names: list[str], tmp_path: Path
) -> None:
    images, attributes = _images(tmp_path), _bad_attributes(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    values = {"tmp": empty, "images": images, "attributes": attributes}
    run_root = tmp_path / "runs"
    result = run_cli(
        "isodiff.train",
        "tier=smoke",
        f"run_root={run_root}",
        *(a.format(**values) for a in args),
        HYDRA_FULL_ERROR="",
    )
    line = refusal(result)
    assert line.startswith("error: "), line
    assert all(name in line for name in names), line
    assert not run_root.exists()


@pytest.mark.parametrize(
    ("arg", "names"),
    [
        ("run={job}/status.json", ["is a file, not a run folder", "run={job}"]),
        ("device=cuda", ["device='cuda'", "device=cpu"]),
    ],
)
def test_evaluate_refuses_a_file_as_run_and_a_missing_device(
    arg: str, names: list[str], tmp_path: Path
) -> None:
    if arg.startswith("device") and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    job = tmp_path / "job"
    job.mkdir()
    (job / "status.json").write_text('{"state": "done"}')
    result = run_cli(
        "isodiff.evaluate",
        arg.format(job=job) if "{" in arg else arg,
        *([] if arg.startswith("run") else [f"run={job}"]),
        "eval=smoke",
        HYDRA_FULL_ERROR="",
    )
    line = refusal(result)
    assert all(name.format(job=job) in line for name in names), line
    assert sorted(p.name for p in job.iterdir()) == ["status.json"]  # nothing recorded


def test_a_folder_that_cannot_be_listed_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rglob skipped unreadable folders without a word (part of the data); as root, chmod
    cannot make one, so listing it fails here as it would for another user."""
    root = _images(tmp_path)
    locked = root / "locked"
    locked.mkdir()
    scandir = os.scandir

    def refuse(path: object = ".") -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(ConfigError, match=r"data.root=.*cannot list .*locked.*Permission"):
        check_data(DataConfig(name=DatasetName.folder, root=str(root), resolution=16))


def test_memory_check_names_data_size_and_its_limit() -> None:
    cfg = DataConfig(size=1000, resolution=32)
    check_memory(cfg, available=2**40)  # fits
    with pytest.raises(ConfigError, match=r"data.size=1000.*GiB.*at most ~\d+"):
        check_memory(cfg, available=2**20)
    check_memory(DataConfig(name=DatasetName.folder, root="x", size=10**9), available=1)


def test_an_error_inside_a_job_is_recorded_with_its_traceback_in_train_log(tmp_path: Path) -> None:
    cfg = compose_train(["tier=smoke"], tmp_path / "runs")
    run_dir = job_dir(cfg)
    run_dir.mkdir(parents=True)
    with open_dict(cfg):
        del cfg["hydra"]

    def work(*_: object) -> dict:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as caught:
        run_job(cfg, run_dir, work)
    status = read_status(run_dir)
    assert status["state"] == "failed" and "RuntimeError: boom" in status["error"]
    assert "Traceback" in (run_dir / "train.log").read_text()
    line = cli.job_failure(caught.value)
    assert line is not None and "\n" not in line
    assert "boom" in line and str(run_dir / "train.log") in line


RUN = [
    sys.executable,
    "-m",
    "isodiff.train",
    "tier=smoke",
    "train.progress=false",
    "train.steps=30",
    "train.checkpoint_every=3",
    "train.grid_samples=0",
]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_marks_the_job_interrupted_and_the_same_command_resumes_it(
    signum: int, code: int, tmp_path: Path
) -> None:
    command = [*RUN, f"run_root={tmp_path / 'runs'}"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("runs/*/*/*/checkpoints/step_*")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], stderr
    assert "resumes it" in lines[0] and "train.steps=30" in lines[0]
    (run_dir,) = tmp_path.glob("runs/*/*/*")
    assert read_status(run_dir)["state"] == INTERRUPTED
    assert not is_done(run_dir)  # the sweep and collect run or list it, never skip it
    if signum != signal.SIGTERM:
        return  # one rerun is enough
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout + rerun.stderr
    status = read_status(run_dir)
    assert status["state"] == "done" and status["attempts"] == 2 and "error" not in status
