"""isodiff.geometry against closed forms: chart, conformal metric, projector, slerp."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from isodiff import geometry as geo


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def points(b: int, n: int, r: float | torch.Tensor, seed: int = 0) -> torch.Tensor:
    x = torch.randn(b, n, generator=torch.Generator().manual_seed(seed))
    return geo.onto_sphere(x, r)


@pytest.mark.parametrize("r", [0.5, 1.0, 7.0])
@pytest.mark.parametrize("pole", [None, "random", "south"])
def test_chart_round_trip_and_pole(r, pole):
    n = 5
    p = {None: None, "random": torch.randn(n), "south": -torch.eye(n)[-1]}[pole]
    x = points(16, n, r)
    z = geo.stereographic(x, r, p)
    assert z.shape == (16, n - 1)
    back = geo.inverse_stereographic(z, r, p)
    torch.testing.assert_close(back, x)
    # The point opposite the pole goes to the chart's origin.
    q = torch.eye(n)[-1] if p is None else p / p.norm()
    torch.testing.assert_close(geo.stereographic(-r * q[None], r, p), torch.zeros(1, n - 1))


def test_chart_formula_north_pole():
    x = torch.tensor([[0.6, 0.0, 0.8]])  # on the unit sphere
    torch.testing.assert_close(geo.stereographic(x, 1.0), torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(geo.stereographic(2 * x, 2.0), torch.tensor([[6.0, 0.0]]))


@pytest.mark.parametrize("r", [0.3, 2.0])
@pytest.mark.parametrize("random_pole", [False, True])
def test_conformal_factor_is_the_pullback_metric(r, random_pole):
    """D Pi^{-1}(z)^T D Pi^{-1}(z) = G(z) = 4 r^4 / (|z|^2 + r^2)^2 I."""
    n = 4
    pole = torch.randn(n) if random_pole else None
    z = torch.randn(3, n - 1)
    g = geo.conformal_factor(z, r)
    for i in range(3):
        d = jacobian(lambda zi: geo.inverse_stereographic(zi[None], r, pole)[0], z[i])
        torch.testing.assert_close(d.T @ d, g[i] * torch.eye(n - 1))


def test_tangent_projector_matches_matrix():
    x = torch.randn(4, 2, 3)  # non-flat samples: one projector per sample over all dims
    v = torch.randn(4, 2, 3)
    pv = geo.tangent_project(v, x)
    for i in range(4):
        xi = x[i].reshape(-1)
        p = torch.eye(6) - torch.outer(xi, xi) / xi.dot(xi)
        torch.testing.assert_close(pv[i].reshape(-1), p @ v[i].reshape(-1))
    torch.testing.assert_close(geo.inner(pv, x), torch.zeros(4), atol=1e-12, rtol=0)
    torch.testing.assert_close(geo.tangent_project(pv, x), pv)


def test_radius_choices():
    x = torch.randn(3, 2, 8) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    torch.testing.assert_close(geo.sphere_radius(x, "norm"), x.flatten(1).norm(dim=1))
    torch.testing.assert_close(geo.sphere_radius(x, "sqrt_n"), torch.full((3,), 4.0))
    torch.testing.assert_close(geo.sphere_radius(x, "official"), torch.full((3,), math.sqrt(15)))
    on = geo.onto_sphere(x, geo.sphere_radius(x, "sqrt_n"))
    torch.testing.assert_close(on.flatten(1).norm(dim=1), torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="radius"):
        geo.sphere_radius(x, "unit")


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = geo.inner(a, b) / (geo.sq_norm(a) * geo.sq_norm(b)).sqrt()
    return torch.arccos(cos.clamp(-1, 1))


def test_slerp_keeps_norms_and_per_sample_angles():
    x0 = torch.randn(5, 3, 4, 4)
    x1 = geo.onto_sphere(torch.randn(5, 3, 4, 4), geo.sq_norm(x0).sqrt())
    theta = angle(x0, x1)
    for w in [0.0, 0.25, 0.5, 0.9, 1.0]:
        xw = geo.slerp(x0, x1, w)
        torch.testing.assert_close(geo.sq_norm(xw), geo.sq_norm(x0))
        torch.testing.assert_close(angle(x0, xw), w * theta, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(geo.slerp(x0, x1, 0.0), x0)
    torch.testing.assert_close(geo.slerp(x0, x1, 1.0), x1)


def test_slerp_per_sample_weights_and_no_unit_normalisation():
    x0, x1 = 3 * torch.randn(4, 10), 3 * torch.randn(4, 10)
    x1 = geo.onto_sphere(x1, geo.sq_norm(x0).sqrt())
    w = torch.tensor([0.0, 0.3, 0.6, 1.0])
    xw = geo.slerp(x0, x1, w)
    for i in range(4):
        torch.testing.assert_close(xw[i], geo.slerp(x0[i : i + 1], x1[i : i + 1], float(w[i]))[0])
    torch.testing.assert_close(geo.sq_norm(xw), geo.sq_norm(x0))  # not the unit sphere


def test_slerp_tiny_angle_falls_back_to_lerp():
    x0 = torch.randn(2, 6)
    x1 = x0 + 1e-9 * torch.randn(2, 6)
    xw = geo.slerp(x0, x1, 0.5)
    assert torch.isfinite(xw).all()
    torch.testing.assert_close(xw, geo.lerp(x0, x1, 0.5))


def test_lerp():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(geo.lerp(x0, x1, 0.25), torch.full((2, 3), 0.25))
    torch.testing.assert_close(
        geo.lerp(x0, x1, torch.tensor([0.0, 1.0])), torch.tensor([[0.0] * 3, [1.0] * 3])
    )
