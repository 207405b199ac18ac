"""Editing directions and edits (isodiff.directions) and the linearity metric against
known answers: exact no-ops, Asyrp's process by hand, a known SVD, linear generators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff import directions as dirs
from isodiff.config import ConfigError, DiffusionConfig
from isodiff.metrics.attributes import AttributeConfig
from isodiff.metrics.linearity import (
    LinearityConfig,
    evaluate,
    image_r2,
    interaction_error,
    leakage,
    linear_fit,
)
from isodiff.models import HUNet
from isodiff.sampling import DDIM, ddim_step, latents
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


def _asyrp_by_hand(unet: HUNet, ddim: DDIM, x: torch.Tensor, offset: torch.Tensor,
                   t_edit: int) -> torch.Tensor:
    """Asyrp's asymmetric process written out: on steps with t >= t_edit the x0 prediction
    uses the up path from h + offset (h replaced), the direction the model's own eps."""
    s = ddim.schedule
    with torch.no_grad():
        for k in range(ddim.steps):
            t = int(s.timesteps[k])
            h, skips, emb, ts = unet.encode(x, t)
            eps = unet.decode(h, skips, emb, ts)
            eps_x0 = unet.decode(h + offset.reshape(h.shape), skips, emb, ts) if t >= t_edit \
                else eps
            x = ddim_step(x, eps_x0, float(s.alpha_bar[k]), float(s.alpha_bar_prev[k]), eps,
                          CFG.clip_sample)
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
    torch.testing.assert_close(dirs.edit(ddim, x_T, "h", offset[None], t_edit=middle)[0],
                               _asyrp_by_hand(unet, ddim, x_T, offset, middle))
    # t_edit past T: no edit at all
    assert torch.equal(dirs.edit(ddim, x_T, "h", offset[None], t_edit=1000)[0],
                       ddim.sample(x_T).x.clamp(-1, 1))


def test_power_iteration_recovers_the_top_singular_vectors_of_a_known_map() -> None:
    rng = np.random.default_rng(0)
    n, m, k = 12, 9, 3
    U, _ = np.linalg.qr(rng.normal(size=(m, m)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    A = torch.from_numpy(U @ np.diag(s) @ V[:, :m].T)  # (m, n), singular values s

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) @ A.T

    v, u, sv = dirs.top_singular_vectors(f, torch.randn(3, 2, 2, dtype=torch.float64), k,
                                         iters=60)
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
    for direction in (dirs.class_mean_direction(codes, labels),
                      dirs.svm_direction(codes, labels)):
        assert direction @ axis / np.linalg.norm(direction) > 0.95  # towards label 1
        one_std = dirs.scaled(direction, codes)
        assert (codes @ (one_std / np.linalg.norm(one_std))).std() == pytest.approx(
            np.linalg.norm(one_std))
    with pytest.raises(ValueError, match="both labels"):
        dirs.class_mean_direction(codes, np.zeros(600))


def test_a_linear_generator_is_perfectly_linear_and_additive() -> None:
    rng = np.random.default_rng(0)
    strengths = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    base, v1, v2 = rng.normal(size=(3, 4, 50))  # 4 samples, 50 "pixels"

    def linear(a: float, b: float = 0.0) -> np.ndarray:
        return base + a * v1 + b * v2

    def curved(a: float, b: float = 0.0) -> np.ndarray:
        return base + a * v1 + b * v2 + 0.5 * a * b * v1 + 0.3 * a ** 2 * v2

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
    cfg = LinearityConfig(fit_n=16, n=2, steps=2, strengths=[-1.0, 0.0, 1.0],
                          grid_strengths=[-1.0, 0.0, 1.0], targets=["x", "y", "shape=1"],
                          local_iters=2, keep_images=2,
                          classifier=AttributeConfig(epochs=1, width=8))
    result = evaluate(ctx, cfg)
    for space in ("xT", "h"):
        for source in ("mean", "svm", "local"):
            for q in ("r2", "slope", "r2img", "lpips", "interaction", "interaction_img"):
                assert f"lin_{space}_{source}_{q}" in result.values
            assert result.arrays[f"strip_{space}_{source}"].shape == (2, 3, *SHAPE)
            assert result.arrays[f"grid_{space}_{source}"].shape == (3, 3, *SHAPE)
    assert {"lin_xT_svm_r2_x", "lin_xT_svm_r2_y"} <= set(result.values)
    # a class the untrained model never generates has no direction, and says so
    assert ("lin_xT_svm_r2_shape1" in result.values) != any(
        "shape1" in s for s in result.provenance.get("skipped", []))
    assert result.protocol["targets_used"] == ["x", "y", "shape1"]


def test_bad_linearity_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strengths"):
        LinearityConfig(strengths=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="spaces"):
        LinearityConfig(spaces=["z"])
    with pytest.raises(ConfigError, match="sources"):
        LinearityConfig(sources=["pca"])
    cfg = LinearityConfig(fit_n=8, n=1, steps=1, targets=["colour"],
                          classifier=AttributeConfig(epochs=1, width=8))
    with pytest.raises(ConfigError, match="eval.linearity.targets"):
        evaluate(tiny_context(tmp_path), cfg)
