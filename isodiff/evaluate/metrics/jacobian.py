"""MCN and VoR: the spread of the singular values of J = dh/dx_t (reference/metrics.md).

s_1 >= ... >= s_k of J at x_t ~ q(x_t | x_0) (held-out x_0, per-sample noise) for a given t:
MCN = mean over samples of s_1 / s_k; VoR = sum_i Var_samples(log s_i). An isometry up to
scale has MCN = 1 and VoR = 0. Small models: the full Jacobian from batched JVPs and an
exact SVD (the official helpers' choice). Large ones: the top-k and bottom-k singular values
by Lanczos (scipy's eigsh) on the smaller Gram matrix, J^T J or J J^T, applied with one JVP
and one VJP per product (Park et al., NeurIPS 2023). `tangent=True` restricts x_t to the
tangent space of the sphere through it (the spherical variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric
from isodiff.evaluate.metrics.result import MetricResult, protocol_of

if TYPE_CHECKING:  # torch and scipy load inside the functions that use them
    from collections.abc import Callable

    import torch

    from isodiff.evaluate.metrics.common import EvalContext

    Map = Callable[[torch.Tensor], torch.Tensor]  # (B, *x) -> (B, m)

METHODS = ("auto", "exact", "lanczos")


@dataclass
class JacobianConfig:
    enabled: bool = True
    n: int = 16  # samples x_t
    timesteps: list[int] = field(default_factory=lambda: [999])
    method: str = "auto"  # exact | lanczos | auto: exact when J has <= max_exact entries
    k: int = 8  # lanczos: top-k and bottom-k singular values
    tangent: bool = False  # spherical variant: x_t restricted to the sphere's tangent space
    h_pool: int = 1  # average-pool h by this factor first (the official helper: 2)
    # VoR's variance over samples: 1 (unbiased) as the official code's torch.var, 0 the
    # population variance (at n = 4 they are 25 % apart)
    vor_ddof: int = 1
    max_exact: int = 20_000_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"eval.jacobian.method={self.method!r}: use one of {METHODS}")
        if self.n < 2 or self.k < 1 or self.h_pool < 1:
            raise ConfigError("eval.jacobian needs n >= 2, k >= 1 and h_pool >= 1")
        if self.vor_ddof not in (0, 1):
            raise ConfigError(
                f"eval.jacobian.vor_ddof={self.vor_ddof}: use 1 (unbiased, the "
                "official code's) or 0 (population variance)"
            )


def mean_condition_number(s: np.ndarray) -> float:
    """MCN of singular values s (samples, k), each row in decreasing order."""
    return float(np.mean(s[:, 0] / s[:, -1]))


def variance_of_riemannian_metric(s: np.ndarray, ddof: int = 1) -> float:
    """VoR = sum_i Var_samples(log s_i) for s (samples, k); ddof=1: the unbiased variance."""
    return float(np.sum(np.var(np.log(s), axis=0, ddof=ddof)))


def jacobian(f: Map, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Full Jacobian (m, n) of f at one sample x (*x), from batches of `chunk` copies of x.

    Rows by reverse mode (one backward per batch of output basis vectors) unless m > 2n, then
    columns by forward mode (JVPs): in eager PyTorch a JVP costs about twice a VJP.
    """
    import torch

    n = x.numel()
    with torch.no_grad():
        m = f(x[None]).shape[1]
    rows = m <= 2 * n
    size = m if rows else n
    parts = []
    for lo in range(0, size, chunk):
        c = min(chunk, size - lo)
        basis = torch.zeros(c, size, dtype=x.dtype, device=x.device)
        basis[torch.arange(c), torch.arange(lo, lo + c)] = 1
        primal = x.expand(c, *x.shape).clone()  # unaliased memory, one copy per product
        if rows:
            with torch.enable_grad():
                primal.requires_grad_(True)
                parts.append(torch.autograd.grad(f(primal), primal, basis)[0].reshape(c, n))
        else:
            parts.append(torch.func.jvp(f, (primal,), (basis.reshape(c, *x.shape),))[1].T)
    return torch.cat(parts) if rows else torch.cat(parts, dim=1)


def singular_values_exact(
    f: Map, x: torch.Tensor, tangent: bool = False, chunk: int = 128
) -> np.ndarray:
    """All min(m, n) singular values of J, decreasing; with `tangent`, those of J restricted
    to the tangent space of the sphere through x (min(m, n - 1) values)."""
    import torch

    J = jacobian(f, x, chunk)
    if tangent:  # J P = J - (J u) u^T with u = x / |x|
        u = (x / x.norm()).reshape(-1)
        J = J - torch.outer(J @ u, u)
    s = torch.linalg.svdvals(J.double()).cpu().numpy()
    # J P has the singular values of J on the tangent space plus the radial 0 when m >= n.
    return s[:-1] if tangent and J.shape[0] >= J.shape[1] else s


def singular_values_lanczos(
    f: Map, x: torch.Tensor, k: int, tangent: bool = False, tol: float = 1e-5
) -> np.ndarray:
    """Top-k then bottom-k singular values of J (decreasing), by Lanczos on the smaller of
    J^T J and J J^T (with `tangent`, of J P; the radial zero of P J^T J P is dropped)."""
    import torch
    from scipy.sparse.linalg import LinearOperator, eigsh

    from isodiff.geometry import tangent_project

    shape = x.shape
    x = x[None]
    h, vjp_fn = torch.func.vjp(f, x)
    m, n = h.shape[1], x[0].numel()
    project = (lambda v: tangent_project(v, x)) if tangent else (lambda v: v)

    def to_torch(v: np.ndarray, *size: int) -> torch.Tensor:
        return torch.from_numpy(v).to(x).reshape(1, *size)

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (x,), (v,))[1]

    if n <= m:  # P J^T J P on R^n

        def matvec(v: np.ndarray) -> np.ndarray:
            v = project(to_torch(v.ravel(), *shape))
            return project(vjp_fn(jvp(v))[0]).double().cpu().numpy().ravel()

        size, spurious_zero = n, tangent
    else:  # J P J^T on R^m

        def matvec(u: np.ndarray) -> np.ndarray:
            return jvp(project(vjp_fn(to_torch(u.ravel(), m))[0])).double().cpu().numpy().ravel()

        size, spurious_zero = m, False
    half = k + spurious_zero  # eigenvalues wanted from each end of the spectrum
    if 2 * half >= size:
        raise ValueError(f"k={k} asks for more singular values than J has ({size}): use exact")
    op = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(size)  # deterministic start vector
    # One Lanczos run for both ends of the spectrum ("BE": half from each end).
    eig = np.sort(
        eigsh(
            op,
            2 * half,
            which="BE",
            tol=tol,
            v0=v0,
            ncv=min(size, max(4 * half + 1, 40)),
            return_eigenvectors=False,
        )
    )
    eig = np.concatenate([eig[-k:][::-1], eig[spurious_zero:half][::-1]])
    return np.sqrt(np.clip(eig, 0, None))


def h_map(ctx: EvalContext, t: int, pool: int) -> Map:
    """x_t -> h (optionally average-pooled), flattened per sample."""
    import torch.nn.functional as F

    def f(x: torch.Tensor) -> torch.Tensor:
        h = ctx.unet.encode_h(x, t)
        return (F.avg_pool2d(h, pool) if pool > 1 else h).flatten(1)

    return f


def evaluate(ctx: EvalContext, cfg: JacobianConfig) -> MetricResult:
    """MCN and VoR of x_t -> h at each configured t over cfg.n held-out x_t."""
    import torch

    from isodiff.isometry import higher_order_ad
    from isodiff.model.diffusion import noising
    from isodiff.model.sampling import SampleRNG

    x_0 = ctx.real_codes("test", cfg.n, "eval.jacobian.n")
    noise = SampleRNG(ctx.seed, range(cfg.n)).randn(*ctx.x_shape)
    x_t_of = noising(ctx.diffusion)  # the run's own q(x_t | x_0): DDPM's or the flow's
    values, arrays, methods = {}, {}, {}
    for t in cfg.timesteps:
        if not 0 <= t < ctx.diffusion.num_train_timesteps:
            raise ConfigError(f"eval.jacobian.timesteps: t={t} is outside [0, T)")
        x_t = x_t_of(x_0, noise, t).to(ctx.device)
        f = h_map(ctx, t, cfg.h_pool)
        with torch.no_grad():
            m = f(x_t[:1]).shape[1]
        exact = cfg.method == "exact" or (
            cfg.method == "auto" and m * x_t[0].numel() <= cfg.max_exact
        )
        methods[t] = "exact" if exact else f"lanczos-k{cfg.k}"

        def sample(i: range, f=f, x_t=x_t, exact=exact) -> np.ndarray:
            x = x_t[i.start]
            with higher_order_ad(), torch.no_grad():
                return (
                    singular_values_exact(f, x, cfg.tangent, ctx.batch_size)
                    if exact
                    else singular_values_lanczos(f, x, cfg.k, cfg.tangent)
                )

        s = np.stack(ctx.map(sample, cfg.n, f"Jacobian t={t}", size=1))
        values[f"mcn_t{t}"] = mean_condition_number(s)
        values[f"vor_t{t}"] = variance_of_riemannian_metric(s, cfg.vor_ddof)
        arrays[f"singular_values_t{t}"] = s
    protocol = {**protocol_of(cfg), "method_used": methods, "x_t": "q(x_t|x_0), test split"}
    return MetricResult(values, protocol, arrays=arrays)


METRIC = Metric(
    name="jacobian",
    config=JacobianConfig,
    values=("mcn_", "vor_"),
    order=5,
    summary=(r"mcn_t\d+", r"vor_t\d+"),
)
