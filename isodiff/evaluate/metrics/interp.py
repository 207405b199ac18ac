"""Interpolation smoothness: LPIPS between adjacent frames of x_T interpolations.

Frames are DDIM samples of path(x0, x1, w) at w = 0, 1/(F-1), ..., 1 (the official script:
11 frames, slerp, DDIM 20 steps, LPIPS-VGG). Per pair: mean, std and max of the F - 1
adjacent distances, and their coefficient of variation std / mean, then averaged over pairs
(values <path>_mean, _std, _max, _cv). The mean and std shrink with any contraction of the
images; cv does not: it is the uniformity of the speed along the path (0 for frames equally
far apart, the flat curve of paper Figure 5). The per-pair curves are kept for the figure
(paper Figure 1 compares lerp and slerp, baseline and regularised), and so are the frames of
the first `keep_frames` pairs, as 8-bit images (the strips of paper Figure 5).

Beside them, the peers' path statistics of the same frames (definitions, citations and
ambiguities in isodiff.evaluate.metrics.interp_stats), each as mean, std (ddof 1) and N over
the pairs (<path>_<stat>, _<stat>_std, _<stat>_n), lower is smoother:
  <path>_istd  ISTD (Smooth Diffusion, CVPR 2024, Sec. 4.1): per pair the std (ddof 0) of
               the pixel-space L2 distances between adjacent frames, images in [0, 1].
  <path>_pdv   PDV (DiffMorpher, CVPR 2024, Sec. 4.4): per pair the variance (ddof 0) of
               the adjacent LPIPS distances, unscaled (the paper's words).
  <path>_ppl   DiffMorpher's PPL: per pair the sum of the adjacent LPIPS distances, unscaled.
The frame count, path and sampler are this metric's config (the peers use 11 and 17 frames,
slerp; Smooth Diffusion samples 50 steps): the protocol records every choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.interp_stats import (
    adjacent_l2,
    istd_per_path,
    mean_std_n,
    path_length_per_path,
    pdv_per_path,
)
from isodiff.evaluate.metrics.result import SLERP_CONVENTION, MetricResult, protocol_of

if TYPE_CHECKING:  # torch loads inside the functions that use it
    import torch

    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.evaluate.metrics.perceptual import Distance

# The keys of common.PATHS (which holds the torch functions; tests keep the two equal)
PATH_NAMES = ("slerp", "lerp")

# Bumped when the values change or grow: stored results are then computed again
# (isodiff.evaluate.measure.values_version). 2: <path>_cv, the uniformity of adjacent distances.
# 3: ISTD, PDV and DiffMorpher's PPL, each as mean, std and N.
VERSION = 3

# ISTD's pixels: images in [0, 1] (Smooth Diffusion's values fit [0, 1] or [-1, 1], not
# 0..255; interp_stats' docstring), so the L2 of the metric's [-1, 1] images is halved.
ISTD_PIXEL_SCALE = 0.5


# The protocol of <path>_istd, _pdv and _ppl (recorded with every result: the peers' papers
# leave these choices open, interp_stats' docstring).
PATH_STATISTICS = {
    "istd": "Smooth Diffusion Sec. 4.1: per pair std (ddof 0) of the pixel-space L2 between "
    "adjacent frames, images in [0, 1] at the data's resolution; mean over pairs",
    "pdv": "DiffMorpher Sec. 4.4: per pair variance (ddof 0) of the adjacent LPIPS "
    "distances (this metric's backbone), unscaled; mean over pairs",
    "ppl": "DiffMorpher Sec. 4.4: per pair sum of the adjacent LPIPS distances, unscaled; "
    "mean over pairs",
    "spread": "<stat>_std: std (ddof 1) of the per-pair values over the pairs; <stat>_n: the pairs",
}


@dataclass
class InterpConfig:
    enabled: bool = True
    pairs: int = 100
    frames: int = 11
    steps: int = 20  # DDIM steps
    net: str = "vgg"  # LPIPS backbone: vgg | alex
    paths: list[str] = field(default_factory=lambda: ["slerp", "lerp"])
    # Pairs whose frames are stored (<path>_frames): in the protocol, so that results
    # stored without frames are recomputed once rather than leave the figure empty.
    keep_frames: int = 4

    def __post_init__(self) -> None:
        if unknown := set(self.paths) - set(PATH_NAMES):
            raise ConfigError(
                f"eval.interp.paths: unknown {sorted(unknown)}; use {list(PATH_NAMES)}"
            )
        if self.frames < 2 or self.pairs < 1 or self.keep_frames < 0:
            raise ConfigError("eval.interp needs frames >= 2, pairs >= 1 and keep_frames >= 0")
        if self.net not in ("vgg", "alex"):
            raise ConfigError(f"eval.interp.net={self.net!r}: use vgg or alex")


def adjacent_distances(frames: torch.Tensor, distance: Distance) -> np.ndarray:
    """frames (P, F, C, H, W) -> distance between frames k and k + 1 of each pair, (P, F-1)."""
    p, f = frames.shape[:2]
    a = frames[:, :-1].reshape(p * (f - 1), *frames.shape[2:])
    b = frames[:, 1:].reshape(p * (f - 1), *frames.shape[2:])
    return distance(a, b).double().numpy().reshape(p, f - 1)


def coefficient_of_variation(d: np.ndarray) -> np.ndarray:
    """std / mean (std with ddof=0) of each row of d (P, F-1); 0 for a row of zeros (a path
    that does not move moves uniformly)."""
    mean, std = d.mean(axis=1), d.std(axis=1)
    return np.divide(std, mean, out=np.zeros_like(std), where=mean > 0)


def smoothness(d: np.ndarray) -> dict[str, float]:
    """Per-pair mean, std, max and coefficient of variation of adjacent distances d (P, F-1),
    averaged over pairs."""
    return {
        "mean": float(d.mean(axis=1).mean()),
        "std": float(d.std(axis=1).mean()),
        "max": float(d.max(axis=1).mean()),
        "cv": float(coefficient_of_variation(d).mean()),
    }


def path_statistics(d_lpips: np.ndarray, d_l2: np.ndarray) -> dict[str, float]:
    """ISTD of the pixel distances d_l2, PDV and DiffMorpher's PPL of the LPIPS distances
    d_lpips (both (P, F-1), one row a pair), each as its mean, std (ddof 1: "mean +- std
    over N"; nan for one pair) and N over the pairs."""
    values = {}
    for name, per_path in (
        ("istd", istd_per_path(d_l2)),
        ("pdv", pdv_per_path(d_lpips)),
        ("ppl", path_length_per_path(d_lpips)),
    ):
        mean, std, n = mean_std_n(per_path)
        values.update({name: mean, f"{name}_std": std, f"{name}_n": float(n)})
    return values


def evaluate(ctx: EvalContext, cfg: InterpConfig) -> MetricResult:
    """Adjacent-frame LPIPS of cfg.pairs interpolations (pair i seeded by (seed, i)), and
    the frames of the first cfg.keep_frames pairs, (P_keep, F, C, H, W) uint8."""
    from isodiff.evaluate.metrics.common import path_points
    from isodiff.model.sampling import quantise

    distance, weights = ctx.lpips(cfg.net)
    ddim = ctx.ddim(cfg.steps)
    values, arrays = {}, {}
    for path in cfg.paths:

        def chunk(rows: range, path: str = path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            x0, x1, _ = ctx.endpoints(rows)
            images = ctx.images(ddim.sample(path_points(x0, x1, cfg.frames, path)).x)
            frames = images.reshape(len(rows), cfg.frames, *images.shape[1:])
            return (
                adjacent_distances(frames, distance),
                adjacent_l2(frames.double().numpy() * ISTD_PIXEL_SCALE),
                quantise(frames[: max(0, cfg.keep_frames - rows.start)]).numpy(),
            )

        parts = ctx.map(
            chunk, cfg.pairs, f"interp {path}", size=max(1, ctx.batch_size // cfg.frames)
        )
        d = np.concatenate([curve for curve, _, _ in parts])
        d_l2 = np.concatenate([l2 for _, l2, _ in parts])
        kept = [frames for _, _, frames in parts]
        values.update({f"{path}_{k}": v for k, v in smoothness(d).items()})
        values.update({f"{path}_{k}": v for k, v in path_statistics(d, d_l2).items()})
        arrays[f"{path}_adjacent"] = d
        arrays[f"{path}_adjacent_l2"] = d_l2
        arrays[f"{path}_frames"] = np.concatenate(kept)
    protocol = {
        **protocol_of(cfg),
        "backbone": f"lpips-v0.1-{cfg.net}",
        "slerp": SLERP_CONVENTION,
        "path_statistics": PATH_STATISTICS,
    }
    return MetricResult(values, protocol, {"weights": weights}, arrays)


METRIC = Metric(
    name="interp",
    config=InterpConfig,
    values=("slerp_", "lerp_"),
    version=VERSION,
    order=4,
    summary=("slerp_mean", "lerp_mean"),
)
