"""Disentanglement read-outs: known answers, a calibration at the quick tier's sizes (planted,
noise and rotated codes, each against its permutation floor), a tiny model end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from isodiff.config import DataConfig, DatasetName
from isodiff.errors import ConfigError
from isodiff.evaluate.metrics.calibration import (
    permutation_floor,
    planted_code,
    random_rotation,
    spectrum,
    within_floor,
)
from isodiff.evaluate.metrics.disentanglement import (
    DisentanglementConfig,
    dci,
    dci_from_importance,
    discretise,
    evaluate,
    mig,
    mutual_information,
    readouts,
)
from isodiff.evaluate.metrics.factors import (
    angle_of,
    circular_mean,
    encode,
    encode_factor,
    wrapped,
)
from isodiff.evaluate.metrics.probes import participation_ratio, probes
from isodiff.model.data import FactorDataset, shape_factors
from tests.metric_helpers import tiny_context

NAMES = ("shape", "hue", "size", "x", "y")
KINDS = ("categorical", "circular", "continuous", "continuous", "continuous")
# The quick tier's sizes: 512 inverted test images, h = 64 x 4 x 4 = 1,024 dims.
N, D = 512, 1024


def _h_like(seed: int = 0) -> np.ndarray:
    """(N, D) Gaussian rows with a decaying spectrum (s.d. i^-0.7 on axis i, randomly
    rotated), as a trained U-Net's h has: a few directions carry most of its variance."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((D, D)))[0]
    return rng.standard_normal((N, D)) * np.arange(1, D + 1) ** -0.7 @ rotation


def test_dci_from_importance_by_hand() -> None:
    # Row 0 is (3/4, 1/4): 1 - H_2 = 1 - 0.811278; row 1 is (0, 1): 1; rho = (4/6, 2/6).
    # Column 0 is (1, 0): 1; column 1 is (1/3, 2/3): 1 - H_2 = 1 - 0.918296.
    d, c = dci_from_importance(np.array([[3.0, 1.0], [0.0, 2.0]]))
    h_row = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    h_col = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert d == pytest.approx(4 / 6 * (1 - h_row) + 2 / 6 * 1.0)  # 0.459148
    assert c == pytest.approx((1.0 + (1 - h_col)) / 2)  # 0.540852
    # The weighting by rho: a dim devoted to one factor but with little importance counts
    # little next to a heavy dim shared by both.
    d, c = dci_from_importance(np.array([[1.0, 0.0], [1.0, 1.0]]))
    assert (d, c) == (pytest.approx(1 / 3), pytest.approx(0.5))
    assert dci_from_importance(np.eye(3)) == (pytest.approx(1.0), pytest.approx(1.0))
    assert dci_from_importance(np.ones((4, 3))) == (pytest.approx(0.0), pytest.approx(0.0))
    # Entropies are in log base k (rows) and d (columns), not base 2: a dim split evenly
    # between 2 of 3 factors keeps 1 - log 2 / log 3 (base 2 would give it 0).
    d, _ = dci_from_importance(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert d == pytest.approx(2 / 3 * (1 - math.log(2) / math.log(3)) + 1 / 3)  # 0.579
    assert dci_from_importance(np.ones((5, 1)))[0] is None  # one factor: D undefined


def test_circular_factors_are_angles() -> None:
    turns = np.array([0.0, 0.25, 0.5, 0.75, 0.999])
    np.testing.assert_allclose(
        encode_factor(turns, "circular"),
        [[1, 0], [0, 1], [-1, 0], [0, -1], [np.cos(2 * np.pi * 0.999), np.sin(2 * np.pi * 0.999)]],
        atol=1e-12,
    )
    np.testing.assert_allclose(
        angle_of(3.0 * encode_factor(turns, "circular")), turns, atol=1e-12
    )  # any length: only the direction is the angle
    # 0.95 and 0.05 are 0.1 turns apart across the wrap, and their mean is 0, not 0.5.
    np.testing.assert_allclose(
        wrapped(np.array([0.05 - 0.95, 0.95 - 0.05, 0.5])), [0.1, -0.1, -0.5], atol=1e-12
    )
    assert circular_mean(np.array([0.95, 0.05])) == pytest.approx(0.0, abs=1e-12) or circular_mean(
        np.array([0.95, 0.05])
    ) == pytest.approx(1.0, abs=1e-12)
    encodings, columns = encode(
        np.array([[2, 0.25, 0.7]]), ("categorical", "circular", "continuous")
    )
    np.testing.assert_allclose(encodings, [[0, 0, 1, 0, 1, 0.7]], atol=1e-12)
    assert [(c.start, c.stop) for c in columns] == [(0, 3), (3, 5), (5, 6)]
    with pytest.raises(ValueError, match="kinds"):
        encode(np.zeros((2, 1)), ("angle",))


def test_a_circular_factor_read_as_a_circle() -> None:
    """hue as a line jumps from 1 to 0 where the circle closes: a linear read-out of the
    scalar is capped. Read as (cos, sin), a code that holds hue's colour wheel is perfect."""
    rng = np.random.default_rng(0)
    hue = rng.uniform(size=N)
    codes = np.concatenate([encode_factor(hue, "circular"), rng.normal(size=(N, 6)) * 0.1], axis=1)
    circle = probes(codes, hue[:, None], ("circular",), ("hue",))
    line = probes(codes, hue[:, None], ("continuous",), ("hue",))
    assert circle["lin_hue"] > 0.95 and circle["lin_deg_hue"] < 5.0
    assert line["lin_hue"] < 0.8  # the same code, the wrong kind


def test_one_factor_has_no_disentanglement() -> None:
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 10, N).astype(np.float64)
    codes = np.concatenate([encode_factor(digit, "categorical"), rng.normal(size=(N, 20))], axis=1)
    result = dci(codes, digit[:, None], ("categorical",))
    assert "disentanglement" not in result
    assert result["informativeness"] == 1.0
    # Ten one-hot dims for one factor: completeness 1 - log 10 / log d, its most.
    assert result["completeness"] == pytest.approx(1 - math.log(10) / math.log(30), abs=0.02)


@pytest.fixture(scope="module")
def calibration() -> dict[str, dict[str, float]]:
    """Every read-out at the quick tier's n and d of a planted code (the five shapes factors
    as axes in an h-like spectrum), of it rotated, and of noise with the same spectrum, and
    the permutation floor of the noise."""
    factors = shape_factors(N, seed=0)
    h = _h_like()
    planted = planted_code(h, encode(factors, KINDS)[0], seed=1)
    cfg = DisentanglementConfig()

    def readout(codes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return readouts(codes, labels, KINDS, NAMES, "h", cfg)

    noise = planted_code(h, np.zeros((N, 0)), seed=2)  # the spectrum, no factor
    return {
        "planted": readout(planted, factors),
        "rotated": readout(random_rotation(planted, seed=3), factors),
        "noise": readout(noise, factors),
        "floor": permutation_floor(readout, noise, factors, permutations=3, seed=4),
    }


def test_the_planted_code_scores_at_the_ceiling(calibration: dict) -> None:
    planted = calibration["planted"]
    print({k: round(v, 3) for k, v in planted.items()})
    # DCI with Lasso importances (Eastwood & Williams), not ridge: a perfect code is D, C
    # >= 0.9 at these sizes (ridge spread its importance over the 1,016 noise dims: D 0.14).
    assert planted["dci_d_h"] > 0.95 and planted["dci_c_h"] > 0.9
    assert planted["dci_i_h"] > 0.95
    assert planted["probe_lin_h"] > 0.95 and planted["angle_lin_h_hue"] < 5.0
    # MIG counts one dim per factor: the one-hot shape and (cos, sin) hue split theirs over
    # 3 and 2 dims, so their gaps are ~0 even here; size, x and y are ~0.8 (20 bins).
    assert all(planted[f"mig_h_{name}"] > 0.6 for name in ("size", "x", "y"))


def test_noise_scores_at_its_floor(calibration: dict) -> None:
    noise, floor = calibration["noise"], calibration["floor"]
    for key in ("dci_i_h", "mig_h", "probe_lin_h", "probe_knn_h", "probe_lin_h_size"):
        assert within_floor(
            noise[key], floor[f"{key}_floor"], max(floor[f"{key}_floor_sd"], 0.02)
        ), key
    assert noise["dci_i_h"] < 0.2 and noise["mig_h"] < 0.05 and noise["probe_lin_h"] < 0.2
    # ... and the ceiling is far outside that floor: each read-out separates the two.
    planted = calibration["planted"]
    for key in ("dci_c_h", "dci_i_h", "mig_h", "probe_lin_h", "probe_knn_h"):
        spread = max(floor[f"{key}_floor_sd"], 1e-3)
        assert planted[key] - floor[f"{key}_floor"] > 5 * spread, key


def test_rotation_moves_only_what_rewards_axes(calibration: dict) -> None:
    planted, rotated = calibration["planted"], calibration["rotated"]
    print({k: round(v, 3) for k, v in rotated.items() if k.count("_") <= 2})
    # Rotation-invariant read-outs do not move (only solver tolerance)...
    for key in planted:
        if key.startswith(("probe_", "angle_")):
            assert rotated[key] == pytest.approx(planted[key], abs=1e-6), key
    assert rotated["dci_i_h"] > 0.9  # the information is all there, in other dims
    # ... the axis-aligned ones drop: completeness and MIG to near their floor, D less (with
    # n < d the Lasso keeps few dims per factor, and few dims look devoted to one factor).
    assert rotated["dci_c_h"] < planted["dci_c_h"] - 0.4
    assert rotated["mig_h"] < 0.05
    assert rotated["dci_d_h"] < planted["dci_d_h"] - 0.05


def test_probes_are_rotation_invariant_and_spectrum_is_kept() -> None:
    rng = np.random.default_rng(5)
    factors = shape_factors(200, seed=5)
    codes = np.concatenate([encode(factors, KINDS)[0], rng.normal(size=(200, 40))], axis=1)
    rotated = random_rotation(codes, seed=6)
    np.testing.assert_allclose(spectrum(rotated), spectrum(codes), rtol=1e-9, atol=1e-12)
    a, b = probes(codes, factors, KINDS, NAMES), probes(rotated, factors, KINDS, NAMES)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    # A planted code's axis i has the s.d. of the code's i-th principal axis: exactly on the
    # 8 encoding axes (standardised), up to sampling on the noise axes.
    planted = planted_code(codes, encode(factors, KINDS)[0], seed=7)
    sd, target = planted.std(axis=0, ddof=1), spectrum(codes)
    np.testing.assert_allclose(sd[:8], target[:8], rtol=1e-9)
    np.testing.assert_allclose(sd[8:], target[8:], rtol=0.2, atol=1e-12)


def test_the_floor_of_an_independent_code_contains_its_value() -> None:
    rng = np.random.default_rng(8)
    factors = shape_factors(300, seed=8)
    codes = rng.normal(size=(300, 64))

    def readout(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return probes(x, labels, KINDS, NAMES)

    floor = permutation_floor(readout, codes, factors, permutations=8, seed=9)
    value = readout(codes, factors)
    for key in ("lin", "knn", "lin_size", "knn_shape"):
        assert within_floor(value[key], floor[f"{key}_floor"], floor[f"{key}_floor_sd"]), key
        assert floor[f"{key}_floor_sd"] > 0
    # The permutation keeps each column's values, and the same seed gives the same floor.
    assert permutation_floor(readout, codes, factors, 8, 9) == floor


def test_participation_ratio_closed_forms() -> None:
    rng = np.random.default_rng(10)
    z = rng.normal(size=(4000, 1))
    assert participation_ratio(z @ rng.normal(size=(1, 30))) == pytest.approx(1.0)
    # Two equal-variance directions and nothing else: (1 + 1)^2 / (1 + 1) = 2.
    two = np.concatenate([rng.normal(size=(4000, 2)), np.zeros((4000, 5))], axis=1)
    assert participation_ratio(two) == pytest.approx(2.0, rel=0.02)
    # Variances (4, 1): (4 + 1)^2 / (16 + 1).
    scaled = rng.normal(size=(20000, 2)) * [2.0, 1.0]
    assert participation_ratio(scaled) == pytest.approx(25 / 17, rel=0.02)
    assert participation_ratio(np.ones((10, 3))) == 0.0


def test_mutual_information_matches_sklearn_and_is_fast() -> None:
    rng = np.random.default_rng(3)
    codes = discretise(rng.normal(size=(300, 6)) + rng.integers(0, 3, (300, 1)), 20)
    labels = rng.integers(0, 3, 300)
    expected = [mutual_info_score(codes[:, i], labels) for i in range(6)]
    np.testing.assert_allclose(mutual_information(codes, labels), expected, atol=1e-12)
    assert discretise(np.array([[0.0], [0.5], [1.0], [0.999]]), 2)[:, 0].tolist() == [0, 1, 1, 1]
    codes, factors = rng.normal(size=(64, 8)), shape_factors(64, seed=3)
    with pytest.raises(ValueError, match="2 code dimensions"):
        mig(codes[:, :1], factors, KINDS)


def test_config_checks() -> None:
    for bad, key in [
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"n": 3}, "n=3"),
        ({"bins": 1}, "bins"),
        ({"h_pool": 0}, "h_pool"),
        ({"steps": 0}, "steps"),
        ({"cv_folds": 1}, "cv_folds"),
        ({"permutations": 0}, "permutations"),
        ({"swap_pairs": -1}, "swap_pairs"),
        ({"t_edit": 1001}, "t_edit"),
        ({"lasso_steps": 0}, "lasso_steps"),
    ]:
        with pytest.raises(ConfigError, match=key):
            DisentanglementConfig(**bad)


def test_disentanglement_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    result = evaluate(ctx, DisentanglementConfig(n=32, steps=2, permutations=2, swap_pairs=4))
    readout = {
        f"{m}_{s}"
        for m in ("dci_d", "dci_c", "dci_i", "mig", "probe_lin", "probe_knn")
        for s in ("h", "xT")
    }
    readout |= {
        f"{m}_{s}_{name}"
        for m in ("mig", "probe_lin", "probe_knn", "probe_gap")
        for s in ("h", "xT")
        for name in NAMES
    }
    readout |= {f"angle_{p}_{s}_hue" for p in ("lin", "knn") for s in ("h", "xT")}
    companions = {
        f"{key}_{c}" for key in readout for c in ("floor", "floor_sd", "ceiling", "ceiling_rot")
    }
    assert set(result.values) == readout | companions | {"pr_h", "pr_xT", "hswap_h"}
    assert all(np.isfinite(v) for v in result.values.values())
    assert all(0.0 <= v <= 1.0 for k, v in result.values.items() if k.startswith(("dci_", "mig_")))
    assert 1.0 <= result.values["pr_h"] <= result.arrays["importance_h"].shape[0]
    assert result.values["hswap_h"] >= 0 and result.arrays["hswap_h"].shape == (4,)
    assert result.arrays["importance_xT"].shape == (3 * 16 * 16, 5)
    assert result.arrays["importance_h"].shape[1] == 5
    assert result.protocol["factors"] == list(NAMES) and result.protocol["split"] == "test"
    assert result.protocol["kinds"] == list(KINDS)

    # A one-factor dataset (as mnist): no D. The shapes test split with only its class.
    test = ctx.dataset("test")
    images, factors = test.tensors
    ctx._datasets["test"] = FactorDataset(images, factors[:, :1], ("shape",), ("categorical",))
    result = evaluate(
        ctx, DisentanglementConfig(n=16, steps=1, h_pool=2, permutations=1, swap_pairs=0)
    )
    assert not any(k.startswith("dci_d") for k in result.values)
    assert {"dci_c_h", "dci_i_h", "probe_lin_h_shape", "probe_knn_xT"} <= set(result.values)
    assert "hswap_h" not in result.values


def test_data_without_factors_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    ctx = tiny_context(tmp_path)
    ctx.data = DataConfig(name=DatasetName.folder, root=str(folder), resolution=16)
    with pytest.raises(ConfigError, match="data=shapes or data=mnist"):
        evaluate(ctx, DisentanglementConfig(n=16, steps=1, swap_pairs=0))
