"""Linear separability on separable and inseparable data, its resampling and permutation
floor, circular labels; attribute predictors; a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics.attributes import AttributeConfig, attribute_model
from isodiff.evaluate.metrics.separability import (
    SeparabilityConfig,
    conditional_entropy,
    confident_labels,
    evaluate,
    linear_separability,
    per_split_statistics,
    permuted_labels,
    random_splits,
    split_scores,
    with_companions,
)
from tests.metric_helpers import tiny_context


def test_conditional_entropy() -> None:
    y = np.array([0, 1, 0, 1, 2, 2])
    assert conditional_entropy(y, y) == 0.0
    assert conditional_entropy(np.array([0, 1, 0, 1]), np.zeros(4)) == pytest.approx(math.log(2))
    assert conditional_entropy(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(
        math.log(2)
    )


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n // 2), np.arange(n // 2, n)


def test_linearly_separable_data_is_perfect() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    centres = rng.normal(size=(3, 20)) * 10
    features = centres[labels] + rng.normal(size=(400, 20))
    result = linear_separability(features, labels, _halves(400))
    assert result == {"error": 0.0, "entropy": 0.0}  # LS = exp(0) = 1


def test_unrelated_labels_are_not_separable() -> None:
    rng = np.random.default_rng(1)
    result = linear_separability(
        rng.normal(size=(2000, 5)), rng.integers(0, 2, 2000), _halves(2000)
    )
    assert result["error"] > 0.4 and result["entropy"] > 0.6


def test_one_class_in_the_fitted_rows_predicts_that_class() -> None:
    labels = np.array([1, 1, 1, 0, 1, 0])
    result = linear_separability(np.zeros((6, 2)), labels, _halves(6))
    # held out [0, 1, 0], all predicted 1: H(Y | constant) = H(Y), Y ~ (2/3, 1/3)
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert result == {"error": pytest.approx(2 / 3), "entropy": pytest.approx(entropy)}


def test_random_splits_partition_the_rows_reproducibly() -> None:
    splits = random_splits(10, 0.3, resamples=4, seed=7)
    assert len(splits) == 4
    for fit, heldout in splits:
        assert len(fit) == 7 and len(heldout) == 3
        assert sorted(np.r_[fit, heldout].tolist()) == list(range(10))
    assert len({tuple(fit) for fit, _ in splits}) == 4  # different splits
    again = random_splits(10, 0.3, resamples=4, seed=7)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again, strict=True))
    other = random_splits(10, 0.3, resamples=4, seed=8)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(splits, other, strict=True))


def test_permuted_labels_keep_the_classes_and_are_reproducible() -> None:
    labels = np.repeat([0, 1, 2], [5, 3, 2])
    permuted = permuted_labels(labels, permutations=3, seed=1)
    assert all(np.array_equal(np.sort(p), labels) for p in permuted)
    assert not all(np.array_equal(p, labels) for p in permuted)
    np.testing.assert_array_equal(permuted[2], permuted_labels(labels, 3, seed=1)[2])


def test_companions_are_the_mean_its_standard_error_and_the_floor() -> None:
    per_split = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    null = np.array([[1.0, 3.0], [5.0, 7.0]])  # 2 permutations x 2 splits: statistics 2, 6
    values = with_companions("x", per_split, null)
    assert values == pytest.approx(
        {"x": 3.0, "x_se": math.sqrt(2.5 / 5), "x_floor": 4.0, "x_floor_sd": math.sqrt(8.0)}
    )


def test_statistics_per_split() -> None:
    # 2 attributes x 3 splits of (error, entropy)
    scores = np.stack(
        [
            np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
            np.array([[0.3, 0.0], [0.1, 1.0], [0.2, 0.2]]),
        ]
    )
    stats = per_split_statistics(scores, ["a", "b"], "h")
    np.testing.assert_allclose(stats["error_h_a"], [0.1, 0.3, 0.5])
    np.testing.assert_allclose(stats["error_h"], [0.2, 0.2, 0.35])
    np.testing.assert_allclose(stats["ls_h"], np.exp([0.2, 1.4, 0.8]))
    # a leading permutation axis is carried through
    stacked = per_split_statistics(np.stack([scores, scores]), ["a", "b"], "h")
    assert stacked["ls_h"].shape == (2, 3)


def _value_and_floor(
    features: np.ndarray, labels: np.ndarray, permutations: int = 10
) -> dict[str, float]:
    splits = random_splits(len(labels), 0.5, resamples=5, seed=0)
    scores = split_scores(features, labels, splits)[None]  # one attribute
    null = np.stack(
        [
            split_scores(features, y, splits)[None]
            for y in permuted_labels(labels, permutations, seed=0)
        ]
    )
    observed, permuted = (per_split_statistics(s, ["a"], "h") for s in (scores, null))
    return with_companions("error_h", observed["error_h"], permuted["error_h"])


def test_floor_of_labels_independent_of_the_features_contains_the_value() -> None:
    """Labels drawn independently of 1,024-d features, 256 rows (the quick tier's kept rows
    at n = 512): the value is itself a draw from the null, so within its spread, and both
    are at chance (0.5)."""
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(256, 1024)), rng.integers(0, 2, 256)
    v = _value_and_floor(features, labels)
    assert abs(v["error_h"] - v["error_h_floor"]) < 3 * v["error_h_floor_sd"] + 2 * v["error_h_se"]
    assert v["error_h_floor"] == pytest.approx(0.5, abs=0.05)
    assert 0 < v["error_h_floor_sd"] < 0.05 and v["error_h_se"] > 0


def test_a_separable_feature_scores_far_below_its_floor() -> None:
    """The label shifts each of 1,024 unit-variance dims by +-0.3: the class means are
    0.6 sqrt(1024) = 19 s.d. apart along their difference. Error 0, while its permuted
    labels stay at chance."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 256)
    features = rng.normal(size=(256, 1024)) + 0.3 * (2 * labels - 1)[:, None]
    v = _value_and_floor(features, labels)
    assert v["error_h"] < 0.05 and v["error_h_se"] < 0.02
    assert v["error_h_floor"] - v["error_h"] > 10 * v["error_h_floor_sd"]


def test_confident_labels() -> None:
    values = np.array([0.0, 10.0, 4.0, 6.0, 5.1, 4.9])
    labels, rows = confident_labels(values, None, fraction=0.5)
    assert labels.tolist() == [0, 1, 0, 1, 1, 0]  # above the median (5.0)
    assert rows.tolist() == [0, 1, 2]  # the farthest from the median
    labels, rows = confident_labels(np.array([2, 0, 1]), np.array([0.9, 0.2, 0.5]), 2 / 3)
    assert rows.tolist() == [0, 2]


def test_circular_labels_are_the_half_circle_around_the_circular_mean() -> None:
    """Angles at mean 0.95 (turns) + offsets 0, +-0.1, +-0.2, +-0.35: symmetric about 0.95
    with a positive resultant, so their circular mean is 0.95. Within a quarter turn of it:
    label 1; confidence |cos(2 pi offset)|."""
    offsets = np.array([0.0, 0.1, -0.1, 0.2, -0.2, 0.35, -0.35])
    angles = np.mod(0.95 + offsets, 1.0)
    labels, rows = confident_labels(angles, None, fraction=5 / 7, circular=True)
    assert labels.tolist() == [1, 1, 1, 1, 1, 0, 0]
    # |cos|: 1, 0.81, 0.81, 0.31, 0.31, 0.59, 0.59: the +-0.2 offsets are the least sure
    assert rows.tolist() == [0, 1, 2, 5, 6]
    # a turn of the whole circle changes nothing (a median split of the angles would)
    turned, _ = confident_labels(np.mod(angles + 0.4, 1.0), None, 5 / 7, circular=True)
    assert turned.tolist() == labels.tolist()
    assert confident_labels(angles, None, 5 / 7)[0].tolist() != labels.tolist()


@pytest.mark.slow
def test_attribute_predictor_learns_shapes_and_is_cached(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    ctx.data.size = 2000
    model = attribute_model(ctx, AttributeConfig(epochs=8, width=16))
    assert model.report["shape"]["accuracy"] > 0.45  # chance: 1/3
    assert model.report["x"]["r2"] > 0.5
    # hue is circular: a (cos, sin) head read as an angle; chance is a 90 degree error
    assert [a.kind for a in model.attributes][1] == "circular"
    assert model.report["hue"]["angle_error_deg"] < 30
    cached = attribute_model(ctx, AttributeConfig(epochs=8, width=16))
    assert cached.report == model.report


def test_config_needs_two_resamples_and_permutations() -> None:
    with pytest.raises(ConfigError, match="resamples"):
        SeparabilityConfig(resamples=1)
    with pytest.raises(ConfigError, match="permutations"):
        SeparabilityConfig(permutations=1)


def test_separability_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    cfg = SeparabilityConfig(
        n=24, steps=2, resamples=3, permutations=2, classifier=AttributeConfig(epochs=1, width=8)
    )
    result = evaluate(ctx, cfg)
    names = {"ls_h", "ls_x_T", "error_h", "error_x_T", "error_h_shape", "error_x_T_hue"}
    assert names <= set(result.values)
    for name in names:
        assert {f"{name}_se", f"{name}_floor", f"{name}_floor_sd"} <= set(result.values)
        assert result.values[f"{name}_se"] >= 0 and result.values[f"{name}_floor_sd"] >= 0
    assert result.values["ls_h"] >= 1.0 and result.values["ls_h_floor"] >= 1.0
    assert result.arrays["scores_h"].shape == (5, 3, 2)  # attributes x splits
    assert result.arrays["null_h"].shape == (2, 5, 3, 2)
    np.testing.assert_allclose(
        result.values["error_h_shape"], result.arrays["scores_h"][0, :, 0].mean()
    )
    assert evaluate(ctx, cfg).values == result.values  # seeded splits and permutations
    assert set(result.provenance["classifier_heldout"]) == {"shape", "hue", "size", "x", "y"}
    assert len(list(tmp_path.glob("attributes-shapes-*.pt"))) == 1
