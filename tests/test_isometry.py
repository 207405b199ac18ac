"""L_iso, the path-length baseline and the timestep window against independent truth.

References are built from exact Jacobians (closed form for linear maps,
torch.autograd.functional.jacobian otherwise) and, for the spherical metric, from the
stereographic chart and its conformal metric, never from the projector implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.autograd.functional import jvp as functional_jvp
from torch.autograd.functional import vjp as functional_vjp

from isodiff import geometry as geo
from isodiff.config import IsoConfig, IsoMetric
from isodiff.isometry import (
    Regulariser,
    draw_probes,
    higher_order_ad,
    isometry_loss,
    isometry_loss_from_h,
    path_lengths,
    sample_timesteps,
)
from isodiff.model.unet import HUNet
from isodiff.train.objective import build_regulariser
from tests.conftest import tiny_unet


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """Tiny U-Nets: intra-op threads only add synchronisation (10x slower on a busy box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- references -------------------------------------------------------------------------


def ratio(a: torch.Tensor) -> torch.Tensor:
    """mean_i Tr(A_i^2) / (mean_i Tr(A_i))^2 for a batch of symmetric (B, d, d) A_i."""
    tr = torch.diagonal(a, dim1=1, dim2=2).sum(1)
    tr2 = (a * a.transpose(1, 2)).sum((1, 2))
    return tr2.mean() / tr.mean() ** 2


def jacobians(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians (B, m, n) of a batch map f at flat x (B, n)."""
    return torch.stack([jacobian(lambda xi: f(xi[None])[0], xi) for xi in x])


def exact(f, x: torch.Tensor, metric: str) -> torch.Tensor:
    """The exact L_iso from full Jacobians; spherical: P J^T J P with P the projector."""
    j = jacobians(f, x)
    m = j.transpose(1, 2) @ j
    if metric == "spherical":
        xh = x / x.norm(dim=1, keepdim=True)
        p = torch.eye(x.shape[1]) - xh[:, :, None] * xh[:, None, :]
        m = p @ m @ p
    return ratio(m)


def exact_in_chart(f, x: torch.Tensor, pole: torch.Tensor | None) -> torch.Tensor:
    """The paper's definition: f o Pi^{-1} on (R^{n-1}, G) with G = g(z) I, r = |x|."""
    r = x.norm(dim=1)
    z = geo.stereographic(x, r, pole)
    g = geo.conformal_factor(z, r)
    a = []
    for zi, ri, gi in zip(z, r, g, strict=True):
        j = jacobian(lambda zz, ri=ri: f(geo.inverse_stereographic(zz[None], ri, pole))[0], zi)
        a.append(j.T @ j / gi)
    return ratio(torch.stack(a))


def linear(a: torch.Tensor):
    return lambda x: x @ a.T


def mlp(n: int = 5, m: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, 7), nn.Tanh(), nn.Linear(7, m))


def sphere_points(b: int, n: int, r: float | torch.Tensor = 1.0, seed: int = 1) -> torch.Tensor:
    return geo.onto_sphere(torch.randn(b, n, generator=gen(seed)), r)


# ---- exact values and Hutchinson convergence --------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "spherical"])
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_linear_map_converges_to_exact(metric, probe):
    n, m = 6, 8
    a = torch.randn(m, n, generator=gen(2))
    x = sphere_points(4000, n, 3.0)
    est = isometry_loss(linear(a), x, metric=metric, probe=probe, generator=gen(3))
    # Closed form: the Jacobian is A; spherical uses P A^T A P per point.
    m_ = (a.T @ a).expand(len(x), n, n)
    if metric == "spherical":
        xh = x / x.norm(dim=1, keepdim=True)
        p = torch.eye(n) - xh[:, :, None] * xh[:, None, :]
        m_ = p @ m_ @ p
    truth = ratio(m_)
    assert truth > 1 / n  # a generic A is no isometry
    torch.testing.assert_close(est, truth, rtol=0.04, atol=0)


@pytest.mark.parametrize("metric", ["euclidean", "spherical"])
def test_nonlinear_map_converges_with_many_probes(metric):
    f = mlp()
    x = torch.randn(6, 5, generator=gen(4))
    with torch.no_grad():
        truth = exact(f, x, metric)
    est = isometry_loss(f, x, metric=metric, n_probes=1500, generator=gen(5))
    torch.testing.assert_close(est, truth, rtol=0.05, atol=0)


def test_scaled_isometry_reaches_one_over_rank():
    n, m, c = 5, 9, 2.5
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=gen(6)))  # orthonormal columns
    f = linear(c * q)
    x = torch.randn(32, n, generator=gen(7))
    torch.testing.assert_close(exact(f, x, "euclidean"), torch.tensor(1 / n))
    # With Rademacher probes |u|^2 = n exactly, so even one probe gives the minimum.
    est = isometry_loss(f, x, metric="euclidean", probe="rademacher", generator=gen(8))
    torch.testing.assert_close(est, torch.tensor(1 / n))
    # Tangent space: a scaled isometry of rank n - 1.
    torch.testing.assert_close(exact(f, x, "spherical"), torch.tensor(1 / (n - 1)))


def radial_stretch(a: float):
    """f(x) = x (1 + a |x|): on a sphere |x| = rho its tangent differential is (1 + a rho) I
    but it stretches the radial direction by 1 + 2 a rho: a scaled isometry on the tangent
    space only."""
    return lambda x: x * (1 + a * x.norm(dim=1, keepdim=True))


def test_tangent_isometry_is_minimal_for_spherical_only():
    n = 5
    f = radial_stretch(0.7)
    x = sphere_points(16, n, 2.0)
    torch.testing.assert_close(exact(f, x, "spherical"), torch.tensor(1 / (n - 1)))
    assert exact(f, x, "euclidean") > 1 / n + 1e-3
    est = isometry_loss(f, x, metric="spherical", n_probes=400, generator=gen(9))
    torch.testing.assert_close(est, torch.tensor(1 / (n - 1)), rtol=0.05, atol=0)
    # Not otherwise: points on different spheres see different tangent scales.
    x_mixed = x * torch.linspace(0.5, 3.0, 16)[:, None]
    assert exact(f, x_mixed, "spherical") > 1 / (n - 1) + 1e-3


@pytest.mark.parametrize("radius", [0.4, 1.0, 6.0])
def test_spherical_independent_of_pole_and_radius(radius):
    """The chart-based value (paper's definition) is the same for every pole and radius,
    and equals the projector implementation's exact value."""
    n = 5
    f = mlp(n, 4)
    x = sphere_points(5, n, radius)
    with torch.no_grad():
        projector = exact(f, x, "spherical")
        for pole in [None, -torch.eye(n)[-1], torch.randn(n, generator=gen(10))]:
            torch.testing.assert_close(exact_in_chart(f, x, pole), projector)
    # A linear map has one Jacobian everywhere: the value cannot depend on the sphere's size.
    a = torch.randn(4, n, generator=gen(11))
    unit = exact(linear(a), sphere_points(5, n, 1.0), "spherical")
    torch.testing.assert_close(exact_in_chart(linear(a), sphere_points(5, n, radius), None), unit)


def test_chart_probe_equals_projected_ambient_probe():
    """v ~ N(0, I_{n-1}) in the chart, pushed forward and rescaled by G^{-1/2}, is a tangent
    probe: the chart-coordinate Hutchinson terms equal the projector implementation's."""
    n, r = 6, 2.0
    f = mlp(n, 3)
    x = sphere_points(3, n, r).requires_grad_()
    z = geo.stereographic(x.detach(), r)
    v = torch.randn(3, n - 1, generator=gen(12))
    g = geo.conformal_factor(z, r)

    def chart_f(zz):
        return f(geo.inverse_stereographic(zz, r))

    _, j_v = functional_jvp(chart_f, z, v / g.sqrt()[:, None])  # J G^{-1/2} v
    _, jt_j_v = functional_vjp(chart_f, z, functional_jvp(chart_f, z, v / g[:, None])[1])
    ref = jt_j_v.pow(2).sum(1).mean() / j_v.pow(2).sum(1).mean() ** 2  # J^T J G^{-1} v
    _, tangent = functional_jvp(lambda zz: geo.inverse_stereographic(zz, r), z, v)
    tangent = tangent / g.sqrt()[:, None]  # U v: an isometric image of v
    ours = isometry_loss_from_h(f(x), x, tangent, metric="spherical")
    torch.testing.assert_close(ours, ref)


# ---- isodiff_compat ----------------------------------------------------------------------


def official_formula(f, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An independent transcription of what the official `isometry_loss_t` computes:
    chart z = x_{1:n-1} / (|x| - x_n); inverse onto the sphere of radius sqrt(n - 1);
    G(z) = 4 |z|^4 / (2 |z|^2)^2 (= 1); probe u in chart coordinates; JVPs and VJP through
    torch.autograd.functional."""
    n = x.shape[1]
    norm = x.norm(dim=1, keepdim=True)
    z = x[:, :-1] / (norm - x[:, -1:])
    zz = z.pow(2).sum(1, keepdim=True)
    big_g = 4 * zz**2 / (zz + zz) ** 2

    def chart_f(zc):
        s = zc.pow(2).sum(1, keepdim=True)
        return f(math.sqrt(n - 1) / (s + 1) * torch.cat([2 * zc, s - 1], dim=1))

    _, j_u = functional_jvp(chart_f, z, u / big_g.sqrt(), create_graph=True)
    _, j_u2 = functional_jvp(chart_f, z, u / big_g, create_graph=True)
    _, jt_j_u = functional_vjp(chart_f, z, j_u2, create_graph=True)
    return jt_j_u.pow(2).sum(1).mean() / j_u.pow(2).sum(1).mean() ** 2


def test_isodiff_compat_equals_official_formula():
    n = 6
    f = mlp(n, 4)
    x = torch.randn(5, n, generator=gen(13)) * torch.linspace(0.5, 2, 5)[:, None]
    u = torch.randn(5, n - 1, generator=gen(14))
    ref = official_formula(f, x, u)
    # The same chart probe as an ambient tangent vector at the official point: the pushed
    # forward probe, rescaled to |u| (the chart differential is conformal).
    r_off = math.sqrt(n - 1)
    z = x[:, :-1] / (x.norm(dim=1, keepdim=True) - x[:, -1:])
    point, push = functional_jvp(lambda zc: r_off * geo.inverse_stereographic(zc, 1.0), z, u)
    torch.testing.assert_close(point, r_off * x / x.norm(dim=1, keepdim=True))
    tangent = push * (u.norm(dim=1) / push.norm(dim=1))[:, None]
    point = point.requires_grad_()
    ours = isometry_loss_from_h(f(point), point, tangent, metric="isodiff_compat")
    torch.testing.assert_close(ours, ref)
    # The per-sample chart weights matter for B > 1: plain tangent-space L_iso differs ...
    plain = isometry_loss_from_h(f(point), point, tangent, metric="spherical")
    assert not torch.isclose(plain, ref, rtol=1e-3)
    # ... and cancel at batch size 1 (the reference's "equivalent, cheaper form").
    one = point[:1].detach().requires_grad_()
    torch.testing.assert_close(
        isometry_loss_from_h(f(one), one, tangent[:1], metric="isodiff_compat"),
        isometry_loss_from_h(f(one), one, tangent[:1], metric="spherical"),
    )


def test_isodiff_compat_public_entry_evaluates_at_official_point():
    n = 6
    f = mlp(n, 4)
    x = torch.randn(4, n, generator=gen(15))
    point = geo.onto_sphere(x, math.sqrt(n - 1)).requires_grad_()
    v = draw_probes(point, 1, "gaussian", gen(16))
    expected = isometry_loss_from_h(f(point), point, v, metric="isodiff_compat")
    torch.testing.assert_close(
        isometry_loss(f, x, metric="isodiff_compat", generator=gen(16)), expected
    )
    with pytest.raises(ValueError, match="Gaussian"):
        isometry_loss(f, x, metric="isodiff_compat", probe="rademacher")


@pytest.mark.parametrize("radius", ["sqrt_n", "official"])
def test_spherical_radius_moves_the_evaluation_point(radius):
    n = 6
    f = mlp(n, 4)
    x = torch.randn(4, n, generator=gen(34))
    r = math.sqrt(n) if radius == "sqrt_n" else math.sqrt(n - 1)
    point = geo.onto_sphere(x, r).requires_grad_()
    v = draw_probes(point, 1, "gaussian", gen(35))
    torch.testing.assert_close(
        isometry_loss(f, x, metric="spherical", radius=radius, generator=gen(35)),
        isometry_loss_from_h(f(point), point, v, metric="spherical"),
    )


# ---- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "spherical", "isodiff_compat"])
def test_gradient_matches_finite_differences(metric):
    f = mlp()
    x = torch.randn(4, 5, generator=gen(17))
    if metric == "isodiff_compat":
        x = geo.onto_sphere(x, 2.0)
    x.requires_grad_()
    v = torch.randn(2, 4, 5, generator=gen(18))

    def loss() -> torch.Tensor:
        return isometry_loss_from_h(f(x), x, v, metric=metric)

    params = list(f.parameters())[:-1]  # the output bias does not enter J
    grads = torch.autograd.grad(loss(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += eps
            up = loss().detach()
            with torch.no_grad():
                p[idx] -= 2 * eps
            down = loss().detach()
            with torch.no_grad():
                p[idx] += eps
            torch.testing.assert_close(g[idx], (up - down) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_path_length_is_exact_and_has_gradient():
    n, m = 5, 3
    a = torch.randn(m, n, generator=gen(19))
    x = torch.randn(4, n, generator=gen(20)).requires_grad_()
    y = torch.randn(4, m, generator=gen(21))
    torch.testing.assert_close(path_lengths(x @ a.T, x, y), (y @ a).norm(dim=1))
    f = mlp(n, m)
    lengths = path_lengths(f(x), x, y)
    grads = torch.autograd.grad(lengths.var(), list(f.parameters())[:-1])
    assert all(g.abs().sum() > 0 for g in grads)


def test_draw_probes():
    like = torch.zeros(3, 2, 4)
    u = draw_probes(like, 5, "rademacher", gen(22))
    assert u.shape == (5, 3, 2, 4) and set(u.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(
        draw_probes(like, 2, "gaussian", gen(23)), draw_probes(like, 2, "gaussian", gen(23))
    )
    with pytest.raises(ValueError, match="probe"):
        draw_probes(like, 1, "uniform")


# ---- timestep window ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["micro_batch", "per_sample"])
@pytest.mark.parametrize("window", [0.0, 0.35, 0.5])
def test_sample_timesteps_window_and_uniform_marginal(schedule, window):
    T, B, draws = 10, 4, 5000
    g = gen(24)
    ts, masks = zip(
        *(sample_timesteps(B, T, window, schedule, g) for _ in range(draws)), strict=True
    )
    t, mask = torch.stack(ts), torch.stack(masks)
    k = math.floor(window * T)
    assert t.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(mask, t >= k)
    if schedule == "micro_batch":  # one regime per micro-batch
        assert torch.equal(mask.all(1), mask.any(1))
    counts = torch.bincount(t.flatten(), minlength=T).double()
    expected = draws * B / T
    # Uniform marginal: chi-square with T - 1 = 9 dof; 30 is far beyond its 99.9% quantile.
    # Micro-batch draws are correlated in blocks of B, so scale the statistic by B.
    chi2 = ((counts - expected) ** 2 / expected).sum() / (B if schedule == "micro_batch" else 1)
    assert chi2 < 30, counts


def test_sample_timesteps_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        sample_timesteps(2, 10, 1.0)
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(2, 10, 0.5, "per_epoch")


# ---- the regulariser on a U-Net ----------------------------------------------------------


def grey_unet(dtype: torch.dtype = torch.float64) -> HUNet:
    return tiny_unet(size=8, channels=1, widths=(8, 16), dtype=dtype, norm_num_groups=4)


@pytest.mark.parametrize("metric", ["euclidean", "spherical", "path_length"])
def test_regulariser_reuses_the_main_forward_h(metric, one_thread):
    unet = grey_unet()
    x_t = torch.randn(3, 1, 8, 8, generator=gen(25)).requires_grad_()
    t = torch.tensor([600, 700, 999])
    reg = Regulariser(metric)
    assert reg.reuses_h(torch.ones(3, dtype=torch.bool))
    separate = reg(unet.encode_h, x_t, t, generator=gen(26))
    reg.pl_updates.zero_()
    with higher_order_ad():  # the main forward is differentiated twice: math attention
        _, h = unet.eps_and_h(x_t, t)
    reused = reg(unet.encode_h, x_t, t, h=h, generator=gen(26))
    torch.testing.assert_close(reused, separate)
    grads = torch.autograd.grad(reused, list(unet.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_regulariser_choices():
    mask = torch.ones(4, dtype=torch.bool)
    assert not Regulariser("spherical", radius="sqrt_n").reuses_h(mask)
    assert not Regulariser("isodiff_compat").reuses_h(mask)
    assert not Regulariser("spherical").reuses_h(torch.tensor([True, True, False, False]))
    half = Regulariser("spherical", batch_fraction=0.5)
    assert half.n_regularised(5) == 3 and not half.reuses_h(mask)
    assert build_regulariser(IsoConfig(metric=IsoMetric.none)) is None
    reg = build_regulariser(IsoConfig(metric=IsoMetric.path_length))
    assert set(reg.state_dict()) == {"pl_mean", "pl_updates"}
    with pytest.raises(ValueError, match="metric"):
        Regulariser("hyperbolic")


def test_path_length_running_mean(one_thread):
    unet = grey_unet()
    reg = Regulariser("path_length", path_length_decay=0.5)
    x_t = torch.randn(2, 1, 8, 8, generator=gen(27))
    t = torch.tensor([900, 950])
    first = reg(unet.encode_h, x_t, t, generator=gen(28))
    assert int(reg.pl_updates) == 1 and reg.pl_mean > 0
    mean1 = reg.pl_mean.clone()
    reg(unet.encode_h, 2 * x_t, t, generator=gen(29))
    assert int(reg.pl_updates) == 2 and not torch.equal(reg.pl_mean, mean1)
    grads = torch.autograd.grad(first, list(unet.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


# ---- training ----------------------------------------------------------------------------


def held_out_iso(unet, x_t: torch.Tensor, t: torch.Tensor) -> float:
    with higher_order_ad():
        value = isometry_loss(lambda x: unet.encode_h(x, t), x_t, n_probes=8, generator=gen(30))
    return float(value.detach())


def train_tiny(lambda_iso: float, steps: int = 8):
    """A few AdamW steps of the training objective on a tiny U-Net; data, timesteps and noise
    come from one generator, the probes from another, so both runs see the same batches."""
    from isodiff.config import DiffusionConfig
    from isodiff.model.diffusion import build_scheduler
    from isodiff.train.objective import DiffusionObjective

    unet = grey_unet(torch.float32)
    reg = Regulariser("spherical") if lambda_iso > 0 else None
    objective = DiffusionObjective(unet, build_scheduler(DiffusionConfig()), lambda_iso, reg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    data, probes = gen(31), gen(32)
    for _ in range(steps):
        x0 = torch.randn(8, 1, 8, 8, generator=data, dtype=torch.float32).clamp(-1, 1)
        t, mask = sample_timesteps(8, 1000, 0.5, "per_sample", data)
        noise = torch.randn(x0.shape, generator=data, dtype=torch.float32)
        out = objective(x0, noise, t, mask, generator=probes)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    return unet


def test_training_with_lambda_iso_lowers_iso_loss(one_thread):
    x_t = torch.randn(8, 1, 8, 8, generator=gen(33), dtype=torch.float32)
    t = torch.arange(600, 1000, 50)
    before = held_out_iso(grey_unet(torch.float32), x_t, t)
    control = held_out_iso(train_tiny(0.0), x_t, t)
    regularised = held_out_iso(train_tiny(1.0), x_t, t)
    assert regularised < 0.9 * min(control, before), (before, control, regularised)
