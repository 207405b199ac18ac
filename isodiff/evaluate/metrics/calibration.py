"""Every read-out beside its floor and its ceiling, computed in the same run.

A number that says how well a code carries its labels means little alone: at a few hundred
rows and a thousand dimensions a read-out can score well above zero on a code that knows
nothing. So each read-out X is also computed
- on the same code with the labels permuted across rows (the floor: what X gives when the
  code is independent of the labels; `X_floor` its mean over a few permutations, `X_floor_sd`
  their spread), and
- on a planted code of the same n, d and spectrum (the ceiling: the labels' encodings as its
  leading axes, the other axes noise, `X_ceiling`), and on that code randomly rotated
  (`X_ceiling_rot`): a rotation-invariant read-out keeps its ceiling there, one that rewards
  axis alignment (DCI's D and C, MIG) loses it.
A value within `FLOOR_SDS` standard deviations of its floor is not told apart from no
information (`within_floor`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Readout = Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (codes, labels) -> values
FLOOR_SDS = 2.0  # ~95 % of a Gaussian null lies within 2 s.d. of its mean


def permutation_floor(
    readout: Readout, codes: np.ndarray, labels: np.ndarray, permutations: int, seed: int
) -> dict[str, float]:
    """`X_floor` (mean) and `X_floor_sd` (s.d., ddof 1; 0 for one permutation) of every
    value X of readout(codes, labels[perm]) over `permutations` seeded row permutations, the
    labels' columns permuted together (their joint distribution is kept)."""
    if permutations < 1:
        raise ValueError(f"permutations={permutations}: use >= 1")
    rng = np.random.default_rng(seed)
    runs = [readout(codes, labels[rng.permutation(len(labels))]) for _ in range(permutations)]
    floor = {}
    for key in runs[0]:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        floor[f"{key}_floor"] = float(np.mean(values))
        floor[f"{key}_floor_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return floor


def spectrum(codes: np.ndarray) -> np.ndarray:
    """The s.d. of the codes (n, d) along each of their principal axes, decreasing, (d,)
    (zeros past their rank)."""
    centred = codes - codes.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False) / np.sqrt(max(len(codes) - 1, 1))
    return np.pad(s, (0, codes.shape[1] - len(s)))


def planted_code(codes: np.ndarray, encodings: np.ndarray, seed: int) -> np.ndarray:
    """A perfect code with the codes' shape and spectrum: axis i has the s.d. of the codes'
    i-th principal axis; the labels' q encoding columns, standardised, are the first q
    (leading) axes, and the rest are Gaussian noise, independent of the labels. A code whose
    main variation is the factors, each on an axis of its own."""
    n, d = codes.shape
    q = encodings.shape[1]
    if q > d:
        raise ValueError(f"a planted code needs d >= q: the code has {d} dims, the labels {q}")
    axes = np.random.default_rng(seed).standard_normal((n, d))
    sd = encodings.std(axis=0, ddof=1)  # as spectrum's
    axes[:, :q] = (encodings - encodings.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return axes * spectrum(codes)


def random_rotation(codes: np.ndarray, seed: int, max_dims: int = 2048) -> np.ndarray:
    """The codes under a Haar-random rotation. Above max_dims dims only the first max_dims
    axes are mixed (a planted code's axes come first), which keeps the QR affordable and still
    spreads every planted axis over max_dims dims."""
    d = codes.shape[1]
    k = min(d, max_dims)
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
    q *= np.sign(np.diag(r))  # Haar measure (Mezzadri 2007)
    rotated = codes.copy()
    rotated[:, :k] = codes[:, :k] @ q
    return rotated


def ceilings(
    readout: Readout, codes: np.ndarray, labels: np.ndarray, encodings: np.ndarray, seed: int
) -> dict[str, float]:
    """`X_ceiling` and `X_ceiling_rot` of every value X of readout on a planted code of the
    codes' shape (planted_code) and on that code randomly rotated."""
    planted = planted_code(codes, encodings, seed)
    plain, rotated = readout(planted, labels), readout(random_rotation(planted, seed + 1), labels)
    return {
        **{f"{k}_ceiling": v for k, v in plain.items()},
        **{f"{k}_ceiling_rot": v for k, v in rotated.items()},
    }


def within_floor(value: float, floor: float, floor_sd: float) -> bool:
    """Whether a value is within FLOOR_SDS s.d. of its permutation floor."""
    return bool(abs(value - floor) <= FLOOR_SDS * floor_sd)
