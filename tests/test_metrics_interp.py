"""Adjacent-frame distances and their summary; interpolation of a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff.evaluate.metrics.common import path_points
from isodiff.evaluate.metrics.interp import (
    ISTD_PIXEL_SCALE,
    PATH_STATISTICS,
    InterpConfig,
    adjacent_distances,
    coefficient_of_variation,
    evaluate,
    path_statistics,
    smoothness,
)
from isodiff.evaluate.metrics.interp_stats import adjacent_l2
from isodiff.model.sampling import quantise
from tests.metric_helpers import tiny_context


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def test_adjacent_distances_of_uniform_motion_are_constant() -> None:
    x0, x1 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    x1[1] *= 3
    frames = path_points(x0, x1, 5, "lerp").reshape(2, 5, 1, 2, 2)
    d = adjacent_distances(frames, _l2)
    np.testing.assert_allclose(d, [[0.5] * 4, [1.5] * 4], rtol=1e-6)


def test_smoothness_summary() -> None:
    d = np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0]])
    summary = smoothness(d)
    assert summary["mean"] == pytest.approx(2.5)
    assert summary["std"] == pytest.approx(np.std([1, 2, 3]) / 2)
    assert summary["max"] == pytest.approx(3.0)
    # cv of [1, 2, 3]: sqrt(2/3) / 2; of [3, 3, 3]: 0
    assert summary["cv"] == pytest.approx(math.sqrt(2 / 3) / 2 / 2)


def test_uniform_motion_has_cv_0_at_any_speed() -> None:
    x0, x1 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    x1[1] *= 0.01  # a contracted path: slower, as uniform
    frames = path_points(x0, x1, 6, "lerp").reshape(2, 6, 1, 2, 2)
    np.testing.assert_allclose(
        coefficient_of_variation(adjacent_distances(frames, _l2)), 0, atol=1e-6
    )


def test_cv_is_scale_free_and_sees_a_jump() -> None:
    """A path that covers the distance in one jump: F - 1 = 4 steps [0, 0, 4, 0]: mean 1,
    std sqrt(3), whatever the scale; a stationary path counts as uniform (0)."""
    d = np.array([[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.04, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(coefficient_of_variation(d), [math.sqrt(3), math.sqrt(3), 0.0])


def test_path_statistics_closed_form() -> None:
    """Two pairs: LPIPS steps [1, 2, 3] and [3, 3, 3]; pixel steps [0, 4] and [1, 1].
    Per pair: ISTD (std, ddof 0) 2 and 0; PDV (variance, ddof 0) 2/3 and 0; DiffMorpher's
    PPL (sum) 6 and 9; then mean, sample std (ddof 1) and N = 2 over the pairs."""
    d_lpips = np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0]])
    d_l2 = np.array([[0.0, 4.0], [1.0, 1.0]])
    got = path_statistics(d_lpips, d_l2)
    want = {
        "istd": 1.0,
        "istd_std": math.sqrt(2),
        "istd_n": 2,
        "pdv": 1 / 3,
        "pdv_std": (2 / 3) / math.sqrt(2),
        "pdv_n": 2,
        "ppl": 7.5,
        "ppl_std": 3 / math.sqrt(2),
        "ppl_n": 2,
    }
    assert got == pytest.approx(want)


def test_path_statistics_of_uniform_motion_are_0_but_its_length() -> None:
    """Frames equally far apart: ISTD and PDV vanish at any speed, PPL is the path's length;
    one pair: N = 1 and a std that is not a number (left out of metrics.json)."""
    x0, x1 = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    frames = path_points(x0, x1, 5, "lerp").reshape(1, 5, 1, 2, 2)
    d = adjacent_distances(frames, _l2)
    got = path_statistics(d, adjacent_l2(frames.numpy()))
    assert got["istd"] == pytest.approx(0, abs=1e-12) and got["pdv"] == pytest.approx(0, abs=1e-12)
    assert got["ppl"] == pytest.approx(4.0)  # |x1 - x0| = 2 * sqrt(4) pixels
    assert got["istd_n"] == 1 and math.isnan(got["istd_std"])


def test_slerp_frames_keep_the_norm_and_lerp_frames_do_not() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 8, 8, generator=g)
    x1 = torch.randn(1, 3, 8, 8, generator=g)
    x1 = x1 * x0.norm() / x1.norm()
    norms = {p: path_points(x0, x1, 11, p).flatten(1).norm(dim=1) for p in ("slerp", "lerp")}
    torch.testing.assert_close(norms["slerp"], torch.full((11,), float(x0.norm())))
    assert norms["lerp"][5] < 0.8 * x0.norm()


def test_interpolation_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path, batch_size=8)  # 8 // 5 frames: one pair a batch
    result = evaluate(ctx, InterpConfig(pairs=5, frames=5, steps=2, net="alex", keep_frames=4))
    for path in ("slerp", "lerp"):
        assert result.arrays[f"{path}_adjacent"].shape == (5, 4)
        assert result.values[f"{path}_max"] >= result.values[f"{path}_mean"] > 0
        d = result.arrays[f"{path}_adjacent"]
        assert result.values[f"{path}_cv"] == pytest.approx(np.mean(d.std(axis=1) / d.mean(axis=1)))
        frames = result.arrays[f"{path}_frames"]  # the first 4 pairs, from 4 batches
        assert frames.shape == (4, 5, 3, 16, 16) and frames.dtype == np.uint8
        x0, x1, _ = ctx.endpoints([3])  # pair 3, sampled on its own
        again = ctx.ddim(2).sample(path_points(x0, x1, 5, path)).x
        np.testing.assert_allclose(
            frames[3].astype(int), quantise(again).numpy().astype(int), atol=1
        )
    assert result.provenance["weights"] == "lpips-v0.1-alex/random-trunk"
    for path in ("slerp", "lerp"):  # the peers' statistics of the very frames measured
        d, d_l2 = result.arrays[f"{path}_adjacent"], result.arrays[f"{path}_adjacent_l2"]
        assert d_l2.shape == (5, 4) and (d_l2 > 0).all()
        assert result.values[f"{path}_istd"] == pytest.approx(d_l2.std(axis=1).mean())
        assert result.values[f"{path}_pdv"] == pytest.approx(d.var(axis=1).mean())
        assert result.values[f"{path}_ppl"] == pytest.approx(d.sum(axis=1).mean())
        assert result.values[f"{path}_ppl_n"] == 5
        assert result.values[f"{path}_istd_std"] == pytest.approx(d_l2.std(axis=1).std(ddof=1))
    # frames in [-1, 1]: ISTD measures them in [0, 1] (recorded in the protocol)
    assert ISTD_PIXEL_SCALE == 0.5 and "[0, 1]" in result.protocol["path_statistics"]["istd"]
    assert result.protocol["path_statistics"] == PATH_STATISTICS


def test_frames_kept_are_capped_by_the_pairs(tmp_path: Path) -> None:
    result = evaluate(
        tiny_context(tmp_path, batch_size=8),
        InterpConfig(pairs=2, frames=3, steps=1, net="alex", paths=["slerp"]),
    )
    assert result.arrays["slerp_frames"].shape == (2, 3, 3, 16, 16)  # min(pairs, 4)
