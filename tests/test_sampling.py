"""DDIM sampling, inversion and h-editing against diffusers' schedulers, and per-sample seeds."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler

from isodiff.config import DiffusionConfig
from isodiff.model.diffusion import build_ddim
from isodiff.model.sampling import DDIM, HEdit, ddim_schedule, ddim_step, latents, quantise
from isodiff.model.unet import HUNet
from tests.conftest import tiny_unet

CFG = DiffusionConfig()
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def unet() -> HUNet:
    return tiny_unet()


def _diffusers_loop(unet: HUNet, scheduler, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def _inverse(cfg: DiffusionConfig) -> DDIMInverseScheduler:
    """diffusers' inversion as isodiff runs it: never clipped."""
    return DDIMInverseScheduler.from_config(build_ddim(cfg).config, clip_sample=False)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_step_matches_diffusers_schedulers(steps: int, clip: bool) -> None:
    """Tolerance 1e-5: diffusers keeps alpha_bar in float32, ddim_schedule in float64.
    x and eps are scaled so that x0 leaves [-1, 1] and clip_sample has work to do."""
    cfg = DiffusionConfig(clip_sample=clip)
    schedule = ddim_schedule(cfg, steps)
    forward, inverse = build_ddim(cfg), _inverse(cfg)
    forward.set_timesteps(steps)
    inverse.set_timesteps(steps)
    assert torch.equal(schedule.timesteps, forward.timesteps)
    assert torch.equal(schedule.timesteps.flip(0), inverse.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = 3 * torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
    for k, t in enumerate(schedule.timesteps):
        a, a_prev = float(schedule.alpha_bar[k]), float(schedule.alpha_bar_prev[k])
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        assert x0.abs().max() > 1.5  # the clip acts on this case
        torch.testing.assert_close(
            ddim_step(x, eps, a, a_prev, clip=clip),
            forward.step(eps, t, x, eta=0.0).prev_sample,
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            ddim_step(x, eps, a_prev, a), inverse.step(eps, t, x).prev_sample, atol=1e-5, rtol=1e-5
        )


def test_sample_and_invert_match_diffusers_loops(unet: HUNet) -> None:
    """Whole trajectories (5 steps) against DDIMScheduler / DDIMInverseScheduler: 1e-4."""
    x_T = latents(0, range(3), SHAPE)
    ddim = DDIM(unet, CFG, steps=5)
    forward, inverse = build_ddim(CFG), _inverse(CFG)
    forward.set_timesteps(5)
    inverse.set_timesteps(5)
    torch.testing.assert_close(
        ddim.sample(x_T).x, _diffusers_loop(unet, forward, x_T), atol=1e-4, rtol=1e-4
    )
    x_0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(
        ddim.invert(x_0).x, _diffusers_loop(unet, inverse, x_0), atol=1e-4, rtol=1e-4
    )


def test_inversion_is_exact_when_eps_does_not_depend_on_x() -> None:
    """With eps constant in x (zero output conv) DDIM is affine and inversion exact."""
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.normal_()
    ddim = DDIM(unet, CFG, steps=10)
    x_0 = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(ddim.sample(ddim.invert(x_0).x).x, x_0, atol=1e-4, rtol=0)


def test_latents_are_per_sample() -> None:
    full = latents(7, range(16), SHAPE)
    parts = torch.cat([latents(7, range(i, i + 4), SHAPE) for i in range(0, 16, 4)])
    assert torch.equal(full, parts)
    assert torch.equal(latents(7, [5], SHAPE)[0], full[5])
    assert not torch.equal(latents(8, range(16), SHAPE), full)


def test_samples_do_not_depend_on_batch_size(unet: HUNet) -> None:
    x_T = latents(0, range(16), SHAPE)
    small = DDIM(unet, CFG, steps=3, batch_size=4).sample(x_T, return_h=True)
    large = DDIM(unet, CFG, steps=3, batch_size=16).sample(x_T, return_h=True)
    # Same inputs bitwise (test_latents_are_per_sample); oneDNN's conv kernels may differ by
    # batch size and thread count in the last bits.
    torch.testing.assert_close(small.x, large.x, rtol=0, atol=1e-4)
    torch.testing.assert_close(small.h, large.h, rtol=0, atol=1e-4)


def test_h_is_recorded_at_every_step(unet: HUNet) -> None:
    x_T = latents(0, range(2), SHAPE)
    ddim = DDIM(unet, CFG, steps=4)
    run = ddim.sample(x_T, return_h=True)
    h_T = unet.encode_h(x_T, int(ddim.schedule.timesteps[0]))
    assert run.h.shape == (4, 2, h_T[0].numel())
    torch.testing.assert_close(run.h[0], h_T.flatten(1).detach())
    assert ddim.trajectories == 2 and ddim.seconds > 0


def test_h_edit_follows_asyrps_asymmetric_process(unet: HUNet) -> None:
    x_T = latents(0, range(2), SHAPE)
    ddim = DDIM(unet, CFG, steps=4)
    plain = ddim.sample(x_T, return_h=True)
    # Replacing h by the run's own h, or offsetting by 0, changes nothing (up to rounding:
    # the replaced h is a copy with another memory layout).
    torch.testing.assert_close(
        ddim.sample(x_T, edit=HEdit(replace=plain.h)).x, plain.x, atol=1e-4, rtol=1e-4
    )
    assert torch.equal(
        ddim.sample(x_T, edit=HEdit(offset=torch.zeros(1, plain.h.shape[2]))).x, plain.x
    )
    offset = torch.randn(1, plain.h.shape[2], generator=torch.Generator().manual_seed(2))
    # An edit window past the first timestep leaves the sample unedited.
    assert torch.equal(ddim.sample(x_T, edit=HEdit(offset=offset, t_edit=1000)).x, plain.x)
    # One step by hand: x0 predicted with eps(h + dh), direction with the model's own eps.
    one = DDIM(unet, CFG, steps=1)
    t = int(one.schedule.timesteps[0])
    with torch.no_grad():
        h, skips, emb, ts = unet.encode(x_T, t)
        eps = unet.decode(h, skips, emb, ts)
        eps_edit = unet.decode(h + offset.reshape(1, *h.shape[1:]), skips, emb, ts)
    a, a_prev = float(one.schedule.alpha_bar[0]), float(one.schedule.alpha_bar_prev[0])
    x0_edit = ((x_T - (1 - a) ** 0.5 * eps_edit) / a**0.5).clamp(-1, 1)  # clip_sample
    expected = a_prev**0.5 * x0_edit + (1 - a_prev) ** 0.5 * eps
    torch.testing.assert_close(one.sample(x_T, edit=HEdit(offset=offset)).x, expected)
    assert not torch.allclose(one.sample(x_T, edit=HEdit(offset=offset)).x, one.sample(x_T).x)


def test_generated_samples_are_shared_between_metrics(tmp_path) -> None:
    """EvalContext.generated: sample i is DDIM of x_T seeded by (seed, i), whatever the
    batch it is asked in; asked again, it is served from memory without sampling; past the
    cache's bytes it is sampled again, to the same images."""
    from isodiff.evaluate.metrics.common import EvalContext
    from isodiff.model.sampling import to_images
    from tests.metric_helpers import tiny_context

    ctx = tiny_context(tmp_path, batch_size=4)
    direct = to_images(ctx.ddim(3).sample(latents(0, range(6), ctx.x_shape)).x)
    ran = ctx.ddim(3).trajectories
    first = torch.cat([ctx.generated(3, range(0, 4)), ctx.generated(3, range(4, 6))])
    assert torch.equal(first, direct)
    assert ctx.ddim(3).trajectories == ran + 6
    assert torch.equal(ctx.generated(3, range(1, 5)), direct[1:5])
    assert ctx.ddim(3).trajectories == ran + 6  # all from the cache
    small = EvalContext(
        tiny_unet(),
        ctx.diffusion,
        ctx.data,
        refs_dir=tmp_path,
        batch_size=4,
        cache_bytes=direct[0].nbytes,
    )  # room for one image
    assert torch.equal(small.generated(3, range(6)), direct)  # same batches as `direct`
    # batches of other sizes: oneDNN's kernels may differ in the last bits
    torch.testing.assert_close(small.generated(3, range(6)), direct, rtol=0, atol=1e-4)
    assert small.ddim(3).trajectories == 6 + 5


def test_quantise_rounds_images_to_bytes_as_an_image_file() -> None:
    x = torch.tensor([-1.0, -1.5, 0.0, 1.0, 1.2, 2 * 100.4 / 255 - 1, 2 * 100.6 / 255 - 1])
    assert quantise(x).tolist() == [0, 0, 128, 255, 255, 100, 101]
    assert quantise(x).dtype == torch.uint8
