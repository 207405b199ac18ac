"""The training objective: epsilon-prediction MSE + lambda_iso * L_iso (Hahm et al., eq. 10),
or lambda_iso times a baseline regulariser in L_iso's place (`iso.metric`).

`diffusion.objective=flow` trains a rectified flow instead, with isodiff.flow's conventions
(diffusers' FlowMatchEulerDiscreteScheduler): t ~ U[0, 1), x_t = (1 - t) x0 + t noise, the
model at timestep t T predicts the velocity noise - x0, and L_iso, at x_t itself (the
sphere of x_t's own radius), is on the window t >= flow_window(iso.window), the flow times of
the paper's DDPM noise levels matched by SNR (`draw_timesteps`). It is flow_matching_loss's
loss, computed on the suite's denoisers' own split (eps_and_h), so that model.h_block holds.

`iso.metric=smooth_diffusion` is Smooth Diffusion's step-wise variation regulariser
(isodiff/smoothness.py, Guo et al. CVPR 2024, eq. 14: L = L_base + lambda L_reg), weighted
by lambda_iso as L_iso and the path-length baseline are, so that an ablation compares them at
equal strength. The peer applies it on every t (t uniform on {0..T-1}, every sample of every
step); here it gets the samples of `iso.window` as the other arms do: t in [floor(pT), T),
so iso.window=0 is the peer's own setting and the tables' p=0.5 regularises the noisier half
of the steps only. Its running mean a (`pl_mean`) is a buffer of the objective, so it is in
every checkpoint and a resume continues it exactly (the official script loses it).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from isodiff.config import IsoConfig, IsoMetric, Objective, TrainConfig
from isodiff.flow import flow_window, interpolate, sample_flow_timesteps, velocity_target
from isodiff.isometry import Regulariser, higher_order_ad, sample_timesteps
from isodiff.model.diffusion import build_flow_scheduler, build_scheduler
from isodiff.model.unet import Denoiser
from isodiff.smoothness import StepVariationRegulariser


class DiffusionObjective(nn.Module):
    """One module for everything a training step differentiates, so that accelerate/DDP wrap
    a single forward (custom methods called on an unwrapped model would bypass DDP).

    The scheduler is the forward process: DDPMScheduler (t: integer timesteps, epsilon
    target) or FlowMatchEulerDiscreteScheduler (t: flow times in [0, 1], velocity target).
    """

    def __init__(
        self,
        unet: Denoiser,
        scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler,
        lambda_iso: float,
        regulariser: Regulariser | StepVariationRegulariser | None = None,
    ) -> None:
        super().__init__()
        self.unet, self.scheduler = unet, scheduler
        self.lambda_iso, self.regulariser = lambda_iso, regulariser

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        iso_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            x_t, target = interpolate(x0, noise, t), velocity_target(x0, noise)
            t = t * self.scheduler.config.num_train_timesteps  # the model's timestep
        else:
            x_t, target = self.scheduler.add_noise(x0, noise, t), noise
        reg = self.regulariser
        active = reg is not None and bool(iso_mask.any())
        smooth = isinstance(reg, StepVariationRegulariser)
        # When every sample is regularised at x_t itself, L_iso differentiates the main
        # forward's h (saves an encoder forward), Smooth Diffusion's term its eps (as the
        # official script reuses its prediction); that graph must then support double backward.
        reuse = active and (bool(iso_mask.all()) if smooth else reg.reuses_h(iso_mask))
        if reuse:
            x_t.requires_grad_()
        with higher_order_ad() if reuse else contextlib.nullcontext():
            eps, h = self.unet.eps_and_h(x_t, t)  # (the velocity, for a flow)
        mse = F.mse_loss(eps.float(), target.float())
        out = {"loss": mse, "mse": mse}
        if active and smooth:
            if reuse:
                iso = reg(self._eps, x_t, t, out=eps, generator=generator)
            else:
                iso = reg(self._eps, x_t[iso_mask], t[iso_mask], generator=generator)
            out.update(loss=mse + self.lambda_iso * iso, iso=iso)
        elif active:
            if reuse:
                iso = reg(self.unet.encode_h, x_t, t, h=h, generator=generator)
            else:
                iso = reg(self.unet.encode_h, x_t[iso_mask], t[iso_mask], generator=generator)
            out.update(loss=mse + self.lambda_iso * iso, iso=iso)
        return out

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The U-Net's eps at (x_t, t): the model Smooth Diffusion's term differentiates."""
        return self.unet.eps_and_h(x_t, t)[0]


def build_regulariser(
    cfg: IsoConfig, alphas_cumprod: torch.Tensor | None = None
) -> Regulariser | StepVariationRegulariser | None:
    """The regulariser named by `iso.metric` (None for metric=none). smooth_diffusion needs
    the noise schedule's alphas_cumprod (its length is weighted by 1 - abar_t); its running
    mean's rate is iso.path_length_decay (the peer's 0.01 by default)."""
    if cfg.metric == IsoMetric.none:
        return None
    if cfg.metric == IsoMetric.smooth_diffusion:
        if alphas_cumprod is None:
            raise ValueError("iso.metric=smooth_diffusion needs the schedule's alphas_cumprod")
        return StepVariationRegulariser(alphas_cumprod, decay=cfg.path_length_decay)
    return Regulariser(
        cfg.metric.value,
        cfg.radius.value,
        cfg.n_probes,
        cfg.probe.value,
        cfg.batch_fraction,
        cfg.path_length_decay,
    )


def build_objective(cfg: TrainConfig, unet: Denoiser) -> DiffusionObjective:
    """The objective of `diffusion.objective` on `unet`, with the regulariser of `iso` (none
    unless cfg.regularised)."""
    if cfg.diffusion.objective == Objective.flow:
        scheduler, alphas = build_flow_scheduler(cfg.diffusion), None  # (config refuses SD)
    else:
        scheduler = build_scheduler(cfg.diffusion)
        alphas = scheduler.alphas_cumprod
    regulariser = build_regulariser(cfg.iso, alphas) if cfg.regularised else None
    return DiffusionObjective(unet, scheduler, cfg.lambda_iso, regulariser)


def draw_timesteps(
    cfg: TrainConfig, batch_size: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """t for one micro-batch and the mask of samples that get the iso loss: integer DDPM
    timesteps uniform on {0..T-1}, window t >= floor(pT) (isometry.sample_timesteps), or flow
    times uniform on [0, 1), window t >= flow_window(p) (flow.sample_flow_timesteps)."""
    flow = cfg.diffusion.objective == Objective.flow
    T, p = cfg.diffusion.num_train_timesteps, cfg.iso.window
    if not cfg.regularised:
        if flow:
            t = torch.rand(batch_size, generator=g)
        else:
            t = torch.randint(0, T, (batch_size,), generator=g)
        return t, torch.zeros(batch_size, dtype=bool)
    if flow:  # p names the paper's noise levels (DDPM's linear schedule): flow_window
        return sample_flow_timesteps(batch_size, flow_window(p), cfg.iso.schedule.value, g)
    return sample_timesteps(batch_size, T, p, cfg.iso.schedule.value, g)


def window_start(cfg: TrainConfig) -> int:
    """The first model timestep the iso loss reaches: floor(pT), or for a flow the first
    integer at or above flow_window(p) T."""
    T, p = cfg.diffusion.num_train_timesteps, cfg.iso.window
    if cfg.diffusion.objective == Objective.flow:
        return min(math.ceil(flow_window(p) * T), T - 1)
    return math.floor(p * T)
