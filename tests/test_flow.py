"""The regulariser in a rectified-flow objective (issue 29, item 2): diffusers'
FlowMatchEulerDiscreteScheduler conventions, the window, the radius of x_t, and the loss
against diffusers' plain velocity loss and the Regulariser's own value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from isodiff import Regulariser, h_encoder
from isodiff.flow import (
    flow_matching_loss,
    flow_radius,
    flow_window,
    interpolate,
    radius_deviation,
    sample_flow_timesteps,
    velocity_target,
)
from tests.test_transformers import inputs, tiny


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scheduler_batch(seed: int = 0, batch: int = 4):
    """x0, noise, the scheduler's timesteps (B,) and their sigmas, as diffusers' SD3
    training script draws them (uniform density, no shift)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    g = gen(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=g) * 0.5
    noise = torch.randn(x0.shape, generator=g)
    indices = torch.randint(0, 1000, (batch,), generator=g)
    timesteps = scheduler.timesteps[indices]
    return scheduler, x0, noise, timesteps, timesteps / 1000


def test_interpolation_is_the_schedulers() -> None:
    scheduler, x0, noise, timesteps, sigmas = scheduler_batch()
    torch.testing.assert_close(
        interpolate(x0, noise, sigmas), scheduler.scale_noise(x0, timesteps, noise)
    )
    torch.testing.assert_close(interpolate(x0, noise, 0.0), x0)
    torch.testing.assert_close(interpolate(x0, noise, 1.0), noise)
    # the target is d x_t / dt
    eps = 1e-3
    torch.testing.assert_close(
        (interpolate(x0, noise, 0.5 + eps) - interpolate(x0, noise, 0.5)) / eps,
        velocity_target(x0, noise),
        rtol=1e-3,
        atol=1e-3,
    )


def test_without_the_regulariser_the_loss_is_diffusers_velocity_mse() -> None:
    model = tiny("dit")
    scheduler, x0, noise, timesteps, sigmas = scheduler_batch(1)
    labels = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        pred = model(
            scheduler.scale_noise(x0, timesteps, noise), timestep=timesteps, class_labels=labels
        ).sample
        plain = F.mse_loss(pred.float(), (noise - x0).float())
        for reg, lam in [(None, 1.0), (Regulariser("spherical"), 0.0)]:
            out = flow_matching_loss(
                model, x0, noise, sigmas, lambda_iso=lam, regulariser=reg, class_labels=labels
            )
            torch.testing.assert_close(out["loss"], plain)
            assert "iso" not in out


@pytest.mark.parametrize("metric", ["spherical", "euclidean"])
@pytest.mark.parametrize("subset", [True, False], ids=["subset", "all_reusing_h"])
def test_the_regulariser_term_is_the_regularisers_value_at_the_flow_x_t(
    metric: str, subset: bool
) -> None:
    """On a subset, L_iso from a separate encoder forward; on every sample, from the main
    forward's h (recorded): both the Regulariser's own value at x_t."""
    model = tiny("dit")
    _, x0, noise, _, t = scheduler_batch(2)
    labels = torch.tensor([1, 2, 3, 4])
    mask = torch.tensor([True, not subset, True, True])
    out = flow_matching_loss(
        model,
        x0,
        noise,
        t,
        lambda_iso=0.5,
        iso_mask=mask,
        regulariser=Regulariser(metric),
        generator=gen(3),
        class_labels=labels,
    )
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    expected = Regulariser(metric)(
        h_encoder(model), x_t[mask], 1000 * t[mask], generator=gen(3), class_labels=labels[mask]
    )
    torch.testing.assert_close(out["iso"], expected, rtol=1e-4, atol=0)  # attention kernels
    torch.testing.assert_close(out["loss"], out["mse"] + 0.5 * out["iso"])
    grads = torch.autograd.grad(out["iso"], list(model.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    none = torch.zeros(4, dtype=torch.bool)
    empty = flow_matching_loss(
        model,
        x0,
        noise,
        t,
        lambda_iso=0.5,
        iso_mask=none,
        regulariser=Regulariser(metric),
        class_labels=labels,
    )
    assert "iso" not in empty


def test_flux_takes_flow_time_and_shared_ids() -> None:
    model = tiny("flux")
    x, t, condition, shared = inputs("flux")
    out = flow_matching_loss(
        model,
        x,
        torch.randn(x.shape, generator=gen(4)),
        t,
        lambda_iso=1.0,
        regulariser=Regulariser("spherical"),
        timestep_scale=1.0,
        shared=shared,
        generator=gen(5),
        **condition,
    )
    assert torch.isfinite(out["loss"]) and out["iso"] > 0


def test_the_window_matches_ddpm_noise_levels_by_snr() -> None:
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    for p in (0.0, 0.25, 0.5, 0.9):
        t = flow_window(p)
        snr = abar[int(p * 1000)] / (1 - abar[int(p * 1000)])
        # diffusers builds the schedule in float32: agree to its rounding
        torch.testing.assert_close(
            torch.tensor((1 - t) ** 2 / t**2, dtype=torch.float64), snr, rtol=1e-3, atol=0
        )
    assert abs(flow_window(0.5) - 0.775) < 1e-3
    assert flow_window(0.25) < flow_window(0.5) < flow_window(0.9) < 1


@pytest.mark.parametrize("schedule", ["micro_batch", "per_sample"])
def test_flow_timesteps_are_uniform_with_the_window_mask(schedule: str) -> None:
    g = gen(6)
    draws = [sample_flow_timesteps(8, 0.6, schedule, g) for _ in range(2000)]
    t = torch.cat([d[0] for d in draws])
    assert t.min() >= 0 and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.01
    assert abs(float((t >= 0.6).float().mean()) - 0.4) < 0.02
    for ti, mask in draws:
        assert torch.equal(mask, ti >= 0.6)
        if schedule == "micro_batch":
            assert bool(mask.all()) or not bool(mask.any())
    with pytest.raises(ValueError):
        sample_flow_timesteps(4, 1.0)


def test_the_radius_of_x_t() -> None:
    """E|x_t|^2 = n ((1 - t)^2 sigma^2 + t^2) for x0 ~ N(0, sigma^2 I), and |x_t|
    concentrates on that radius (1 / sqrt(2 n) spread)."""
    n, sigma = 3 * 32 * 32, 0.5
    g = gen(7)
    x0 = torch.randn(256, 3, 32, 32, generator=g) * sigma
    noise = torch.randn(x0.shape, generator=g)
    for t in (0.0, 0.3, 0.774, 1.0):
        mean_sq = interpolate(x0, noise, t).flatten(1).pow(2).sum(1).mean()
        torch.testing.assert_close(mean_sq.sqrt(), flow_radius(t, n, sigma), rtol=5e-3, atol=0)
        dev = radius_deviation(x0, noise, t, sigma)
        assert dev.abs().max() < 5 / (2 * n) ** 0.5
    assert float(flow_radius(0.5, 1, 0.5)) < 0.6  # x_t leaves the sqrt(n) shell mid-way


def test_the_dit_flow_example_trains_with_the_regulariser() -> None:
    """examples/train_dit_flow.py at toy size; its L_iso term reaches the weights: the
    same seed with lambda_iso = 0 ends elsewhere."""
    from tests.test_library import _example

    main = _example("train_dit_flow").main
    args = ["--steps", "2", "--batch-size", "4", "--resolution", "8", "--window", "0"]
    with_iso = main([*args, "--lambda-iso", "1.0"])
    without = main([*args, "--lambda-iso", "0"])
    assert any(
        not torch.equal(a, b)
        for a, b in zip(with_iso.parameters(), without.parameters(), strict=True)
    )


def test_the_radius_measurement_runs_at_toy_size() -> None:
    """examples/flow_radius.py (the numbers in isodiff.flow's docstring) on 8 shapes."""
    from tests.test_library import _example

    out = _example("flow_radius").main(["--data", "shapes", "--images", "8", "--dit-images", "2"])[
        "shapes"
    ]
    assert len(out["radius"]) == 7 and all(r["max_abs"] < 0.2 for r in out["radius"])
    assert all(r["spherical_at_x_t"] > 0 and r["euclidean"] > 0 for r in out["liso"])
