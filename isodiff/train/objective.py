"""The training objective: epsilon-prediction MSE + lambda_iso * L_iso (Hahm et al., eq. 10)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from isodiff.config import IsoConfig, IsoMetric
from isodiff.isometry import Regulariser, higher_order_ad
from isodiff.model.unet import Denoiser


class DiffusionObjective(nn.Module):
    """One module for everything a training step differentiates, so that accelerate/DDP wrap
    a single forward (custom methods called on an unwrapped model would bypass DDP)."""

    def __init__(
        self,
        unet: Denoiser,
        scheduler: DDPMScheduler,
        lambda_iso: float,
        regulariser: Regulariser | None = None,
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
        # When every sample is regularised at x_t itself, L_iso differentiates the main
        # forward's h (saves an encoder forward); that graph must then support double backward.
        reuse = active and reg.reuses_h(iso_mask)
        if reuse:
            x_t.requires_grad_()
        with higher_order_ad() if reuse else contextlib.nullcontext():
            eps, h = self.unet.eps_and_h(x_t, t)
        mse = F.mse_loss(eps.float(), noise.float())
        out = {"loss": mse, "mse": mse}
        if active:
            if reuse:
                iso = reg(self.unet.encode_h, x_t, t, h=h, generator=generator)
            else:
                iso = reg(self.unet.encode_h, x_t[iso_mask], t[iso_mask], generator=generator)
            out.update(loss=mse + self.lambda_iso * iso, iso=iso)
        return out


def build_regulariser(cfg: IsoConfig) -> Regulariser | None:
    """The regulariser named by `iso.metric` (None for metric=none)."""
    if cfg.metric == IsoMetric.none:
        return None
    return Regulariser(
        cfg.metric.value,
        cfg.radius.value,
        cfg.n_probes,
        cfg.probe.value,
        cfg.batch_fraction,
        cfg.path_length_decay,
    )
