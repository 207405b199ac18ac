"""The forward (noising) process of `conf/diffusion`: diffusers' DDPM scheduler, or with
diffusion.objective=flow its rectified flow (FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from isodiff.config import DiffusionConfig, Objective
from isodiff.flow import interpolate

# (x_0, noise, the model's timestep) -> x_t
Noising = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule.value,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def build_ddim(cfg: DiffusionConfig) -> DDIMScheduler:
    """Deterministic DDIM on the same betas, clipping x0 as `diffusion.clip_sample` says."""
    return DDIMScheduler.from_config(build_scheduler(cfg).config, clip_sample=cfg.clip_sample)


def build_flow_scheduler(cfg: DiffusionConfig) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' rectified flow on T timesteps, unshifted: sigma = t / T, as isodiff.flow."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps)


def noising(cfg: DiffusionConfig) -> Noising:
    """x_t at the model's timestep t in [0, T), as training makes it: DDPM's q(x_t | x_0) =
    sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, or the flow's (1 - s) x_0 + s noise at
    s = t / T (the flow model is called with timestep s T)."""
    if cfg.objective == Objective.flow:
        T = cfg.num_train_timesteps
        return lambda x_0, noise, t: interpolate(x_0, noise, t / T)
    alphas = build_scheduler(cfg).alphas_cumprod.double()

    def ddpm(x_0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a = float(alphas[t])
        return a**0.5 * x_0 + (1 - a) ** 0.5 * noise

    return ddpm
