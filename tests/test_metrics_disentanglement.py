"""DCI and MIG: known answers for aligned, random and rotated codes; a tiny model end to end."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from isodiff.config import ConfigError, DataConfig, DatasetName
from isodiff.data import FactorDataset
from isodiff.metrics.disentanglement import (
    DisentanglementConfig,
    dci,
    dci_from_importance,
    discretise,
    evaluate,
    mig,
    mutual_information,
)
from tests.metric_helpers import tiny_context

KINDS = ("categorical", "continuous", "continuous", "continuous", "continuous")
N = 2000


def _factors(seed: int = 0) -> np.ndarray:
    """(N, 5) independent factors like shapes': a 3-class one and 4 uniform ones."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 3, (N, 1)), rng.uniform(size=(N, 4))], axis=1)


def _aligned(factors: np.ndarray, seed: int = 1) -> np.ndarray:
    """The factors themselves, plus 3 noise dims (which should get ~zero importance)."""
    return np.concatenate([factors, np.random.default_rng(seed).normal(size=(N, 3))], axis=1)


def _rotated(factors: np.ndarray) -> np.ndarray:
    """The class as it is; the continuous factors in pairs (1, 2), (3, 4), each pair rotated
    by 45 degrees, so every one of those dims carries two factors equally."""
    rotation = np.array([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2)
    centred = factors[:, 1:] - 0.5
    return np.concatenate([factors[:, :1], centred[:, :2] @ rotation, centred[:, 2:] @ rotation],
                          axis=1)


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


def test_aligned_code_is_disentangled() -> None:
    factors = _factors()
    result, gaps = dci(_aligned(factors), factors, KINDS), mig(_aligned(factors), factors, KINDS)
    print("aligned", result["disentanglement"], result["completeness"], gaps["mig"])
    assert result["disentanglement"] > 0.95 and result["completeness"] > 0.95
    assert result["informativeness"] > 0.95
    assert gaps["mig"] > 0.9 and (gaps["gaps"] > 0.9).all()
    r = result["importance"]
    assert r.shape == (8, 5)
    np.testing.assert_allclose(r.sum(axis=0), 1.0)
    assert (np.argmax(r, axis=0) == np.arange(5)).all()
    assert r[5:].max() < 0.05  # the noise dims


def test_random_code_is_not() -> None:
    factors = _factors()
    codes = np.random.default_rng(2).normal(size=(N, 8))
    result, gaps = dci(codes, factors, KINDS), mig(codes, factors, KINDS)
    print("random", result["disentanglement"], result["completeness"], gaps["mig"])
    assert result["disentanglement"] < 0.3 and result["completeness"] < 0.3
    assert gaps["mig"] < 0.1
    # Chance: the majority class of the held-out half, and R^2 = 0 for continuous factors.
    held_out = factors[N // 2:, 0]
    chance = np.mean([np.max(np.bincount(held_out.astype(int))) / len(held_out), 0, 0, 0, 0])
    assert result["informativeness"] == pytest.approx(chance, abs=0.05)


def test_rotated_code_is_entangled_but_informative() -> None:
    factors = _factors()
    aligned, rotated = dci(_aligned(factors), factors, KINDS), dci(_rotated(factors), factors,
                                                                   KINDS)
    gaps = mig(_rotated(factors), factors, KINDS)
    print("rotated", rotated["disentanglement"], rotated["completeness"], gaps["mig"])
    # The class dim is devoted to one factor (1 - H = 1) and holds ~1/5 of the importance
    # (columns sum to 1); each other dim splits evenly between 2 of the 5 factors,
    # 1 - H_5 = 1 - log 2 / log 5. Completeness likewise: 4 of the factors split over 2 of
    # the 5 dims.
    shared = 1 - math.log(2) / math.log(5)
    expected = 1 / 5 + 4 / 5 * shared  # 0.655
    assert rotated["disentanglement"] == pytest.approx(expected, abs=0.05)
    assert rotated["completeness"] == pytest.approx(expected, abs=0.05)
    assert rotated["disentanglement"] < aligned["disentanglement"] - 0.25
    assert rotated["informativeness"] > 0.95  # linear: rotation loses no information
    assert gaps["gaps"][0] > 0.9 and (gaps["gaps"][1:] < 0.2).all()


def test_one_factor_has_no_disentanglement() -> None:
    factors = _factors()[:, :1]
    result = dci(_aligned(_factors())[:, [0, 5, 6]], factors, KINDS[:1])
    assert "disentanglement" not in result
    assert result["completeness"] > 0.9 and result["informativeness"] == 1.0


def test_mutual_information_matches_sklearn_and_is_fast() -> None:
    rng = np.random.default_rng(3)
    codes = discretise(rng.normal(size=(300, 6)) + rng.integers(0, 3, (300, 1)), 20)
    labels = rng.integers(0, 3, 300)
    expected = [mutual_info_score(codes[:, i], labels) for i in range(6)]
    np.testing.assert_allclose(mutual_information(codes, labels), expected, atol=1e-12)
    assert discretise(np.array([[0.0], [0.5], [1.0], [0.999]]), 2)[:, 0].tolist() == [0, 1, 1, 1]
    # The size an evaluation sees: d = 1024 codes, 5 factors, n = 512.
    codes, factors = rng.normal(size=(512, 1024)), _factors()[:512]
    start = time.perf_counter()
    mig(codes, factors, KINDS)
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ValueError, match="2 code dimensions"):
        mig(codes[:, :1], factors, KINDS)


def test_config_checks() -> None:
    for bad, key in [({"heldout_fraction": 1.0}, "heldout_fraction"), ({"n": 3}, "n=3"),
                     ({"bins": 1}, "bins"), ({"h_pool": 0}, "h_pool"), ({"alpha": 0.0}, "alpha"),
                     ({"steps": 0}, "steps")]:
        with pytest.raises(ConfigError, match=key):
            DisentanglementConfig(**bad)


def test_disentanglement_of_a_model(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    result = evaluate(ctx, DisentanglementConfig(n=32, steps=2))
    names = ("shape", "hue", "size", "x", "y")
    expected = {f"{m}_{s}" for m in ("dci_d", "dci_c", "dci_i", "mig") for s in ("h", "xT")}
    expected |= {f"mig_{s}_{name}" for s in ("h", "xT") for name in names}
    assert set(result.values) == expected
    assert all(0.0 <= v <= 1.0 for v in result.values.values())  # nan fails too
    assert result.arrays["importance_xT"].shape == (3 * 16 * 16, 5)
    assert result.arrays["importance_h"].shape[1] == 5
    assert result.protocol["factors"] == list(names) and result.protocol["split"] == "test"

    # A one-factor dataset (as mnist): no D. The shapes test split with only its class.
    test = ctx.dataset("test")
    images, factors = test.tensors
    ctx._datasets["test"] = FactorDataset(images, factors[:, :1], ("shape",), ("categorical",))
    result = evaluate(ctx, DisentanglementConfig(n=16, steps=1, h_pool=2))
    assert set(result.values) == {"dci_c_h", "dci_i_h", "mig_h", "mig_h_shape", "dci_c_xT",
                                  "dci_i_xT", "mig_xT", "mig_xT_shape"}


def test_data_without_factors_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    ctx = tiny_context(tmp_path)
    ctx.data = DataConfig(name=DatasetName.folder, root=str(folder), resolution=16)
    with pytest.raises(ConfigError, match="data=shapes or data=mnist"):
        evaluate(ctx, DisentanglementConfig(n=4, steps=1))
