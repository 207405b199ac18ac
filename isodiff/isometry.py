"""The isometric regulariser L_iso of Isometric Diffusion (Hahm et al., ICML 2024, eq. 9),
the path-length baseline, and the timestep window.

For f = e_theta: X -> H (x_t -> h) with Jacobian J at x and the metric G of X,

    L_iso = E[Tr((G^{-1} J^T J)^2)] / (E[Tr(G^{-1} J^T J)])^2,

batch means taken separately in numerator and denominator; L_iso >= 1/rank(J), with
equality exactly for a scaled isometry (G^{-1} J^T J = c I). Hutchinson estimates with a
probe u (E[u u^T] = I on the space X):

    Tr(G^{-1} J^T J) ~ |J u|^2,   Tr((G^{-1} J^T J)^2) ~ |J^T J u|^2.

Metrics of X:
- euclidean: G = I on R^n (the paper's "G = I" ablation).
- spherical: X = S^{n-1} through x, in the stereographic chart with its conformal metric
  G = g I. The chart's differential is sqrt(g) times an isometry U onto the tangent space,
  so G^{-1} J_chart^T J_chart = U^T J^T J U: the value is that of J restricted to the
  tangent space, whatever the chart's pole and radius. A chart probe v ~ N(0, I_{n-1}) maps
  to U v ~ P eps, eps ~ N(0, I_n), with P the tangent projector at x: no chart is built.
- isodiff_compat: what the official `isometry_loss_t` computes. Its chart is taken from
  |x_t| and its inverse maps onto the sphere of radius R = sqrt(n - 1), so h is evaluated at
  x' = R x_t / |x_t|; its metric is identically 1. The chart differential at x' is c U with
  c = R - x'_n (unit-sphere chart scaled by R), so per sample the official terms are
  c^2 |J P eps|^2 and c^4 |P J^T J P eps|^2: the tangent-space estimator, weighted by
  powers of c (the weights cancel only at batch size 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd import grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from isodiff.geometry import onto_sphere, sphere_radius, sq_norm, tangent_project

METRICS = ("euclidean", "spherical", "isodiff_compat")
PROBES = ("gaussian", "rademacher")
# The h-encoder being regularised: (x_t (B, ...), t (B,)) -> h (B, ...), differentiable in
# x_t; e.g. HUNet.encode_h, or isodiff.adapters.h_encoder(unet) for any diffusers U-Net.
Encoder = Callable[..., Tensor]


@contextlib.contextmanager
def higher_order_ad() -> Iterator[None]:
    """Attention that supports double backward and forward-mode AD.

    The fused SDPA kernels (flash, memory-efficient, and the CPU flash kernel) have no
    second derivative; the math kernel is plain matmul + softmax and differentiates to
    any order. Used wherever the isometric loss differentiates through the U-Net twice.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def draw_probes(
    like: Tensor,
    n_probes: int = 1,
    probe: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Tensor:
    """n_probes probes shaped like `like`, stacked: (n_probes, *like.shape); E[u u^T] = I.

    Drawn on the generator's device (a CPU generator makes draws device-independent), then
    moved to like's device and dtype.
    """
    shape = (n_probes, *like.shape)
    device = generator.device if generator is not None else like.device
    if probe == "gaussian":
        u = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    elif probe == "rademacher":
        u = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype) * 2 - 1
    else:
        raise ValueError(f"probe={probe!r}: use one of {PROBES}")
    return u.to(like.device)


def evaluation_point(x: Tensor, metric: str, radius: str = "norm") -> Tensor:
    """Where e_theta is evaluated: x itself (euclidean; spherical with radius=norm) or x
    projected radially onto the sphere of the chosen radius (spherical; isodiff_compat always
    uses the official sqrt(n - 1))."""
    if metric == "isodiff_compat":
        return onto_sphere(x, sphere_radius(x, "official"))
    if metric == "spherical" and radius != "norm":
        return onto_sphere(x, sphere_radius(x, radius))
    return x


def _jt_w(h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(w, J^T w) for a dummy w = 0 with a graph: J^T w is linear in w, so the gradient of
    <J^T w, u> with respect to w is J u (forward-mode product by double backward)."""
    w = torch.zeros_like(h, requires_grad=True)
    (jt_w,) = grad(h, x, w, create_graph=True)
    return w, jt_w


def isometry_terms(
    h: Tensor, x: Tensor, v: Tensor, *, metric: str = "spherical"
) -> tuple[Tensor, Tensor]:
    """Per-probe, per-sample Hutchinson terms (Tr((G^{-1}J^TJ)^2), Tr(G^{-1}J^TJ)), (K, B) each.

    h: f(x) computed with a graph from x (x.requires_grad); x: the evaluation point (for the
    spherical metrics, a point of the sphere whose tangent space is regularised); v: ambient
    probes (B, ...) or (K, B, ...) with E[v v^T] = I_n. One J^T w graph, then per probe one
    JVP (double backward) and one VJP, all with create_graph.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: use one of {METRICS}")
    v = v if v.ndim > x.ndim else v[None]
    x0 = x.detach()
    w, jt_w = _jt_w(h, x)
    num, den = [], []
    for u in v:
        if metric != "euclidean":
            u = tangent_project(u, x0)
        (ju,) = grad(jt_w, w, u, create_graph=True)  # J u
        (jtju,) = grad(h, x, ju, create_graph=True)  # J^T J u
        if metric != "euclidean":
            jtju = tangent_project(jtju, x0)
        num.append(sq_norm(jtju))
        den.append(sq_norm(ju))
    num_t, den_t = torch.stack(num), torch.stack(den)
    if metric == "isodiff_compat":
        c = math.sqrt(x0[0].numel() - 1) - x0.flatten(1)[:, -1]  # chart differential scale
        num_t, den_t = num_t * c**4, den_t * c**2
    return num_t, den_t


def isometry_loss_from_h(h: Tensor, x: Tensor, v: Tensor, *, metric: str = "spherical") -> Tensor:
    """L_iso = mean Tr((G^{-1}J^TJ)^2) / (mean Tr(G^{-1}J^TJ))^2 from an h already computed
    from x (see `isometry_terms`); means over samples and probes."""
    num, den = isometry_terms(h, x, v, metric=metric)
    return num.mean() / den.mean() ** 2


def isometry_loss(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    metric: str = "spherical",
    n_probes: int = 1,
    probe: str = "gaussian",
    radius: str = "norm",
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_iso of f at the batch x (B, ...) -> (B, ...), differentiable w.r.t. what f uses.

    metric: euclidean | spherical | isodiff_compat (module docstring); radius (spherical
    only): norm keeps x, sqrt_n / official evaluate f at x projected onto that sphere.
    """
    if metric == "isodiff_compat" and probe != "gaussian":
        raise ValueError("metric=isodiff_compat uses the official Gaussian chart probe")
    point = evaluation_point(x.detach(), metric, radius).requires_grad_()
    v = draw_probes(point, n_probes, probe, generator)
    with higher_order_ad():  # attention in f is differentiated twice
        return isometry_loss_from_h(f(point), point, v, metric=metric)


def path_lengths(h: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """StyleGAN2's path length |J^T y| per sample (B,), y ~ N(0, I) / sqrt(dim h), with a
    graph (create_graph) so that the penalty has a gradient."""
    (jt_y,) = grad(h, x, y, create_graph=True)
    return sq_norm(jt_y).sqrt()


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    window: float,
    schedule: str = "micro_batch",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Timesteps t (B,) and the mask of samples that get L_iso: those with t >= floor(p T).

    micro_batch (the official schedule): one draw per micro-batch; with probability
    floor(pT)/T every t < floor(pT) and no iso loss, otherwise every t >= floor(pT) and all
    get it. per_sample: t ~ U{0..T-1} per sample. Either way t is uniform on {0..T-1}
    (floor(pT)/T rather than p keeps it exactly uniform when pT is not an integer).
    p = 0 regularises every t.
    """
    T, k = num_train_timesteps, math.floor(window * num_train_timesteps)
    if not 0 <= k < T:
        raise ValueError(f"window={window!r}: need 0 <= p < 1")
    if schedule == "per_sample":
        t = torch.randint(0, T, (batch_size,), generator=generator)
    elif schedule == "micro_batch":
        early = bool(torch.randint(0, T, (1,), generator=generator) < k)
        low, high = (0, k) if early else (k, T)
        t = torch.randint(low, high, (batch_size,), generator=generator)
    else:
        raise ValueError(f"schedule={schedule!r}: use micro_batch or per_sample")
    return t, t >= k


def first_samples(condition: Tensor | dict | None, k: int) -> Tensor | dict | None:
    """condition[:k] for a tensor; a dict of them (PixArt-alpha's added_cond_kwargs) entry by
    entry; None (an unused input) as is."""
    if isinstance(condition, dict):
        return {name: first_samples(c, k) for name, c in condition.items()}
    return None if condition is None else condition[:k]


class Regulariser(nn.Module):
    """L_iso (or the path-length baseline) of the U-Net's h-encoder at (x_t, t).

    Called by the training objective on the iso-active samples. `forward(..., h=h)` reuses
    an h computed from x_t by the main U-Net forward (x_t.requires_grad, under
    `higher_order_ad`), which saves one encoder forward; `reuses_h` says when that is right.
    """

    def __init__(
        self,
        metric: str,
        radius: str = "norm",
        n_probes: int = 1,
        probe: str = "gaussian",
        batch_fraction: float = 1.0,
        path_length_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if metric not in (*METRICS, "path_length"):
            raise ValueError(f"metric={metric!r}: use one of {(*METRICS, 'path_length')}")
        if metric == "isodiff_compat" and probe != "gaussian":
            raise ValueError("metric=isodiff_compat uses the official Gaussian chart probe")
        self.metric, self.radius, self.n_probes, self.probe = metric, radius, n_probes, probe
        self.batch_fraction, self.decay = batch_fraction, path_length_decay
        # Running mean of the path length (StyleGAN2's pl_mean), checkpointed as a buffer.
        self.register_buffer("pl_mean", torch.zeros(()))
        self.register_buffer("pl_updates", torch.zeros((), dtype=torch.long))

    def n_regularised(self, batch_size: int) -> int:
        """How many of the iso-active samples get the term (`iso.batch_fraction`)."""
        return max(1, math.ceil(self.batch_fraction * batch_size))

    def reuses_h(self, iso_mask: Tensor) -> bool:
        """True when the main forward's h at x_t is the h this loss needs for every sample
        of the micro-batch: the point is x_t itself and every sample is regularised (for a
        subset, backpropagating through the full batch's encoder costs more than a forward
        of the subset)."""
        at_x_t = self.metric in ("euclidean", "path_length") or (
            self.metric == "spherical" and self.radius == "norm"
        )
        n = iso_mask.numel()
        return at_x_t and bool(iso_mask.all()) and self.n_regularised(n) == n

    def forward(
        self,
        encoder: Encoder,
        x_t: Tensor,
        t: Tensor,
        *,
        h: Tensor | None = None,
        generator: torch.Generator | None = None,
        **condition: Tensor,
    ) -> Tensor:
        """The term at the batch (x_t, t): encoder(x, t, **condition) gives h; condition
        tensors (e.g. encoder_hidden_states of a text-conditional U-Net) have the batch as
        their first dimension (dicts of such tensors are sliced entry by entry). `h`: the
        encoder's output at x_t already computed with a graph from x_t (see `reuses_h`).

        An empty batch (x_t[mask] where no sample is in the window, a fraction floor(pT)/T of
        micro-batches) gives 0: it adds nothing to the objective, so `mse + lambda_iso *
        reg(h_encoder(unet), x_t[mask], t[mask])` needs no guard."""
        if not isinstance(t, Tensor) or t.shape != x_t.shape[:1]:
            raise ValueError(
                f"t has shape {tuple(getattr(t, 'shape', ()))} for {x_t.shape[0]} samples of "
                f"x_t: pass one timestep per sample, t of shape ({x_t.shape[0]},): "
                "reg(h_encoder(unet), x_t[mask], t[mask])"
            )
        if x_t.shape[0] == 0:
            return x_t.new_zeros(())
        with higher_order_ad():
            if h is None:
                k = self.n_regularised(x_t.shape[0])
                x = evaluation_point(x_t[:k].detach(), self.metric, self.radius)
                x = x.requires_grad_()
                h = encoder(
                    x, t[:k], **{name: first_samples(c, k) for name, c in condition.items()}
                )
                if not isinstance(h, Tensor):  # the model itself (a UNet2DOutput), not h
                    raise TypeError(
                        f"the encoder returned {type(h).__name__}, not the tensor h: pass the "
                        "model's h-encoder, reg(h_encoder(unet), x_t, t) with `from isodiff "
                        "import h_encoder`, not the model"
                    )
            else:
                x = x_t
            if self.metric == "path_length":
                return self._path_length(h, x, generator)
            v = draw_probes(x, self.n_probes, self.probe, generator)
            return isometry_loss_from_h(h, x, v, metric=self.metric)

    def _path_length(self, h: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """(|J^T y| - a)^2 with a the running mean of |J^T y| (StyleGAN2, eq. 4)."""
        device = generator.device if generator is not None else h.device
        y = torch.randn(h.shape, generator=generator, device=device, dtype=h.dtype).to(h.device)
        lengths = path_lengths(h, x, y / math.sqrt(h[0].numel()))
        if self.training:
            batch_mean = lengths.detach().mean()
            first = self.pl_updates == 0  # start from the first batch, not from 0
            self.pl_mean.copy_(
                torch.where(first, batch_mean, self.pl_mean.lerp(batch_mean, self.decay))
            )
            self.pl_updates += 1
        return (lengths - self.pl_mean).pow(2).mean()
