"""Shared fixtures: compose the real conf/ tree with Hydra, run jobs in-process or as CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

import isodiff.train.command  # noqa: F401  (registers the schema and the job_name resolver)
from isodiff.config import ModelConfig, compose
from isodiff.model.unet import HUNet, build_unet

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# One intra-op thread: the suite's models are tiny, and extra threads only contend (with
# the subprocesses some tests start) on a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network


def tiny_model(
    size: int = 16, channels: int = 3, widths: tuple[int, ...] = (16, 32), **kwargs: object
) -> ModelConfig:
    """The suite's tiny U-Net config: two levels, attention on the second."""
    return ModelConfig(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(widths),
        **kwargs,
    )


def tiny_unet(
    size: int = 16,
    channels: int = 3,
    widths: tuple[int, ...] = (16, 32),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **kwargs: object,
) -> HUNet:
    """The suite's one tiny U-Net: tiny_model's, weights seeded by `seed`, in eval mode."""
    torch.manual_seed(seed)
    return build_unet(tiny_model(size, channels, widths, **kwargs)).to(dtype).eval()


def compose_train(overrides: list[str], run_root: Path | None = None) -> DictConfig:
    """conf/train.yaml composed as `python -m isodiff.train` would, hydra node included."""
    extra = [f"run_root={run_root}"] if run_root is not None else []
    return compose("train", [*overrides, *extra], hydra_node=True)


def job_dir(cfg: DictConfig) -> Path:
    return Path(cfg.hydra.run.dir)


def run_train_job(overrides: list[str], run_root: Path) -> tuple[dict, Path]:
    """Run one training job in-process (as the CLI would) and return (status, run dir)."""
    from isodiff.train.job import run_job
    from isodiff.train.loop import train

    cfg = compose_train(["tier=smoke", "train.progress=false", *overrides], run_root)
    run_dir = job_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return run_job(cfg, run_dir, train), run_dir


def run_cli(
    module: str, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`python -m <module> args` in a subprocess (exit codes and messages as users see them)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one line of a command that refused its input (exit 2, one line on stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"
