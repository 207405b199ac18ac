"""Held-out L_iso: how isometric x_t -> h is on data the model was not trained on.

The regulariser's own quantity (isometry.py), measured the same way for every run, the
control included: held-out x_0 (test split) noised to q(x_t | x_0) with per-sample noise at
each configured t (a flow model's own x_t at timestep t, (1 - t/T) x_0 + (t/T) noise: not
DDPM's noise level at the same t), then L_iso with the spherical metric and `probes`
Gaussian probes per sample (ratio of means over the n samples at one t). `liso_t<t>` per
timestep, `liso` their mean, and `liso_scaled` = r * liso with r = min(n_x - 1, m), the
largest rank J can have (n_x - 1 tangent directions, m = h's size): L_iso >= 1 / rank J,
so 1 is the best a map into h can do (a scaled isometry on the tangent space when
m >= n_x - 1; equal gain on the directions it keeps when h is compressive), larger the less
isometric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import MetricResult, protocol_of

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch

    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.model.diffusion import Noising

# 2: scaled by min(n_x - 1, m) instead of n_x - 1 (the two differ once h is compressive)
VERSION = 2


@dataclass
class LisoConfig:
    enabled: bool = True
    n: int = 64  # held-out images
    timesteps: list[int] = field(default_factory=lambda: [500, 750, 999])
    probes: int = 4

    def __post_init__(self) -> None:
        if self.n < 1 or self.probes < 1 or not self.timesteps:
            raise ConfigError("eval.liso needs n >= 1, probes >= 1 and some timesteps")


def max_rank(n_x: int, m: int) -> int:
    """The largest rank dh/dx_t can have on the (n_x - 1)-dimensional tangent space."""
    return min(n_x - 1, m)


def liso_terms(
    encode_h: Callable[[torch.Tensor, int], torch.Tensor],
    x_t: torch.Tensor,
    probes: torch.Tensor,
    t: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L_iso's numerator and denominator terms (probes x samples, float64 on the CPU) of the
    spherical metric at x_t, and h's size. probes: (samples, probes, *x)."""
    from isodiff.isometry import higher_order_ad, isometry_terms

    x = x_t.float().to(device).requires_grad_()
    v = probes.transpose(0, 1).to(device)
    with higher_order_ad():
        h = encode_h(x, t)
        num, den = isometry_terms(h, x, v, metric="spherical")[:2]
    return num.detach().double().cpu(), den.detach().double().cpu(), h[0].numel()


def heldout_liso(
    encode_h: Callable[[torch.Tensor, int], torch.Tensor],
    x_0: torch.Tensor,
    seed: int,
    timesteps: list[int],
    noising: Noising,
    probes: int = 2,
    device: torch.device | str = "cpu",
) -> float:
    """liso_scaled of encode_h on the held-out x_0, in one batch (the training loop's curve;
    the metric is the same quantity over more images, in chunks). noising: the run's
    forward process (isodiff.model.diffusion.noising)."""
    from isodiff.model.sampling import SampleRNG

    rng = SampleRNG(seed, range(len(x_0)))
    noise, v = rng.randn(*x_0.shape[1:]), rng.randn(probes, *x_0.shape[1:])
    per_t, m = [], 0
    for t in timesteps:
        num, den, m = liso_terms(encode_h, noising(x_0, noise, t), v, t, device)
        per_t.append(float(num.mean() / den.mean() ** 2))
    return float(np.mean(per_t)) * max_rank(x_0[0].numel(), m)


def evaluate(ctx: EvalContext, cfg: LisoConfig) -> MetricResult:
    """L_iso (spherical) of the evaluated U-Net's h-encoder at held-out x_t, per timestep."""
    import torch

    from isodiff.model.diffusion import noising
    from isodiff.model.sampling import SampleRNG

    x_0 = ctx.real_codes("test", cfg.n, "eval.liso.n")
    rng = SampleRNG(ctx.seed, range(cfg.n))
    noise, probes = rng.randn(*ctx.x_shape), rng.randn(cfg.probes, *ctx.x_shape)
    x_t_of = noising(ctx.diffusion)
    values, h_size = {}, []
    for t in cfg.timesteps:
        if not 0 <= t < ctx.diffusion.num_train_timesteps:
            raise ConfigError(f"eval.liso.timesteps: t={t} is outside [0, T)")

        def chunk(rows: range, t: int = t) -> tuple[torch.Tensor, torch.Tensor]:
            num, den, m = liso_terms(
                ctx.unet.encode_h,
                x_t_of(x_0[rows.start : rows.stop], noise[rows.start : rows.stop], t),
                probes[rows.start : rows.stop],
                t,
                ctx.device,
            )
            h_size.append(m)
            return num, den

        parts = ctx.map(chunk, cfg.n, f"L_iso t={t}")
        num, den = [p[0] for p in parts], [p[1] for p in parts]
        values[f"liso_t{t}"] = float(torch.cat(num, 1).mean() / torch.cat(den, 1).mean() ** 2)
    values["liso"] = float(np.mean([values[f"liso_t{t}"] for t in cfg.timesteps]))
    values["liso_scaled"] = values["liso"] * max_rank(int(np.prod(ctx.x_shape)), h_size[0])
    protocol = {
        **protocol_of(cfg),
        "metric": "spherical",
        "x_t": "q(x_t|x_0), test split",
        "scale": "min(n_x - 1, m)",
    }
    return MetricResult(values, protocol)


METRIC = Metric(
    name="liso",
    config=LisoConfig,
    values=("liso",),
    version=VERSION,
    order=9,
    summary=("liso", "liso_scaled"),
)
