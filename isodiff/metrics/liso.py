"""Held-out L_iso: how isometric x_t -> h is on data the model was not trained on.

The regulariser's own quantity (isometry.py), measured the same way for every run, the
control included: held-out x_0 (test split) noised to q(x_t | x_0) with per-sample noise at
each configured t, then L_iso with the spherical metric and `probes` Gaussian probes per
sample (ratio of means over the n samples at one t). `liso_t<t>` per timestep, `liso` their
mean, and `liso_scaled` = (n_x - 1) * liso: 1 for an exact scaled isometry on the
(n_x - 1)-dimensional tangent space (L_iso >= 1 / rank J), larger the less isometric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from isodiff.config import ConfigError
from isodiff.diffusion import build_scheduler
from isodiff.isometry import higher_order_ad, isometry_terms
from isodiff.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.sampling import SampleRNG


@dataclass
class LisoConfig:
    enabled: bool = True
    n: int = 64  # held-out images
    timesteps: list[int] = field(default_factory=lambda: [500, 750, 999])
    probes: int = 4

    def __post_init__(self) -> None:
        if self.n < 1 or self.probes < 1 or not self.timesteps:
            raise ConfigError("eval.liso needs n >= 1, probes >= 1 and some timesteps")


def evaluate(ctx: EvalContext, cfg: LisoConfig) -> MetricResult:
    """L_iso (spherical) of the evaluated U-Net's h-encoder at held-out x_t, per timestep."""
    x_0 = ctx.real_codes("test", cfg.n, "eval.liso.n")
    rng = SampleRNG(ctx.seed, range(cfg.n))
    noise, probes = rng.randn(*ctx.x_shape), rng.randn(cfg.probes, *ctx.x_shape)
    alphas = build_scheduler(ctx.diffusion).alphas_cumprod.double()
    values = {}
    for t in cfg.timesteps:
        if not 0 <= t < ctx.diffusion.num_train_timesteps:
            raise ConfigError(f"eval.liso.timesteps: t={t} is outside [0, T)")
        a = float(alphas[t])
        def chunk(rows: range, a: float = a, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
            x = (a ** 0.5 * x_0[rows.start:rows.stop] + (1 - a) ** 0.5
                 * noise[rows.start:rows.stop]).float().to(ctx.device).requires_grad_()
            v = probes[rows.start:rows.stop].transpose(0, 1).to(ctx.device)
            with higher_order_ad():
                terms = isometry_terms(ctx.unet.encode_h(x, t), x, v, metric="spherical")
            return terms[0].detach().double().cpu(), terms[1].detach().double().cpu()

        parts = ctx.map(chunk, cfg.n, f"L_iso t={t}")
        num, den = [p[0] for p in parts], [p[1] for p in parts]
        values[f"liso_t{t}"] = float(torch.cat(num, 1).mean() / torch.cat(den, 1).mean() ** 2)
    values["liso"] = float(np.mean([values[f"liso_t{t}"] for t in cfg.timesteps]))
    values["liso_scaled"] = values["liso"] * (int(np.prod(ctx.x_shape)) - 1)
    protocol = {**protocol_of(cfg), "metric": "spherical", "x_t": "q(x_t|x_0), test split"}
    return MetricResult(values, protocol)
