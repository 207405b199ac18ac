"""The forward (noising) process: diffusers' DDPM scheduler built from `conf/diffusion`."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

from isodiff.config import DiffusionConfig


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
