"""The suite's rectified-flow option (issue 29): `diffusion=flow` trains with isodiff.flow's
conventions and the Euler ODE sampler (isodiff.model.sampling.FlowEuler) stands in for DDIM
in every metric; DDPM jobs keep their signatures."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isodiff.config import DiffusionConfig, Objective, to_train_config
from isodiff.flow import flow_matching_loss, flow_window
from isodiff.model.sampling import FlowEuler, HEdit, build_sampler, flow_schedule, flow_step
from tests.conftest import compose_train, refusal, run_cli
from tests.test_flow import scheduler_batch

FLOW = DiffusionConfig(objective=Objective.flow, clip_sample=False)
FLOW_DIT = ["tier=smoke", "model=dit_tiny", "diffusion=flow"]


class Field(nn.Module):
    """A denoiser whose velocity is a given function v(x, sigma), with the encode/decode
    split the samplers call (h = x): the ODE is then known in closed form."""

    def __init__(self, v) -> None:  # noqa: ANN001 (a lambda)
        super().__init__()
        self.v, self.anchor = v, nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode(self, x: torch.Tensor, t: float) -> tuple:
        return x, (), None, t

    def decode(self, h: torch.Tensor, skips: tuple, emb: None, t: float) -> torch.Tensor:
        return self.v(h, t / FLOW.num_train_timesteps)


def test_the_schedule_and_step_are_diffusers_flow_match_euler() -> None:
    """Timesteps, sigmas and the Euler step against FlowMatchEulerDiscreteScheduler; the
    asymmetric step with an unedited v is the Euler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(7)
    s = flow_schedule(FLOW, 7)
    torch.testing.assert_close(s.timesteps.float(), scheduler.timesteps)
    assert s.sigma[0] == 1 and s.sigma_next[-1] == 0 and len(s.sigma) == 7
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for k, t in enumerate(scheduler.timesteps):
        ours = flow_step(x, v, float(s.sigma[k]), float(s.sigma_next[k]))
        torch.testing.assert_close(ours, scheduler.step(v, t, x).prev_sample)
        torch.testing.assert_close(
            flow_step(x, v, float(s.sigma[k]), float(s.sigma_next[k]), v), ours
        )


def test_euler_recovers_x0_exactly_for_the_true_constant_velocity() -> None:
    """v = noise - x0 everywhere: the ODE is the straight line, which Euler follows exactly
    with any number of steps; inversion lands on the noise."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    model = Field(lambda x, sigma: noise - x0)
    for steps in (1, 3, 20):
        sampler = FlowEuler(model, FLOW, steps)
        torch.testing.assert_close(sampler.sample(noise).x, x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(sampler.invert(x0).x, noise, atol=1e-5, rtol=0)


def test_euler_on_a_linear_field_is_its_closed_form() -> None:
    """v = a sigma x: dx/dsigma = a sigma x, so x(0) = x(1) exp(-a / 2). Euler with the
    network at each step's own sigma is prod_k (1 + a sigma_k (sigma_{k+1} - sigma_k))
    exactly, and tends to the ODE's solution as 1 / steps."""
    a, x_T = 0.8, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    model = Field(lambda x, sigma: a * sigma * x)
    errors = []
    for steps in (10, 40):
        s = flow_schedule(FLOW, steps)
        factor = math.prod(
            1 + a * float(s.sigma[k]) * float(s.sigma_next[k] - s.sigma[k]) for k in range(steps)
        )
        out = FlowEuler(model, FLOW, steps).sample(x_T).x
        torch.testing.assert_close(out, x_T * factor, atol=1e-6, rtol=1e-6)
        errors.append(abs(factor - math.exp(-a / 2)))
    assert errors[1] < errors[0] / 3  # first order: 4 x the steps, ~1/4 the error


def test_invert_then_sample_reproduces_x0_on_a_toy_field() -> None:
    """On v = a sigma x (a = 0.8) each inverse step and its sampling step use v at the same
    sigma_k, so the round trip multiplies x0 by prod_k (1 - (a sigma_k dsigma_k)^2): second
    order per step, first order over the trajectory. Stated tolerance: relative error below
    3e-2 at 10 steps and 2.5e-3 at 100 (measured: 2.7e-2 and 2.2e-3)."""
    a = 0.8
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    model = Field(lambda x, sigma: a * sigma * x)
    for steps, tol in ((10, 3e-2), (100, 2.5e-3)):
        sampler = FlowEuler(model, FLOW, steps)
        back = sampler.sample(sampler.invert(x0).x).x
        s = sampler.schedule
        factor = math.prod(
            1 - (a * float(s.sigma[k]) * float(s.sigma_next[k] - s.sigma[k])) ** 2
            for k in range(steps)
        )
        torch.testing.assert_close(back, x0 * factor, atol=1e-6, rtol=1e-5)
        assert ((back - x0).norm() / x0.norm()).item() < tol


def test_h_edits_and_recorded_h_follow_the_step_timesteps() -> None:
    """h at every step is the x the network saw; an h edit acts on the steps with
    t >= t_edit only (the flow's timesteps are sigma T: 1000 first)."""
    model = Field(lambda x, sigma: -x)
    sampler = FlowEuler(model, FLOW, 4)
    x_T = torch.ones(1, 1, 2, 2)
    run = sampler.sample(x_T, return_h=True)
    assert run.h.shape == (4, 1, 4) and torch.equal(run.h[0], x_T.flatten(1))
    assert int(sampler.schedule.timesteps[0]) == 1000
    edited = sampler.sample(x_T, edit=HEdit(offset=torch.ones(1, 4), t_edit=1001)).x
    assert torch.equal(edited, run.x)  # no step has t >= 1001
    assert not torch.equal(sampler.sample(x_T, edit=HEdit(offset=torch.ones(1, 4))).x, run.x)


def test_the_sampler_is_the_objectives_and_clipping_is_refused() -> None:
    from isodiff.errors import ConfigError
    from isodiff.model.sampling import DDIM, SAMPLERS

    model = Field(lambda x, sigma: x)
    assert isinstance(build_sampler(model, FLOW, 5), FlowEuler)
    assert type(build_sampler(model, DiffusionConfig(), 5)) is DDIM
    assert SAMPLERS[Objective.ddpm] == "DDIM eta=0 fp32"  # the protocol every run has
    clipping = DiffusionConfig(objective=Objective.flow, clip_sample=False)
    clipping.clip_sample = True  # as evaluate's clip_sample= sets it, after the config's check
    with pytest.raises(ConfigError, match="diffusion.clip_sample=true"):
        FlowEuler(model, clipping, 5)


def _dit(overrides: list[str] = ()) -> tuple:
    from isodiff.model.unet import build_unet
    from isodiff.train.objective import build_objective

    cfg = to_train_config(compose_train([*FLOW_DIT, *overrides]))
    torch.manual_seed(0)
    unet = build_unet(cfg.model)
    return cfg, unet, build_objective(cfg, unet)


def test_the_flow_objective_is_the_librarys_flow_matching_loss() -> None:
    """lambda = 0: the velocity MSE of diffusers' scheduler (test_flow's batch and check);
    lambda = 0.1: flow_matching_loss's loss and L_iso at the same x_t, probes and t."""
    cfg, unet, objective = _dit(["lambda_iso=0.1", "iso.window=0"])
    scheduler, x0, noise, timesteps, sigmas = scheduler_batch(1)
    x0, noise = x0[:, :3].repeat(1, 1, 2, 2), noise[:, :3].repeat(1, 1, 2, 2)  # 3 x 16 x 16
    everyone = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        x_t = scheduler.scale_noise(x0, timesteps, noise)
        plain = F.mse_loss(unet(x_t, timesteps).sample, noise - x0)
        objective.lambda_iso, reg = 0.0, objective.regulariser
        objective.regulariser = None
        torch.testing.assert_close(objective(x0, noise, sigmas, everyone)["loss"], plain)
    objective.lambda_iso, objective.regulariser = 0.1, reg
    ours = objective(x0, noise, sigmas, everyone, generator=torch.Generator().manual_seed(5))
    lib = flow_matching_loss(
        unet,
        x0,
        noise,
        sigmas,
        lambda_iso=0.1,
        regulariser=reg,
        generator=torch.Generator().manual_seed(5),
    )
    for key in ("loss", "mse", "iso"):
        torch.testing.assert_close(ours[key], lib[key], rtol=1e-4, atol=1e-6)


def test_flow_times_are_uniform_with_the_snr_matched_window() -> None:
    from isodiff.train.objective import draw_timesteps, window_start

    cfg = to_train_config(compose_train([*FLOW_DIT, "lambda_iso=0.1", "iso.schedule=per_sample"]))
    t, mask = draw_timesteps(cfg, 20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01
    assert torch.equal(mask, t >= flow_window(0.5)) and abs(mask.float().mean() - 0.225) < 0.01
    assert window_start(cfg) == 775  # flow_window(0.5) = 0.77493: the first t/T inside
    plain = to_train_config(compose_train(["tier=smoke", "lambda_iso=0.1"]))
    assert window_start(plain) == 500


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("iso.metric=smooth_diffusion", "iso.metric='smooth_diffusion'"),
        ("iso.metric=isodiff_compat", "iso.metric='isodiff_compat'"),
        ("iso.radius=sqrt_n", "iso.radius='sqrt_n'"),
        ("diffusion.clip_sample=true", "diffusion.clip_sample=True"),
    ],
)
def test_what_flow_cannot_mean_is_refused_at_config_time(override: str, key: str) -> None:
    from isodiff.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(key)} is invalid: .*flow"):
        to_train_config(compose_train([*FLOW_DIT, "lambda_iso=0.1", override]))


def test_flow_is_in_the_identity_and_ddpm_keeps_its_signature(tmp_path: Path) -> None:
    names = {
        o: compose_train(["tier=smoke", *o], tmp_path).name
        for o in ((), ("diffusion=ddpm",), ("diffusion=flow",))
    }
    signature = {o: name.rsplit("-", 1)[1] for o, name in names.items()}
    # 7015b76e: the default smoke job's signature before diffusion.objective existed
    assert signature[()] == signature[("diffusion=ddpm",)] == "7015b76e"
    assert signature[("diffusion=flow",)] != "7015b76e"


def test_a_flow_dit_trains_and_every_sampler_metric_runs(run_root: Path) -> None:
    """tier=smoke model=dit_tiny diffusion=flow lambda_iso=0.1 trains (L_iso logged, held-out
    L_iso on the flow's window) and evaluates with the Euler sampler recorded in the
    protocol; the full eval=smoke (all 11 metrics) is run by hand (12 min on 2 CPU cores)."""
    import pandas as pd
    from omegaconf import OmegaConf

    from isodiff.config import compose
    from isodiff.evaluate.config import register_schemas, to_evaluate_config
    from isodiff.evaluate.measure import evaluate_run
    from isodiff.model.latent import build_codec
    from isodiff.train.loop import HeldoutCurve
    from tests.conftest import run_train_job

    status, run_dir = run_train_job(
        [
            "model=dit_tiny",
            "diffusion=flow",
            "lambda_iso=0.1",
            "iso.window=0",
            "train.heldout_every=3",
            "train.heldout_n=4",
            "train.grid_samples=4",
        ],
        run_root,
    )
    assert status["state"] == "done" and "diffusion=flow" in run_dir.name
    log = pd.read_csv(run_dir / "metrics.csv")
    steps = log.dropna(subset=["mse"])  # (a row of step 0 holds the held-out L_iso alone)
    assert steps["iso"].notna().all() and (steps["mse"] > 0.5).all()  # var(noise - x0) > 1
    assert log.dropna(subset=["liso_heldout"])["step"].tolist() == [0, 3, 6]
    cfg = to_train_config(OmegaConf.load(run_dir / "config.yaml"))
    curve = HeldoutCurve(cfg, build_codec(cfg.latent, torch.device("cpu")), torch.device("cpu"))
    assert curve.timesteps == [10, 505, 999]  # p = 0: flow_window(0) = 0.0099, t >= 9.9
    register_schemas()
    metrics = ["liso", "jacobian", "inversion", "rtl"]
    evaluated = to_evaluate_config(
        compose(
            "evaluate",
            [f"run='{run_dir}'", "eval=smoke", "progress=false", f"metrics=[{','.join(metrics)}]"],
        )
    )
    record = evaluate_run(evaluated)
    assert not record.get("failed")
    for name in metrics:
        entry = record["metrics"][name]
        assert entry["protocol"]["sampler"] == "flow Euler ODE fp32"
        assert all(math.isfinite(v) for v in entry["values"].values()), (name, entry)

    # a fine-tune of this flow base as a DDPM would read its velocity as noise: refused
    refused = run_cli(
        "isodiff.train",
        "tier=smoke",
        "model=dit_tiny",
        f"init_from={run_dir}",
        f"run_root={run_root / 'refused'}",
    )
    line = refusal(refused)
    assert "diffusion.objective=ddpm does not match" in line, line
    assert "diffusion=flow" in line and "config.yaml" in line, line
    assert not (run_root / "refused").exists()
