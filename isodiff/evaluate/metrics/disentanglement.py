"""Disentanglement of h and x_T against ground-truth factors, each number beside its floor
and its ceiling (isodiff.evaluate.metrics.calibration).

The codes are those of held-out real images: the first `n` test images are DDIM-inverted
to x_T, and h is the U-Net's mid-block output at (x_T, t = T), optionally average-pooled by
`h_pool` and flattened. Both codes are scored against the images' ground-truth factors
(shapes: shape, hue (circular), size, x, y; mnist: digit; an image folder: its
data.attributes), each factor encoded as isodiff.evaluate.metrics.factors says (one-hot, value,
(cos, sin)). Read-outs fit on the first (1 - heldout_fraction) of the rows and score on the
rest.

Read-outs that reward axis alignment (neither is rotation-invariant: a rotation of a
perfect code drops them to the floor, and L_iso, which sees J^T J only, cannot create
alignment):
- DCI (Eastwood & Williams, ICLR 2018) with their importances: per target column (a
  continuous value, cos or sin of a circular one, one class indicator of a categorical one)
  a Lasso on codes standardised on the fit rows, its penalty chosen by `cv_folds`-fold
  cross-validation along the LARS path (at most `lasso_steps` steps: the fitted code uses at
  most that many dims per target); importance R_ij = the sum of |coefficient| over factor j's
  columns, each factor's column of R normalised to sum 1 (a factor no dim predicts spreads
  uniformly: it prefers no dim). D = sum_i rho_i (1 - H_k(P_i.)), C = mean_j (1 - H_d(P~_.j));
  I: the Lasso's held-out accuracy (argmax of the class indicators), R^2 (continuous) or R^2
  of (cos, sin) (circular), clipped to [0, 1], averaged over factors. D is left out for one
  factor (mnist).
- MIG (Chen et al., NeurIPS 2018): per factor the gap between the two largest mutual
  informations of a code dim with the factor, over the factor's entropy, averaged; codes and
  continuous and circular factors in `bins` equal-width bins (disentanglement_lib's
  discretiser), over all n rows.

Rotation-invariant read-outs (isodiff.evaluate.metrics.probes): per factor a cross-validated linear
probe and a kNN probe (probe_lin_*, probe_knn_*; their gap probe_gap_* = knn - lin), the
circular factor's angle error (angle_lin_*, angle_knn_*, degrees), and h's participation
ratio (pr_*, its effective rank; no floor: it is not about the factors). The decoder's
reliance on h (hswap_h): on `swap_pairs` pairs of sampled x_T ~ N(0, I) (the seed's first
2 * swap_pairs latents, not the inverted codes: a few-step DDIM inversion can land far from
N(0, I), where the decoder leans on the skips instead), how far the image moves towards
the other image of the pair when its h is replaced by the other's on every DDIM step with
t >= t_edit (isodiff.model.directions.h_swap_influence; 0 = the decoder ignores h, 1 = h decides
the image).

Every read-out value X comes with X_floor and X_floor_sd (`permutations` permutations of the
factors across the images) and X_ceiling, X_ceiling_rot (a planted code of the same n and d,
and it rotated).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.calibration import ceilings, permutation_floor
from isodiff.evaluate.metrics.factors import check_kinds, encode
from isodiff.evaluate.metrics.probes import participation_ratio, probes, r2, split_rows
from isodiff.evaluate.metrics.result import MetricResult, protocol_of
from isodiff.model.seeding import derive_seed

if TYPE_CHECKING:  # torch, scipy and scikit-learn load inside the functions that use them
    from sklearn.linear_model import LassoLarsCV

    from isodiff.evaluate.metrics.common import EvalContext

SPACES = ("h", "xT")


@dataclass
class DisentanglementConfig:
    enabled: bool = True
    n: int = 512  # held-out (test split) images, inverted by DDIM
    steps: int = 10  # DDIM inversion steps
    heldout_fraction: float = 0.5
    bins: int = 20  # MIG discretisation
    h_pool: int = 1  # average-pool h by this factor first (as eval.jacobian.h_pool)
    cv_folds: int = 3  # Lasso penalty and kNN k by cross-validation on the fit rows
    lasso_steps: int = 128  # LARS steps: a target's Lasso uses at most this many dims
    permutations: int = 3  # of the factors across images: the floor of every read-out
    swap_pairs: int = 16  # sampled x_T pairs of the h-swap influence (0: not measured)
    t_edit: int = 500  # h swapped on the DDIM steps with t >= t_edit (Asyrp)

    def __post_init__(self) -> None:
        key = "eval.disentanglement"
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(
                f"{key}.heldout_fraction={self.heldout_fraction}: use a value in (0, 1)"
            )
        if self.n * min(self.heldout_fraction, 1 - self.heldout_fraction) < 2 * self.cv_folds:
            raise ConfigError(
                f"{key}.n={self.n} leaves fewer than 2 images per fold "
                f"({key}.cv_folds={self.cv_folds}) to fit or to score"
            )
        checks = [
            ("steps", self.steps, 1),
            ("bins", self.bins, 2),
            ("h_pool", self.h_pool, 1),
            ("cv_folds", self.cv_folds, 2),
            ("lasso_steps", self.lasso_steps, 1),
            ("permutations", self.permutations, 1),
            ("swap_pairs", self.swap_pairs, 0),
        ]
        for name, value, least in checks:
            if value < least:
                raise ConfigError(f"{key}.{name}={value}: use >= {least}")
        if not 0 <= self.t_edit <= 1000:
            raise ConfigError(f"{key}.t_edit={self.t_edit} must be in [0, 1000]")


def _check_inputs(
    codes: np.ndarray, factors: np.ndarray, kinds: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64)
    if factors.ndim == 1:
        factors = factors[:, None]
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(
            f"codes (n, d) and factors (n, k) must have the same n, got "
            f"{codes.shape} and {factors.shape}"
        )
    check_kinds(kinds, factors.shape[1])
    return codes, factors


def _normalised(r: np.ndarray, axis: int) -> np.ndarray:
    """r / its sums along axis; all-zero slices become uniform (no preference)."""
    total = r.sum(axis=axis, keepdims=True)
    uniform = np.full_like(r, 1.0 / r.shape[axis])
    return np.where(total > 0, r / np.where(total > 0, total, 1.0), uniform)


def _one_minus_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """1 - H(p) along axis, H in log base (the axis' length)."""
    from scipy.special import xlogy

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


def lasso_importance(
    x: np.ndarray, y: np.ndarray, folds: int, steps: int
) -> tuple[np.ndarray, LassoLarsCV | None]:
    """|coefficients| (d,) of a Lasso of y on x, its penalty by cross-validation along the
    LARS path, and the model (None for a constant y: nothing to predict, no importance)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LassoLarsCV

    if np.ptp(y) == 0:
        return np.zeros(x.shape[1]), None
    with warnings.catch_warnings():  # LARS warns when a path step is degenerate; harmless
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LassoLarsCV(cv=folds, max_iter=steps).fit(x, y)
    return np.abs(model.coef_), model


def dci(
    codes: np.ndarray,
    factors: np.ndarray,
    kinds: Sequence[str],
    heldout_fraction: float = 0.5,
    folds: int = 3,
    steps: int = 128,
) -> dict:
    """DCI of codes (n, d) against factors (n, k) of kinds categorical | continuous |
    circular (module docstring). Returns disentanglement (left out when k = 1),
    completeness (left out when d = 1), informativeness, importance R (d, k), each column
    summing to 1, and informativeness_per_factor (k,)."""
    from sklearn.preprocessing import StandardScaler

    codes, factors = _check_inputs(codes, factors, kinds)
    split = split_rows(len(codes), heldout_fraction)
    scaler = StandardScaler().fit(codes[:split])  # constant dims: scale 1, all zero
    fit_x, test_x = scaler.transform(codes[:split]), scaler.transform(codes[split:])
    encodings, columns = encode(factors, kinds)
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    scores = np.zeros(factors.shape[1])
    for j, (kind, cols) in enumerate(zip(kinds, columns, strict=True)):
        predicted = np.zeros((len(test_x), cols.stop - cols.start))
        for c, column in enumerate(range(cols.start, cols.stop)):
            y = encodings[:split, column]
            weights, model = lasso_importance(fit_x, y, folds, steps)
            importance[:, j] += weights
            predicted[:, c] = model.predict(test_x) if model is not None else y[0]
        if kind == "categorical":
            classes = np.argmax(predicted, axis=1)
            scores[j] = float(np.mean(classes == factors[split:, j]))
        else:
            scores[j] = float(np.clip(r2(encodings[split:, cols], predicted), 0.0, 1.0))
    total = importance.sum(axis=0, keepdims=True)
    # A factor no dim predicts prefers no dim: uniform, so that it lowers D and C instead of
    # vanishing from them (a code of noise would otherwise score D = 1 on its few dims).
    importance = np.where(
        total > 0, importance / np.where(total > 0, total, 1.0), 1.0 / codes.shape[1]
    )
    disentanglement, completeness = dci_from_importance(importance)
    result = {
        "informativeness": float(scores.mean()),
        "importance": importance,
        "informativeness_per_factor": scores,
    }
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

    Codes, and continuous and circular factors, are discretised into `bins` equal-width
    bins per dimension; categorical factors are used as they are. Per factor v_k the gap is
    (I(c_top1; v_k) - I(c_top2; v_k)) / H(v_k) over the code dims c, MI from the empirical
    joint; mig is the mean over factors. A constant factor (H = 0) has gap nan and is left
    out of the mean. Returns mig and gaps (k,). Raises ValueError for a single code dim.
    """
    from scipy.special import xlogy

    codes, factors = _check_inputs(codes, factors, kinds)
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 code dimensions (a gap to a second one)")
    discrete = discretise(codes, bins)
    gaps = np.full(factors.shape[1], np.nan)
    for j, kind in enumerate(kinds):
        v = (
            factors[:, j]
            if kind == "categorical"
            else discretise(factors[:, j : j + 1], bins)[:, 0]
        )
        _, counts = np.unique(v, return_counts=True)
        entropy = float(-xlogy(counts / len(v), counts / len(v)).sum())
        if entropy > 0:
            top = np.sort(mutual_information(discrete, v))[::-1]
            gaps[j] = (top[0] - top[1]) / entropy
    if np.isnan(gaps).all():
        raise ValueError("MIG needs a factor that varies over the rows")
    return {"mig": float(np.nanmean(gaps)), "gaps": gaps}


def readouts(
    codes: np.ndarray,
    factors: np.ndarray,
    kinds: Sequence[str],
    names: Sequence[str],
    space: str,
    cfg: DisentanglementConfig,
    arrays: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Every factor read-out of one code, keyed as metrics.json stores them: dci_{d,c,i}_<space>,
    mig_<space>(_<factor>), probe_{lin,knn}_<space>(_<factor>), probe_gap_<space>_<factor>,
    angle_{lin,knn}_<space>_<circular factor>. `arrays`, when given, receives DCI's
    importance_<space> and informativeness_<space> (so the Lasso paths run once)."""
    values: dict[str, float] = {}
    scores = dci(codes, factors, kinds, cfg.heldout_fraction, cfg.cv_folds, cfg.lasso_steps)
    if arrays is not None:
        arrays[f"importance_{space}"] = scores["importance"]
        arrays[f"informativeness_{space}"] = scores["informativeness_per_factor"]
    for key, name in (("disentanglement", "d"), ("completeness", "c"), ("informativeness", "i")):
        if key in scores:
            values[f"dci_{name}_{space}"] = scores[key]
    gaps = mig(codes, factors, kinds, cfg.bins)
    values[f"mig_{space}"] = gaps["mig"]
    values.update(
        {f"mig_{space}_{name}": float(g) for name, g in zip(names, gaps["gaps"], strict=True)}
    )
    read = probes(codes, factors, kinds, names, cfg.heldout_fraction, cfg.cv_folds)
    for probe in ("lin", "knn"):
        values[f"probe_{probe}_{space}"] = read[probe]
        for name in names:
            values[f"probe_{probe}_{space}_{name}"] = read[f"{probe}_{name}"]
            if f"{probe}_deg_{name}" in read:
                values[f"angle_{probe}_{space}_{name}"] = read[f"{probe}_deg_{name}"]
    for name in names:
        values[f"probe_gap_{space}_{name}"] = read[f"knn_{name}"] - read[f"lin_{name}"]
    return values


def calibrated(
    codes: np.ndarray,
    factors: np.ndarray,
    kinds: Sequence[str],
    names: Sequence[str],
    space: str,
    cfg: DisentanglementConfig,
    seed: int,
    arrays: dict[str, np.ndarray],
) -> dict[str, float]:
    """readouts of the code (its DCI arrays into `arrays`), with every value's floor
    (factors permuted) and ceiling (planted code, and it rotated):
    isodiff.evaluate.metrics.calibration."""

    def readout(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return readouts(x, y, kinds, names, space, cfg)

    encodings, _ = encode(factors, kinds)
    return {
        **readouts(codes, factors, kinds, names, space, cfg, arrays),
        **permutation_floor(readout, codes, factors, cfg.permutations, seed),
        **ceilings(readout, codes, factors, encodings, seed + 1),
    }


def codes_of(ctx: EvalContext, cfg: DisentanglementConfig) -> dict[str, np.ndarray]:
    """h (t = T, pooled, flattened) and x_T of the first cfg.n DDIM-inverted test images."""
    import torch

    from isodiff.evaluate.metrics.jacobian import h_map

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
    """Every read-out of h (t = T) and x_T of held-out images against their factors, with
    floors and ceilings; h's participation ratio and the decoder's reliance on h."""
    import torch

    from isodiff.model.directions import h_swap_influence
    from isodiff.model.sampling import latents

    test = ctx.dataset("test")
    names, kinds = (
        tuple(getattr(test, "factor_names", ())),
        tuple(getattr(test, "factor_kinds", ())),
    )
    if not names:
        raise ConfigError(
            f"data={ctx.data.name.value} has no ground-truth factors: "
            "eval.disentanglement needs data=shapes or data=mnist (or "
            "data=folder with data.attributes)"
        )
    codes = codes_of(ctx, cfg)
    factors = torch.stack([test[i][1] for i in range(cfg.n)]).double().numpy()
    values: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    for space, x in codes.items():
        seed = derive_seed("disentanglement", ctx.seed, space)
        values.update(calibrated(x, factors, kinds, names, space, cfg, seed, arrays))
        values[f"pr_{space}"] = participation_ratio(x)
    if cfg.swap_pairs:  # on sampling's own x_T: inverted ones can be far from N(0, I)
        x_T = latents(ctx.seed, range(2 * cfg.swap_pairs), ctx.x_shape)
        influence = h_swap_influence(
            ctx.ddim(cfg.steps),
            x_T[: cfg.swap_pairs],
            x_T[cfg.swap_pairs :],
            cfg.t_edit,
            ctx.codec.decode,
        )
        values["hswap_h"] = float(np.mean(influence))
        arrays["hswap_h"] = influence
    protocol = {
        **protocol_of(cfg),
        "codes": "h at t = T of the DDIM-inverted test image, and that x_T",
        "factors": list(names),
        "kinds": list(kinds),
        "encoding": "categorical one-hot, continuous as is, circular (cos, sin)",
        "importance": "|coef| of a Lasso per target column (LassoLarsCV: penalty by "
        "cv_folds-fold CV along at most lasso_steps LARS steps) on codes "
        "standardised on the fit rows, summed over a factor's columns; "
        "columns normalised to sum 1, uniform where all zero",
        "informativeness": "the Lasso's held-out accuracy (argmax of class "
        "indicators), R^2 (continuous) or R^2 of (cos, sin) "
        "(circular), clipped to [0, 1]",
        "rotation": "dci_d, dci_c and mig reward axis alignment and are not "
        "rotation-invariant (their _ceiling_rot shows it); probe_*, "
        "angle_* and pr_* are",
        "probes": "ridge (RidgeCV / RidgeClassifierCV, leave-one-out penalty) and kNN "
        "(k by cv_folds-fold CV) on codes centred and scaled by one scalar; "
        "held-out accuracy / R^2 unclipped; angle_*: mean |angle error| in "
        "degrees",
        "floor": "X_floor, X_floor_sd: mean and s.d. over `permutations` permutations "
        "of the factors across images",
        "ceiling": "X_ceiling: the factors' encodings as axes in noise with the "
        "code's spectrum (same n, d); X_ceiling_rot: that code randomly "
        "rotated",
        "hswap_h": "mean over swap_pairs pairs of sampled x_T (latents 0 .. 2 "
        "swap_pairs - 1) of |img(a, h <- h(b) on t >= t_edit) - img(a)| / "
        "|img(b) - img(a)|",
        "mig_discretisation": "equal-width bins per dim over all n rows",
        "split": "test",
    }
    return MetricResult(values, protocol, {}, arrays)


METRIC = Metric(
    name="disentanglement",
    config=DisentanglementConfig,
    values=("dci_", "mig_", "probe_", "angle_", "pr_", "hswap_"),
    higher_is_better=("dci_", "mig_", "probe_"),
    order=11,
    summary=(r"probe_lin_(h|xT)", r"dci_d_(h|xT)", r"mig_(h|xT)"),
)
