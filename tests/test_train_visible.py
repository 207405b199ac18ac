"""What a training job shows: L_iso's window means in metrics.csv, the progress bar and the
tracker (accelerate's; TensorBoard by default), its run folder at start and end, train.log,
a lock's holder before the slow imports, and the evaluation's metrics beside the hparams."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
from filelock import FileLock
from omegaconf import OmegaConf, open_dict

from isodiff.config import TRACKERS, to_train_config
from isodiff.errors import UserError
from isodiff.runs.files import announce_holder
from isodiff.runs.tracking import log_evaluation
from isodiff.train.job import first_line
from tests.conftest import compose_train, refusal, run_cli, run_train_job

# 4 steps, a window of 2; lambda_iso=1e-3 as the new user's run (no grids: seconds fewer)
ISO = ["tier=smoke", "lambda_iso=1e-3", "train.steps=4", "train.grid_samples=0"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The new user's command: (run folder, stdout, stderr)."""
    root = tmp_path_factory.mktemp("visible")
    result = run_cli("isodiff.train", *ISO, f"run_root={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (root / "smoke" / "default").iterdir()
    return run_dir, result.stdout, result.stderr


def test_the_run_folder_is_printed_at_start_and_end(cli_run: tuple[Path, str, str]) -> None:
    run_dir, stdout, _ = cli_run
    lines = stdout.splitlines()
    assert lines[0] == f"train {run_dir}: 4 steps from scratch at tier smoke", lines
    assert lines[-1].startswith(f"train {run_dir}: done, 4 steps, final loss "), lines
    assert f"python -m isodiff.evaluate run={run_dir} eval=smoke" in lines[-1]
    # train.log holds the job's log: its attempt, each logged window, its end
    log = (run_dir / "train.log").read_text()
    assert "attempt 1" in log and "step 2/4: loss" in log and "step 4/4: loss" in log
    assert f"train {run_dir}: done" in log


def test_liso_is_logged_as_its_window_mean(cli_run: tuple[Path, str, str], tmp_path: Path) -> None:
    """Each row of metrics.csv is the mean over its window: loss and mse over the steps,
    L_iso over the iso-active samples, iso_active their fraction; the same job logged at
    every step (train.log_every only logs) gives the values the window means must equal."""
    run_dir, _, stderr = cli_run
    windows = _rows(run_dir)
    assert [int(r["step"]) for r in windows] == [2, 4]
    assert all(r["iso_active"] != "" and 0 <= float(r["iso_active"]) <= 1 for r in windows)
    assert any(r["iso"] != "" for r in windows)  # the new user's empty column
    _, per_step = run_train_job([*ISO, "train.log_every=1"], tmp_path)
    steps = _rows(per_step)
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
    for window, pair in zip(windows, (steps[:2], steps[2:]), strict=True):
        active = [float(r["iso_active"]) for r in pair]
        assert float(window["iso_active"]) == pytest.approx(sum(active) / 2, abs=1e-12)
        for key in ("loss", "mse"):
            assert float(window[key]) == pytest.approx(
                sum(float(r[key]) for r in pair) / 2, rel=1e-6
            )
        if sum(active):
            iso = sum(a * float(r["iso"]) for a, r in zip(active, pair, strict=True) if a)
            assert float(window["iso"]) == pytest.approx(iso / sum(active), rel=1e-6)
        else:
            assert window["iso"] == ""
    # the progress bar shows them; the tracker (TensorBoard, <run>/tb) has them
    assert "L_iso=" in stderr and "iso_active=" in stderr
    scalars = _scalars(run_dir / "tb")
    for key in ("loss", "mse", "iso_active"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [2, 4]
    logged = {int(r["step"]): float(r["iso"]) for r in windows if r["iso"]}
    assert dict(scalars["train/iso"]) == pytest.approx(logged, rel=1e-6)


def test_log_with_none_writes_no_tensorboard(tmp_path: Path) -> None:
    status, run_dir = run_train_job(
        ["train.steps=2", "train.grid_samples=0", "train.log_with=none"], tmp_path
    )
    assert status["state"] == "done" and len(_rows(run_dir)) == 1
    assert not (run_dir / "tb").exists()


@pytest.mark.parametrize(
    "value, says", [("tensorbord", "use one of accelerate's trackers"), ("wandb", "pip install")]
)
def test_a_bad_tracker_is_one_line_and_no_folder(value: str, says: str, tmp_path: Path) -> None:
    import importlib.util

    if value == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = run_cli(
        "isodiff.train", "tier=smoke", f"run_root={tmp_path / 'runs'}", f"train.log_with={value}"
    )
    line = refusal(result)
    assert line.startswith(f"error: train.log_with='{value}' is invalid") and says in line
    assert not (tmp_path / "runs").exists()


def test_the_trackers_are_accelerates() -> None:
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}


def test_evaluation_metrics_land_beside_the_hparams(tmp_path: Path) -> None:
    """log_evaluation: the run's sweep keys as hparams, metrics.json's finite scalars as
    eval/<metric>/<value>, in <run>/tb/eval; a second evaluation replaces the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {
        "lambda_iso": 0.001,
        "seed": 3,
        "iso": {"metric": "spherical", "window": 0.5},
        "data": {"name": "shapes"},
        "name_keys": ["optim.lr"],
        "optim": {"lr": 1e-4},
        "train": {"log_with": "tensorboard"},
    }
    OmegaConf.save(config, run_dir / "config.yaml")
    record = {
        "metrics": {
            "fid": {"values": {"fid": 12.5, "n": 64, "curve": [1.0, 2.0]}},
            "liso": {"values": {"liso_scaled": 0.9, "bad": math.nan}},
        }
    }
    log_evaluation(run_dir, {"metrics": {"fid": {"values": {"fid": 99.0}}}})
    log_evaluation(run_dir, record)
    folder = run_dir / "tb" / "eval"
    assert len(list(folder.glob("events.out.tfevents.*"))) >= 1
    scalars = _scalars(folder)
    assert {k: v[-1][1] for k, v in scalars.items()} == pytest.approx(
        {"eval/fid/fid": 12.5, "eval/fid/n": 64.0, "eval/liso/liso_scaled": 0.9}
    )
    assert all(len(v) == 1 for v in scalars.values())  # the first evaluation is gone
    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    values = {
        k: v.number_value if v.HasField("number_value") else v.string_value
        for k, v in hparams.items()
    }
    assert values == {
        "lambda_iso": 0.001,
        "seed": 3.0,
        "iso.metric": "spherical",
        "iso.window": 0.5,
        "data.name": "shapes",
        "optim.lr": 1e-4,
    }
    # a run trained without a tracker gets none from its evaluation either
    (run_dir / "tb").rename(run_dir / "tb_before")
    OmegaConf.save({**config, "train": {"log_with": "none"}}, run_dir / "config.yaml")
    log_evaluation(run_dir, record)
    assert not (run_dir / "tb").exists()


def test_a_base_from_scratch_at_quick_says_so_first(tmp_path: Path) -> None:
    level, line = first_line(
        to_train_config(compose_train(["tier=quick"], tmp_path)), tmp_path, False
    )
    assert level == logging.WARNING and line.startswith(f"train {tmp_path}: a base from scratch")
    assert "8000 steps at tier quick" in line and "stage=finetune" in line
    base = compose_train(["tier=quick", "stage=base"], tmp_path)
    assert first_line(to_train_config(base), tmp_path, False)[0] == logging.WARNING
    for quiet in (["tier=smoke"], ["tier=quick", f"init_from={tmp_path}"]):
        cfg = to_train_config(compose_train(quiet, tmp_path))
        assert first_line(cfg, tmp_path, False)[0] == logging.INFO
    done = first_line(cfg, tmp_path, True)
    assert done == (logging.INFO, f"train {tmp_path}: done already, checking its weights")


def test_a_held_lock_is_announced_before_the_slow_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second job says whose lock it waits for before it loads torch and checks its data
    (tens of seconds on a loaded machine), not after."""
    import isodiff.model.data
    from isodiff.train.job import run_job
    from isodiff.train.loop import train
    from tests.conftest import job_dir

    assert not announce_holder(tmp_path / ".lock", "job x")  # no lock file: none made
    assert not (tmp_path / ".lock").exists()
    cfg = compose_train(["tier=smoke"], tmp_path)
    run_dir = job_dir(cfg)
    run_dir.mkdir(parents=True)
    with open_dict(cfg):
        del cfg["hydra"]
    seen = []

    def check_data(_: object) -> None:
        seen.append("waiting for the process that holds" in caplog.text)
        raise UserError("stop here")

    monkeypatch.setattr(isodiff.model.data, "check_data", check_data)
    lock = FileLock(str(run_dir / ".lock"))
    lock.acquire()
    try:
        with caplog.at_level(logging.INFO), pytest.raises(UserError, match="stop here"):
            run_job(cfg, run_dir, train)
    finally:
        lock.release()
    assert seen == [True]
    assert caplog.messages[0] == f"train {run_dir}: 6 steps from scratch at tier smoke"
    assert not announce_holder(run_dir / ".lock", "job x")  # free again


def test_a_resumed_run_logs_each_step_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails after logging past its newest checkpoint, then runs again: it resumes
    from that checkpoint, and TensorBoard (like metrics.csv) holds each step once, the
    values the resumed attempt logged."""
    from isodiff.train import loop

    args = [*ISO, "train.steps=6", "train.log_every=1", "train.checkpoint_every=2"]
    real = loop.save_checkpoint

    def fail_at_4(state: object, run_dir: Path, step: int, keep: int) -> None:
        if step == 4:
            raise RuntimeError("killed")
        real(state, run_dir, step, keep)

    monkeypatch.setattr(loop, "save_checkpoint", fail_at_4)
    with pytest.raises(RuntimeError, match="killed"):
        run_train_job(args, tmp_path)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    status, run_dir = run_train_job(args, tmp_path)
    assert status["state"] == "done" and status["attempts"] == 2
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    scalars = _scalars(run_dir / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [float(r["loss"]) for r in rows], rel=1e-6
    )
