"""Interpolation smoothness: LPIPS between adjacent frames of x_T interpolations.

Frames are DDIM samples of path(x0, x1, w) at w = 0, 1/(F-1), ..., 1 (the official script:
11 frames, slerp, DDIM 20 steps, LPIPS-VGG). Per pair: mean, std and max of the F - 1
adjacent distances, and their coefficient of variation std / mean, then averaged over pairs
(values <path>_mean, _std, _max, _cv). The mean and std shrink with any contraction of the
images; cv does not: it is the uniformity of the speed along the path (0 for frames equally
far apart, the flat curve of paper Figure 5). The per-pair curves are kept for the figure
(paper Figure 1 compares lerp and slerp, baseline and regularised), and so are the frames of
the first `keep_frames` pairs, as 8-bit images (the strips of paper Figure 5).
"""

from __future__ import annotations

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

# The keys of common.PATHS (which holds the torch functions; tests keep the two equal)
PATH_NAMES = ("slerp", "lerp")

# Bumped when the values change or grow: stored results are then computed again
# (isodiff.evaluate.measure.values_version). 2: <path>_cv, the uniformity of adjacent distances.
VERSION = 2


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
            raise ConfigError(f"eval.interp.paths: unknown {sorted(unknown)}; "
                              f"use {list(PATH_NAMES)}")
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
    return {"mean": float(d.mean(axis=1).mean()), "std": float(d.std(axis=1).mean()),
            "max": float(d.max(axis=1).mean()), "cv": float(coefficient_of_variation(d).mean())}


def evaluate(ctx: EvalContext, cfg: InterpConfig) -> MetricResult:
    """Adjacent-frame LPIPS of cfg.pairs interpolations (pair i seeded by (seed, i)), and
    the frames of the first cfg.keep_frames pairs, (P_keep, F, C, H, W) uint8."""
    from isodiff.evaluate.metrics.common import path_points
    from isodiff.model.sampling import quantise

    distance, weights = ctx.lpips(cfg.net)
    ddim = ctx.ddim(cfg.steps)
    values, arrays = {}, {}
    for path in cfg.paths:
        def chunk(rows: range, path: str = path) -> tuple[np.ndarray, np.ndarray]:
            x0, x1, _ = ctx.endpoints(rows)
            images = ctx.images(ddim.sample(path_points(x0, x1, cfg.frames, path)).x)
            frames = images.reshape(len(rows), cfg.frames, *images.shape[1:])
            return (adjacent_distances(frames, distance),
                    quantise(frames[:max(0, cfg.keep_frames - rows.start)]).numpy())

        parts = ctx.map(chunk, cfg.pairs, f"interp {path}",
                        size=max(1, ctx.batch_size // cfg.frames))
        d = np.concatenate([curve for curve, _ in parts])
        kept = [frames for _, frames in parts]
        values.update({f"{path}_{k}": v for k, v in smoothness(d).items()})
        arrays[f"{path}_adjacent"] = d
        arrays[f"{path}_frames"] = np.concatenate(kept)
    protocol = {**protocol_of(cfg), "backbone": f"lpips-v0.1-{cfg.net}",
                "slerp": SLERP_CONVENTION}
    return MetricResult(values, protocol, {"weights": weights}, arrays)


METRIC = Metric(name="interp", config=InterpConfig, values=("slerp_", "lerp_"),
                version=VERSION, order=4)
