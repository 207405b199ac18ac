"""Smooth Diffusion's step-wise variation regulariser (isodiff.smoothness) on linear maps,
where its terms have closed forms, and on a tiny diffusers U-Net."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from isodiff.smoothness import (
    StepVariationRegulariser,
    predicted_x0,
    variation_lengths,
)

torch.set_num_threads(1)
T = 10


def schedule() -> Tensor:
    return torch.linspace(0.95, 0.2, T, dtype=torch.float64)


class Linear(nn.Module):
    """eps_theta(x) = M x on R^D, for which x0_hat = A x with A = (I - s M) / a."""

    def __init__(self, m: Tensor) -> None:
        super().__init__()
        self.m = nn.Parameter(m.clone())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x @ self.m.T


def x0_map(m: Tensor, ab: float) -> Tensor:
    """A = (I - sqrt(1 - ab) M) / sqrt(ab)."""
    return (torch.eye(m.shape[0], dtype=m.dtype) - math.sqrt(1 - ab) * m) / math.sqrt(ab)


def eps_for(a: Tensor, ab: float) -> Tensor:
    """The M whose x0_hat map is A: M = (I - sqrt(ab) A) / sqrt(1 - ab)."""
    return (torch.eye(a.shape[0], dtype=a.dtype) - math.sqrt(ab) * a) / math.sqrt(1 - ab)


def mean_chi(d: int) -> float:
    """E|g| for g ~ N(0, I_d)."""
    return math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


def test_lengths_are_eq10_differentiated_by_eps() -> None:
    """(1 - abar) |J^T y| (x_t-derivative) equals |grad_eps <s x0_hat, y>| with x_t built
    from (x0, eps) as the official script builds it."""
    g = torch.Generator().manual_seed(0)
    d, b, t = 6, 5, 7
    ab = float(schedule()[t])
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    model = Linear(m)
    x0 = torch.randn(b, d, generator=g, dtype=torch.float64)
    eps = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randn(b, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    s = math.sqrt(1 - ab)
    x_t = math.sqrt(ab) * x0 + s * eps
    x0_hat = (x_t - s * model(x_t, None)) / math.sqrt(ab)
    (by_eps,) = torch.autograd.grad((s * x0_hat * y).sum(), eps)
    x = x_t.detach().requires_grad_()
    abt = torch.full((b,), ab, dtype=torch.float64)
    ours = variation_lengths(predicted_x0(model(x, None), x, abt), x, abt, y)
    torch.testing.assert_close(ours, by_eps.norm(dim=1))
    # and in closed form: (1 - ab) |A^T y|
    a = x0_map(m, ab)
    torch.testing.assert_close(ours, (1 - ab) * (y @ a).norm(dim=1))


def test_penalty_expectation_linear_map() -> None:
    """a held at 0 (decay 0): E[L_reg] = E[L^2] = (1 - abar)^2 Tr(A A^T) / D for
    y ~ N(0, I / D) (E|A^T y|^2 = Tr(A A^T) / D), by Monte Carlo within 3 %."""
    g = torch.Generator().manual_seed(1)
    d, b, t = 5, 40000, 3
    ab = float(schedule()[t])
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    reg = StepVariationRegulariser(schedule(), decay=0.0).train()
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    value = reg(Linear(m), x, torch.full((b,), t), generator=g)
    a = x0_map(m, ab)
    expected = (1 - ab) ** 2 * torch.trace(a @ a.T) / d
    assert float(value.detach()) == pytest.approx(float(expected), rel=0.03)
    assert float(reg.pl_mean) == 0.0  # decay 0 keeps a where it started


def test_penalty_expectation_scaled_isometry() -> None:
    """A = c Q: L = (1 - abar) c |y| with |y| sqrt(D) ~ chi_D, so at a fixed a
    E[(L - a)^2] = k^2 - 2 a k E chi_D / sqrt(D) + a^2, k = (1 - abar) c."""
    g = torch.Generator().manual_seed(2)
    d, b, t, c, a = 4, 40000, 5, 1.7, 0.3
    ab = float(schedule()[t])
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    reg = StepVariationRegulariser(schedule(), decay=0.0).train()
    reg.pl_mean.fill_(a)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    value = reg(Linear(eps_for(c * q, ab)), x, torch.full((b,), t), generator=g)
    k = (1 - ab) * c
    expected = k**2 - 2 * a * k * mean_chi(d) / math.sqrt(d) + a**2
    assert float(value.detach()) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("decay", [0.0, 0.01, 0.5])
def test_zero_gradient_at_scaled_isometry_at_running_mean(decay: float) -> None:
    """A = c Q, every |y_i| equal and a = (1 - abar) c |y|: every length equals a (and the
    update leaves a there), so the penalty and its gradient vanish; a non-isometric map at
    the same a has a gradient."""
    g = torch.Generator().manual_seed(3)
    d, b, t, c = 6, 8, 4, 0.8
    ab = float(schedule()[t])
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = y / y.norm(dim=1, keepdim=True) * 0.9  # equal norms
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    tt = torch.full((b,), t)
    a = (1 - ab) * c * 0.9
    model = Linear(eps_for(c * q, ab))
    reg = StepVariationRegulariser(schedule(), decay=decay).train()
    reg.pl_mean.fill_(a)
    value = reg(model, x, tt, y=y)
    (gm,) = torch.autograd.grad(value, model.m)
    assert float(value.detach()) < 1e-20
    assert float(gm.abs().max()) < 1e-10
    assert float(reg.pl_mean) == pytest.approx(a, rel=1e-12)
    skew = Linear(eps_for(c * q @ torch.diag(torch.linspace(0.5, 1.5, d, dtype=torch.float64)), ab))
    reg.pl_mean.fill_(a)
    (gs,) = torch.autograd.grad(reg(skew, x, tt, y=y), skew.m)
    assert float(gs.abs().max()) > 1e-4


def test_running_mean_update_rule_and_state() -> None:
    """a starts at 0; a_{k+1} = a_k + decay (mean lengths_k - a_k) in training mode only;
    the penalty is against the updated a; the state round-trips through state_dict."""
    g = torch.Generator().manual_seed(4)
    d, b, t, decay = 5, 6, 2, 0.1
    ab = torch.full((b,), float(schedule()[t]), dtype=torch.float64)
    model = Linear(torch.randn(d, d, generator=g, dtype=torch.float64))
    reg = StepVariationRegulariser(schedule(), decay=decay).train()
    assert float(reg.pl_mean) == 0.0
    a = 0.0
    for k in range(3):
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        y = torch.randn(b, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        xr = x.clone().requires_grad_()
        lengths = variation_lengths(predicted_x0(model(xr, None), xr, ab), xr, ab, y).detach()
        value = reg(model, x, torch.full((b,), t), y=y)
        a = a + decay * (float(lengths.mean()) - a)
        assert float(reg.pl_mean) == pytest.approx(a, rel=1e-12)
        assert int(reg.pl_updates) == k + 1
        assert float(value.detach()) == pytest.approx(float((lengths - a).pow(2).mean()), rel=1e-10)
    copy = StepVariationRegulariser(schedule(), decay=decay)
    copy.load_state_dict(reg.state_dict())
    assert float(copy.pl_mean) == float(reg.pl_mean) and int(copy.pl_updates) == 3
    reg.eval()
    reg(model, torch.randn(b, d, generator=g, dtype=torch.float64), torch.full((b,), t))
    assert float(reg.pl_mean) == pytest.approx(a, rel=1e-12)  # eval: no update


def test_prediction_types_give_the_same_x0() -> None:
    """eps, v and x0 outputs of the same denoiser give the same x0_hat."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    x_t = a * x0 + s * eps
    for out, kind in [(eps, "epsilon"), (a * eps - s * x0, "v_prediction"), (x0, "sample")]:
        torch.testing.assert_close(predicted_x0(out, x_t, ab, kind), x0)
    with pytest.raises(ValueError):
        StepVariationRegulariser(schedule(), prediction_type="flow")


def test_gradients_reach_parameters_and_reused_output() -> None:
    """The penalty's gradient reaches the model's parameters; reusing the main forward's
    output (out=) gives the same value as the regulariser's own forward."""
    g = torch.Generator().manual_seed(6)
    d, b = 5, 4
    model = Linear(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (b,), generator=g)
    y = torch.randn(b, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    own = StepVariationRegulariser(schedule())(model, x, t, y=y)
    (gm,) = torch.autograd.grad(own, model.m)
    assert torch.isfinite(gm).all() and float(gm.abs().max()) > 0
    xr = x.clone().requires_grad_()
    reused = StepVariationRegulariser(schedule())(model, xr, t, out=model(xr, t), y=y)
    torch.testing.assert_close(reused, own)


def test_tiny_diffusers_unet() -> None:
    """Runs on a diffusers UNet2DModel with attention (double backward through the math
    attention kernel); every parameter that the output depends on gets a finite gradient."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    reg = StepVariationRegulariser(torch.linspace(0.99, 0.05, 1000)).train()
    x = torch.randn(2, 3, 8, 8)
    value = reg(unet, x, torch.tensor([10, 900]), generator=torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and float(value.detach()) > 0
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(unet.parameters()))
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert float(reg.pl_mean) > 0 and int(reg.pl_updates) == 1


def test_imports_torch_alone() -> None:
    """Like the core library: importing isodiff.smoothness loads none of the suite's
    dependencies."""
    import subprocess
    import sys

    code = (
        "import sys\nimport isodiff.smoothness\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(eval(out))
    suite = {"hydra", "omegaconf", "diffusers", "transformers", "lpips", "scipy", "PIL"}
    assert "torch" in loaded and not loaded & suite, loaded & suite
