"""FID: the Frechet distance against closed forms and clean-fid, features through clean-fid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

from isodiff.evaluate import networks
from isodiff.evaluate.metrics.fid import (
    distance,
    feature_stats,
    frechet_distance,
    gaussian_stats,
    inception_features,
    to_uint8,
)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_feature_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = gaussian_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_two_gaussians_is_the_analytic_frechet_distance() -> None:
    """Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_clean_fid() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=32), rng.normal(size=32), _spd(rng, 32), _spd(rng, 32)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        cleanfid_frechet_distance(mu1, s1, mu2, s2), rel=1e-9
    )


def test_fid_of_few_samples_through_their_covariance_factor() -> None:
    """Fewer samples than dimensions (FID of a few hundred images): the distance through the
    covariance factor is the analytic one for diagonal covariances, and clean-fid's on the
    full matrices of random features (scipy's sqrtm, which clean-fid uses, and our full
    eigendecomposition are only ~1e-8 exact on the singular covariance)."""
    from isodiff.evaluate.metrics.fid import frechet_distance_factored

    rng = np.random.default_rng(3)
    a, b = np.zeros(10), rng.uniform(0.1, 3, 10)
    a[:4] = rng.uniform(0.1, 3, 4)  # rank 4
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    factor = np.sqrt(a)[:4, None] * np.eye(10)[:4]  # F^T F = diag(a)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_factored(mu1, factor, mu2, np.diag(b)) == pytest.approx(
        expected, rel=1e-12
    )
    few = feature_stats(rng.normal(size=(12, 48)) * rng.uniform(0.5, 2, 48))
    many = feature_stats(rng.normal(1.0, 1.5, size=(200, 48)))
    assert set(few) == {"mu", "sigma", "factor"} and set(many) == {"mu", "sigma"}
    assert few["factor"].T @ few["factor"] == pytest.approx(few["sigma"], abs=1e-12)
    for second in (many, feature_stats(rng.normal(size=(9, 48)))):
        args = (few["mu"], few["sigma"], second["mu"], second["sigma"])
        assert distance(few, second) == pytest.approx(cleanfid_frechet_distance(*args), rel=1e-6)


def test_images_are_quantised_like_an_image_file() -> None:
    images = torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    pixels = to_uint8(images)
    assert pixels.shape == (1, 1, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_clean_fid_runs_on_the_offline_inception(mode: str) -> None:
    model = networks.inception(mode).module
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = inception_features(images, model, mode)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    # The same images give the same features; different images do not.
    assert np.allclose(inception_features(images[:1], model, mode), features[:1], atol=1e-4)
    assert not np.allclose(features[0], features[1], atol=1e-3)
