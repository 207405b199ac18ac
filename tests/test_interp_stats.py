"""ISTD, PDV, DiffMorpher's PPL and mean +- std with N (isodiff.evaluate.metrics.interp_stats) on
paths whose adjacent distances are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isodiff.evaluate.metrics.interp_stats import (
    adjacent_l2,
    format_mean_std_n,
    istd,
    istd_per_path,
    mean_std_n,
    path_length_per_path,
    pdv,
    pdv_per_path,
)


def line_path(positions: list[float], shape: tuple[int, ...] = (3, 4, 4)) -> np.ndarray:
    """Frames c * u at the given positions c along a unit direction u (|u| = 1), so that
    the adjacent L2 distances are the gaps between positions."""
    u = np.arange(1, math.prod(shape) + 1, dtype=np.float64).reshape(shape)
    u /= np.linalg.norm(u)
    return np.stack([c * u for c in positions])


def test_uniform_speed_path_is_zero() -> None:
    """Frames equally far apart (lerp between two images): ISTD = PDV = 0, PPL = the
    endpoint distance."""
    a, b = np.zeros((3, 4, 4)), np.full((3, 4, 4), 0.5)
    frames = np.stack([a + w * (b - a) for w in np.linspace(0, 1, 11)])[None]
    d = adjacent_l2(frames)
    assert d.shape == (1, 10)
    np.testing.assert_allclose(d, np.linalg.norm(b - a) / 10)
    assert istd(d) == pytest.approx(0.0, abs=1e-12)
    assert pdv(d) == pytest.approx(0.0, abs=1e-24)
    assert path_length_per_path(d)[0] == pytest.approx(np.linalg.norm(b - a))


def test_known_distances_by_hand() -> None:
    """Positions 0, 1, 3, 6: gaps 1, 2, 3, mean 2, population variance 2/3; a second path
    with gaps 2, 2, 2 has std 0. ISTD = (sqrt(2/3) + 0) / 2, PDV = (2/3 + 0) / 2."""
    frames = np.stack([line_path([0, 1, 3, 6]), line_path([0, 2, 4, 6])])
    d = adjacent_l2(frames)
    np.testing.assert_allclose(d, [[1, 2, 3], [2, 2, 2]], atol=1e-12)
    np.testing.assert_allclose(istd_per_path(d), [math.sqrt(2 / 3), 0], atol=1e-12)
    assert istd(d) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert pdv(d) == pytest.approx(1 / 3)
    assert istd(d, ddof=1) == pytest.approx(0.5)  # sample std of 1, 2, 3 is 1
    # DiffMorpher's scaling: distances times s, variance times s^2, sum times s.
    np.testing.assert_allclose(pdv_per_path(d, scale=16), [256 * 2 / 3, 0])
    np.testing.assert_allclose(path_length_per_path(d, scale=16), [96, 96])


def test_single_path_and_validation() -> None:
    """A 1-D array is one path; bad shapes and negative distances are refused."""
    assert istd([1.0, 3.0]) == pytest.approx(1.0)
    assert pdv([1.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        istd(np.zeros((2, 0)))
    with pytest.raises(ValueError):
        pdv([[1.0, -1.0]])
    with pytest.raises(ValueError):
        istd([[1.0]], ddof=1)
    with pytest.raises(ValueError):
        adjacent_l2(np.zeros((2, 1, 3)))


def test_mean_std_n() -> None:
    """1, 2, 3, 4: mean 2.5, sample std sqrt(5/3), N 4; one value has no sample std."""
    mean, std, n = mean_std_n([1, 2, 3, 4])
    assert (mean, n) == (2.5, 4) and std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std_n(np.array([[1.0, 3.0]]), ddof=0) == (2.0, 1.0, 2)
    m1, s1, n1 = mean_std_n([7.0])
    assert (m1, n1) == (7.0, 1) and math.isnan(s1)
    assert format_mean_std_n([1, 2, 3, 4]) == "2.50 ± 1.29 (N=4)"
    with pytest.raises(ValueError):
        mean_std_n([])


def test_per_path_values_feed_mean_std_n() -> None:
    """ISTD reported as mean +- std over paths: the mean is `istd`."""
    d = np.array([[1, 2, 3], [2, 2, 2], [0, 4, 0]], dtype=np.float64)
    mean, _, n = mean_std_n(istd_per_path(d))
    assert mean == pytest.approx(istd(d)) and n == 3


def test_imports_numpy_and_stdlib_only() -> None:
    """The module is arrays in, numbers out: its own imports are numpy and the stdlib."""
    import ast
    import sys
    from pathlib import Path

    from isodiff.evaluate.metrics import interp_stats

    tree = ast.parse(Path(interp_stats.__file__).read_text())
    names = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert names - set(sys.stdlib_module_names) == {"numpy"}
