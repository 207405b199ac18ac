"""Rotation-invariant read-outs of a code: what L_iso can move.

L_iso depends on J^T J only, so it cannot prefer one rotation of h over another; the
read-outs here give the same number for any rotation of the code (up to solver tolerance):
- probes: per factor, a linear probe (ridge, penalty by efficient leave-one-out
  cross-validation; a ridge classifier for a categorical factor) and a non-linear one (k
  nearest neighbours, k by cross-validation), fit on the first (1 - heldout_fraction) of the
  rows and scored on the rest. The code is centred and divided by one scalar (its root-mean
  per-dimension variance) on the fit rows, never standardised per dimension, which would
  break the invariance. Scores: accuracy (categorical), R^2 (continuous), R^2 of (cos, sin)
  (circular; and the mean absolute angle error in degrees), not clipped, so that the floor of
  a code without information has a spread around 0. The gap (knn - linear) says how far a
  factor is from linearly encoded.
- participation_ratio: the code's effective rank (sum lambda)^2 / sum lambda^2 of its
  covariance eigenvalues: 1 for a code on a line, d for a white one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn loads inside the functions that use it
    from sklearn.model_selection import GridSearchCV

from isodiff.evaluate.metrics.factors import angle_of, check_kinds, encode_factor, wrapped

ALPHAS = np.logspace(-3, 5, 17)  # on codes scaled to unit root-mean variance per dimension
NEIGHBOURS = (1, 3, 5, 10, 20)


def split_rows(n: int, heldout_fraction: float) -> int:
    """The number of fit rows: the first (1 - heldout_fraction) of n; ValueError if either
    part would be empty."""
    split = int(round(n * (1 - heldout_fraction)))
    if split < 2 or split >= n:
        raise ValueError(
            f"heldout_fraction={heldout_fraction} leaves too few rows to fit or to score of {n}"
        )
    return split


def isotropic_scaling(codes: np.ndarray, split: int) -> np.ndarray:
    """Codes centred on the fit rows and divided by their root-mean per-dimension s.d. there
    (one scalar: a rotation of the codes commutes with it)."""
    fit = codes[:split]
    centred = codes - fit.mean(axis=0)
    scale = np.sqrt(np.mean(fit.var(axis=0)))
    return centred / (scale if scale > 0 else 1.0)


def r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 - SSE / SST over every column of y (n, q): R^2 of a multi-output prediction,
    unclipped (a prediction worse than the mean is negative). 0 for a constant y."""
    y, y_hat = y.reshape(len(y), -1), y_hat.reshape(len(y), -1)
    total = np.sum((y - y.mean(axis=0)) ** 2)
    return float(1.0 - np.sum((y - y_hat) ** 2) / total) if total > 0 else 0.0


def _knn(kind: str, folds: int, n_fit: int) -> GridSearchCV:
    """kNN on precomputed distances (computed once per code, not once per fit), k by CV."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

    model = (KNeighborsClassifier if kind == "categorical" else KNeighborsRegressor)(
        metric="precomputed"
    )
    grid = [k for k in NEIGHBOURS if k <= n_fit * (folds - 1) // folds] or [1]
    return GridSearchCV(model, {"n_neighbors": grid}, cv=folds)


def probe_factor(
    x: np.ndarray, distances: np.ndarray, values: np.ndarray, kind: str, split: int, folds: int = 3
) -> dict[str, float]:
    """Held-out linear and kNN scores of one factor (n,) from scaled codes x (n, d) and their
    Euclidean distances to the fit rows (n, split): {lin, knn} and, for a circular factor,
    {lin_deg, knn_deg} (mean |angle error|)."""
    from sklearn.linear_model import RidgeClassifierCV, RidgeCV

    data = {"lin": (x[:split], x[split:]), "knn": (distances[:split], distances[split:])}
    if kind == "categorical":
        labels = values.astype(np.int64)
        if len(np.unique(labels[:split])) == 1:  # one class: every probe is the constant
            score = float(np.mean(labels[split:] == labels[0]))
            return {"lin": score, "knn": score}
        models = {"lin": RidgeClassifierCV(alphas=ALPHAS), "knn": _knn(kind, folds, split)}
        return {
            name: float(
                np.mean(
                    model.fit(data[name][0], labels[:split]).predict(data[name][1])
                    == labels[split:]
                )
            )
            for name, model in models.items()
        }
    target = encode_factor(values, kind)
    fit_y = target[:split] if kind == "circular" else target[:split, 0]
    result = {}
    for name, model in {"lin": RidgeCV(alphas=ALPHAS), "knn": _knn(kind, folds, split)}.items():
        predicted = model.fit(data[name][0], fit_y).predict(data[name][1])
        result[name] = r2(target[split:], predicted)
        if kind == "circular":
            error = wrapped(angle_of(predicted) - values[split:])
            result[f"{name}_deg"] = float(np.mean(np.abs(error)) * 360)
    return result


def probes(
    codes: np.ndarray,
    factors: np.ndarray,
    kinds: Sequence[str],
    names: Sequence[str],
    heldout_fraction: float = 0.5,
    folds: int = 3,
) -> dict[str, float]:
    """Per factor `lin_<name>`, `knn_<name>` (and `lin_deg_<name>`, `knn_deg_<name>` for a
    circular one), and their means over factors `lin`, `knn`."""
    factors = np.asarray(factors, dtype=np.float64).reshape(len(factors), -1)
    check_kinds(kinds, factors.shape[1])
    split = split_rows(len(codes), heldout_fraction)
    x = isotropic_scaling(np.asarray(codes, dtype=np.float64), split)
    distances = np.sqrt(
        np.maximum(
            (x**2).sum(1)[:, None] - 2 * x @ x[:split].T + (x[:split] ** 2).sum(1)[None], 0.0
        )
    )
    result: dict[str, float] = {}
    for j, (kind, name) in enumerate(zip(kinds, names, strict=True)):
        for key, value in probe_factor(x, distances, factors[:, j], kind, split, folds).items():
            probe, _, unit = key.partition("_")
            result[f"{probe}_{unit}_{name}" if unit else f"{probe}_{name}"] = value
    for probe in ("lin", "knn"):
        result[probe] = float(np.mean([result[f"{probe}_{name}"] for name in names]))
    return result


def participation_ratio(codes: np.ndarray) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues lambda of codes (n, d),
    from the singular values of the centred codes (no d x d matrix)."""
    centred = np.asarray(codes, dtype=np.float64) - np.mean(codes, axis=0)
    power = np.linalg.svd(centred, compute_uv=False) ** 2
    return float(power.sum() ** 2 / np.sum(power**2)) if power.sum() > 0 else 0.0
