"""Perceptual path length (StyleGAN, Karras et al. 2019, sec. 3; adapted to x_T of DDIM).

Per sample: x0, x1 ~ N(0, I) and w ~ U(0, 1) from the sample's own generator;
d = LPIPS(g(slerp(x0, x1, w)), g(slerp(x0, x1, w + eps))) / eps^2 with g = DDIM sampling.
Variants, both computed on the same image pairs:
  stylegan:        LPIPS-VGG; drop d outside the per-sample 1st..99th percentiles; mean.
  isodiff_compat:  the official isodiff helper: LPIPS-AlexNet; percentiles over the means of
                   consecutive batches of `compat_batch` samples; mean of those kept.
`crop` applies StyleGAN's crop for aligned faces; images above 256 px are box-downsampled to
256 first, as StyleGAN does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from isodiff.config import ConfigError
from isodiff.geometry import slerp
from isodiff.metrics.common import SLERP_CONVENTION, EvalContext, MetricResult, protocol_of
from isodiff.metrics.perceptual import Distance

VARIANT_NET = {"stylegan": "vgg", "isodiff_compat": "alex"}


@dataclass
class PPLConfig:
    enabled: bool = True
    n: int = 10_000
    steps: int = 50  # DDIM steps
    epsilon: float = 1e-4
    crop: bool = False  # StyleGAN's face crop (aligned faces only)
    variants: list[str] = field(default_factory=lambda: ["stylegan", "isodiff_compat"])
    compat_batch: int = 16  # isodiff_compat: samples per batch mean

    def __post_init__(self) -> None:
        if unknown := set(self.variants) - set(VARIANT_NET):
            raise ConfigError(f"eval.ppl.variants: unknown {sorted(unknown)}; "
                              f"use {list(VARIANT_NET)}")
        if not 0 < self.epsilon < 1 or self.n < 2 or self.compat_batch < 1:
            raise ConfigError("eval.ppl needs 0 < epsilon < 1, n >= 2 and compat_batch >= 1")


def percentile_mean(d: np.ndarray) -> float:
    """Mean of d within its 1st..99th percentiles (StyleGAN's outlier filter)."""
    lo = np.percentile(d, 1, method="lower")
    hi = np.percentile(d, 99, method="higher")
    return float(d[(d >= lo) & (d <= hi)].mean())


def batch_mean_percentile_mean(d: np.ndarray, batch: int) -> float:
    """The official isodiff helper's filter: the same percentile rule over batch means."""
    means = np.array([chunk.mean() for chunk in np.array_split(d, range(batch, len(d), batch))])
    return percentile_mean(means)


def face_crop(images: torch.Tensor) -> torch.Tensor:
    """StyleGAN's PPL crop of aligned faces: rows 3/8..7/8, columns 2/8..6/8."""
    c = images.shape[-1] // 8
    return images[..., c * 3: c * 7, c * 2: c * 6]


def downsample_to_256(images: torch.Tensor) -> torch.Tensor:
    """Box-downsample by an integer factor to at most 256 px (StyleGAN)."""
    factor = images.shape[-1] // 256
    return F.avg_pool2d(images, factor) if factor > 1 else images


def path_lengths(generate: Callable[[torch.Tensor], torch.Tensor],
                 distances: dict[str, Distance], x0: torch.Tensor, x1: torch.Tensor,
                 w: torch.Tensor, epsilon: float, crop: bool = False) -> dict[str, np.ndarray]:
    """d = distance(g(slerp(x0, x1, w)), g(slerp(x0, x1, w + eps))) / eps^2 per sample, for
    each named distance; g = `generate`, w (B,)."""
    images = generate(torch.cat([slerp(x0, x1, w), slerp(x0, x1, w + epsilon)]))
    images = downsample_to_256(face_crop(images) if crop else images)
    a, b = images.chunk(2)
    return {name: distance(a, b).double().numpy() / epsilon ** 2
            for name, distance in distances.items()}


def evaluate(ctx: EvalContext, cfg: PPLConfig) -> MetricResult:
    """PPL over cfg.n samples (x0, x1, w of sample i seeded by (seed, i))."""
    ddim = ctx.ddim(cfg.steps)
    loaded = {v: ctx.lpips(VARIANT_NET[v]) for v in cfg.variants}
    distances = {v: distance for v, (distance, _) in loaded.items()}

    def generate(z: torch.Tensor) -> torch.Tensor:
        return ctx.images(ddim.sample(z).x)

    def chunk(rows: range) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x0, x1, rng = ctx.endpoints(rows)
        w = rng.rand().reshape(-1)
        return path_lengths(generate, distances, x0, x1, w, cfg.epsilon, cfg.crop), w.numpy()

    parts = ctx.map(chunk, cfg.n, "PPL", size=max(1, ctx.batch_size // 2))
    d_all = {v: np.concatenate([d[v] for d, _ in parts]) for v in cfg.variants}
    ws = [w for _, w in parts]
    values = {}
    if "stylegan" in d_all:
        values["ppl_stylegan"] = percentile_mean(d_all["stylegan"])
    if "isodiff_compat" in d_all:
        values["ppl_isodiff_compat"] = batch_mean_percentile_mean(d_all["isodiff_compat"],
                                                                  cfg.compat_batch)
    protocol = {**protocol_of(cfg), "backbones": {v: f"lpips-v0.1-{VARIANT_NET[v]}"
                                                  for v in cfg.variants}, "path": "slerp",
                "slerp": SLERP_CONVENTION,
                "departure": "images clamped to [-1, 1] before LPIPS (what an image file "
                             "holds); StyleGAN feeds the generator's raw output"}
    provenance = {"weights": {v: weights for v, (_, weights) in loaded.items()}}
    arrays = {**{f"d_{v}": x for v, x in d_all.items()}, "w": np.concatenate(ws)}
    return MetricResult(values, protocol, provenance, arrays)
