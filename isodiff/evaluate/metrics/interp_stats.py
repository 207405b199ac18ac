"""ISTD, PDV and DiffMorpher's PPL of interpolation paths, and mean +- std with N: pure numpy
(arrays in, numbers out). The distances between adjacent frames come from the caller (pixel
L2 via `adjacent_l2`, or LPIPS from isodiff.evaluate.metrics.interp.adjacent_distances), as an array
d of shape (P, F - 1): P paths of F frames each.

ISTD, interpolation standard deviation (Guo et al., "Smooth Diffusion", CVPR 2024, Sec. 4.1
"Evaluation metrics"): 500 MS-COCO validation prompts; per prompt a pair of Gaussian noises
is interpolated "uniformly ... 9 times with mix ratios from 0.1 to 0.9", giving 11 images;
"the standard deviation of L2 distances between every two adjacent images in the pixel
space", then "average the standard deviations over 500 prompts". So: per path the std of
the F - 1 = 10 pixel-space L2 distances (not LPIPS), then the mean over paths, without any
normalisation by the mean distance. Ambiguous in the paper (its code was never released,
SHI-Labs/Smooth-Diffusion#17): the pixel range (the reported values, 38.63 for SD 1.5 and
16.54 for Smooth Diffusion at 512 x 512, fit images in [0, 1] or [-1, 1], not 0..255); the
std's ddof (numpy's default 0 is used here, `ddof`); whether "uniformly interpolate" is lerp
or slerp (its Sec. 4.2 figures use slerp, "Stable Diffusion Walk"); the sampler (50 steps,
guidance 7.5 in its inference settings).

PDV, perceptual distance variance (Zhang et al., "DiffMorpher", CVPR 2024, Sec. 4.4): "the
perceptual loss between consecutive images in 17-frame sequences just like PPL, and then
... the variance of these distances in the sequence. The average distance variance of all
sequences from the test set is taken as the PDV index." So: per path the variance of the
F - 1 = 16 LPIPS distances, then the mean over paths. Its PPL there is "the sum of the
perceptual loss between adjacent images in 17-frame sequences". Ambiguous: the paper's
Table 1 values (PDV up to 302.83, PPL up to 108.51) cannot be raw LPIPS distances (a
variance of values in [0, 1] is at most 0.25, and 16 of them sum to at most 16), so the
authors' script (posted only in Kevin-thu/DiffMorpher#33, of which we could read the image
loading, LPIPS() default AlexNet, images resized to 512 and normalised to [-1, 1], but not
the arithmetic) scales the distances. `scale` multiplies every distance before the sum and
variance (PDV scales by scale^2); with scale = 1 the functions follow the paper's words.
Table 1 fits StyleGAN's d / eps^2 with eps = 1 / (F - 1): PPL = mean(d / eps^2) =
sum(d) (F - 1) (`path_length_per_path(d, scale=F - 1)`) and PDV = var(d / eps^2)
(`pdv(d, scale=(F - 1)**2)`) give plausible LPIPS for DiffMorpher's row (mean ~0.08, std
~0.02); that reading is our guess, not the authors' statement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def _distances(d: np.ndarray | Iterable[Iterable[float]]) -> np.ndarray:
    """d as a float64 (P, F - 1) array with P >= 1 and F - 1 >= 1, finite, non-negative."""
    a = np.asarray(d, dtype=np.float64)
    if a.ndim == 1:  # one path
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"distances: need shape (paths, frames - 1), got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("distances must be finite and non-negative")
    return a


def adjacent_l2(frames: np.ndarray) -> np.ndarray:
    """Pixel-space L2 distance between frames k and k + 1 of each path: frames (P, F, ...)
    -> (P, F - 1). The distance is in the frames' own units (ISTD's pixel range is the
    caller's choice; see the module docstring)."""
    f = np.asarray(frames, dtype=np.float64)
    if f.ndim < 2 or f.shape[1] < 2:
        raise ValueError(f"frames: need shape (paths, frames >= 2, ...), got {f.shape}")
    diff = (f[:, 1:] - f[:, :-1]).reshape(f.shape[0], f.shape[1] - 1, -1)
    return np.sqrt((diff**2).sum(axis=2))


def istd_per_path(d: np.ndarray, ddof: int = 0) -> np.ndarray:
    """Std of each path's adjacent distances (P,) (Smooth Diffusion's per-prompt value)."""
    a = _distances(d)
    if a.shape[1] <= ddof:
        raise ValueError(f"ddof={ddof} needs more than {ddof} distances per path")
    return a.std(axis=1, ddof=ddof)


def istd(d: np.ndarray, ddof: int = 0) -> float:
    """ISTD: the per-path std of adjacent (pixel L2) distances, averaged over paths."""
    return float(istd_per_path(d, ddof).mean())


def pdv_per_path(d: np.ndarray, scale: float = 1.0, ddof: int = 0) -> np.ndarray:
    """Variance of each path's adjacent (LPIPS) distances times `scale` (P,)."""
    a = _distances(d)
    if a.shape[1] <= ddof:
        raise ValueError(f"ddof={ddof} needs more than {ddof} distances per path")
    return (a * scale).var(axis=1, ddof=ddof)


def pdv(d: np.ndarray, scale: float = 1.0, ddof: int = 0) -> float:
    """PDV: the per-path variance of adjacent perceptual distances, averaged over paths."""
    return float(pdv_per_path(d, scale, ddof).mean())


def path_length_per_path(d: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """DiffMorpher's PPL per path: the sum of its adjacent distances times `scale` (P,)."""
    return (_distances(d) * scale).sum(axis=1)


def mean_std_n(values: np.ndarray | Iterable[float], ddof: int = 1) -> tuple[float, float, int]:
    """(mean, std, N) of per-path (or per-seed) values, the std with `ddof` (1: the sample
    std, what "mean +- std over N" reports); std is nan for N <= ddof."""
    v = np.asarray(
        list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64
    ).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_std_n: no values")
    if not np.isfinite(v).all():
        raise ValueError("mean_std_n: values must be finite")
    std = float(v.std(ddof=ddof)) if v.size > ddof else math.nan
    return float(v.mean()), std, int(v.size)


def format_mean_std_n(values: np.ndarray | Iterable[float], digits: int = 2, ddof: int = 1) -> str:
    """ "mean ± std (N=n)" of the values, as a table cell."""
    mean, std, n = mean_std_n(values, ddof)
    return f"{mean:.{digits}f} ± {std:.{digits}f} (N={n})"
