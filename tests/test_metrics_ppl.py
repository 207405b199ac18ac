"""PPL against a generator whose distance is known in closed form, its filters, the
diversity beside it, a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff.evaluate.metrics import lower_is_better
from isodiff.evaluate.metrics.ppl import (
    VARIANT_NET,
    PPLConfig,
    batch_mean_percentile_mean,
    evaluate,
    face_crop,
    pair_distances,
    path_images,
    path_lengths,
    per_diversity,
    percentile_mean,
)
from tests.metric_helpers import tiny_context


def _squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).pow(2).sum(1)


def test_ppl_of_a_linear_generator_with_a_known_distance() -> None:
    """g(z) = c z and d = |a - b|^2: along a slerp between x0 and x1 of equal norm r at angle
    theta the speed is r theta, so d / eps^2 -> (c r theta)^2 (first order in eps)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    x1 = x1 * (x0.flatten(1).norm(dim=1) / x1.flatten(1).norm(dim=1))[:, None, None, None]
    w = torch.rand(64, generator=g, dtype=torch.float64)
    c = 2.5
    d = path_lengths(lambda z: c * z, {"l2": _squared_l2}, x0, x1, w, epsilon=1e-4)["l2"]
    r = x0.flatten(1).norm(dim=1)
    theta = torch.acos((x0.flatten(1) * x1.flatten(1)).sum(1) / r**2)
    np.testing.assert_allclose(d, ((c * r * theta) ** 2).numpy(), rtol=1e-6)


def test_percentile_filter_drops_the_tails() -> None:
    d = np.r_[np.ones(998), 0.0, 1e6]
    assert percentile_mean(d) == 1.0
    assert np.mean(d) > 1000


def test_isodiff_compat_filters_batch_means() -> None:
    d = np.r_[np.full(1990, 2.0), np.full(10, 1e6)]  # the last of 200 batches is an outlier
    assert batch_mean_percentile_mean(d, batch=10) == 2.0
    assert batch_mean_percentile_mean(np.arange(8.0), batch=4) == pytest.approx(3.5)


def test_diversity_pairs_samples_2k_and_2k_plus_1() -> None:
    images = torch.tensor([0.0, 1.0, 5.0, 3.0, 7.0]).reshape(5, 1, 1, 1)  # the 5th: unpaired
    d = pair_distances(images, {"l2": _squared_l2})["l2"]
    np.testing.assert_array_equal(d, [1.0, 4.0])


def test_per_diversity_is_invariant_to_a_contraction() -> None:
    """g(z) = c z with d = |a - b|^2: PPL and the diversity both scale by c^2, their ratio
    not at all (a model that contracts everything is not smoother per unit of diversity)."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(32, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(32, generator=g, dtype=torch.float64)
    ratios, ppls = [], []
    for c in (1.0, 0.1):
        a, _ = path_images(lambda z, c=c: c * z, x0, x1, w, 1e-4)
        ppl = path_lengths(lambda z, c=c: c * z, {"l2": _squared_l2}, x0, x1, w, 1e-4)["l2"]
        diversity = pair_distances(a, {"l2": _squared_l2})["l2"].mean()
        ppls.append(ppl.mean())
        ratios.append(per_diversity(ppl.mean(), diversity))
    assert ppls[1] == pytest.approx(0.01 * ppls[0], rel=1e-6)
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-6)
    assert per_diversity(1.0, 0.0) == float("inf")


def test_diversity_is_better_higher_and_its_ratio_lower() -> None:
    for v in VARIANT_NET:
        assert lower_is_better(f"ppl_{v}") and lower_is_better(f"ppl_{v}_per_diversity")
        assert not lower_is_better(f"ppl_{v}_diversity")


def test_face_crop_is_stylegans() -> None:
    images = torch.zeros(1, 3, 256, 256)
    images[..., 96:224, 64:192] = 1
    crop = face_crop(images)
    assert crop.shape[-2:] == (128, 128) and bool((crop == 1).all())


def test_ppl_of_a_model_does_not_depend_on_batch_size(tmp_path: Path) -> None:
    cfg = PPLConfig(n=8, steps=2, compat_batch=4)
    small = evaluate(tiny_context(tmp_path, batch_size=4), cfg)
    large = evaluate(tiny_context(tmp_path, batch_size=16), cfg)
    assert set(small.values) == {
        f"ppl_{v}{suffix}"
        for v in ("stylegan", "isodiff_compat")
        for suffix in ("", "_diversity", "_per_diversity")
    }
    assert small.arrays["d_stylegan"].shape == (8,)
    for v in ("stylegan", "isodiff_compat"):
        assert small.arrays[f"pairs_{v}"].shape == (4,)  # samples (0, 1), (2, 3), ...
        assert small.values[f"ppl_{v}_diversity"] == pytest.approx(
            small.arrays[f"pairs_{v}"].mean()
        )
        assert small.values[f"ppl_{v}_per_diversity"] == pytest.approx(
            small.values[f"ppl_{v}"] / small.values[f"ppl_{v}_diversity"]
        )
        # the same pairs at every batch size (chunks start at even samples)
        np.testing.assert_allclose(
            small.arrays[f"pairs_{v}"], large.arrays[f"pairs_{v}"], rtol=1e-4
        )
    np.testing.assert_array_equal(small.arrays["w"], large.arrays["w"])
    # Inputs are bitwise equal (per-sample seeds); the CPU conv kernels oneDNN picks depend
    # on batch size and thread count (~1e-5 in the images), which 1/eps^2 amplifies.
    np.testing.assert_allclose(small.arrays["d_stylegan"], large.arrays["d_stylegan"], rtol=5e-3)
    assert small.values == pytest.approx(large.values, rel=5e-3)
