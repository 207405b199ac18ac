"""Reconstruction errors in closed form; inversion of a model where DDIM inversion is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff.evaluate.metrics.inversion import InversionConfig, evaluate, reconstruction_errors
from isodiff.model.sampling import quantise
from tests.conftest import tiny_unet
from tests.metric_helpers import tiny_context


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1)


def test_reconstruction_errors_closed_form() -> None:
    x = torch.rand(3, 3, 8, 8) * 1.6 - 0.8
    same = reconstruction_errors(x, x, _l1)
    assert (same["mse"] == 0).all() and np.isinf(same["psnr"]).all() and (same["lpips"] == 0).all()
    shifted = reconstruction_errors(x, x + 0.2, _l1)  # 0.1 on the [0, 1] scale
    np.testing.assert_allclose(shifted["mse"], 0.01, rtol=1e-5)
    np.testing.assert_allclose(shifted["psnr"], 20.0, rtol=1e-5)
    np.testing.assert_allclose(shifted["lpips"], 0.2, rtol=1e-5)


def test_inversion_reconstructs_where_inversion_is_exact(tmp_path: Path) -> None:
    unet = tiny_unet()
    with torch.no_grad():  # eps independent of x: DDIM is affine, inversion exact
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.normal_()
    ctx = tiny_context(tmp_path, unet=unet)
    result = evaluate(ctx, InversionConfig(n=3, steps=4))
    assert result.values["mse"] < 1e-9 and result.values["psnr"] > 90
    assert result.values["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert result.arrays["psnr"].shape == (3,)
    sources, reconstructions = result.arrays["sources"], result.arrays["reconstructions"]
    assert sources.shape == reconstructions.shape == (3, 3, 16, 16)  # min(n, 8)
    assert sources.dtype == reconstructions.dtype == np.uint8
    held_out = torch.stack([ctx.dataset("test")[i][0] for i in range(3)])
    np.testing.assert_array_equal(sources, quantise(held_out).numpy())
    np.testing.assert_allclose(reconstructions.astype(int), sources.astype(int), atol=1)


def test_inversion_of_a_random_model_is_lossy(tmp_path: Path) -> None:
    result = evaluate(
        tiny_context(tmp_path, batch_size=2), InversionConfig(n=5, steps=4, keep_images=3)
    )
    assert result.values["mse"] > 1e-4
    # the first 3 of 5 images, kept across batches of 2
    assert (
        result.arrays["sources"].shape == result.arrays["reconstructions"].shape == (3, 3, 16, 16)
    )
    assert result.arrays["mse"].shape == (5,)
