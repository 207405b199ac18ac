"""Editing, measured: linearity, linear combination and identity preservation of edits in
x_T and in h (the paper's Figures 7 and 8 as numbers; reference/metrics.md).

Directions (isodiff.model.directions), per space and source:
- mean / svm: class-mean difference / linear-SVM normal of `fit_n` generated samples
  labelled by the dataset's attribute predictors (attributes.py): a continuous factor as
  above / below its median, a circular one (hue) by the half circle around its circular
  mean (label 1 where cos 2 pi (angle - mean) > 0), a categorical one as class c against
  the rest; one direction a target factor. In x_T fitted on x_T. In h fitted per DDIM step:
  for each step with t >= t_edit, on the h the fit samples' own trajectories have at that
  step (h at t < T is not h at t = T, and Asyrp's edit acts on all those steps), and each
  step's direction is added on its own step;
- local: the top-`local_k` singular directions of dh/dx_T at t = T at each edited sample
  (no labels): x_T's unit vector v, and in h J v, the same offset on every step with
  t >= t_edit (not per step: J of later steps would need the trajectory's Jacobian).
Scale: alpha = 1 is one standard deviation of the fit codes along the direction (in h,
of that step's codes along that step's direction; local: x_T's unit vector, h's J v), and
`n` further samples are edited with strengths alpha (Figure 7's -2..2). h edits are then
stated in a unit known to move the image, the h-swap: `lin_h_swap` is the mean over
`swap_pairs` pairs (a, b) of fit samples of ||img(a, h <- h(b) on t >= t_edit) - img(a)||
/ ||img(b) - img(a)|| (directions.h_swap_influence), and each h direction is multiplied by
one factor (lin_h_<source>_gain, a mean over directions) that makes its edit at the largest
|alpha| move the edited images by `h_swapfrac` of the swap's mean image change
||img(a, h <- h(b)) - img(a)|| (one secant step). swapfrac, reported for every space and
source, is that ratio as achieved (x_T edits are not rescaled: 1 means the edit moves the
image as far as replacing h with another sample's h does). Measured on the edited images,
per sample:
- linearity: the target's response against alpha: least-squares slope and R^2 (a local
  direction's target is the attribute it moves most; its slope, and a circular target's,
  counted by size). Responses: continuous, the standardised prediction; categorical, the
  log-odds of class c; circular, the signed angle from the unedited sample's (wrapped to
  half a turn) over the fit samples' angular spread (RMS of wrapped deviations from their
  circular mean). leak: mean |slope| of the other
  continuous and circular attributes over the target's |slope|; r2img: R^2 of a straight
  line per pixel;
- effect / offtarget: mean |response(alpha) - response(0)| at the largest |alpha| of the
  target / of the other targets (other factors), each in units of its spread over the fit
  samples (standard deviation; circular: the angular spread): what an edit does to what it
  aims at beside what it does to everything else;
- identity: LPIPS between the unedited sample and its edits at the largest |alpha|;
- linear combination: two directions (the first two targets; local: k = 1, 2) at
  (a, b) in {-m, 0, m}^2, m the largest strength: |f(a, b) - f(a, 0) - f(0, b) + f(0, 0)|
  over |f(a, 0) - f(0, 0)| + |f(0, b) - f(0, 0)| for f the two targets' responses
  (interaction) or the image (interaction_img); 0 for an additive generator.
Values are lin_<xT|h>_<source>_<quantity>, averaged over samples and directions; per target
lin_<space>_<source>_r2_<target>; lin_h_swap once, lin_h_<source>_gain with h_swapfrac.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.attributes import (
    AttributeConfig,
    AttributeModel,
    attribute_model,
)
from isodiff.evaluate.metrics.factors import angle_of, circular_mean, wrapped
from isodiff.evaluate.metrics.result import MetricResult, protocol_of

if TYPE_CHECKING:  # torch, scipy and the model layer load inside the functions that use them
    import torch

    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.evaluate.metrics.perceptual import Distance

SOURCES = ("mean", "svm", "local")
# directions.SPACES, which loads torch (tests keep the two equal)
SPACES = ("x_T", "h")
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
    swap_pairs: int = 16  # pairs of fit samples whose h-swap is the unit of edit strengths
    # h edits in the unit of the h-swap: each h direction is rescaled (one factor over its
    # steps) so that its edit at the largest |alpha| moves the edited images by this
    # fraction of the h-swap's image change. One s.d. of h along a direction moves the image
    # by very different amounts per source (on the quick shapes base, largest edit over the
    # swap: mean 0.47, svm 0.012: the SVM normal lies where h hardly varies and the decoder
    # hardly looks), so a shared s.d. scale leaves svm edits inert. null: one s.d. per step.
    h_swapfrac: float | None = 0.5
    classifier: AttributeConfig = field(default_factory=AttributeConfig)

    def __post_init__(self) -> None:
        if 0.0 not in self.strengths or len(set(self.strengths)) < 3:
            raise ConfigError(
                f"eval.linearity.strengths={self.strengths}: give at least 3 "
                "strengths, 0 (the unedited sample) among them"
            )
        if 0.0 not in self.grid_strengths:
            raise ConfigError("eval.linearity.grid_strengths must hold 0")
        if bad := set(self.spaces) - set(SPACES):
            raise ConfigError(f"eval.linearity.spaces: {sorted(bad)}; use {SPACES}")
        if bad := set(self.sources) - set(SOURCES):
            raise ConfigError(f"eval.linearity.sources: {sorted(bad)}; use {SOURCES}")
        if (
            self.fit_n < 4
            or self.n < 1
            or self.local_k < 1
            or self.local_iters < 1
            or self.swap_pairs < 1
            or (self.h_swapfrac is not None and self.h_swapfrac <= 0)
        ):
            raise ConfigError(
                "eval.linearity needs fit_n >= 4, n >= 1, local_k >= 1, "
                "local_iters >= 1, swap_pairs >= 1 and h_swapfrac > 0 or null"
            )
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
    total = (r**2).sum(axis=0)
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
    total = (r**2).sum(axis=(0, 2))
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
            single = np.linalg.norm(grid[a, 1] - f00, axis=-1) + np.linalg.norm(
                grid[1, b] - f00, axis=-1
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                errors.append(np.where(single > 0, mixed / single, np.nan))
    return np.nanmean(np.stack(errors), axis=0)


def leakage(target_slopes: np.ndarray, other_slopes: np.ndarray) -> float:
    """Mean |slope| of the other attributes (J, N) over the target's mean |slope| (N,)."""
    if other_slopes.size == 0:
        return float("nan")
    return float(np.abs(other_slopes).mean() / np.abs(target_slopes).mean())


def mean_change(responses: np.ndarray, zero: int, far: np.ndarray) -> float:
    """Mean |response(alpha) - response(0)| over the strengths `far` and samples, of
    responses (S, N) with the unedited sample at row `zero`."""
    return float(np.abs(responses[far] - responses[zero]).mean())


def angular_spread(angles: np.ndarray) -> float:
    """The spread of angles in turns: the RMS of their wrapped deviations from their
    circular mean (a line's standard deviation for concentrated angles; sqrt(1/12) turns
    for angles uniform on the circle), in turns."""
    return float(np.sqrt(np.mean(wrapped(angles - circular_mean(angles)) ** 2)))


def circular_labels(angles: np.ndarray) -> np.ndarray:
    """Binary labels of angles in turns: 1 on the half circle around their circular mean
    (cos 2 pi (angle - mean) > 0), the circular counterpart of above the median."""
    return (np.cos(2 * np.pi * (angles - circular_mean(angles))) > 0).astype(np.int64)


# --- targets and responses ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A factor an edit aims at: continuous or circular (cls None), or class cls of a
    categorical one."""

    attribute: str
    cls: int | None = None
    kind: str = "continuous"

    @property
    def name(self) -> str:
        return self.attribute if self.cls is None else f"{self.attribute}{self.cls}"


def resolve_targets(predictor: AttributeModel, names: list[str] | None) -> list[Target]:
    kinds = {a.name: a for a in predictor.attributes}
    if names is None:
        return [
            Target(a.name, 1 if a.kind == "categorical" else None, a.kind)
            for a in predictor.attributes
        ]
    targets = []
    for name in names:
        attribute, _, cls = name.partition("=")
        a = kinds.get(attribute)
        if (
            a is None
            or (a.kind == "categorical") != (cls != "")
            or (cls and not (cls.isdigit() and int(cls) < a.classes))
        ):
            raise ConfigError(
                f"eval.linearity.targets: {name!r} is not a factor of this "
                f"dataset ({', '.join(kinds)}); a categorical factor is named "
                "with its class, e.g. shape=1"
            )
        targets.append(Target(attribute, int(cls) if cls else None, a.kind))
    return targets


def response(
    raw: dict[str, np.ndarray], target: Target, base: np.ndarray | None = None, spread: float = 1.0
) -> np.ndarray:
    """The target's value in `AttributeModel.responses` output: the standardised prediction,
    the log-odds of class cls, or (circular) the signed angle from the unedited samples'
    (base: their raw (cos, sin), row for row), wrapped, over the angular spread."""
    from scipy.special import logsumexp

    out = raw[target.attribute]
    if target.kind == "circular":
        if base is None:
            raise ValueError(
                f"{target.name} is circular: its response needs the unedited "
                "samples' outputs (base)"
            )
        return wrapped(angle_of(out) - angle_of(base)) / spread
    if target.cls is None:
        return out
    others = np.delete(out, target.cls, axis=1)
    return out[:, target.cls] - logsumexp(others, axis=1)


def labels(raw: dict[str, np.ndarray], target: Target) -> np.ndarray:
    """Binary labels of the fit samples: above the median, on the half circle around the
    circular mean, or predicted as class cls."""
    values = raw[target.attribute]
    if target.kind == "circular":
        return circular_labels(angle_of(values))
    if target.cls is None:
        return (values > np.median(values)).astype(np.int64)
    return (values.argmax(axis=1) == target.cls).astype(np.int64)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Readout:
    """The attribute predictor with what turns its outputs into responses: the targets, the
    other attributes a leak is read on, the circular attributes' angular spreads and each
    target's unit (its response's spread over the fit samples)."""

    predictor: AttributeModel
    targets: list[Target]
    spreads: dict[str, float]  # circular attribute -> angular spread (turns)
    units: dict[str, float]  # target name -> standard deviation of its response

    @property
    def others(self) -> list[Target]:
        """The attributes leak is read on: the continuous and the circular ones."""
        return [
            Target(a.name, None, a.kind)
            for a in self.predictor.attributes
            if a.kind != "categorical"
        ]

    def grid(
        self,
        raw: dict[str, np.ndarray],
        target: Target,
        shape: tuple[int, ...],
        zero: tuple[int, ...],
    ) -> np.ndarray:
        """The target's responses to images laid out as `shape` (..., N), flattened row-major
        in raw, the unedited sample of each column at index `zero` of the leading axes."""
        base = None
        if target.kind == "circular":
            out = raw[target.attribute].reshape(*shape, 2)
            base = np.broadcast_to(out[zero], out.shape).reshape(-1, 2)
        values = response(raw, target, base, self.spreads.get(target.attribute, 1.0))
        return values.reshape(shape)


def readout(
    predictor: AttributeModel, targets: list[Target], raw: dict[str, np.ndarray]
) -> Readout:
    """The Readout of fit samples' raw outputs: spreads and units from their unedited
    responses (a circular response is already in spreads: unit 1)."""
    spreads = {
        a.name: angular_spread(angle_of(raw[a.name]))
        for a in predictor.attributes
        if a.kind == "circular"
    }
    # a response constant over the fit samples has no unit: its changes read nan
    units = {
        t.name: 1.0 if t.kind == "circular" else float(np.std(response(raw, t))) or float("nan")
        for t in targets
    }
    return Readout(predictor, targets, spreads, units)


# --- evaluation ---------------------------------------------------------------------------


@dataclass
class Edits:
    """One source's directions in one space: vectors (each (N or 1, D), or per DDIM step
    (steps, N or 1, D)) and the target of each (None: the attribute it moves most); the
    first two are the combined pair."""

    vectors: list[torch.Tensor]
    targets: list[Target | None]


def _rows(v: torch.Tensor, n: int) -> torch.Tensor:
    """A direction with its sample axis (second from last) expanded to n rows."""
    return v.expand(*v.shape[:-2], n, v.shape[-1])


def _local(ctx: EvalContext, cfg: LinearityConfig, x_T: torch.Tensor, t: int) -> dict[str, Edits]:
    """Per edited sample, the top-k singular directions of dh/dx_T: v_k in x_T, s_k u_k in h."""
    import torch

    from isodiff.evaluate.metrics.jacobian import h_map
    from isodiff.isometry import higher_order_ad
    from isodiff.model import directions as dirs

    f = h_map(ctx, t, 1)
    V, U = [], []
    with higher_order_ad():
        for i in ctx.chunks(len(x_T), "editing: local basis", size=1):
            v, u, s = dirs.top_singular_vectors(
                f, x_T[i.start].to(ctx.device), cfg.local_k, cfg.local_iters, seed=i.start
            )
            V.append(v.float().cpu())
            U.append((u * s[:, None]).float().cpu())
    V, U = torch.stack(V), torch.stack(U)  # (N, k, D)
    return {
        "x_T": Edits([V[:, k] for k in range(cfg.local_k)], [None] * cfg.local_k),
        "h": Edits([U[:, k] for k in range(cfg.local_k)], [None] * cfg.local_k),
    }


def _measure(
    ctx: EvalContext,
    cfg: LinearityConfig,
    read: Readout,
    x_T: torch.Tensor,
    space: str,
    edits: Edits,
    distance: Distance,
    swap_move: float,
    prefix: str,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One source's directions in one space, edited and measured: values named prefix<q>,
    and the images of Figures 7 and 8 (strip; grid when there are two directions)."""
    import torch

    from isodiff.model import directions as dirs
    from isodiff.model.sampling import quantise

    ddim, strengths = ctx.ddim(cfg.steps), np.asarray(cfg.strengths, dtype=np.float64)
    D, S, N = len(edits.vectors), len(strengths), len(x_T)
    offsets = torch.cat([dirs.strength_offsets(strengths, _rows(v, N)) for v in edits.vectors])
    images = dirs.edit(ddim, x_T, space, offsets, cfg.t_edit, ctx.codec.decode)
    images = images.reshape(D, S, N, *images.shape[2:])
    raw = {
        k: v.reshape(D, S * N, *v.shape[1:])
        for k, v in read.predictor.responses(images.flatten(0, 2)).items()
    }
    zero = int(np.flatnonzero(strengths == 0)[0])
    far = np.flatnonzero(np.abs(strengths) == np.abs(strengths).max())
    r2s: dict[str, list[float]] = {}
    slopes, leaks, r2img, lpips, chosen, effects, offtargets, moves = ([] for _ in range(8))
    for d, aimed in enumerate(edits.targets):

        def along(t: Target, d: int = d) -> np.ndarray:  # (S, N)
            return read.grid({k: v[d] for k, v in raw.items()}, t, (S, N), (zero,))

        def fit(t: Target) -> tuple[np.ndarray, np.ndarray]:
            return linear_fit(strengths, along(t))

        # a local direction (no target) aims at the attribute it moves most; its sign is
        # arbitrary per sample, so its slope is counted by size. So is a circular target's:
        # a straight line turns each hue towards one angle, clockwise or not by its side.
        target = aimed or max(read.targets, key=lambda t: np.abs(fit(t)[0]).mean())
        chosen.append(target)
        slope, r2 = fit(target)
        r2s.setdefault(target.name, []).append(float(np.nanmean(r2)))
        by_size = aimed is None or target.kind == "circular"
        slopes.append(np.abs(slope).mean() if by_size else slope.mean())
        others = [fit(t)[0] for t in read.others if t.attribute != target.attribute]
        leaks.append(leakage(slope, np.array(others)))
        effects.append(mean_change(along(target), zero, far) / read.units[target.name])
        off = [
            mean_change(along(t), zero, far) / read.units[t.name]
            for t in read.targets
            if t.attribute != target.attribute
        ]
        offtargets.append(_nanmean(off) if off else np.nan)
        r2img.append(np.nanmean(image_r2(strengths, images[d].double().numpy())))
        lpips.append(np.mean([distance(images[d, zero], images[d, s]).numpy() for s in far]))
        moves.append(
            np.mean(
                [
                    (images[d, s] - images[d, zero]).flatten(1).double().norm(dim=1).numpy()
                    for s in far
                ]
            )
        )
    values = {
        f"{prefix}r2": float(np.mean([np.mean(v) for v in r2s.values()])),
        f"{prefix}slope": float(np.mean(slopes)),
        f"{prefix}leak": _nanmean(leaks),
        f"{prefix}effect": float(np.mean(effects)),
        f"{prefix}offtarget": _nanmean(offtargets),
        f"{prefix}swapfrac": float(np.mean(moves) / swap_move) if swap_move > 0 else float("nan"),
        f"{prefix}r2img": float(np.nanmean(r2img)),
        f"{prefix}lpips": float(np.mean(lpips)),
        **{f"{prefix}r2_{name}": float(np.mean(v)) for name, v in r2s.items()},
    }
    keep = min(cfg.keep_images, N)
    arrays = {"strip": quantise(images[0, :, :keep].transpose(0, 1)).numpy()}  # (K, S, ...)
    if D >= 2:
        values.update(_combination(ctx, cfg, read, x_T, space, edits, chosen[:2], prefix))
        g = len(cfg.grid_strengths)
        grid = dirs.pair_offsets(
            cfg.grid_strengths, edits.vectors[0][..., :1, :], edits.vectors[1][..., :1, :]
        )
        pictures = dirs.edit(ddim, x_T[:1], space, grid, cfg.t_edit, ctx.codec.decode)[:, 0]
        arrays["grid"] = quantise(pictures).numpy().reshape(g, g, *pictures.shape[1:])
    return values, arrays


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _combination(
    ctx: EvalContext,
    cfg: LinearityConfig,
    read: Readout,
    x_T: torch.Tensor,
    space: str,
    edits: Edits,
    targets: list[Target],
    prefix: str,
) -> dict[str, float]:
    """The interaction of the first two directions at the corners of the largest strength."""
    from isodiff.model import directions as dirs

    m, N = float(np.abs(cfg.strengths).max()), len(x_T)
    first, second = (_rows(v, N) for v in edits.vectors[:2])
    images = dirs.edit(
        ctx.ddim(cfg.steps),
        x_T,
        space,
        dirs.pair_offsets([-m, 0.0, m], first, second),
        cfg.t_edit,
        ctx.codec.decode,
    )
    raw = read.predictor.responses(images.flatten(0, 1))
    f = np.stack([read.grid(raw, t, (3, 3, N), (1, 1)) for t in targets], axis=-1)
    pixels = images.reshape(3, 3, N, -1).double().numpy()
    return {
        f"{prefix}interaction": float(np.nanmean(interaction_error(f))),
        f"{prefix}interaction_img": float(np.nanmean(interaction_error(pixels))),
    }


def _supervised(
    cfg: LinearityConfig, source: str, codes: np.ndarray, y: np.ndarray, steps: np.ndarray | None
) -> torch.Tensor:
    """One target's direction: (1, D) from codes (n, D) in x_T, or from h per DDIM step,
    codes (edited steps, n, D) -> (all steps, 1, D), zero on the steps not edited."""
    import torch

    from isodiff.model import directions as dirs

    def one(c: np.ndarray) -> torch.Tensor:
        c = c.astype(np.float64)
        v = dirs.class_mean_direction(c, y) if source == "mean" else dirs.svm_direction(c, y, cfg.C)
        return torch.from_numpy(dirs.scaled(v, c)).float()[None]

    if steps is None:
        return one(codes)
    out = torch.zeros(len(steps), 1, codes.shape[-1])
    out[torch.from_numpy(steps)] = torch.stack([one(c) for c in codes])
    return out


def swap_gain(move: float, swap_move: float, swapfrac: float) -> float:
    """The factor that takes an edit whose image change is `move` to `swapfrac` of the
    h-swap's image change (one secant step: image changes grow about linearly with small
    edits); 1 where the edit does not move the image."""
    return swapfrac * swap_move / move if move > 0 and swap_move > 0 else 1.0


def image_move(images: torch.Tensor, plain: torch.Tensor) -> float:
    """Mean L2 distance of edited images (E, N, ...) from the unedited ones (N, ...)."""
    return float((images - plain).flatten(2).double().norm(dim=2).mean())


def _calibrated(
    ctx: EvalContext, cfg: LinearityConfig, x_T: torch.Tensor, edits: Edits, swap_move: float
) -> tuple[Edits, list[float]]:
    """h directions rescaled to move the images of x_T by cfg.h_swapfrac of the h-swap at
    the largest |alpha| (both signs), and the factor of each."""
    import torch

    from isodiff.model import directions as dirs

    m, N = float(np.abs(cfg.strengths).max()), len(x_T)
    ddim = ctx.ddim(cfg.steps)
    plain = dirs.edit(ddim, x_T, "x_T", torch.zeros(1, 1, x_T[0].numel()), 0, ctx.codec.decode)[0]
    gains = []
    for v in edits.vectors:
        images = dirs.edit(
            ddim,
            x_T,
            "h",
            dirs.strength_offsets([-m, m], _rows(v, N)),
            cfg.t_edit,
            ctx.codec.decode,
        )
        gains.append(swap_gain(image_move(images, plain), swap_move, cfg.h_swapfrac))
    return Edits([g * v for g, v in zip(gains, edits.vectors, strict=True)], edits.targets), gains


def evaluate(ctx: EvalContext, cfg: LinearityConfig) -> MetricResult:
    """Edits of cfg.n generated samples along every space x source direction."""
    import torch

    from isodiff.model import directions as dirs
    from isodiff.model.sampling import latents

    predictor = attribute_model(ctx, cfg.classifier)
    targets = resolve_targets(predictor, cfg.targets)
    ddim = ctx.ddim(cfg.steps)
    t_T = int(ddim.schedule.timesteps[0])
    edited = (ddim.schedule.timesteps >= cfg.t_edit).numpy()  # the steps an h edit acts on
    spaces = [s for s in cfg.spaces if s != "h" or edited.any()]
    skipped = [] if spaces == cfg.spaces else [f"h: no DDIM step has t >= {cfg.t_edit}"]
    codes: dict[str, list[np.ndarray]] = {"x_T": [], "h": []}
    raw_parts, fit_h = [], "h" in spaces and set(cfg.sources) - {"local"}
    for rows in ctx.chunks(cfg.fit_n, "editing: fit samples"):
        x_T = latents(ctx.seed, rows, ctx.x_shape)
        if fit_h:  # h per step: the fit samples' own trajectories
            run = ddim.sample(x_T, return_h=True)
            raw_parts.append(predictor.responses(ctx.images(run.x).cpu()))
            codes["h"].append(run.h[torch.from_numpy(edited)].numpy())  # fp32: steps x n x D
        else:
            raw_parts.append(predictor.responses(ctx.generated(cfg.steps, rows)))
        codes["x_T"].append(x_T.flatten(1).double().numpy())
    raw = _concat(raw_parts)
    read = readout(predictor, targets, raw)
    fit = {"x_T": np.concatenate(codes["x_T"])}
    if codes["h"]:
        fit["h"] = np.concatenate(codes["h"], axis=1)  # (edited steps, fit_n, D)
    # the h-swap of pairs of fit samples (a, b) = (i, m + i): the unit of edit strengths
    m = min(cfg.swap_pairs, cfg.fit_n // 2)
    moved, gap = dirs.h_swap_moves(
        ddim,
        latents(ctx.seed, range(m), ctx.x_shape),
        latents(ctx.seed, range(m, 2 * m), ctx.x_shape),
        cfg.t_edit,
        ctx.codec.decode,
    )
    x_T = latents(ctx.seed, range(cfg.fit_n, cfg.fit_n + cfg.n), ctx.x_shape)
    local = _local(ctx, cfg, x_T, t_T) if "local" in cfg.sources else {}
    distance, weights = ctx.lpips(cfg.net)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {"lin_h_swap": float(np.mean(np.where(gap > 0, moved / gap, 0.0)))}
    arrays = {}
    for space in spaces:
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
                    vectors.append(
                        _supervised(cfg, source, fit[space], y, edited if space == "h" else None)
                    )
                    aimed.append(target)
                if not vectors:
                    continue
                edits = Edits(vectors, aimed)
            tag = f"{TAGS[space]}_{source}"
            if space == "h" and cfg.h_swapfrac is not None:
                edits, gains = _calibrated(ctx, cfg, x_T, edits, float(moved.mean()))
                values[f"lin_{tag}_gain"] = float(np.mean(gains))
            found, images = _measure(
                ctx, cfg, read, x_T, space, edits, distance, float(moved.mean()), f"lin_{tag}_"
            )
            values.update(found)
            arrays.update({f"{name}_{tag}": a for name, a in images.items()})
    protocol = {
        **protocol_of(cfg),
        "backbone": f"lpips-v0.1-{cfg.net}",
        "targets_used": [t.name for t in targets],
        "h_at": "supervised h directions fitted per DDIM step on the fit samples' "
        "trajectories and added on their own step (t >= t_edit); local: J at "
        "t = T, the same offset on every step with t >= t_edit (Asyrp's "
        "asymmetric process)",
        "scale": "alpha = 1: one std of the fit codes along the direction (h: of "
        "each step's codes); local: x_T's unit singular vector, in h J v; "
        "h directions then times lin_h_<source>_gain, which makes the "
        "largest edit move the edited images by h_swapfrac of the h-swap",
        "swap": f"lin_h_swap over {m} pairs of fit samples; swapfrac: image change "
        "at the largest |alpha| over the h-swap's image change",
        "units": "effect/offtarget: each response over its std on the fit samples; "
        "circular: angle from the unedited sample over the fit samples' "
        "angular spread (turns, angular_spread)",
        "angular_spread": read.spreads,
    }
    provenance = {
        "weights": weights,
        "classifier_heldout": predictor.report,
        **({"skipped": skipped} if skipped else {}),
    }
    return MetricResult(values, protocol, provenance, arrays)


METRIC = Metric(
    name="linearity",
    config=LinearityConfig,
    values=("lin_",),
    order=10,
    summary=(r"lin_(xT|h)_mean_leak", r"lin_(xT|h)_mean_interaction"),
)
