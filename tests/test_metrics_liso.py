"""Held-out L_iso against closed forms: 1 (scaled) for an isometry, more for a stretch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from isodiff.evaluate.metrics.liso import LisoConfig, evaluate
from tests.metric_helpers import tiny_context


def test_an_isometry_scores_one_and_a_stretch_more(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    cfg = LisoConfig(n=16, timesteps=[500, 999], probes=4)
    ctx.unet.encode_h = lambda x, t: 3.0 * x.flatten(1)  # J = 3 I: an isometry up to scale
    iso = evaluate(ctx, cfg).values
    # J^T J = 9 I on the tangent space: L_iso = 1 / mean |P u|^2 = 1 / (n - 1) up to the
    # Hutchinson estimate's spread (64 chi^2 draws with 767 degrees of freedom: ~0.6 %).
    assert iso["liso_scaled"] == pytest.approx(1.0, abs=0.03)
    assert set(iso) == {"liso_t500", "liso_t999", "liso", "liso_scaled"}
    scale = torch.linspace(0.2, 2.0, 3 * 16 * 16)  # singular values spread over 10x
    ctx.unet.encode_h = lambda x, t: x.flatten(1) * scale
    stretched = evaluate(ctx, cfg).values
    # E s^4 / (E s^2)^2 of s uniform on [0.2, 2]: about 1.6
    assert stretched["liso_scaled"] == pytest.approx(1.6, rel=0.05)


def test_held_out_liso_of_a_model_is_finite_and_seeded(tmp_path: Path) -> None:
    cfg = LisoConfig(n=8, timesteps=[999], probes=2)
    a = evaluate(tiny_context(tmp_path), cfg).values
    b = evaluate(tiny_context(tmp_path), cfg).values
    assert a == b and a["liso_scaled"] > 1.0


def test_a_compressive_map_with_equal_gains_scores_one(tmp_path: Path) -> None:
    """h keeps m = 64 of the n = 768 input directions at one gain: the best a map into a
    smaller h can do. L_iso >= 1 / rank J = 1 / m, so the score is scaled by min(n - 1, m)
    and reads 1 (by n - 1 it would read 12)."""
    ctx = tiny_context(tmp_path)
    cfg = LisoConfig(n=16, timesteps=[999], probes=4)
    ctx.unet.encode_h = lambda x, t: 3.0 * x.flatten(1)[:, :64]
    kept = evaluate(ctx, cfg).values
    assert kept["liso_scaled"] == pytest.approx(1.0, abs=0.1)
    assert kept["liso"] * (3 * 16 * 16 - 1) == pytest.approx(767 / 64, rel=0.1)
