"""mRTL: mean Relative Trajectory Length of slerp paths in h-space (the paper's new metric).

For a pair (x0, x1) of x_T, N + 1 points slerp(x0, x1, k / N) are each followed along their
deterministic DDIM trajectory; h_t(w_k) is the mid-block output at timestep t. Then

    RTL_t = sum_k |h_t(w_{k+1}) - h_t(w_k)| / |h_t(w_N) - h_t(w_0)|   (>= 1; 1 = straight),

and mRTL is the mean over pairs and evaluated timesteps. The paper's exact definition has
not been transcribed (reference/metrics.md): it lives in `relative_trajectory_lengths` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import SLERP_CONVENTION, MetricResult, protocol_of

if TYPE_CHECKING:
    from isodiff.evaluate.metrics.common import EvalContext

WHICH_T = ("all", "T")


@dataclass
class RTLConfig:
    enabled: bool = True
    pairs: int = 100
    segments: int = 10  # N: the path has N + 1 points
    steps: int = 50  # DDIM steps; h is read at every step's timestep
    timesteps: str = "all"  # all: every DDIM step; T: only the first (x_T itself)

    def __post_init__(self) -> None:
        if self.timesteps not in WHICH_T:
            raise ConfigError(f"eval.rtl.timesteps={self.timesteps!r}: use one of {WHICH_T}")
        if self.pairs < 1 or self.segments < 1:
            raise ConfigError("eval.rtl needs pairs >= 1 and segments >= 1")


def relative_trajectory_lengths(paths: np.ndarray) -> np.ndarray:
    """RTL of paths (..., N + 1, D): polyline length over endpoint distance, shape (...)."""
    length = np.linalg.norm(np.diff(paths, axis=-2), axis=-1).sum(axis=-1)
    chord = np.linalg.norm(paths[..., -1, :] - paths[..., 0, :], axis=-1)
    return length / chord


def relative_trajectory_length(path: np.ndarray) -> float:
    """RTL of one path (N + 1, D)."""
    return float(relative_trajectory_lengths(path))


def evaluate(ctx: EvalContext, cfg: RTLConfig) -> MetricResult:
    """RTL_t of cfg.pairs slerp paths (pair i seeded by (seed, i)) at every DDIM step."""
    import torch  # here, not at the top: a config is checked without torch

    from isodiff.evaluate.metrics.common import path_points

    points = cfg.segments + 1
    ddim = ctx.ddim(cfg.steps)
    timesteps = ddim.schedule.timesteps[:1] if cfg.timesteps == "T" else ddim.schedule.timesteps
    pairs_per_batch = max(1, ctx.batch_size // points)

    def chunk(rows: range) -> np.ndarray:
        x0, x1, _ = ctx.endpoints(rows)
        z = path_points(x0, x1, points)
        if cfg.timesteps == "T":
            with torch.no_grad():
                h = ctx.unet.encode_h(z.to(ctx.device), int(timesteps[0])).flatten(1).cpu()[None]
        else:
            h = ddim.sample(z, return_h=True).h
        h = h.double().numpy().reshape(len(timesteps), len(rows), points, -1)
        return relative_trajectory_lengths(h).T  # (pairs, timesteps)

    rtl = np.concatenate(ctx.map(chunk, cfg.pairs, "RTL", size=pairs_per_batch))
    values = {"mrtl": float(rtl.mean()), "rtl_T": float(rtl[:, 0].mean())}
    arrays = {"rtl": rtl, "timesteps": timesteps.numpy()}
    return MetricResult(values, {**protocol_of(cfg), "slerp": SLERP_CONVENTION}, arrays=arrays)


METRIC = Metric(
    name="rtl", config=RTLConfig, values=("mrtl", "rtl_"), order=3, summary=("mrtl", "rtl_T")
)
