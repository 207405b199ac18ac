"""RTL on closed forms (line, circular arc) and mRTL of a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from isodiff.evaluate.metrics.rtl import RTLConfig, evaluate, relative_trajectory_length
from isodiff.evaluate.metrics.rtl import relative_trajectory_lengths as rtls
from tests.metric_helpers import tiny_context


def _rotation(d: int, seed: int = 0) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]


def test_rtl_of_a_straight_line_is_one() -> None:
    a, b = np.random.default_rng(0).normal(size=(2, 50))
    path = a + np.linspace(0, 1, 11)[:, None] * (b - a)
    assert relative_trajectory_length(path) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("phi", "n"), [(np.pi / 3, 4), (np.pi, 10), (1.9 * np.pi, 7)])
def test_rtl_of_a_circular_arc_is_polyline_over_chord(phi: float, n: int) -> None:
    r = 3.0
    angles = np.linspace(0, phi, n + 1)
    circle = np.zeros((n + 1, 20))
    circle[:, 0], circle[:, 1] = r * np.cos(angles), r * np.sin(angles)
    path = circle @ _rotation(20).T  # anywhere in R^20
    expected = n * 2 * r * np.sin(phi / (2 * n)) / (2 * r * np.sin(phi / 2))
    assert relative_trajectory_length(path) == pytest.approx(expected, rel=1e-12)


def test_rtl_is_batched_over_leading_axes() -> None:
    paths = np.random.default_rng(1).normal(size=(3, 4, 6, 5))
    batched = rtls(paths)
    assert batched.shape == (3, 4)
    assert batched[2, 1] == pytest.approx(relative_trajectory_length(paths[2, 1]))


def test_mrtl_of_a_model_and_batch_size_invariance(tmp_path: Path) -> None:
    """Batch sizes 4 and 16 draw identical x_T; the CPU kernels of a batch of one round
    differently (1e-8 here), hence rel=1e-6."""
    cfg = RTLConfig(pairs=3, segments=4, steps=3)
    small = evaluate(tiny_context(tmp_path, batch_size=4), cfg)
    large = evaluate(tiny_context(tmp_path, batch_size=16), cfg)
    assert small.arrays["rtl"].shape == (3, 3) and (small.arrays["rtl"] >= 1).all()
    assert small.values == pytest.approx(large.values, rel=1e-6)
    only_T = evaluate(
        tiny_context(tmp_path), RTLConfig(pairs=3, segments=4, steps=3, timesteps="T")
    )
    assert only_T.arrays["rtl"].shape == (3, 1)
    assert only_T.values["mrtl"] == pytest.approx(small.values["rtl_T"], rel=1e-5)
