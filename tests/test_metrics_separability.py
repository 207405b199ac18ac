"""Linear separability on separable and inseparable data; attribute predictors; a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from isodiff.metrics.attributes import AttributeConfig, attribute_model
from isodiff.metrics.separability import (
    SeparabilityConfig,
    conditional_entropy,
    confident_labels,
    evaluate,
    linear_separability,
)
from tests.metric_helpers import tiny_context


def test_conditional_entropy() -> None:
    y = np.array([0, 1, 0, 1, 2, 2])
    assert conditional_entropy(y, y) == 0.0
    assert conditional_entropy(np.array([0, 1, 0, 1]), np.zeros(4)) == pytest.approx(math.log(2))
    assert conditional_entropy(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(
        math.log(2))


def test_linearly_separable_data_is_perfect() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    centres = rng.normal(size=(3, 20)) * 10
    features = centres[labels] + rng.normal(size=(400, 20))
    result = linear_separability(features, labels)
    assert result == {"error": 0.0, "entropy": 0.0}  # LS = exp(0) = 1


def test_unrelated_labels_are_not_separable() -> None:
    rng = np.random.default_rng(1)
    result = linear_separability(rng.normal(size=(2000, 5)), rng.integers(0, 2, 2000))
    assert result["error"] > 0.4 and result["entropy"] > 0.6


def test_confident_labels() -> None:
    values = np.array([0.0, 10.0, 4.0, 6.0, 5.1, 4.9])
    labels, rows = confident_labels(values, None, fraction=0.5)
    assert labels.tolist() == [0, 1, 0, 1, 1, 0]  # above the median (5.0)
    assert rows.tolist() == [0, 1, 2]  # the farthest from the median
    labels, rows = confident_labels(np.array([2, 0, 1]), np.array([0.9, 0.2, 0.5]), 2 / 3)
    assert rows.tolist() == [0, 2]


@pytest.mark.slow
def test_attribute_predictor_learns_shapes_and_is_cached(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    ctx.data.size = 2000
    model = attribute_model(ctx, AttributeConfig(epochs=8, width=16))
    assert model.report["shape"]["accuracy"] > 0.45  # chance: 1/3
    assert model.report["x"]["r2"] > 0.5
    cached = attribute_model(ctx, AttributeConfig(epochs=8, width=16))
    assert cached.report == model.report


def test_separability_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    result = evaluate(ctx, SeparabilityConfig(n=24, steps=2,
                                              classifier=AttributeConfig(epochs=1, width=8)))
    assert {"ls_h", "ls_x_T", "error_h", "error_x_T", "error_h_shape"} <= set(result.values)
    assert result.values["ls_h"] >= 1.0
    assert set(result.provenance["classifier_heldout"]) == {"shape", "hue", "size", "x", "y"}
    assert len(list(tmp_path.glob("attributes-shapes-*.pt"))) == 1
