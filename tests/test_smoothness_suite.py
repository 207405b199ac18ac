"""Smooth Diffusion's regulariser as an arm of the suite (issue 28, item 2): `iso.metric=
smooth_diffusion` trains, its running mean is checkpointed so a resume is exact, the ablation
tables plan its jobs, and a combination it cannot honour is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from isodiff.config import IsoConfig, IsoMetric, Probe
from isodiff.errors import ConfigError
from isodiff.smoothness import StepVariationRegulariser
from tests.conftest import refusal, run_cli, run_train_job

SMOOTH = ["iso.metric=smooth_diffusion", "lambda_iso=0.1", "iso.window=0"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_smoke_job_trains_and_its_running_mean_is_checkpointed(tmp_path: Path) -> None:
    status, run_dir = run_train_job(SMOOTH, tmp_path / "ref")
    assert status["state"] == "done" and status["step"] == 6
    assert torch.isfinite(torch.tensor(status["final_loss"]))
    assert "iso" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    # the log names the peer's penalty as such, not as L_iso
    steps = [line for line in (run_dir / "train.log").read_text().splitlines() if "step " in line]
    assert steps and all("), L_reg " in line and "), L_iso " not in line for line in steps)
    # the regulariser's state is in the checkpoint, with the weights
    state = load_file(run_dir / "checkpoints" / "step_00000003" / "model.safetensors")
    assert int(state["regulariser.pl_updates"]) == 3  # one update per (micro-)batch, every t
    assert float(state["regulariser.pl_mean"]) > 0

    # resume from that checkpoint in a fresh folder: the weights of the uninterrupted run
    relative = run_dir.relative_to(tmp_path / "ref")
    resumed_dir = tmp_path / "resumed" / relative
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        run_dir / "checkpoints" / "step_00000003", resumed_dir / "checkpoints" / "step_00000003"
    )
    again, again_dir = run_train_job(SMOOTH, tmp_path / "resumed")
    assert again_dir == resumed_dir and again["state"] == "done"
    # it resumed at step 3 (the copy has no metrics.csv: its rows start after the checkpoint)
    assert (resumed_dir / "metrics.csv").read_text().splitlines()[1].startswith("4,")
    ref, res = _weights(run_dir), _weights(resumed_dir)
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def test_the_running_mean_is_what_the_resume_restores() -> None:
    """Exactness depends on a: a regulariser loaded from another's state_dict continues it."""
    torch.manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 10)
    a, b = StepVariationRegulariser(alphas), StepVariationRegulariser(alphas)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    a(lambda x_t, _t: model(x_t), x, t)
    assert float(a.pl_mean) > 0 and float(b.pl_mean) == 0
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.pl_mean, b.pl_mean) and torch.equal(a.pl_updates, b.pl_updates)


@pytest.mark.parametrize("spec", ["table_2", "table_4"])
def test_the_ablation_tables_plan_the_smooth_diffusion_arm(spec: str, tmp_path: Path) -> None:
    result = run_cli(
        "isodiff.sweep", spec, "tier=smoke", f"run_root={tmp_path}/runs", "--plan", timeout=600
    )
    assert result.returncode == 0, result.stderr
    arms = [line for line in result.stdout.splitlines() if "iso.metric=smooth_diffusion" in line]
    # beside L_iso at the same lambda_iso and window
    spherical = [line for line in result.stdout.splitlines() if "iso.metric=spherical" in line]
    assert arms and len(arms) == len(spherical)
    assert not list((tmp_path / "runs").glob("smoke/*/*/status.json"))  # nothing launched


def test_a_combination_it_cannot_honour_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="iso.probe"):
        IsoConfig(metric=IsoMetric.smooth_diffusion, probe=Probe.rademacher)
    run_root = tmp_path / "runs"
    result = run_cli(
        "isodiff.train",
        "tier=smoke",
        f"run_root={run_root}",
        *SMOOTH,
        "iso.n_probes=2",
        HYDRA_FULL_ERROR="",
    )
    line = refusal(result)
    assert "iso.n_probes" in line and "smooth_diffusion" in line, line
    assert not run_root.exists()
