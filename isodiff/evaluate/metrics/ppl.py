"""Perceptual path length (StyleGAN, Karras et al. 2019, sec. 3; adapted to x_T of DDIM).

Per sample: x0, x1 ~ N(0, I) and w ~ U(0, 1) from the sample's own generator;
d = LPIPS(g(slerp(x0, x1, w)), g(slerp(x0, x1, w + eps))) / eps^2 with g = DDIM sampling.
Variants, both computed on the same image pairs:
  stylegan:        LPIPS-VGG; drop d outside the per-sample 1st..99th percentiles; mean.
  isodiff_compat:  the official isodiff helper: LPIPS-AlexNet; percentiles over the means of
                   consecutive batches of `compat_batch` samples; mean of those kept.
`crop` applies StyleGAN's crop for aligned faces; images above 256 px are box-downsampled to
256 first, as StyleGAN does.

PPL alone rewards contraction: a model that maps every x_T to nearly the same image has a
small PPL. Beside each variant, on the same images and with the variant's backbone:
  ppl_<variant>_diversity      mean LPIPS between the images g(slerp(x0, x1, w)) of samples
                               2k and 2k + 1 (independent samples, so a random pair; no extra
                               sampling; an odd last sample is left unpaired). Higher is more
                               diverse.
  ppl_<variant>_per_diversity  ppl_<variant> / ppl_<variant>_diversity: path length in units
                               of the distance between two samples, which a uniform
                               contraction leaves unchanged to first order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import SLERP_CONVENTION, MetricResult, protocol_of

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch

    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.evaluate.metrics.perceptual import Distance

VARIANT_NET = {"stylegan": "vgg", "isodiff_compat": "alex"}


# Bumped when the values change or grow: stored results are then computed again
# (isodiff.evaluate.measure.values_version). 2: the samples' diversity beside PPL.
VERSION = 2


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
            raise ConfigError(
                f"eval.ppl.variants: unknown {sorted(unknown)}; use {list(VARIANT_NET)}"
            )
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
    return images[..., c * 3 : c * 7, c * 2 : c * 6]


def downsample_to_256(images: torch.Tensor) -> torch.Tensor:
    """Box-downsample by an integer factor to at most 256 px (StyleGAN)."""
    import torch.nn.functional as F

    factor = images.shape[-1] // 256
    return F.avg_pool2d(images, factor) if factor > 1 else images


def path_images(
    generate: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    x1: torch.Tensor,
    w: torch.Tensor,
    epsilon: float,
    crop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g(slerp(x0, x1, w)), g(slerp(x0, x1, w + eps))), cropped and downsampled as LPIPS
    sees them; g = `generate`, w (B,)."""
    import torch

    from isodiff.geometry import slerp

    images = generate(torch.cat([slerp(x0, x1, w), slerp(x0, x1, w + epsilon)]))
    images = downsample_to_256(face_crop(images) if crop else images)
    a, b = images.chunk(2)
    return a, b


def path_lengths(
    generate: Callable[[torch.Tensor], torch.Tensor],
    distances: dict[str, Distance],
    x0: torch.Tensor,
    x1: torch.Tensor,
    w: torch.Tensor,
    epsilon: float,
    crop: bool = False,
) -> dict[str, np.ndarray]:
    """d = distance(g(slerp(x0, x1, w)), g(slerp(x0, x1, w + eps))) / eps^2 per sample, for
    each named distance; g = `generate`, w (B,)."""
    return step_lengths(*path_images(generate, x0, x1, w, epsilon, crop), distances, epsilon)


def step_lengths(
    a: torch.Tensor, b: torch.Tensor, distances: dict[str, Distance], epsilon: float
) -> dict[str, np.ndarray]:
    """distance(a, b) / eps^2 per image pair, for each named distance."""
    return {
        name: distance(a, b).double().numpy() / epsilon**2 for name, distance in distances.items()
    }


def pair_distances(images: torch.Tensor, distances: dict[str, Distance]) -> dict[str, np.ndarray]:
    """distance(images[2k], images[2k + 1]) for each named distance, (B // 2,); an odd last
    image is left out."""
    pairs = len(images) // 2
    a, b = images[0 : 2 * pairs : 2], images[1 : 2 * pairs : 2]
    return {name: distance(a, b).double().numpy() for name, distance in distances.items()}


def per_diversity(ppl: float, diversity: float) -> float:
    """PPL in units of the distance between two random samples (inf if they are all equal)."""
    return ppl / diversity if diversity > 0 else float("inf")


def evaluate(ctx: EvalContext, cfg: PPLConfig) -> MetricResult:
    """PPL over cfg.n samples (x0, x1, w of sample i seeded by (seed, i))."""
    ddim = ctx.ddim(cfg.steps)
    loaded = {v: ctx.lpips(VARIANT_NET[v]) for v in cfg.variants}
    distances = {v: distance for v, (distance, _) in loaded.items()}

    def generate(z: torch.Tensor) -> torch.Tensor:
        return ctx.images(ddim.sample(z).x)

    def chunk(rows: range) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        x0, x1, rng = ctx.endpoints(rows)
        w = rng.rand().reshape(-1)
        a, b = path_images(generate, x0, x1, w, cfg.epsilon, cfg.crop)
        return step_lengths(a, b, distances, cfg.epsilon), w.numpy(), pair_distances(a, distances)

    # Two images a sample; an even chunk size starts every chunk at an even sample, so the
    # diversity pairs (2k, 2k + 1) do not depend on the batch size.
    parts = ctx.map(chunk, cfg.n, "PPL", size=max(2, ctx.batch_size // 4 * 2))
    d_all = {v: np.concatenate([d[v] for d, _, _ in parts]) for v in cfg.variants}
    ws = [w for _, w, _ in parts]
    pairs = {v: np.concatenate([p[v] for _, _, p in parts]) for v in cfg.variants}
    values = {}
    if "stylegan" in d_all:
        values["ppl_stylegan"] = percentile_mean(d_all["stylegan"])
    if "isodiff_compat" in d_all:
        values["ppl_isodiff_compat"] = batch_mean_percentile_mean(
            d_all["isodiff_compat"], cfg.compat_batch
        )
    for v in cfg.variants:
        diversity = float(pairs[v].mean())
        values[f"ppl_{v}_diversity"] = diversity
        values[f"ppl_{v}_per_diversity"] = per_diversity(values[f"ppl_{v}"], diversity)
    protocol = {
        **protocol_of(cfg),
        "backbones": {v: f"lpips-v0.1-{VARIANT_NET[v]}" for v in cfg.variants},
        "path": "slerp",
        "slerp": SLERP_CONVENTION,
        "departure": "images clamped to [-1, 1] before LPIPS (what an image file "
        "holds); StyleGAN feeds the generator's raw output",
        "diversity": "ppl_<variant>_diversity: mean LPIPS (the variant's backbone) "
        "between the images at w of samples 2k and 2k + 1; "
        "ppl_<variant>_per_diversity = ppl_<variant> / diversity",
    }
    provenance = {"weights": {v: weights for v, (_, weights) in loaded.items()}}
    arrays = {
        **{f"d_{v}": x for v, x in d_all.items()},
        "w": np.concatenate(ws),
        **{f"pairs_{v}": x for v, x in pairs.items()},
    }
    return MetricResult(values, protocol, provenance, arrays)


METRIC = Metric(
    name="ppl",
    config=PPLConfig,
    values=("ppl_",),
    # the diversity beside PPL (not ppl_<variant>_per_diversity: lower)
    higher_is_better=("ppl_stylegan_diversity", "ppl_isodiff_compat_diversity"),
    version=VERSION,
    order=2,
    summary=("ppl_stylegan", "ppl_isodiff_compat"),
)
