"""Editing, measured: linearity, linear combination and identity preservation of edits in
x_T and in h (the paper's Figures 7 and 8 as numbers; reference/metrics.md).

Directions (isodiff.directions), per space (x_T; h at t = T, edited by Asyrp's asymmetric
process on t >= t_edit) and source:
- mean / svm: class-mean difference / linear-SVM normal of `fit_n` generated samples
  labelled by the dataset's attribute predictors (attributes.py): a continuous factor as
  above / below its median, a categorical one as class c against the rest; one direction a
  target factor;
- local: the top-`local_k` singular directions of dh/dx_T at each edited sample (no labels).
Each direction is scaled to one standard deviation of the codes along it (local: x_T's unit
vector, h's J v), and `n` further samples are edited with strengths alpha (Figure 7's
-2..2). Measured on the edited images, per sample:
- linearity: the target attribute (continuous: standardised prediction; categorical: the
  log-odds of class c) against alpha: least-squares slope and R^2 (a local direction's
  target is the attribute it moves most); leak: mean |slope| of the other continuous
  attributes over the target's |slope|; r2img: R^2 of a straight line per pixel;
- identity: LPIPS between the unedited sample and its edits at the largest |alpha|;
- linear combination: two directions (the first two targets; local: k = 1, 2) at
  (a, b) in {-m, 0, m}^2, m the largest strength: |f(a, b) - f(a, 0) - f(0, b) + f(0, 0)|
  over |f(a, 0) - f(0, 0)| + |f(0, b) - f(0, 0)| for f the two targets' responses
  (interaction) or the image (interaction_img); 0 for an additive generator.
Values are lin_<xT|h>_<source>_<quantity>, averaged over samples and directions; per target
lin_<space>_<source>_r2_<target>.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import logsumexp

from isodiff import directions as dirs
from isodiff.config import ConfigError
from isodiff.isometry import higher_order_ad
from isodiff.metrics.attributes import AttributeConfig, AttributeModel, attribute_model
from isodiff.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.metrics.jacobian import h_map
from isodiff.metrics.perceptual import Distance
from isodiff.sampling import latents, quantise

SOURCES = ("mean", "svm", "local")
TAGS = {"x_T": "xT", "h": "h"}  # space -> its name in value keys


@dataclass
class LinearityConfig:
    enabled: bool = True
    fit_n: int = 256  # generated samples that fit the supervised directions
    n: int = 16  # generated samples edited: fit_n .. fit_n + n - 1
    steps: int = 50  # DDIM steps
    strengths: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    spaces: list[str] = field(default_factory=lambda: ["x_T", "h"])
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    t_edit: int = 500  # h edits act on the steps with t >= t_edit (Asyrp)
    # factor names, a categorical one as name=class; null: every factor (class 1 of each
    # categorical one against the rest)
    targets: list[str] | None = None
    local_k: int = 2
    local_iters: int = 20
    C: float = 1.0  # SVM regularisation
    net: str = "alex"  # LPIPS backbone
    keep_images: int = 4  # samples whose edit strips are stored (Figure 7)
    grid_strengths: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    classifier: AttributeConfig = field(default_factory=AttributeConfig)

    def __post_init__(self) -> None:
        if 0.0 not in self.strengths or len(set(self.strengths)) < 3:
            raise ConfigError(f"eval.linearity.strengths={self.strengths}: give at least 3 "
                              "strengths, 0 (the unedited sample) among them")
        if 0.0 not in self.grid_strengths:
            raise ConfigError("eval.linearity.grid_strengths must hold 0")
        if bad := set(self.spaces) - set(dirs.SPACES):
            raise ConfigError(f"eval.linearity.spaces: {sorted(bad)}; use {dirs.SPACES}")
        if bad := set(self.sources) - set(SOURCES):
            raise ConfigError(f"eval.linearity.sources: {sorted(bad)}; use {SOURCES}")
        if self.fit_n < 4 or self.n < 1 or self.local_k < 1 or self.local_iters < 1:
            raise ConfigError("eval.linearity needs fit_n >= 4, n >= 1, local_k >= 1 and "
                              "local_iters >= 1")
        if not 0 <= self.t_edit <= 1000:
            raise ConfigError(f"eval.linearity.t_edit={self.t_edit} must be in [0, 1000]")
        if self.net not in ("vgg", "alex"):
            raise ConfigError(f"eval.linearity.net={self.net!r}: use vgg or alex")


# --- the maths: arrays in, numbers out ---------------------------------------------------

def linear_fit(strengths: np.ndarray, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the least-squares line of responses (S, N) against strengths (S,):
    (slope (N,), R^2 (N,)); R^2 is nan where the response does not change."""
    a = np.asarray(strengths, dtype=np.float64) - np.mean(strengths)
    r = responses - responses.mean(axis=0)
    slope = a @ r / (a @ a)
    total = (r ** 2).sum(axis=0)
    residual = ((r - np.outer(a, slope)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return slope, np.where(total > 0, 1 - residual / total, np.nan)


def image_r2(strengths: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per sample, the share of the images' change along the edit that a straight line per
    pixel explains: images (S, N, ...) -> (N,) (nan for an edit that changes nothing)."""
    S, N = images.shape[:2]
    flat = images.reshape(S, N, -1)
    a = np.asarray(strengths, dtype=np.float64) - np.mean(strengths)
    r = flat - flat.mean(axis=0)
    slope = np.einsum("s,snp->np", a, r) / (a @ a)
    total = (r ** 2).sum(axis=(0, 2))
    residual = ((r - a[:, None, None] * slope[None]) ** 2).sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)


def interaction_error(grid: np.ndarray) -> np.ndarray:
    """Relative interaction of two edits, grid (3, 3, N, F) of f at (a, b) in {-m, 0, m}^2:
    per sample the mean over the four corners of |f(a, b) - f(a, 0) - f(0, b) + f(0, 0)|
    / (|f(a, 0) - f(0, 0)| + |f(0, b) - f(0, 0)|) (Euclidean norms over F), (N,)."""
    f00 = grid[1, 1]
    errors = []
    for a in (0, 2):
        for b in (0, 2):
            mixed = np.linalg.norm(grid[a, b] - grid[a, 1] - grid[1, b] + f00, axis=-1)
            single = (np.linalg.norm(grid[a, 1] - f00, axis=-1)
                      + np.linalg.norm(grid[1, b] - f00, axis=-1))
            with np.errstate(invalid="ignore", divide="ignore"):
                errors.append(np.where(single > 0, mixed / single, np.nan))
    return np.nanmean(np.stack(errors), axis=0)


def leakage(target_slopes: np.ndarray, other_slopes: np.ndarray) -> float:
    """Mean |slope| of the other attributes (J, N) over the target's mean |slope| (N,)."""
    if other_slopes.size == 0:
        return float("nan")
    return float(np.abs(other_slopes).mean() / np.abs(target_slopes).mean())


# --- targets and responses ----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A factor an edit aims at: continuous (cls None), or class cls of a categorical one."""

    attribute: str
    cls: int | None = None

    @property
    def name(self) -> str:
        return self.attribute if self.cls is None else f"{self.attribute}{self.cls}"


def resolve_targets(predictor: AttributeModel, names: list[str] | None) -> list[Target]:
    kinds = {a.name: a for a in predictor.attributes}
    if names is None:
        return [Target(a.name, None if a.kind == "continuous" else 1)
                for a in predictor.attributes]
    targets = []
    for name in names:
        attribute, _, cls = name.partition("=")
        a = kinds.get(attribute)
        if a is None or (a.kind == "continuous") != (cls == "") or (
                cls and not (cls.isdigit() and int(cls) < a.classes)):
            raise ConfigError(f"eval.linearity.targets: {name!r} is not a factor of this "
                              f"dataset ({', '.join(kinds)}); a categorical factor is named "
                              "with its class, e.g. shape=1")
        targets.append(Target(attribute, int(cls) if cls else None))
    return targets


def response(raw: dict[str, np.ndarray], target: Target) -> np.ndarray:
    """The target's value in `AttributeModel.responses` output: the standardised prediction,
    or the log-odds of class cls."""
    out = raw[target.attribute]
    if target.cls is None:
        return out
    others = np.delete(out, target.cls, axis=1)
    return out[:, target.cls] - logsumexp(others, axis=1)


def labels(raw: dict[str, np.ndarray], target: Target) -> np.ndarray:
    """Binary labels of the fit samples: above the median, or predicted as class cls."""
    if target.cls is None:
        values = raw[target.attribute]
        return (values > np.median(values)).astype(np.int64)
    return (raw[target.attribute].argmax(axis=1) == target.cls).astype(np.int64)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- evaluation ---------------------------------------------------------------------------

@dataclass
class Edits:
    """One source's directions in one space: vectors (each (N or 1, D)) and the target of
    each (None: the attribute it moves most); the first two are the combined pair."""

    vectors: list[torch.Tensor]
    targets: list[Target | None]


def _local(ctx: EvalContext, cfg: LinearityConfig, x_T: torch.Tensor, t: int
           ) -> dict[str, Edits]:
    """Per edited sample, the top-k singular directions of dh/dx_T: v_k in x_T, s_k u_k in h."""
    f = h_map(ctx, t, 1)
    V, U = [], []
    with higher_order_ad():
        for i in ctx.chunks(len(x_T), "editing: local basis", size=1):
            v, u, s = dirs.top_singular_vectors(f, x_T[i.start].to(ctx.device), cfg.local_k,
                                                cfg.local_iters, seed=i.start)
            V.append(v.float().cpu())
            U.append((u * s[:, None]).float().cpu())
    V, U = torch.stack(V), torch.stack(U)  # (N, k, D)
    return {"x_T": Edits([V[:, k] for k in range(cfg.local_k)], [None] * cfg.local_k),
            "h": Edits([U[:, k] for k in range(cfg.local_k)], [None] * cfg.local_k)}


def _measure(ctx: EvalContext, cfg: LinearityConfig, predictor: AttributeModel,
             targets: list[Target], x_T: torch.Tensor, space: str, edits: Edits,
             distance: Distance, prefix: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One source's directions in one space, edited and measured: values named prefix<q>,
    and the images of Figures 7 and 8 (strip; grid when there are two directions)."""
    ddim, strengths = ctx.ddim(cfg.steps), np.asarray(cfg.strengths, dtype=np.float64)
    D, S, N = len(edits.vectors), len(strengths), len(x_T)
    offsets = torch.cat([dirs.strength_offsets(strengths, v.expand(N, -1))
                         for v in edits.vectors])
    images = dirs.edit(ddim, x_T, space, offsets, cfg.t_edit, ctx.codec.decode)
    images = images.reshape(D, S, N, *images.shape[2:])
    raw = {k: v.reshape(D, S * N, *v.shape[1:])
           for k, v in predictor.responses(images.flatten(0, 2)).items()}
    continuous = [a.name for a in predictor.attributes if a.kind == "continuous"]
    zero = int(np.flatnonzero(strengths == 0)[0])
    far = np.flatnonzero(np.abs(strengths) == np.abs(strengths).max())
    r2s: dict[str, list[float]] = {}
    slopes, leaks, r2img, lpips, chosen = [], [], [], [], []
    for d, aimed in enumerate(edits.targets):
        def fit(t: Target, d: int = d) -> tuple[np.ndarray, np.ndarray]:
            values = response({k: v[d] for k, v in raw.items()}, t)
            return linear_fit(strengths, values.reshape(S, N))

        # a local direction (no target) aims at the attribute it moves most; its sign is
        # arbitrary per sample, so its slope is counted by size
        target = aimed or max(targets, key=lambda t: np.abs(fit(t)[0]).mean())
        chosen.append(target)
        slope, r2 = fit(target)
        r2s.setdefault(target.name, []).append(float(np.nanmean(r2)))
        slopes.append(np.abs(slope).mean() if aimed is None else slope.mean())
        others = [fit(Target(a))[0] for a in continuous if a != target.attribute]
        leaks.append(leakage(slope, np.array(others)))
        r2img.append(np.nanmean(image_r2(strengths, images[d].double().numpy())))
        lpips.append(np.mean([distance(images[d, zero], images[d, s]).numpy() for s in far]))
    values = {f"{prefix}r2": float(np.mean([np.mean(v) for v in r2s.values()])),
              f"{prefix}slope": float(np.mean(slopes)),
              f"{prefix}leak": float(np.nanmean(leaks)) if np.isfinite(leaks).any()
              else float("nan"),
              f"{prefix}r2img": float(np.nanmean(r2img)),
              f"{prefix}lpips": float(np.mean(lpips)),
              **{f"{prefix}r2_{name}": float(np.mean(v)) for name, v in r2s.items()}}
    keep = min(cfg.keep_images, N)
    arrays = {"strip": quantise(images[0, :, :keep].transpose(0, 1)).numpy()}  # (K, S, ...)
    if D >= 2:
        values.update(_combination(ctx, cfg, predictor, x_T, space, edits, chosen[:2], prefix))
        g = len(cfg.grid_strengths)
        grid = dirs.pair_offsets(cfg.grid_strengths, edits.vectors[0][:1], edits.vectors[1][:1])
        pictures = dirs.edit(ddim, x_T[:1], space, grid, cfg.t_edit, ctx.codec.decode)[:, 0]
        arrays["grid"] = quantise(pictures).numpy().reshape(g, g, *pictures.shape[1:])
    return values, arrays


def _combination(ctx: EvalContext, cfg: LinearityConfig, predictor: AttributeModel,
                 x_T: torch.Tensor, space: str, edits: Edits, targets: list[Target],
                 prefix: str) -> dict[str, float]:
    """The interaction of the first two directions at the corners of the largest strength."""
    m, N = float(np.abs(cfg.strengths).max()), len(x_T)
    first, second = (v.expand(N, -1) for v in edits.vectors[:2])
    images = dirs.edit(ctx.ddim(cfg.steps), x_T, space,
                       dirs.pair_offsets([-m, 0.0, m], first, second), cfg.t_edit,
                       ctx.codec.decode)
    raw = predictor.responses(images.flatten(0, 1))
    f = np.stack([response(raw, t) for t in targets], axis=-1).reshape(3, 3, N, len(targets))
    pixels = images.reshape(3, 3, N, -1).double().numpy()
    return {f"{prefix}interaction": float(np.nanmean(interaction_error(f))),
            f"{prefix}interaction_img": float(np.nanmean(interaction_error(pixels)))}


def evaluate(ctx: EvalContext, cfg: LinearityConfig) -> MetricResult:
    """Edits of cfg.n generated samples along every space x source direction."""
    predictor = attribute_model(ctx, cfg.classifier)
    targets = resolve_targets(predictor, cfg.targets)
    t_T = int(ctx.ddim(cfg.steps).schedule.timesteps[0])
    codes: dict[str, list[np.ndarray]] = {"x_T": [], "h": []}
    raw_parts, h_of = [], h_map(ctx, t_T, 1)
    for rows in ctx.chunks(cfg.fit_n, "editing: fit samples"):
        x_T = latents(ctx.seed, rows, ctx.x_shape)
        raw_parts.append(predictor.responses(ctx.generated(cfg.steps, rows)))
        with torch.no_grad():
            codes["h"].append(h_of(x_T.to(ctx.device)).cpu().double().numpy())
        codes["x_T"].append(x_T.flatten(1).double().numpy())
    raw = _concat(raw_parts)
    fit = {space: np.concatenate(parts) for space, parts in codes.items()}
    x_T = latents(ctx.seed, range(cfg.fit_n, cfg.fit_n + cfg.n), ctx.x_shape)
    local = _local(ctx, cfg, x_T, t_T) if "local" in cfg.sources else {}
    distance, weights = ctx.lpips(cfg.net)
    values, arrays, skipped = {}, {}, []
    for space in cfg.spaces:
        for source in cfg.sources:
            if source == "local":
                edits = local[space]
            else:
                vectors, aimed = [], []
                for target in targets:
                    y = labels(raw, target)
                    if len(np.unique(y)) < 2:  # e.g. a class the model never generates
                        skipped.append(f"{space}/{source}/{target.name}: one label only")
                        continue
                    v = (dirs.class_mean_direction(fit[space], y) if source == "mean"
                         else dirs.svm_direction(fit[space], y, cfg.C))
                    vectors.append(torch.from_numpy(dirs.scaled(v, fit[space])).float()[None])
                    aimed.append(target)
                if not vectors:
                    continue
                edits = Edits(vectors, aimed)
            tag = f"{TAGS[space]}_{source}"
            found, images = _measure(ctx, cfg, predictor, targets, x_T, space, edits,
                                     distance, f"lin_{tag}_")
            values.update(found)
            arrays.update({f"{name}_{tag}": a for name, a in images.items()})
    protocol = {**protocol_of(cfg), "backbone": f"lpips-v0.1-{cfg.net}",
                "targets_used": [t.name for t in targets], "h_at": "t = T for directions; edits "
                "offset h on every step with t >= t_edit (Asyrp's asymmetric process)",
                "scale": "alpha = 1: one std of the fit codes along the direction; local: "
                         "x_T's unit singular vector, in h J v"}
    provenance = {"weights": weights, "classifier_heldout": predictor.report,
                  **({"skipped": skipped} if skipped else {})}
    return MetricResult(values, protocol, provenance, arrays)
