"""Geometry of the latent X = S^{n-1}(r) (Hahm et al., sec. 3.2).

The stereographic chart Pi of the sphere of radius r, its inverse, the conformal metric it
pulls back, the tangent projector, the radius choices of `iso.radius`, and the two
interpolations of x_T used in evaluation (lerp, slerp). Pure functions on batches: dim 0 is
the batch, every other dim belongs to one sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RADII = ("norm", "sqrt_n", "official")


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against a batch shaped like `like`."""
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all non-batch dims, shape (B,)."""
    return (a * b).flatten(1).sum(1)


def sq_norm(a: Tensor) -> Tensor:
    """Per-sample squared norm over all non-batch dims, shape (B,)."""
    return a.flatten(1).pow(2).sum(1)


def dim(x: Tensor) -> int:
    """n: the ambient dimension of one sample."""
    return x[0].numel()


def sphere_radius(x: Tensor, radius: str) -> Tensor:
    """Radius r (B,) of the sphere each sample of x is placed on (`iso.radius`).

    norm: each sample's own |x| (x stays where it is); sqrt_n: sqrt(n), where a standard
    Gaussian in R^n concentrates (the paper); official: sqrt(n - 1), the radius the official
    code's inverse chart maps onto.
    """
    if radius == "norm":
        return sq_norm(x).sqrt()
    n = dim(x)
    if radius == "sqrt_n":
        value = math.sqrt(n)
    elif radius == "official":
        value = math.sqrt(n - 1)
    else:
        raise ValueError(f"radius={radius!r}: use one of {RADII}")
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


def onto_sphere(x: Tensor, r: Tensor | float) -> Tensor:
    """Radial projection x -> r x / |x| (r scalar or per sample)."""
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return x * _per_sample(r / sq_norm(x).sqrt(), x)


def tangent_project(v: Tensor, x: Tensor) -> Tensor:
    """P_x v = v - x <x, v> / |x|^2: the component of v tangent to the sphere through x.

    Applied per sample; the n x n projector I - x x^T / |x|^2 is never formed.
    """
    return v - x * _per_sample(inner(x, v) / sq_norm(x), x)


def _to_north(x: Tensor, pole: Tensor | None) -> Tensor:
    """Householder reflection H (an involution) with H pole = e_n, on flat (B, n) rows.

    A chart with any pole is the standard chart (pole e_n) after H; for pole = e_n, H = I.
    """
    if pole is None:
        return x
    p = pole.reshape(-1).to(x)
    p = p / p.norm()
    w = p.clone()
    w[-1] -= 1.0
    ww = w.dot(w)
    if ww < 1e-24:  # pole is e_n already
        return x
    return x - (2.0 / ww) * (x @ w)[:, None] * w


def stereographic(x: Tensor, r: Tensor | float, pole: Tensor | None = None) -> Tensor:
    """Chart Pi: S^{n-1}(r) -> R^{n-1}, Pi(x) = r x_{1:n-1} / (r - x_n) (paper, sec. 3.2).

    x: (B, ...) points on the sphere of radius r (scalar or (B,)); pole: a direction in R^n
    (any shape with n entries), the north pole e_n when None. Returns z: (B, n-1).
    """
    y = _to_north(x.flatten(1), pole)
    r = torch.as_tensor(r, dtype=y.dtype, device=y.device).reshape(-1, 1)
    return r * y[:, :-1] / (r - y[:, -1:])


def inverse_stereographic(z: Tensor, r: Tensor | float, pole: Tensor | None = None) -> Tensor:
    """Pi^{-1}(z) = (2 r^2 z, r (|z|^2 - r^2)) / (|z|^2 + r^2): (B, n-1) -> (B, n) flat."""
    r = torch.as_tensor(r, dtype=z.dtype, device=z.device).reshape(-1, 1)
    zz = z.pow(2).sum(1, keepdim=True)
    y = torch.cat([2 * r**2 * z, r * (zz - r**2)], dim=1) / (zz + r**2)
    return _to_north(y, pole)


def conformal_factor(z: Tensor, r: Tensor | float) -> Tensor:
    """The chart's pulled-back metric G(z) = g(z) I with g = 4 r^4 / (|z|^2 + r^2)^2; (B,)."""
    r = torch.as_tensor(r, dtype=z.dtype, device=z.device).reshape(-1)
    return 4 * r**4 / (z.flatten(1).pow(2).sum(1) + r**2) ** 2


def lerp(x0: Tensor, x1: Tensor, w: float | Tensor) -> Tensor:
    """(1 - w) x0 + w x1; w a scalar or one weight per sample (B,)."""
    w = torch.as_tensor(w, dtype=x0.dtype, device=x0.device)
    if w.ndim:
        w = _per_sample(w, x0)
    return x0 + w * (x1 - x0)


def slerp(x0: Tensor, x1: Tensor, w: float | Tensor) -> Tensor:
    """Spherical interpolation with one angle theta per sample pair (over all non-batch dims):

        slerp = sin((1 - w) theta) / sin(theta) x0 + sin(w theta) / sin(theta) x1.

    Keeps |x| along the path when |x0| = |x1| (nothing is normalised: the path stays on the
    sphere through the endpoints, not on the unit sphere). Falls back to lerp where theta is
    too small for the quotient to be accurate. w: scalar or per sample (B,).
    """
    w = torch.as_tensor(w, dtype=x0.dtype, device=x0.device)
    w = _per_sample(w.expand(x0.shape[0]), x0)
    u0 = x0 / _per_sample(sq_norm(x0).sqrt(), x0)
    u1 = x1 / _per_sample(sq_norm(x1).sqrt(), x1)
    # 2 atan2(|u0 - u1|, |u0 + u1|) is accurate at every angle, unlike acos of the cosine.
    theta = 2 * torch.atan2(sq_norm(u0 - u1).sqrt(), sq_norm(u0 + u1).sqrt())
    theta = _per_sample(theta, x0)
    small = theta < 1e-4
    sin_theta = torch.where(small, torch.ones_like(theta), torch.sin(theta))
    curved = (torch.sin((1 - w) * theta) * x0 + torch.sin(w * theta) * x1) / sin_theta
    return torch.where(small, x0 + w * (x1 - x0), curved)
