"""The training objective: epsilon-prediction MSE + lambda_iso * L_iso (Hahm et al., eq. 10),
or lambda_iso times a baseline regulariser in L_iso's place (`iso.metric`).

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

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from isodiff.config import IsoConfig, IsoMetric
from isodiff.isometry import Regulariser, higher_order_ad
from isodiff.model.unet import Denoiser
from isodiff.smoothness import StepVariationRegulariser


class DiffusionObjective(nn.Module):
    """One module for everything a training step differentiates, so that accelerate/DDP wrap
    a single forward (custom methods called on an unwrapped model would bypass DDP)."""

    def __init__(
        self,
        unet: Denoiser,
        scheduler: DDPMScheduler,
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
        x_t = self.scheduler.add_noise(x0, noise, t)
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
            eps, h = self.unet.eps_and_h(x_t, t)
        mse = F.mse_loss(eps.float(), noise.float())
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
