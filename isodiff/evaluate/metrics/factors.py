"""Ground-truth factors as read-outs see them: kinds, encodings and angles.

A factor is one of three kinds:
- categorical: an integer class (shapes' shape, mnist's digit); encoded one-hot;
- continuous: a real number on a line (size, x, y); encoded as itself;
- circular: an angle in turns, [0, 1) (hue: hsv_to_rgb reads 0.99 next to 0.0); encoded as
  (cos 2 pi v, sin 2 pi v), so that no read-out sees a jump where the circle closes. Its
  errors are angles (wrapped differences in turns).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS = ("categorical", "continuous", "circular")


def check_kinds(kinds: Sequence[str], k: int) -> None:
    """ValueError unless kinds gives one of KINDS for each of k factors."""
    if len(kinds) != k or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must give one of {KINDS} per factor ({k}), got {list(kinds)}")


def encode_factor(values: np.ndarray, kind: str, classes: int | None = None) -> np.ndarray:
    """One factor (n,) -> its encoding (n, q): categorical one-hot over `classes` (default:
    max + 1), continuous the value (q = 1), circular (cos, sin) of the angle (q = 2)."""
    values = np.asarray(values, dtype=np.float64)
    if kind == "categorical":
        labels = values.astype(np.int64)
        return np.eye(classes or int(labels.max()) + 1)[labels]
    if kind == "continuous":
        return values[:, None]
    if kind == "circular":
        angle = 2 * np.pi * values
        return np.stack([np.cos(angle), np.sin(angle)], axis=1)
    raise ValueError(f"kind={kind!r}: use one of {KINDS}")


def encode(factors: np.ndarray, kinds: Sequence[str]) -> tuple[np.ndarray, list[slice]]:
    """Factors (n, k) -> (encodings (n, q), the columns of each factor)."""
    factors = np.asarray(factors, dtype=np.float64).reshape(len(factors), -1)
    check_kinds(kinds, factors.shape[1])
    parts = [encode_factor(factors[:, j], kind) for j, kind in enumerate(kinds)]
    edges = np.cumsum([0] + [p.shape[1] for p in parts])
    columns = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return np.concatenate(parts, axis=1), columns


def angle_of(cos_sin: np.ndarray) -> np.ndarray:
    """(n, 2) (cos, sin), any length -> the angle in turns, [0, 1)."""
    cos_sin = np.asarray(cos_sin, dtype=np.float64)
    return np.mod(np.arctan2(cos_sin[:, 1], cos_sin[:, 0]) / (2 * np.pi), 1.0)


def wrapped(difference: np.ndarray) -> np.ndarray:
    """An angle difference in turns, wrapped to [-0.5, 0.5)."""
    return np.mod(np.asarray(difference, dtype=np.float64) + 0.5, 1.0) - 0.5


def circular_mean(angles: np.ndarray) -> float:
    """The mean direction of angles in turns, in [0, 1) (0 for a resultant of length 0)."""
    return float(angle_of(encode_factor(angles, "circular").mean(axis=0, keepdims=True))[0])
