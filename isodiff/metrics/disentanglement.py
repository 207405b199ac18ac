"""DCI (Eastwood & Williams, ICLR 2018) and MIG (Chen et al., NeurIPS 2018) of h and x_T.

The codes are those of held-out real images: the first `n` test images are DDIM-inverted
to x_T, and h is the U-Net's mid-block output at (x_T, t = T), optionally average-pooled by
`h_pool` and flattened. Both codes are scored against the images' ground-truth factors
(shapes: shape, hue, size, x, y; mnist: digit; an image folder: its data.attributes).

DCI: an importance matrix R (code dims x factors) from one model per factor, fit on the
first (1 - heldout_fraction) of the images. Disentanglement D: how much each code dim is
devoted to a single factor (1 - entropy of its row, in log base k), weighted by the dim's
share of all importance; completeness C: how much each factor is captured by a single code
dim (1 - entropy of its column, log base d), averaged over factors; informativeness I: the
held-out accuracy (categorical factors) or R^2 clipped to [0, 1] (continuous), averaged.
MIG: per factor, the gap between the largest and second-largest mutual information of a
code dim with the factor, over the factor's entropy; the mean over factors. Codes (and
continuous factors) are discretised into `bins` equal-width bins per dimension, as
disentanglement_lib's histogram discretiser does; MIG uses all n images.

Departures from the papers:
- Importance is linear, |coefficient| of a ridge regression (continuous factors) or an L2
  logistic regression (categorical; mean |coefficient| over classes, C = 1 / alpha) on codes
  standardised on the fit rows, where Eastwood & Williams use Lasso / random forests and
  disentanglement_lib gradient-boosted trees: codes here have 768-1024+ dims and a few
  hundred images, where trees are slow and their importances noisy.
- Each factor's column of R is normalised to sum to 1 (as disentanglement_lib's tree
  importances are), so that logistic and ridge coefficients, on different scales, weigh
  equally in D.
- Informativeness is a score (higher is better: accuracy, R^2) rather than the papers'
  prediction error, so that all three DCI numbers read the same way.
- D is undefined for a single factor (log base 1), so it is left out for one-factor
  datasets (mnist): the values then have no dci_d_*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import xlogy
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from isodiff.config import ConfigError
from isodiff.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.metrics.jacobian import h_map

KINDS = ("categorical", "continuous")


@dataclass
class DisentanglementConfig:
    enabled: bool = True
    n: int = 512  # held-out (test split) images, inverted by DDIM
    steps: int = 10  # DDIM inversion steps
    heldout_fraction: float = 0.5
    bins: int = 20  # MIG discretisation
    h_pool: int = 1  # average-pool h by this factor first (as eval.jacobian.h_pool)
    alpha: float = 1.0  # ridge penalty; logistic regression uses C = 1 / alpha

    def __post_init__(self) -> None:
        key = "eval.disentanglement"
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"{key}.heldout_fraction={self.heldout_fraction}: use a value "
                              "in (0, 1)")
        if self.n * min(self.heldout_fraction, 1 - self.heldout_fraction) < 2:
            raise ConfigError(f"{key}.n={self.n} leaves fewer than 2 images to fit or to score")
        if self.steps < 1:
            raise ConfigError(f"{key}.steps={self.steps}: use >= 1")
        if self.bins < 2:
            raise ConfigError(f"{key}.bins={self.bins}: use >= 2")
        if self.h_pool < 1:
            raise ConfigError(f"{key}.h_pool={self.h_pool}: use >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"{key}.alpha={self.alpha}: use > 0")


def _check_inputs(codes: np.ndarray, factors: np.ndarray, kinds: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64)
    if factors.ndim == 1:
        factors = factors[:, None]
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes (n, d) and factors (n, k) must have the same n, got "
                         f"{codes.shape} and {factors.shape}")
    if len(kinds) != factors.shape[1] or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must give one of {KINDS} per factor, got {list(kinds)}")
    return codes, factors


def _normalised(r: np.ndarray, axis: int) -> np.ndarray:
    """r / its sums along axis; all-zero slices become uniform (no preference)."""
    total = r.sum(axis=axis, keepdims=True)
    uniform = np.full_like(r, 1.0 / r.shape[axis])
    return np.where(total > 0, r / np.where(total > 0, total, 1.0), uniform)


def _one_minus_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """1 - H(p) along axis, H in log base (the axis' length)."""
    entropy = -xlogy(p, p).sum(axis=axis) / np.log(p.shape[axis])
    return np.clip(1.0 - entropy, 0.0, 1.0)  # rounding can take it past [0, 1]


def dci_from_importance(importance: np.ndarray) -> tuple[float | None, float | None]:
    """(disentanglement, completeness) of an importance matrix R (d code dims, k factors).

    D = sum_i rho_i (1 - H_k(P_i.)), P_ij = R_ij / sum_j R_ij, rho_i = sum_j R_ij / sum R;
    C = mean_j (1 - H_d(P~_.j)), P~_ij = R_ij / sum_i R_ij; entropies in log base k and d.
    D is None for k = 1 and C None for d = 1 (log base 1). A factor no dim is important for
    has completeness 0; an all-zero R has D = 0.
    """
    r = np.abs(np.asarray(importance, dtype=np.float64))
    if r.ndim != 2:
        raise ValueError(f"importance must be (d, k), got shape {r.shape}")
    d, k = r.shape
    disentanglement = completeness = None
    if k > 1:
        total = r.sum()
        rho = r.sum(axis=1) / total if total > 0 else np.zeros(d)
        disentanglement = float(np.sum(rho * _one_minus_entropy(_normalised(r, 1), 1)))
    if d > 1:
        completeness = float(np.mean(_one_minus_entropy(_normalised(r, 0), 0)))
    return disentanglement, completeness


def _r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Held-out R^2 clipped to [0, 1]: a model worse than the mean scores as the mean."""
    total = np.sum((y - y.mean()) ** 2)
    if total == 0:
        return 0.0
    return float(np.clip(1.0 - np.sum((y - y_hat) ** 2) / total, 0.0, 1.0))


def dci(codes: np.ndarray, factors: np.ndarray, kinds: Sequence[str],
        heldout_fraction: float = 0.5, alpha: float = 1.0) -> dict:
    """DCI of codes (n, d) against factors (n, k) of kinds "categorical" | "continuous".

    Per factor, a linear model on the codes standardised on the first (1 - heldout_fraction)
    of the rows, fit on those rows: ridge (penalty alpha) on the standardised factor for a
    continuous factor, L2 logistic regression (C = 1 / alpha) for a categorical one.
    Importance = |coefficient| (categorical: mean over classes), each factor's column
    normalised to sum 1. Returns disentanglement (left out when k = 1), completeness (left
    out when d = 1), informativeness (mean over factors of the held-out accuracy,
    categorical, or the held-out R^2 clipped to [0, 1], continuous), importance R (d, k)
    and informativeness_per_factor (k,).
    """
    codes, factors = _check_inputs(codes, factors, kinds)
    split = int(round(len(codes) * (1 - heldout_fraction)))
    if split < 1 or split >= len(codes):
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no rows to fit or "
                         f"to score of {len(codes)}")
    scaler = StandardScaler().fit(codes[:split])  # constant dims: scale 1, all zero
    fit_x, test_x = scaler.transform(codes[:split]), scaler.transform(codes[split:])
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    scores = np.zeros(factors.shape[1])
    for j, kind in enumerate(kinds):
        fit_y, test_y = factors[:split, j], factors[split:, j]
        if kind == "continuous":
            std = fit_y.std()
            target = (fit_y - fit_y.mean()) / (std if std > 0 else 1.0)
            model = Ridge(alpha=alpha).fit(fit_x, target)
            importance[:, j] = np.abs(model.coef_)
            scores[j] = _r2(test_y, model.predict(test_x) * (std if std > 0 else 1.0)
                            + fit_y.mean())
        elif len(np.unique(fit_y)) == 1:  # one class: the model is the constant
            scores[j] = float(np.mean(test_y == fit_y[0]))
        else:
            model = LogisticRegression(C=1.0 / alpha, max_iter=2000).fit(fit_x, fit_y)
            importance[:, j] = np.abs(model.coef_).mean(axis=0)
            scores[j] = float(np.mean(model.predict(test_x) == test_y))
    total = importance.sum(axis=0, keepdims=True)
    importance = importance / np.where(total > 0, total, 1.0)
    disentanglement, completeness = dci_from_importance(importance)
    result = {"informativeness": float(scores.mean()), "importance": importance,
              "informativeness_per_factor": scores}
    for key, value in (("disentanglement", disentanglement), ("completeness", completeness)):
        if value is not None:
            result[key] = value
    return result


def discretise(values: np.ndarray, bins: int) -> np.ndarray:
    """(n, m) -> int bins in [0, bins) per column, equal width between the column's min and
    max (disentanglement_lib's histogram discretiser); a constant column is all bin 0."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = values.min(axis=0), values.max(axis=0)
    width = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.floor((values - lo) / width * bins), 0, bins - 1).astype(np.int64)


def mutual_information(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """MI in nats of each column of discrete codes (n, d), ints >= 0, with discrete labels
    (n,), from the empirical joint: all d joints by one bincount."""
    n, d = codes.shape
    _, y = np.unique(labels, return_inverse=True)
    m, b = int(y.max()) + 1, int(codes.max()) + 1
    cells = (np.arange(d)[None, :] * b + codes) * m + y.reshape(-1)[:, None]
    joint = np.bincount(cells.ravel(), minlength=d * b * m).reshape(d, b, m) / n
    p_code, p_y = joint.sum(axis=2, keepdims=True), joint.sum(axis=(0, 1)) / d
    outer = p_code * p_y[None, None, :]
    ratio = np.where(joint > 0, joint / np.where(outer > 0, outer, 1.0), 1.0)
    return (joint * np.log(ratio)).sum(axis=(1, 2))


def mig(codes: np.ndarray, factors: np.ndarray, kinds: Sequence[str], bins: int = 20) -> dict:
    """Mutual information gap of codes (n, d) against factors (n, k).

    Codes, and continuous factors, are discretised into `bins` equal-width bins per
    dimension; categorical factors are used as they are. Per factor v_k the gap is
    (I(c_top1; v_k) - I(c_top2; v_k)) / H(v_k) over the code dims c, MI from the empirical
    joint; mig is the mean over factors. A constant factor (H = 0) has gap nan and is left
    out of the mean. Returns mig and gaps (k,). Raises ValueError for a single code dim.
    """
    codes, factors = _check_inputs(codes, factors, kinds)
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 code dimensions (a gap to a second one)")
    discrete = discretise(codes, bins)
    gaps = np.full(factors.shape[1], np.nan)
    for j, kind in enumerate(kinds):
        v = discretise(factors[:, j:j + 1], bins)[:, 0] if kind == "continuous" else factors[:, j]
        _, counts = np.unique(v, return_counts=True)
        entropy = float(-xlogy(counts / len(v), counts / len(v)).sum())
        if entropy > 0:
            top = np.sort(mutual_information(discrete, v))[::-1]
            gaps[j] = (top[0] - top[1]) / entropy
    if np.isnan(gaps).all():
        raise ValueError("MIG needs a factor that varies over the rows")
    return {"mig": float(np.nanmean(gaps)), "gaps": gaps}


def codes_of(ctx: EvalContext, cfg: DisentanglementConfig) -> dict[str, np.ndarray]:
    """h (t = T, pooled, flattened) and x_T of the first cfg.n DDIM-inverted test images."""
    ddim = ctx.ddim(cfg.steps)
    t_T = int(ddim.schedule.timesteps[0])
    parts: dict[str, list[np.ndarray]] = {"h": [], "xT": []}
    h_of = h_map(ctx, t_T, cfg.h_pool)
    for x in ctx.real_batches("test", cfg.n, "eval.disentanglement.n"):
        x_T = ddim.invert(ctx.codec.encode(x)).x
        with torch.no_grad():
            try:
                h = h_of(x_T.to(ctx.device))
            except RuntimeError as err:  # a pool wider than h
                raise ConfigError(f"eval.disentanglement.h_pool={cfg.h_pool}: {err}") from err
        parts["h"].append(h.double().cpu().numpy())
        parts["xT"].append(x_T.flatten(1).double().cpu().numpy())
    return {space: np.concatenate(p) for space, p in parts.items()}


def evaluate(ctx: EvalContext, cfg: DisentanglementConfig) -> MetricResult:
    """DCI and MIG of h (t = T) and x_T of held-out images against their factors."""
    test = ctx.dataset("test")
    names, kinds = tuple(getattr(test, "factor_names", ())), tuple(getattr(test, "factor_kinds",
                                                                            ()))
    if not names:
        raise ConfigError(f"data={ctx.data.name.value} has no ground-truth factors: "
                          "eval.disentanglement needs data=shapes or data=mnist (or "
                          "data=folder with data.attributes)")
    codes = codes_of(ctx, cfg)
    factors = torch.stack([test[i][1] for i in range(cfg.n)]).double().numpy()
    values: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    for space, x in codes.items():
        scores = dci(x, factors, kinds, cfg.heldout_fraction, cfg.alpha)
        if "disentanglement" in scores:
            values[f"dci_d_{space}"] = scores["disentanglement"]
        if "completeness" in scores:
            values[f"dci_c_{space}"] = scores["completeness"]
        values[f"dci_i_{space}"] = scores["informativeness"]
        gaps = mig(x, factors, kinds, cfg.bins)
        values[f"mig_{space}"] = gaps["mig"]
        for name, gap in zip(names, gaps["gaps"], strict=True):
            values[f"mig_{space}_{name}"] = float(gap)
        arrays[f"importance_{space}"] = scores["importance"]
        arrays[f"informativeness_{space}"] = scores["informativeness_per_factor"]
    protocol = {**protocol_of(cfg),
                "codes": "h at t = T of the DDIM-inverted test image, and that x_T",
                "factors": list(names),
                "importance": "|coef| of ridge (continuous, standardised target) or L2 "
                              "logistic regression (categorical, C = 1/alpha, mean over "
                              "classes) on codes standardised on the fit rows; columns "
                              "normalised to sum 1",
                "informativeness": "held-out accuracy (categorical), R^2 clipped to [0, 1] "
                                   "(continuous)",
                "mig_discretisation": "equal-width bins per dim over all n rows",
                "split": "test"}
    return MetricResult(values, protocol, {}, arrays)
