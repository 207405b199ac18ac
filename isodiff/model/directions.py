"""Editing directions in x_T and in h, and edits along them.

A direction comes from one of three sources, all returned as vectors in the code space:
- supervised: the class-mean difference or the linear-SVM normal of labelled codes (x_T, or
  h at t = T), the labels from ground-truth factors, a dataset's labels or an attribute file;
- local (unsupervised): the top right-singular vectors v_k of J = dh/dx_T at one x_T, by
  subspace iteration with JVPs and VJPs (Park et al., NeurIPS 2023's local basis), and their
  images in h, s_k u_k = J v_k;
- applied in x_T (x_T + alpha v, then DDIM) or in h by Asyrp's asymmetric process
  (h + alpha v on the steps with t >= t_edit; `isodiff.model.sampling.HEdit`).

Strengths are in units of the direction's scale: `scaled` sets it to one standard
deviation of the codes' projection on the direction, so alpha = 2 is as far along it as two
standard deviations of the data's own codes, in every space and for every model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from isodiff.model.sampling import HEdit, Sampler, to_images

Map = Callable[[torch.Tensor], torch.Tensor]  # (B, *x) -> (B, m), row by row
SPACES = ("x_T", "h")


def class_mean_direction(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mean(codes of label 1) - mean(codes of label 0), (N, D) and (N,) -> (D,)."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("a class-mean direction needs samples of both labels")
    return codes[labels].mean(axis=0) - codes[~labels].mean(axis=0)


def svm_direction(codes: np.ndarray, labels: np.ndarray, C: float = 1.0) -> np.ndarray:
    """The normal of a linear SVM separating label 1 from label 0, in code units (D,).

    The SVM is fit on standardised codes (as linear separability is); its normal w there is
    w / scale in the codes' own units, pointing towards label 1.
    """
    labels = np.asarray(labels).astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError("an SVM direction needs samples of both labels")
    # random_state: liblinear's coordinate order (else numpy's global state: not reproducible)
    scaler, svm = make_pipeline(
        StandardScaler(), LinearSVC(C=C, max_iter=20_000, random_state=0)
    ).fit(codes, labels)
    return svm.coef_[0] / scaler.scale_


def scaled(direction: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The direction with the length of one standard deviation of the codes' projection on
    it (alpha = 1 is one such standard deviation)."""
    unit = direction / np.linalg.norm(direction)
    return unit * (codes @ unit).std()


def top_singular_vectors(
    f: Map, x: torch.Tensor, k: int, iters: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V (k, n), U (k, m), s (k,)): the top-k right- and left-singular vectors of J = df/dx
    at one point x (*x), singular values decreasing, J V^T = U^T diag(s).

    Subspace (block power) iteration on J^T J: V <- orth(J^T J V), one batched JVP and one
    batched VJP per iteration, so J is never formed. The error in V falls as
    (s_{k+1} / s_k)^(2 iters).
    """
    n = x.numel()
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    primal = x.expand(k, *x.shape).clone()
    _, vjp = torch.func.vjp(f, primal)

    def J(v: torch.Tensor) -> torch.Tensor:  # (n, k) -> (m, k)
        tangent = v.T.reshape(k, *x.shape).to(x.dtype)
        return torch.func.jvp(f, (primal,), (tangent,))[1].T.double()

    for _ in range(iters):
        W = vjp(J(V).T.to(x.dtype).contiguous())[0].reshape(k, n).T.double()
        V = torch.linalg.qr(W)[0]
    JV = J(V)
    s = JV.norm(dim=0)
    order = torch.argsort(s, descending=True)
    V, JV, s = V[:, order], JV[:, order], s[order]
    return V.T.contiguous(), (JV / s).T.contiguous(), s


def edit(
    ddim: Sampler,
    x_T: torch.Tensor,
    space: str,
    offsets: torch.Tensor,
    t_edit: int = 0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images (E, N, C, H, W) in [-1, 1] of N samples under E edits.

    offsets: (E, N or 1, D), edit e of sample i moves x_T (space "x_T") or h on the steps
    with t >= t_edit (space "h", Asyrp) by offsets[e, i]; in h also (E, S, N or 1, D), one
    offset per DDIM step k (k = 0 at t = T; rows of steps with t < t_edit are never used).
    A zero offset gives the unedited sample exactly, in both spaces. decode: a latent
    model's decoder (isodiff.model.latent).
    """
    if space not in SPACES:
        raise ValueError(f"space={space!r}: use one of {SPACES}")
    E, N, D = offsets.shape[0], x_T.shape[0], offsets.shape[-1]
    start = x_T.repeat(E, *([1] * (x_T.ndim - 1)))
    if offsets.ndim == 4:
        if space != "h" or offsets.shape[1] != ddim.steps:
            raise ValueError(
                f"per-step offsets {tuple(offsets.shape)} need space h and "
                f"one row per DDIM step ({ddim.steps})"
            )
        # (E, S, N, D) -> (S, E * N, D): step-major, rows as `start` orders them
        per_step = (
            offsets.expand(E, ddim.steps, N, D)
            .transpose(0, 1)
            .reshape(ddim.steps, E * N, D)
            .float()
        )
        out = ddim.sample(start, edit=HEdit(step_offset=per_step, t_edit=t_edit)).x
    else:
        offsets = offsets.expand(E, N, D).reshape(E * N, D).float()
        if space == "x_T":
            out = ddim.sample(start + offsets.reshape(start.shape)).x
        else:
            out = ddim.sample(start, edit=HEdit(offset=offsets, t_edit=t_edit)).x
    images = to_images(decode(out) if decode else out)
    return images.reshape(E, N, *images.shape[1:])


def h_swap_moves(
    ddim: Sampler,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    t_edit: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(moved, gap), per pair i (N,): ||img(a_i, h <- h(b_i) on t >= t_edit) - img(a_i)||
    and ||img(b_i) - img(a_i)||, images in [-1, 1] as `edit` makes them (`h_swap_influence`)."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must match")

    def images(x: torch.Tensor) -> torch.Tensor:
        return to_images(decode(x) if decode else x).flatten(1).double()

    run_b = ddim.sample(x_b, return_h=True)  # Trajectory.h (S, N, D): step k at [k], as HEdit
    plain_a = images(ddim.sample(x_a).x)
    swapped = images(ddim.sample(x_a, edit=HEdit(replace=run_b.h, t_edit=t_edit)).x)
    return (
        (swapped - plain_a).norm(dim=1).numpy(),
        (images(run_b.x) - plain_a).norm(dim=1).numpy(),
    )


def h_swap_influence(
    ddim: Sampler,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    t_edit: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """How far the image follows h, per pair i (N,): ||img(a_i, h <- h(b_i) on t >= t_edit)
    - img(a_i)|| / ||img(b_i) - img(a_i)||, images in [-1, 1] as `edit` makes them.

    a_i is sampled with its h replaced, on every step with t >= t_edit, by the h that b_i's
    own trajectory has at that step (Asyrp's asymmetric process: the skips and the
    direction's eps stay a_i's). 0: the decoder ignores h; near 1: h decides the image. An
    h edit's strength is stated as a fraction of this swap's image change. A pair with
    img(b_i) = img(a_i) (b_i = a_i) reads 0: swapping in the same h moves nothing.
    """
    moved, gap = h_swap_moves(ddim, x_a, x_b, t_edit, decode)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, moved / gap, 0.0)


def strength_offsets(strengths: Sequence[float], directions: torch.Tensor) -> torch.Tensor:
    """(E, *directions' shape) offsets alpha_e * direction for directions (N or 1, D), or
    per step (steps, N or 1, D)."""
    alphas = torch.as_tensor(list(strengths), dtype=directions.dtype)
    return alphas.reshape(-1, *([1] * directions.ndim)) * directions[None]


def pair_offsets(
    strengths: Sequence[float], first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """(E * E, *shape) offsets a * first + b * second over the grid (a, b) of strengths,
    a-major (row a of Figure 8's layout), for directions (N or 1, D) or (steps, N or 1, D)."""
    alphas = torch.as_tensor(list(strengths), dtype=first.dtype)
    a, b = torch.meshgrid(alphas, alphas, indexing="ij")
    shape = (-1, *([1] * first.ndim))
    return a.reshape(shape) * first[None] + b.reshape(shape) * second[None]
