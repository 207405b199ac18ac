"""Training jobs: complete, reproducible, resumable after a kill, and fail cleanly."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from isodiff.errors import ConfigError
from isodiff.runs.status import is_done, read_status
from isodiff.train.loop import NonFiniteLossError, StepBatches
from tests.conftest import ROOT, run_cli, run_train_job


def _weights(run_dir: Path, which: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / which / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    for which in ("unet", "unet_ema"):
        wa, wb = _weights(a, which), _weights(b, which)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{which}.{key} differs"


def test_smoke_job_completes_and_is_not_redone(run_root: Path) -> None:
    status, run_dir = run_train_job([], run_root)
    assert status["state"] == "done" and status["step"] == 6
    assert len(status["git"]["commit"]) == 40  # the code that trained it
    for name in (
        "config.yaml",
        "metrics.csv",
        "train.log",
        "final/unet/config.json",
        "final/unet_ema/diffusion_pytorch_model.safetensors",
    ):
        assert (run_dir / name).exists(), name
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    # A sample grid at each checkpoint and at the end (EMA weights, fixed x_T)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_00000003.png",
        "step_00000006.png",
    ]
    mtime = (run_dir / "final").stat().st_mtime_ns
    again, _ = run_train_job([], run_root)
    assert again["attempts"] == 1 and (run_dir / "final").stat().st_mtime_ns == mtime


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    _, a = run_train_job(["train.steps=3"], tmp_path / "a")
    _, b = run_train_job(["train.steps=3"], tmp_path / "b")
    _, c = run_train_job(["train.steps=3", "seed=1"], tmp_path / "c")
    _, d = run_train_job(["train.steps=3", "train.grid_samples=0"], tmp_path / "d")
    _assert_same_weights(a, b)
    _assert_same_weights(a, d)  # sampling the grids leaves training as it was
    assert not torch.equal(_weights(a)["conv_in.weight"], _weights(c)["conv_in.weight"])


def test_held_out_liso_is_logged_and_leaves_training_as_it_was(tmp_path: Path) -> None:
    """train.heldout_every: metrics.csv's liso_heldout at step 0 and every k steps, equal to
    the metric's quantity (metrics.liso.heldout_liso) recomputed on the final raw weights;
    measuring it draws no training randomness, so the weights are bitwise those without it."""
    import pandas as pd
    from omegaconf import OmegaConf

    from isodiff.config import to_train_config
    from isodiff.model.latent import build_codec
    from isodiff.model.unet import load_unet
    from isodiff.train.loop import HeldoutCurve

    _, plain = run_train_job(["train.steps=4"], tmp_path / "a")
    status, logged = run_train_job(
        ["train.steps=4", "train.heldout_every=2", "train.heldout_n=4"], tmp_path / "b"
    )
    assert status["state"] == "done"
    _assert_same_weights(plain, logged)
    rows = pd.read_csv(logged / "metrics.csv").dropna(subset=["liso_heldout"])
    assert rows["step"].tolist() == [0, 2, 4]
    assert (rows["liso_heldout"] > 0.8).all()  # 1 = the best a map into h can do
    cfg = to_train_config(OmegaConf.load(logged / "config.yaml"))
    curve = HeldoutCurve(cfg, build_codec(cfg.latent, torch.device("cpu")), torch.device("cpu"))
    assert len(curve.x_0) == 4 and curve.timesteps == [500, 750, 999]
    assert rows["liso_heldout"].iloc[-1] == pytest.approx(
        curve(load_unet(str(logged), ema=False)), rel=1e-4
    )


def test_batches_depend_only_on_position() -> None:
    whole = StepBatches(10, 4, seed=0, start=0, world=2)
    it = iter(whole)
    first = [next(it) for _ in range(6)]
    resumed = iter(StepBatches(10, 4, seed=0, start=3, world=2))
    assert [next(resumed) for _ in range(3)] == first[3:]
    # two ranks share one permutation per epoch: positions 0-3 on rank 0, 4-7 on rank 1,
    # 8-9 at the start of rank 0's second micro-batch, so epoch 0 is each image once
    rank1 = iter(StepBatches(10, 4, seed=0, start=0, rank=1, world=2))
    epoch0 = first[0] + next(rank1) + first[1][:2]
    assert sorted(epoch0) == list(range(10))
    alone = [
        i for batch in itertools.islice(iter(StepBatches(10, 5, seed=0, start=0)), 2) for i in batch
    ]
    assert sorted(alone) == list(range(10)) and alone != list(range(10))  # shuffled


@pytest.mark.slow
def test_kill_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    args = ["tier=smoke", "train.steps=16", "train.checkpoint_every=4", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ref = run_cli("isodiff.train", *args, f"run_root={tmp_path / 'ref'}", OMP_NUM_THREADS="2")
    assert ref.returncode == 0, ref.stderr
    killed_root = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "isodiff.train", *args, f"run_root={killed_root}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(killed_root.glob("*/*/*/checkpoints/step_00000008")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before exit"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = killed_root.glob("*/*/*")
    assert read_status(run_dir)["state"] == "running" and not (run_dir / "final").exists()
    resumed = run_cli("isodiff.train", *args, f"run_root={killed_root}", OMP_NUM_THREADS="2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in (run_dir / "train.log").read_text()
    assert read_status(run_dir)["attempts"] == 2
    (ref_dir,) = (tmp_path / "ref").glob("*/*/*")
    _assert_same_weights(ref_dir, run_dir)


def test_non_finite_loss_fails_the_job(run_root: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run_train_job(["optim.lr=1e30", "train.steps=20"], run_root)
    (run_dir,) = run_root.glob("*/*/*")
    status = read_status(run_dir)
    assert status["state"] == "failed" and "NonFiniteLossError" in status["error"]
    assert not (run_dir / "final").exists()


def _corrupt_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "ok.png")
    (root / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lambda_iso=-1"], "lambda_iso=-1.0 is invalid"),
        (["iso.window=1.5"], "iso.window=1.5 is invalid"),
        (["iso.metric=cosine"], "iso.metric"),
        (["data=celeba"], "data=celeba: no such option"),
        (
            ["data=folder", "data.root=/no/such/folder"],
            "data.root='/no/such/folder' is not a folder",
        ),
        (["data=folder", "data.root=CORRUPT", "data.resolution=16"], "cannot read image"),
        (["init_from=/no/such/run"], "init_from='/no/such/run' was not found"),
    ],
)
def test_bad_input_exits_non_zero_naming_the_key(overrides, message, tmp_path: Path) -> None:
    if "data.root=CORRUPT" in overrides:
        folder = _corrupt_folder(tmp_path)
        overrides = [o.replace("CORRUPT", str(folder)) for o in overrides]
    run_root = tmp_path / "runs"
    result = run_cli("isodiff.train", "tier=smoke", f"run_root={run_root}", *overrides)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not [p for p in run_root.rglob("status.json") if is_done(p.parent)]


def test_config_error_leaves_no_run_folder(run_root: Path) -> None:
    with pytest.raises(ConfigError):
        run_train_job(["lambda_iso=-1"], run_root)
    assert not list(run_root.glob("*/*/*"))


def test_multirun_writes_one_folder_per_lambda(run_root: Path) -> None:
    result = run_cli(
        "isodiff.train",
        "-m",
        "lambda_iso=0,1e-4,1e-3",
        "tier=smoke",
        "train.steps=2",
        "train.progress=false",
        f"run_root={run_root}",
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.name for p in (run_root / "smoke" / "default").iterdir() if p.is_dir())
    assert [j.split(",")[0] for j in jobs] == [
        "lambda_iso=0",
        "lambda_iso=0.0001",
        "lambda_iso=0.001",
    ]
    assert all(is_done(run_root / "smoke" / "default" / j) for j in jobs)
