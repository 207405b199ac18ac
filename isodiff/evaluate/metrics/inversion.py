"""Inversion and reconstruction: DDIM-invert held-out real images to x_T, regenerate them.

MSE and PSNR on the [0, 1] scale (PSNR per image, then averaged) and LPIPS between each
source image and its reconstruction; deterministic, so no seed is involved. The first
`keep_images` sources and their reconstructions are kept as 8-bit images (paper Figure 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import MetricResult, protocol_of

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch

    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.evaluate.metrics.perceptual import Distance


@dataclass
class InversionConfig:
    enabled: bool = True
    n: int = 100  # held-out (test split) images
    steps: int = 50  # DDIM steps, the same for inversion and regeneration
    net: str = "alex"  # LPIPS backbone: alex | vgg
    # Images stored as `sources` / `reconstructions`: in the protocol, so that results
    # stored without them are recomputed once rather than leave the figure empty.
    keep_images: int = 8

    def __post_init__(self) -> None:
        if self.n < 1 or self.keep_images < 0:
            raise ConfigError("eval.inversion needs n >= 1 and keep_images >= 0")
        if self.net not in ("vgg", "alex"):
            raise ConfigError(f"eval.inversion.net={self.net!r}: use vgg or alex")


def reconstruction_errors(
    x: torch.Tensor, x_rec: torch.Tensor, distance: Distance
) -> dict[str, np.ndarray]:
    """Per-image MSE and PSNR (images in [-1, 1], measured on [0, 1]) and LPIPS."""
    import torch

    mse = ((x - x_rec) / 2).pow(2).flatten(1).mean(1).double()
    return {
        "mse": mse.numpy(),
        "psnr": (-10 * torch.log10(mse)).numpy(),
        "lpips": distance(x, x_rec).double().numpy(),
    }


def evaluate(ctx: EvalContext, cfg: InversionConfig) -> MetricResult:
    """Errors of the first cfg.n test images, and the first cfg.keep_images of them with
    their reconstructions, (K, C, H, W) uint8."""
    from isodiff.model.sampling import quantise

    distance, weights = ctx.lpips(cfg.net)
    ddim = ctx.ddim(cfg.steps)

    def chunk(rows: range) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        x = ctx.real_images("test", rows, cfg.n, "eval.inversion.n")
        x_rec = ctx.images(ddim.sample(ddim.invert(ctx.codec.encode(x)).x).x)
        keep = max(0, cfg.keep_images - rows.start)
        return (
            reconstruction_errors(x, x_rec, distance),
            quantise(x[:keep]).numpy(),
            quantise(x_rec[:keep]).numpy(),
        )

    chunks = ctx.map(chunk, cfg.n, "test images")
    parts, sources, reconstructions = (list(column) for column in zip(*chunks, strict=True))
    errors = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    values = {k: float(v.mean()) for k, v in errors.items()}
    images = {
        "sources": np.concatenate(sources),
        "reconstructions": np.concatenate(reconstructions),
    }
    protocol = {**protocol_of(cfg), "backbone": f"lpips-v0.1-{cfg.net}", "split": "test"}
    return MetricResult(values, protocol, {"weights": weights}, {**errors, **images})


METRIC = Metric(
    name="inversion",
    config=InversionConfig,
    values=("mse", "psnr", "lpips"),
    higher_is_better=("psnr",),
    order=7,
    summary=("mse", "psnr", "lpips"),
)
