"""Editing directions and edits (isodiff.model.directions) and the linearity metric against
known answers: exact no-ops, Asyrp's process by hand, a known SVD, linear generators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff.config import DataConfig, DiffusionConfig
from isodiff.errors import ConfigError
from isodiff.evaluate.metrics.attributes import AttributeConfig
from isodiff.evaluate.metrics.common import EvalContext
from isodiff.evaluate.metrics.linearity import (
    Edits,
    LinearityConfig,
    Readout,
    Target,
    _calibrated,
    _supervised,
    angular_spread,
    circular_labels,
    evaluate,
    image_move,
    image_r2,
    interaction_error,
    labels,
    leakage,
    linear_fit,
    mean_change,
    response,
    swap_gain,
)
from isodiff.model import directions as dirs
from isodiff.model.sampling import DDIM, ddim_step, latents
from isodiff.model.unet import HUNet
from tests.conftest import tiny_unet
from tests.metric_helpers import tiny_context

CFG = DiffusionConfig()
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def unet() -> HUNet:
    return tiny_unet()


def test_a_zero_direction_returns_the_unedited_sample_exactly(unet: HUNet) -> None:
    ddim = DDIM(unet, CFG, steps=4)
    x_T = latents(0, range(3), SHAPE)
    plain = ddim.sample(x_T).x.clamp(-1, 1)
    for space, size in (("x_T", x_T[0].numel()), ("h", unet.encode_h(x_T[:1], 999)[0].numel())):
        zero = dirs.strength_offsets([0.0, 0.0], torch.zeros(1, size))
        images = dirs.edit(ddim, x_T, space, zero, t_edit=0)
        assert torch.equal(images[0], plain) and torch.equal(images[1], plain), space


def _asyrp_by_hand(
    unet: HUNet,
    ddim: DDIM,
    x: torch.Tensor,
    offset: torch.Tensor | None,
    t_edit: int,
    new_h: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Asyrp's asymmetric process written out: on steps with t >= t_edit the x0 prediction
    uses the up path from h + offset, or from new_h(h, step k), the direction the model's
    own eps."""
    s = ddim.schedule
    new_h = new_h or (lambda h, k: h + offset.reshape(h.shape))
    with torch.no_grad():
        for k in range(ddim.steps):
            t = int(s.timesteps[k])
            h, skips, emb, ts = unet.encode(x, t)
            eps = unet.decode(h, skips, emb, ts)
            eps_x0 = unet.decode(new_h(h, k), skips, emb, ts) if t >= t_edit else eps
            x = ddim_step(
                x, eps_x0, float(s.alpha_bar[k]), float(s.alpha_bar_prev[k]), eps, CFG.clip_sample
            )
    return x.clamp(-1, 1)


def test_asyrp_edit_window(unet: HUNet) -> None:
    ddim = DDIM(unet, CFG, steps=4)
    x_T = latents(1, range(2), SHAPE)
    size = unet.encode_h(x_T[:1], 999)[0].numel()
    offset = torch.randn(2, size, generator=torch.Generator().manual_seed(0))
    edited = dirs.edit(ddim, x_T, "h", offset[None], t_edit=0)[0]
    # t_edit = 0: h replaced by h + offset at every step
    torch.testing.assert_close(edited, _asyrp_by_hand(unet, ddim, x_T, offset, 0))
    assert not torch.allclose(edited, ddim.sample(x_T).x.clamp(-1, 1))
    # a window that starts inside the trajectory edits only its first steps
    middle = int(ddim.schedule.timesteps[1])
    torch.testing.assert_close(
        dirs.edit(ddim, x_T, "h", offset[None], t_edit=middle)[0],
        _asyrp_by_hand(unet, ddim, x_T, offset, middle),
    )
    # t_edit past T: no edit at all
    assert torch.equal(
        dirs.edit(ddim, x_T, "h", offset[None], t_edit=1000)[0], ddim.sample(x_T).x.clamp(-1, 1)
    )


def test_power_iteration_recovers_the_top_singular_vectors_of_a_known_map() -> None:
    rng = np.random.default_rng(0)
    n, m, k = 12, 9, 3
    U, _ = np.linalg.qr(rng.normal(size=(m, m)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    A = torch.from_numpy(U @ np.diag(s) @ V[:, :m].T)  # (m, n), singular values s

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) @ A.T

    v, u, sv = dirs.top_singular_vectors(f, torch.randn(3, 2, 2, dtype=torch.float64), k, iters=60)
    np.testing.assert_allclose(sv.numpy(), s[:k], rtol=1e-8)
    # up to sign, each recovered vector is the true one
    np.testing.assert_allclose(np.abs((v.numpy() @ V[:, :k]).diagonal()), 1, atol=1e-8)
    np.testing.assert_allclose(np.abs((u.numpy() @ U[:, :k]).diagonal()), 1, atol=1e-8)
    torch.testing.assert_close(f(v), u * sv[:, None])  # J v_k = s_k u_k


def test_supervised_directions_find_the_separating_axis() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    axis = np.zeros(10)
    axis[3] = 1.0
    codes = rng.normal(size=(600, 10)) + 3 * np.outer(labels, axis)
    for direction in (dirs.class_mean_direction(codes, labels), dirs.svm_direction(codes, labels)):
        assert direction @ axis / np.linalg.norm(direction) > 0.95  # towards label 1
        one_std = dirs.scaled(direction, codes)
        assert (codes @ (one_std / np.linalg.norm(one_std))).std() == pytest.approx(
            np.linalg.norm(one_std)
        )
    with pytest.raises(ValueError, match="both labels"):
        dirs.class_mean_direction(codes, np.zeros(600))


def test_a_linear_generator_is_perfectly_linear_and_additive() -> None:
    rng = np.random.default_rng(0)
    strengths = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    base, v1, v2 = rng.normal(size=(3, 4, 50))  # 4 samples, 50 "pixels"

    def linear(a: float, b: float = 0.0) -> np.ndarray:
        return base + a * v1 + b * v2

    def curved(a: float, b: float = 0.0) -> np.ndarray:
        return base + a * v1 + b * v2 + 0.5 * a * b * v1 + 0.3 * a**2 * v2

    images = np.stack([linear(a) for a in strengths])
    np.testing.assert_allclose(image_r2(strengths, images), 1.0)
    readout = rng.normal(size=50)
    slope, r2 = linear_fit(strengths, images @ readout)  # a linear attribute, (S, N)
    np.testing.assert_allclose(r2, 1.0)
    np.testing.assert_allclose(slope, v1 @ readout)  # per sample: its own slope
    for generator, additive in ((linear, True), (curved, False)):
        grid = np.stack([np.stack([generator(a, b) for b in (-2, 0, 2)]) for a in (-2, 0, 2)])
        error = interaction_error(grid)
        if additive:
            np.testing.assert_allclose(error, 0.0, atol=1e-12)
        else:
            assert (error > 0.05).all()
    curved_images = np.stack([curved(a) for a in strengths])
    assert (image_r2(strengths, curved_images) < 0.99).all()
    # slope by hand, and R^2 = nan for a response that does not change
    slope, r2 = linear_fit(strengths, np.stack([2 * strengths + 1, np.ones(5)], axis=1))
    np.testing.assert_allclose(slope, [2.0, 0.0])
    assert r2[0] == pytest.approx(1.0) and np.isnan(r2[1])
    assert leakage(np.array([2.0, -2.0]), np.array([[0.5, 0.5], [1.0, 1.0]])) == 0.375


def test_linearity_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    cfg = LinearityConfig(
        fit_n=16,
        n=2,
        steps=2,
        strengths=[-1.0, 0.0, 1.0],
        grid_strengths=[-1.0, 0.0, 1.0],
        targets=["x", "hue", "shape=1", "y"],
        local_iters=2,
        keep_images=2,
        swap_pairs=3,
        classifier=AttributeConfig(epochs=1, width=8),
    )
    result = evaluate(ctx, cfg)
    assert 0 <= result.values["lin_h_swap"] < 5
    assert {f"lin_h_{source}_gain" for source in ("mean", "svm", "local")} <= set(result.values)
    for space in ("xT", "h"):
        for source in ("mean", "svm", "local"):
            for q in (
                "r2",
                "slope",
                "r2img",
                "lpips",
                "interaction",
                "interaction_img",
                "effect",
                "offtarget",
                "swapfrac",
            ):
                assert f"lin_{space}_{source}_{q}" in result.values
            assert np.isfinite(result.values[f"lin_{space}_{source}_effect"])
            assert result.arrays[f"strip_{space}_{source}"].shape == (2, 3, *SHAPE)
            assert result.arrays[f"grid_{space}_{source}"].shape == (3, 3, *SHAPE)
    assert {"lin_xT_svm_r2_x", "lin_xT_svm_r2_y"} <= set(result.values)
    assert set(result.protocol["angular_spread"]) == {"hue"}
    # a class the untrained model never generates has no direction, and says so; so has a
    # hue whose generated angles all lie within a quarter turn of their mean (one half
    # circle only: this untrained model's)
    for name in ("shape1", "hue"):
        assert ("lin_xT_svm_r2_" + name in result.values) != any(
            f"/{name}:" in s for s in result.provenance.get("skipped", [])
        )
    assert result.protocol["targets_used"] == ["x", "hue", "shape1", "y"]


def test_bad_linearity_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strengths"):
        LinearityConfig(strengths=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="spaces"):
        LinearityConfig(spaces=["z"])
    with pytest.raises(ConfigError, match="sources"):
        LinearityConfig(sources=["pca"])
    with pytest.raises(ConfigError, match="h_swapfrac"):
        LinearityConfig(h_swapfrac=0)
    cfg = LinearityConfig(
        fit_n=8, n=1, steps=1, targets=["colour"], classifier=AttributeConfig(epochs=1, width=8)
    )
    with pytest.raises(ConfigError, match="eval.linearity.targets"):
        evaluate(tiny_context(tmp_path), cfg)


# --- h-swap influence, per-step h edits, circular targets --------------------------------


class LinearStub(torch.nn.Module):
    """A 'U-Net' with h = x_t and eps = -k h: its output depends on h only, and every DDIM
    state is a scalar multiple of x_T, so the h-swap has a closed form (below)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k, self.anchor = k, torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode(self, x: torch.Tensor, t: int) -> tuple:
        return x.clone(), (), None, None

    def decode(self, h: torch.Tensor, skips: tuple, emb: None, ts: None) -> torch.Tensor:
        return -self.k * h


def _linear_swap_influence(ddim: DDIM, k: float, t_edit: int) -> float:
    """The h-swap influence of LinearStub(k) without clipping, by a scalar recurrence.

    A plain run multiplies x by m = r (1 + k c) - k c' per step (r = sqrt(a' / a), c =
    sqrt(1 - a), c' = sqrt(1 - a')): x_a(step) = P x_a(T). The swapped run is alpha x_a(T) +
    beta x_b(T); on a swapped step the x0 prediction sees b's h = P x_b(T), so beta' =
    (r - k c') beta + r k c P; alpha + beta = P throughout, hence img(swap) - img(a) =
    beta (x_b - x_a) against img(b) - img(a) = P (x_b - x_a): the influence is |beta| / |P|.
    """
    s, P, beta = ddim.schedule, 1.0, 0.0
    for step in range(ddim.steps):
        a, a_next = float(s.alpha_bar[step]), float(s.alpha_bar_prev[step])
        r, c, c_next = (a_next / a) ** 0.5, (1 - a) ** 0.5, (1 - a_next) ** 0.5
        m = r * (1 + k * c) - k * c_next
        beta = (
            (r - k * c_next) * beta + r * k * c * P
            if int(s.timesteps[step]) >= t_edit
            else m * beta
        )
        P *= m
    return abs(beta) / abs(P)


@pytest.mark.parametrize("k", [0.0, 0.3, 1.5])
def test_h_swap_influence_of_a_network_that_reads_only_h(k: float) -> None:
    cfg = DiffusionConfig(clip_sample=False)
    ddim = DDIM(LinearStub(k), cfg, steps=4)
    x = latents(0, range(6), SHAPE)
    x = x * 0.5 / ddim.sample(x).x.abs().max()  # no image reaches the [-1, 1] clamp
    x_a, x_b = x[:3], x[3:]
    for t_edit in (0, int(ddim.schedule.timesteps[1]), int(ddim.schedule.timesteps[2])):
        got = dirs.h_swap_influence(ddim, x_a, x_b, t_edit)
        expected = _linear_swap_influence(ddim, k, t_edit)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
        if k == 0:  # a decoder that ignores h: no swap moves the image
            assert (got == 0).all()
    assert 0 < _linear_swap_influence(ddim, 0.3, 0) < 1
    # past T nothing is swapped
    assert (dirs.h_swap_influence(ddim, x_a, x_b, 1000) == 0).all()


def test_h_swap_replaces_h_step_by_step_with_the_other_trajectorys(unet: HUNet) -> None:
    ddim = DDIM(unet, CFG, steps=4)
    x = latents(2, range(4), SHAPE)
    x_a, x_b = x[:2], x[2:]
    assert (dirs.h_swap_influence(ddim, x_a, x_a.clone(), 0) == 0).all()  # b = a
    # b's h at step k, by hand: b's own trajectory, encoded step by step
    h_b, xb, s = [], x_b.clone(), ddim.schedule
    with torch.no_grad():
        for k in range(ddim.steps):
            h, skips, emb, ts = unet.encode(xb, int(s.timesteps[k]))
            h_b.append(h)
            xb = ddim_step(
                xb,
                unet.decode(h, skips, emb, ts),
                float(s.alpha_bar[k]),
                float(s.alpha_bar_prev[k]),
                clip=CFG.clip_sample,
            )
    middle = int(s.timesteps[1])
    for t_edit in (0, middle):
        swapped = _asyrp_by_hand(unet, ddim, x_a, None, t_edit, lambda h, k: h_b[k])
        plain, img_b = ddim.sample(x_a).x.clamp(-1, 1), xb.clamp(-1, 1)
        expected = (
            ((swapped - plain).flatten(1).norm(dim=1) / (img_b - plain).flatten(1).norm(dim=1))
            .double()
            .numpy()
        )
        np.testing.assert_allclose(
            dirs.h_swap_influence(ddim, x_a, x_b, t_edit), expected, rtol=1e-4
        )
    # fewer swapped steps, less of b in the image (this U-Net's h does act)
    assert (
        dirs.h_swap_influence(ddim, x_a, x_b, middle) < dirs.h_swap_influence(ddim, x_a, x_b, 0)
    ).all()
    with pytest.raises(ValueError, match="must match"):
        dirs.h_swap_influence(ddim, x_a, x_b[:1], 0)


def test_per_step_offsets_reach_their_own_steps(unet: HUNet) -> None:
    ddim = DDIM(unet, CFG, steps=4)
    x_T = latents(3, range(2), SHAPE)
    D = unet.encode_h(x_T[:1], 999)[0].numel()
    gen = torch.Generator().manual_seed(1)
    per_step = torch.randn(ddim.steps, 2, D, generator=gen)  # (steps, N, D)
    per_step[2:] = 0  # only steps 0 and 1 carry an offset
    edited = dirs.edit(ddim, x_T, "h", per_step[None], t_edit=0)[0]
    by_hand = _asyrp_by_hand(
        unet, ddim, x_T, None, 0, lambda h, k: h + per_step[k].reshape(h.shape)
    )
    torch.testing.assert_close(edited, by_hand)
    # only step 1's offset, the window covering it or not
    only_one = torch.zeros_like(per_step)
    only_one[1] = per_step[1]
    t1 = int(ddim.schedule.timesteps[1])
    torch.testing.assert_close(
        dirs.edit(ddim, x_T, "h", only_one[None], t_edit=t1)[0],
        _asyrp_by_hand(unet, ddim, x_T, None, t1, lambda h, k: h + only_one[k].reshape(h.shape)),
    )
    assert not torch.allclose(
        dirs.edit(ddim, x_T, "h", only_one[None], t_edit=t1)[0], ddim.sample(x_T).x.clamp(-1, 1)
    )
    plain = ddim.sample(x_T).x.clamp(-1, 1)
    t2 = int(ddim.schedule.timesteps[0])  # window = step 0 alone: step 1's offset unused
    assert torch.equal(dirs.edit(ddim, x_T, "h", only_one[None], t_edit=t2)[0], plain)
    # strengths of per-step directions: alpha = 0 is the unedited sample exactly, and
    # (E, steps, 1, D) broadcasts over samples as (E, 1, D) does
    offsets = dirs.strength_offsets([0.0, 1.0], per_step[:, :1])
    assert offsets.shape == (2, ddim.steps, 1, D)
    images = dirs.edit(ddim, x_T, "h", offsets, t_edit=0)
    # exactly the unedited rows of a batch of the same size (CPU convolutions round by
    # batch size, ~1e-5), and within that rounding of the plain sample
    assert torch.equal(images[0], dirs.edit(ddim, x_T, "h", 0 * offsets, t_edit=0)[0])
    torch.testing.assert_close(images[0], plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        images[1],
        _asyrp_by_hand(
            unet, ddim, x_T, None, 0, lambda h, k: h + per_step[k, :1].reshape(1, *h.shape[1:])
        ),
    )
    # a constant offset per step is the plain offset
    constant = torch.randn(1, D, generator=gen)
    torch.testing.assert_close(
        dirs.edit(ddim, x_T, "h", constant.expand(ddim.steps, 1, D)[None], t_edit=0),
        dirs.edit(ddim, x_T, "h", constant[None], t_edit=0),
    )
    with pytest.raises(ValueError, match="per-step"):
        dirs.edit(ddim, x_T, "x_T", offsets, t_edit=0)


def test_circular_responses_are_wrapped_angles_in_spreads() -> None:
    rng = np.random.default_rng(0)
    # spread: a line's s.d. for concentrated angles (here around 0.98, across the seam), and
    # sqrt(1/12) turns for angles uniform on the circle
    tight = np.mod(0.98 + 0.02 * rng.normal(size=20_000), 1.0)
    assert angular_spread(tight) == pytest.approx(0.02, rel=0.02)
    assert angular_spread(rng.uniform(0, 1, 20_000)) == pytest.approx(12**-0.5, rel=0.02)
    # labels: the half circle around the circular mean (0.98), whatever side of the seam
    np.testing.assert_array_equal(
        circular_labels(np.array([0.97, 0.99, 0.05, 0.5, 0.6])), [1, 1, 1, 0, 0]
    )
    hue = Target("hue", None, "circular")

    def cos_sin(turns: list[float], radius: float = 1.0) -> np.ndarray:
        angle = 2 * np.pi * np.asarray(turns)
        return radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)

    raw = {"hue": cos_sin([0.02, 0.9, 0.5], radius=3.0)}  # a head's output need not be unit
    base = cos_sin([0.97, 0.95, 0.5])
    # signed, wrapped across the seam: +0.05, -0.05, 0 turns, over a spread of 0.1
    np.testing.assert_allclose(response(raw, hue, base, spread=0.1), [0.5, -0.5, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="circular"):
        response(raw, hue)
    np.testing.assert_array_equal(labels(raw, hue), circular_labels(np.array([0.02, 0.9, 0.5])))
    # a grid of edits (S = 3 strengths, N = 2 samples), unedited at row 1: responses are the
    # angles from each column's unedited sample
    turns = np.array([[0.1, 0.8], [0.2, 0.9], [0.25, 0.05]])
    read = Readout(None, [hue], {"hue": 0.05}, {"hue": 1.0})
    got = read.grid({"hue": cos_sin(turns.ravel())}, hue, (3, 2), (1,))
    np.testing.assert_allclose(got, [[-2.0, -2.0], [0.0, 0.0], [1.0, 3.0]], atol=1e-9)
    # effect: mean |change| at the far strengths (rows 0 and 2)
    assert mean_change(got, 1, np.array([0, 2])) == pytest.approx((2 + 2 + 1 + 3) / 4)


def test_h_directions_are_fitted_and_scaled_per_step() -> None:
    rng = np.random.default_rng(1)
    n, D = 400, 6
    y = rng.integers(0, 2, n)
    # step 0 separates the labels along axis 0 with codes of s.d. ~1, step 1 along axis 3
    # with codes 10x as large: each step's own direction, at its own spread (one s.d.)
    codes = rng.normal(size=(2, n, D))
    codes[0, :, 0] += 2 * y
    codes[1] *= 10
    codes[1, :, 3] += 20 * y
    steps = np.array([True, True, False, False])  # steps 2, 3 (t < t_edit) are not edited
    for source in ("mean", "svm"):
        cfg = LinearityConfig()
        out = _supervised(cfg, source, codes, y, steps)
        assert out.shape == (4, 1, D)
        assert (out[2:] == 0).all()
        for k, axis in ((0, 0), (1, 3)):
            v = out[k, 0].double().numpy()
            assert v[axis] / np.linalg.norm(v) > 0.95  # towards label 1, along the step's axis
            unit = v / np.linalg.norm(v)
            assert np.linalg.norm(v) == pytest.approx((codes[k] @ unit).std(), rel=1e-5)
        # x_T: one direction at one s.d.
        one = _supervised(cfg, source, codes[0], y, None)
        assert one.shape == (1, D)
        assert np.linalg.norm(one.numpy()) == pytest.approx(
            (codes[0] @ (one[0].double().numpy() / np.linalg.norm(one.numpy()))).std(), rel=1e-5
        )


def test_h_edits_are_calibrated_to_a_fraction_of_the_h_swap(tmp_path: Path) -> None:
    # LinearStub without clipping: an h edit's image change is linear in its size, so one
    # secant step lands exactly on the asked fraction of the swap's image change
    assert swap_gain(2.0, 8.0, 0.5) == 2.0 and swap_gain(0.0, 8.0, 0.5) == 1.0
    plain = torch.zeros(3, 4)
    assert image_move(torch.stack([plain + 1, plain - 2]), plain) == pytest.approx(3.0)
    ctx = EvalContext(
        LinearStub(0.7),
        DiffusionConfig(clip_sample=False),
        DataConfig(resolution=16, size=64),
        refs_dir=tmp_path,
    )
    cfg = LinearityConfig(steps=4, strengths=[-2.0, 0.0, 2.0], h_swapfrac=0.3, t_edit=0)
    ddim = ctx.ddim(cfg.steps)
    x = latents(5, range(8), SHAPE)
    x = x * 0.05 / ddim.sample(x).x.abs().max()  # far from the [-1, 1] clamp
    x_T, x_a, x_b = x[:4], x[4:6], x[6:]
    moved, _ = dirs.h_swap_moves(ddim, x_a, x_b, 0)
    gen = torch.Generator().manual_seed(0)
    D = x_T[0].numel()
    vectors = [
        1e-3 * torch.randn(1, D, generator=gen),
        torch.cat([1e-4 * torch.randn(2, 1, D, generator=gen), torch.zeros(2, 1, D)]),
    ]
    edits, gains = _calibrated(ctx, cfg, x_T, Edits(vectors, [None, None]), moved.mean())
    unedited = ddim.sample(x_T).x
    for before, after, gain in zip(vectors, edits.vectors, gains, strict=True):
        torch.testing.assert_close(after, gain * before)
        images = dirs.edit(ddim, x_T, "h", dirs.strength_offsets([-2.0, 2.0], after), 0)
        assert image_move(images, unedited) == pytest.approx(0.3 * moved.mean(), rel=1e-3)
