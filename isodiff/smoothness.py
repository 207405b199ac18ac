"""Smooth Diffusion's Step-wise Variation Regularization (Guo et al., "Smooth Diffusion:
Crafting Smooth Latent Spaces in Diffusion Models", CVPR 2024, Sec. 3.3), the closest peer
of L_iso, as a baseline regulariser.

Definition (paper eqs. 9, 10 and 14; official code: SHI-Labs/Smooth-Diffusion,
train_smooth_diffusion.py, `step_regularize` and `de_noise`, with train.sh):

    L_reg = E_{dx0, eps} ( sqrt(1 - abar_t) |J_eps^T dx0| - a )^2,      (eq. 9)
    sqrt(1 - abar_t) |J_eps^T dx0| = |grad_eps <sqrt(1 - abar_t) x0_hat, dx0>|,  (eq. 10)
    L = L_base + lambda L_reg.                                          (eq. 14)

- Output: the predicted x0, x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) /
  sqrt(abar_t), not eps_theta; J_eps = d x0_hat / d eps, where eps is the forward-process
  noise of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Hence J_eps = sqrt(1 - abar_t) J
  with J = d x0_hat / d x_t, and the length is (1 - abar_t) |J^T dx0|: this module
  differentiates with respect to x_t and multiplies by sqrt(1 - abar_t), which is the same.
  The official `de_noise` reads the model output as eps whatever the prediction type; here
  v_prediction and sample outputs are converted to x0_hat properly (`prediction_type`).
- Perturbation: dx0 ~ N(0, I) / sqrt(C H W), per sample ("normally sampled pixel
  intensities normalised to unit length": unit length in expectation, as StyleGAN2's).
  One draw per sample and step.
- Target a: a running mean of the lengths, a <- a + decay (mean_batch(length) - a) with
  decay = 0.01, starting from a = 0 (the official code keeps it in a Python variable, is
  not checkpointed, "needs to be manually resumed"; here it is the buffer `pl_mean`). As in
  StyleGAN2 (NVlabs stylegan2-ada-pytorch training/loss.py, pl_mean.lerp), the penalty is
  taken against the *updated* mean, and the batch mean inside it keeps its graph, so a
  fraction `decay` of the gradient flows through a.
- Weight lambda = 1 (paper Sec. 4.1, train.sh --lambda_reg 1; Table 3 ablates 0.1, 1, 10),
  `LAMBDA`; applied at every training step to every sample of the batch, t uniform on
  {0..T-1} (no lazy regularisation, unlike StyleGAN2's every 4 minibatches), `INTERVAL`.
  Under gradient accumulation a is updated per micro-batch, and in multi-GPU training per
  process (not synchronised), as in the official script.

Versus isodiff's path-length baseline (`Regulariser(metric="path_length")`): that one
penalises |J_h^T y| of the *h-encoder* (x_t -> h, the mid block), y ~ N(0, I) / sqrt(dim h),
with no (1 - abar_t) factor, only on iso-active timesteps, a starting from the first batch
and the penalty against the detached mean. Versus L_iso (eq. 9 of Hahm et al.): L_iso is a
scale-free ratio E Tr((J^T J)^2) / (E Tr(J^T J))^2 of the h-encoder's Jacobian, so the
scaled isometry it rewards may have any scale at each step, whereas L_reg pins the length
of x0_hat's Jacobian (weighted by 1 - abar_t) to one running constant a shared by every t.
Both are minimised by scaled isometries; L_reg measures only |J^T y| for one y per sample,
L_iso the spread of J^T J's eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd import grad

from isodiff.isometry import higher_order_ad

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DECAY = 0.01  # the running mean's decay (official `step_regularize(..., decay=0.01)`)
LAMBDA = 1.0  # the paper's default weight lambda (eq. 14, Sec. 4.1)
INTERVAL = 1  # applied at every training step (no lazy regularisation)
# The model being regularised: (x_t (B, ...), t (B,), **condition) -> its output (eps, v or
# x0 as `prediction_type` says), a tensor or a diffusers output with `.sample`.
Model = Callable[..., object]


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """v (B,) viewed as (B, 1, ..., 1) to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def predicted_x0(
    out: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str = "epsilon"
) -> Tensor:
    """x0_hat from the model output at x_t; alpha_bar (B,) is abar_t of each sample."""
    a = _per_sample(alpha_bar, x_t).sqrt()
    s = _per_sample(1 - alpha_bar, x_t).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * out) / a
    if prediction_type == "v_prediction":  # v = a eps - s x0  =>  x0 = a x_t - s v
        return a * x_t - s * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type={prediction_type!r}: use one of {PREDICTION_TYPES}")


def draw_perturbation(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """dx0 ~ N(0, I) / sqrt(numel per sample), shaped like `like` (unit length in mean)."""
    device = generator.device if generator is not None else like.device
    y = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return y.to(like.device) / math.sqrt(like[0].numel())


def variation_lengths(x0_hat: Tensor, x_t: Tensor, alpha_bar: Tensor, y: Tensor) -> Tensor:
    """sqrt(1 - abar_t) |J_eps^T y| per sample (B,) with a graph (eq. 10).

    x0_hat: computed from x_t with a graph (x_t.requires_grad). grad_x_t <s x0_hat, y> =
    s J^T y, and d x_t / d eps = s, so the eps-gradient of eq. 10 is s times it.
    """
    s = _per_sample(1 - alpha_bar, x_t).sqrt()
    (g,) = grad((x0_hat * y * s).sum(), x_t, create_graph=True)
    return (s * g).flatten(1).pow(2).sum(1).sqrt()


def _as_tensor(out: object) -> Tensor:
    """A model's output as a tensor (diffusers models return an object with `.sample`)."""
    return out if isinstance(out, Tensor) else out.sample  # type: ignore[attr-defined]


class StepVariationRegulariser(nn.Module):
    """Smooth Diffusion's L_reg (module docstring) at the batch (x_t, t).

    alphas_cumprod: the noise schedule's abar (T,), e.g. `scheduler.alphas_cumprod`.
    State: `pl_mean` (a) and `pl_updates`, buffers, so in the state_dict. The running mean
    is updated only in training mode; in eval mode the penalty is taken against the stored
    a. Multiply the returned term by `LAMBDA` (or the strength of the ablation).
    """

    def __init__(
        self, alphas_cumprod: Tensor, decay: float = DECAY, prediction_type: str = "epsilon"
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}: use one of {PREDICTION_TYPES}")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay={decay!r}: need 0 <= decay <= 1")
        self.decay, self.prediction_type = decay, prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().double().clone())
        # The official code starts a at 0 (not at the first batch's mean).
        self.register_buffer("pl_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("pl_updates", torch.zeros((), dtype=torch.long))

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t per sample (B,), in like's dtype and device."""
        t = t.reshape(-1).to(self.alphas_cumprod.device).long()
        ab = (
            self.alphas_cumprod[t].expand(like.shape[0])
            if t.numel() == 1
            else self.alphas_cumprod[t]
        )
        return ab.to(like.device, like.dtype)

    def penalty(self, lengths: Tensor) -> Tensor:
        """mean((lengths - a')^2) with a' = a + decay (mean(lengths) - a), updating a <- a'
        in training mode (a' keeps the graph of mean(lengths), as StyleGAN2's lerp)."""
        a = self.pl_mean.to(lengths.dtype)
        if self.training:
            a = a + self.decay * (lengths.mean() - a)
            self.pl_mean.copy_(a.detach())
            self.pl_updates += 1
        return (lengths - a).pow(2).mean()

    def forward(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        *,
        out: Tensor | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        **condition: object,
    ) -> Tensor:
        """L_reg at (x_t, t): model(x, t, **condition) gives the output (`prediction_type`).

        out: the model's output already computed from x_t with a graph (x_t.requires_grad,
        under `higher_order_ad`), as the official script reuses the main forward's
        prediction; saves one forward. y: a given perturbation dx0 (default: drawn, see
        `draw_perturbation`).
        """
        with higher_order_ad():  # the penalty's gradient differentiates the model twice
            if out is None:
                x = x_t.detach().requires_grad_()
                out = _as_tensor(model(x, t, **condition))
            else:
                x = x_t
            ab = self.alpha_bar(t, x)
            x0_hat = predicted_x0(out, x, ab, self.prediction_type)
            y = draw_perturbation(x0_hat, generator) if y is None else y
            return self.penalty(variation_lengths(x0_hat, x, ab, y))
