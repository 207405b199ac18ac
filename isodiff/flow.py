"""The isometric regulariser in a rectified-flow (flow-matching) objective.

Conventions are those of diffusers' FlowMatchEulerDiscreteScheduler and its SD3/Flux
training scripts: t in [0, 1] (the scheduler's sigma; t = 0 data, t = 1 noise),

    x_t = (1 - t) x0 + t noise,      velocity target v = noise - x0,

and the model is called with timestep = t * timestep_scale (1000 for SD3, DiT, PixArt and
the scheduler's `timesteps`; 1 for Flux, whose forward multiplies by 1000 itself).

The window. DDPM's window regularises t >= p T, the noisy end; here the noisy end is t -> 1,
so the window is t >= p_flow. The same p does not mean the same noise level: matched by
signal-to-noise ratio, SNR_flow(t) = (1 - t)^2 / t^2 against SNR_ddpm = abar / (1 - abar),
the paper's p = 0.5 on DDPM's linear schedule (abar_500 = 0.078) is t >= 0.775
(`flow_window`). `sample_flow_timesteps` draws t ~ U[0, 1] with the window's mask.

The spherical metric at x_t. In DDPM the regularised x_t lie near the shell where x_T does;
here |x_t| moves with t: for x0 with per-coordinate second moment sigma_data^2 independent of
the noise, E|x_t|^2 = n ((1 - t)^2 sigma_data^2 + t^2) (`flow_radius`), which dips below
sqrt(n) between the ends (t = 0.8 with sigma_data = 0.5: 0.81 sqrt(n)). isodiff's choice:
the spherical metric at x_t is that of the sphere through x_t, of x_t's own radius
(`Regulariser("spherical")`, radius="norm", the default): e_theta is evaluated at x_t itself,
the point the velocity loss trains, and J is restricted to the tangent space there (the
radial direction, along which x_t's norm changes with t, is left out).

The alternative, one sphere per t, moves x_t onto the sphere of radius flow_radius(t) and
so evaluates e_theta off the training point by the factor flow_radius(t) / |x_t|
(`radius_deviation`). Measured (512 images each, sigma_data their own rms; MNIST n = 784,
sigma_data = 0.96; isodiff's shapes n = 3 x 32 x 32, sigma_data = 0.79), |x_t| strays from
flow_radius(t) by a mean |deviation| of at most 1.9 % (MNIST) and 1.0 % (shapes) at every t
in [0, 1], max 7.3 % and 4.1 %, the most at the noisy end (the spread of |noise|, about
1 / sqrt(2 n)); their |x0| vary by only +-4 % around sqrt(n) sigma_data. On a tiny
untrained DiT (4 blocks, 16 images, 16 probes, the same for all) L_iso at x_t, at x_t
projected onto the flow_radius(t) sphere, and Euclidean at x_t differ by at most 0.5 %
(MNIST 0.2 %) for t in {0.1, 0.25, 0.5, 0.775, 0.9, 1}: with n in the hundreds or
thousands, one radial direction barely moves the traces (an untrained model: a weak test).
`python examples/flow_radius.py` reproduces these numbers. So either sphere gives the same
term on such data; x_t's own is kept because it needs no sigma_data
and stays at the training point where |x0| varies more (natural images, latents: measure with
`radius_deviation`). radius="sqrt_n" (the paper's sqrt(n)) would move x_t by up to a factor
1 / 0.78 in the window (sigma_data = 0.5) and is meant for DDPM. The Euclidean metric stays
available: Regulariser("euclidean").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isodiff.adapters import h_encoder, recording_h
from isodiff.geometry import dim, sq_norm
from isodiff.isometry import Regulariser, higher_order_ad

Encoder = Callable[..., Tensor]


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x0 + t noise, t in [0, 1] per sample (B,) or scalar (the scheduler's
    `scale_noise` at sigma = t)."""
    t = torch.as_tensor(t).expand(x0.shape[0])
    return x0 + _per_sample(t, x0) * (noise - x0)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """d x_t / dt = noise - x0, the rectified-flow regression target."""
    return noise - x0


def flow_radius(t: Tensor | float, n: int, sigma_data: float = 1.0) -> Tensor:
    """sqrt(n ((1 - t)^2 sigma_data^2 + t^2)): the rms of |x_t| for x0 of per-coordinate
    second moment sigma_data^2, independent of the noise."""
    t = torch.as_tensor(t, dtype=torch.get_default_dtype())
    return torch.sqrt(n * ((1 - t) ** 2 * sigma_data**2 + t**2))


def radius_deviation(
    x0: Tensor, noise: Tensor, t: Tensor | float, sigma_data: float | None = None
) -> Tensor:
    """|x_t| / flow_radius(t) - 1 per sample (B,): how far x_t is from the sphere of the
    radius its t predicts. sigma_data: the rms of x0's coordinates when None (the batch's)."""
    if sigma_data is None:
        sigma_data = float(x0.float().pow(2).mean().sqrt())
    t = torch.as_tensor(t).expand(x0.shape[0])
    r = flow_radius(t, dim(x0), sigma_data).to(x0)
    return sq_norm(interpolate(x0, noise, t)).sqrt() / r - 1


def _ddpm_snr(p: float, num_train_timesteps: int, beta_start: float, beta_end: float) -> float:
    """abar / (1 - abar) at DDPM timestep floor(p T) of the linear beta schedule."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    abar = float(torch.cumprod(1 - betas, 0)[math.floor(p * num_train_timesteps)])
    return abar / (1 - abar)


def flow_window(
    p: float, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> float:
    """The flow time t whose SNR (1 - t)^2 / t^2 equals DDPM's at timestep floor(p T) of the
    linear schedule: regularise t >= flow_window(p) to regularise the paper's noise levels
    (p = 0.5 -> 0.775; p = 0 -> 0.0099, not 0: DDPM's t = 0 is already slightly noisy)."""
    root = math.sqrt(_ddpm_snr(p, num_train_timesteps, beta_start, beta_end))
    return 1 / (1 + root)


def sample_flow_timesteps(
    batch_size: int,
    window: float,
    schedule: str = "micro_batch",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """t ~ U[0, 1) (B,) and the mask of samples that get L_iso: t >= window.

    micro_batch (as the official schedule): with probability `window` every t of the
    micro-batch is below it and none is regularised, otherwise every t is in [window, 1);
    per_sample: t ~ U[0, 1) per sample. Either way t is uniform on [0, 1).
    """
    if not 0 <= window < 1:
        raise ValueError(f"window={window!r}: need 0 <= window < 1")
    u = torch.rand(batch_size, generator=generator)
    if schedule == "micro_batch":
        early = bool(torch.rand(1, generator=generator) < window)
        t = u * window if early else window + u * (1 - window)
    elif schedule == "per_sample":
        t = u
    else:
        raise ValueError(f"schedule={schedule!r}: use micro_batch or per_sample")
    return t, t >= window


def _select(condition: Tensor | dict | None, mask: Tensor) -> Tensor | dict | None:
    """The masked samples of a condition tensor, of each tensor of a dict, or None."""
    if isinstance(condition, dict):
        return {name: _select(c, mask) for name, c in condition.items()}
    return None if condition is None else condition[mask]


def _prediction(out: object) -> Tensor:
    """The tensor a diffusers model returns: `.sample`, the first element, or itself."""
    if isinstance(out, Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def flow_matching_loss(
    model: nn.Module,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    lambda_iso: float = 0.0,
    regulariser: nn.Module | None = None,
    iso_mask: Tensor | None = None,
    timestep_scale: float = 1000.0,
    encoder: Encoder | None = None,
    shared: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    **condition: Tensor,
) -> dict[str, Tensor]:
    """Rectified-flow loss + lambda_iso * L_iso: {"loss", "mse", and "iso" when computed}.

    mse = mean |model(x_t, t * timestep_scale) - (noise - x0)|^2 (float32), with
    x_t = (1 - t) x0 + t noise; iso = regulariser(encoder, x_t[m], timestep[m]) on the samples
    of iso_mask (all when None), skipped when lambda_iso = 0, no regulariser or an empty mask;
    when every sample is regularised at x_t itself (`regulariser.reuses_h`) and `encoder` is
    None, the main forward's h is reused (`recording_h`) instead of a second forward.
    encoder: h_encoder(model, shared=shared) when None; condition: per-sample inputs of the
    model (class_labels, encoder_hidden_states, pooled_projections), sliced with the mask;
    shared: inputs common to the batch (Flux's img_ids, txt_ids). With gradient checkpointing,
    call it and the backward under `higher_order_ad()` (see isodiff.lora).
    """
    shared = dict(shared or {})
    mask = torch.ones_like(t, dtype=torch.bool) if iso_mask is None else iso_mask
    active = regulariser is not None and lambda_iso != 0 and bool(mask.any())
    # Every sample regularised at x_t itself: L_iso differentiates the main forward's h
    # (recorded by a hook), which saves the encoder forward; that graph must then support
    # double backward (math attention).
    reuse = (
        active
        and encoder is None
        and isinstance(regulariser, Regulariser)
        and regulariser.reuses_h(mask)
    )
    x_t = interpolate(x0, noise, t)
    if reuse and not x_t.requires_grad:
        x_t.requires_grad_()
    timestep = t.to(x0.device) * timestep_scale
    with contextlib.ExitStack() as stack:
        if reuse:
            stack.enter_context(higher_order_ad())
            seen = stack.enter_context(recording_h(model))
        pred = _prediction(model(x_t, timestep=timestep, **condition, **shared))
    mse = F.mse_loss(pred.float(), velocity_target(x0, noise).float())
    out = {"loss": mse, "mse": mse}
    if not active:
        return out
    encoder = encoder or h_encoder(model, shared=shared)
    if reuse:
        iso = regulariser(encoder, x_t, timestep, h=seen[0], generator=generator)
    else:
        iso = regulariser(
            encoder,
            x_t[mask],
            timestep[mask],
            generator=generator,
            **{name: _select(c, mask) for name, c in condition.items()},
        )
    out.update(loss=mse + lambda_iso * iso, iso=iso)
    return out
