"""The quality check: does a model generate? Closed-form figures and verdicts, and the
figures of a real (tiny) model against real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from isodiff.errors import ConfigError
from isodiff.evaluate.metrics.attributes import AttributeConfig
from isodiff.evaluate.metrics.fid import FIDConfig
from isodiff.evaluate.metrics.fid import evaluate as fid_evaluate
from isodiff.evaluate.metrics.quality import QualityConfig, check, class_figures, evaluate
from tests.metric_helpers import tiny_context

PASSING = {
    "fid_heldout": 20.0,
    "fid_floor": 10.0,
    "confident_digit": 0.9,
    "confident_digit_real": 0.95,
    "classes_digit": 10.0,
    "classes_digit_real": 10.0,
}


def test_class_figures_count_only_confident_samples() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    confidence = np.array([0.95, 0.5, 0.9, 0.99, 0.2, 0.91])
    fraction, histogram = class_figures(labels, confidence, classes=4, threshold=0.9)
    assert fraction == 4 / 6
    assert histogram.tolist() == [1, 1, 2, 0]


def test_a_model_that_generates_passes() -> None:
    assert check(PASSING) == []
    # An unlabelled dataset (no classifier figures) is judged on FID alone.
    assert check({"fid_heldout": 29.0, "fid_floor": 10.0}) == []


def test_each_failure_is_named() -> None:
    assert check({**PASSING, "fid_heldout": 31.0}) == ["FID 31 > 3x the real-vs-real floor 10"]
    [reason] = check({**PASSING, "confident_digit": 0.7})
    assert reason.startswith("digit: 70% of samples confidently classified, under 0.8x")
    assert check({**PASSING, "classes_digit": 7.0}) == ["digit: 7 of 10 classes generated"]
    assert check({k: v for k, v in PASSING.items() if not k.startswith("fid")}) == [
        "FID not measured"
    ]
    assert check({**PASSING, "fid_heldout": float("nan")}) == ["FID not measured"]


@pytest.mark.slow  # Inception on 128 images
def test_quality_figures_of_a_model_and_its_fid_floor(tmp_path: Path) -> None:
    """A random U-Net against real shapes: real images are classified confidently more
    often than its samples, and its FID is far above the real-vs-real floor."""
    ctx = tiny_context(tmp_path)
    ctx.data.size = 256
    cfg = QualityConfig(n=32, steps=2, classifier=AttributeConfig(epochs=3, width=8))
    result = evaluate(ctx, cfg)
    assert set(result.values) == {
        "confident_shape",
        "confident_shape_real",
        "classes_shape",
        "classes_shape_real",
    }
    assert result.arrays["histogram_shape"].sum() == round(32 * result.values["confident_shape"])
    assert result.arrays["histogram_shape_real"].shape == (3,)
    fid = fid_evaluate(ctx, FIDConfig(n=32, steps=2, ref_n=64)).values
    assert 0 < fid["fid_floor"] < fid["fid_heldout"]
    assert check({**result.values, **fid})  # a random network does not generate


def test_the_real_reference_counts_its_own_images(tmp_path: Path) -> None:
    """real_n held-out images set the real fraction whatever n samples are drawn: the
    confident real images' histogram holds real_n x the fraction (8 samples, 64 real)."""
    ctx = tiny_context(tmp_path)
    ctx.data.size = 256
    cfg = QualityConfig(n=8, real_n=64, steps=2, classifier=AttributeConfig(epochs=3, width=8))
    result = evaluate(ctx, cfg)
    assert result.arrays["histogram_shape"].sum() == round(8 * result.values["confident_shape"])
    assert result.arrays["histogram_shape_real"].sum() == round(
        64 * result.values["confident_shape_real"]
    )
    assert result.protocol["real_n"] == 64
    with pytest.raises(ConfigError, match="real_n >= 1"):
        QualityConfig(real_n=0)
