"""MCN / VoR on known spectra; exact and Lanczos singular values against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import null_space

from isodiff.evaluate.metrics.jacobian import (
    mean_condition_number,
    singular_values_exact,
    singular_values_lanczos,
    variance_of_riemannian_metric,
)
from isodiff.isometry import higher_order_ad
from tests.conftest import tiny_unet


def _linear_map(m: int, n: int, s: np.ndarray, seed: int = 0):
    """x (*shape, n entries) -> A x with A = U diag(s) V^T: known singular values s."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.normal(size=(m, m)))[0][:, : len(s)]
    V = np.linalg.qr(rng.normal(size=(n, n)))[0][:, : len(s)]
    A = torch.from_numpy(U @ np.diag(s) @ V.T).float()
    return A, lambda x: x.flatten(1) @ A.T


def test_mcn_and_vor_of_known_spectra() -> None:
    s = np.array([[4.0, 2.0, 1.0], [8.0, 4.0, 2.0]])
    assert mean_condition_number(s) == pytest.approx(4.0)
    # log s differs by log 2 between the two samples in each of the 3 columns
    assert variance_of_riemannian_metric(s) == pytest.approx(3 * math.log(2) ** 2 / 2)
    assert variance_of_riemannian_metric(s, ddof=0) == pytest.approx(3 * (math.log(2) / 2) ** 2)
    isometry = np.full((5, 3), 2.5)
    assert mean_condition_number(isometry) == 1.0 and variance_of_riemannian_metric(isometry) == 0


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_exact_singular_values_of_a_linear_map(m: int, n: int) -> None:
    s = np.linspace(5.0, 0.5, min(m, n))
    _, f = _linear_map(m, n, s)
    x = torch.randn(n).reshape(2, -1)
    np.testing.assert_allclose(singular_values_exact(f, x, chunk=7), s, rtol=1e-5)


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_tangent_variant_restricts_to_the_sphere(m: int, n: int) -> None:
    A, f = _linear_map(m, n, np.linspace(5.0, 0.5, min(m, n)))
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    Q = torch.from_numpy(null_space(x[None].double().numpy())).float()  # tangent basis at x
    expected = np.linalg.svd((A @ Q).double().numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values_exact(f, x, tangent=True), expected, rtol=1e-4)
    with torch.no_grad():
        got = singular_values_lanczos(f, x, k=3, tangent=True)
    np.testing.assert_allclose(got, np.r_[expected[:3], expected[-3:]], rtol=1e-4)


@pytest.mark.slow  # ~100 Lanczos products of a U-Net: 15-140 s on a shared 2-core CPU
def test_lanczos_matches_exact_on_a_small_unet() -> None:
    """Top-2 / bottom-2 singular values of dh/dx_t of a tiny random U-Net (8 px grey, 64 ->
    512): Lanczos with JVP/VJP against the exact SVD, relative tolerance 1e-3."""
    unet = tiny_unet(size=8, channels=1)
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(1))

    def f(batch: torch.Tensor) -> torch.Tensor:
        return unet.encode_h(batch, 999).flatten(1)

    with higher_order_ad(), torch.no_grad():
        exact = singular_values_exact(f, x)
        lanczos = singular_values_lanczos(f, x, k=2)
    assert len(exact) == 64
    np.testing.assert_allclose(lanczos, np.r_[exact[:2], exact[-2:]], rtol=1e-3)
