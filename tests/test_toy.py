"""The Figure 3 toy: its scores on maps with known geometry, and an end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from isodiff.analysis.sphere import (
    latitude_rings,
    run_toy,
    sample_sphere,
    scores,
    tangent_basis,
    tangent_metrics,
    toy_figure,
)
from isodiff.analysis.toy import TITLES, ToyConfig
from tests.figure_text import text_problems


def orthographic(x: torch.Tensor) -> torch.Tensor:
    """(x, y): an isometry of R^3 restricted to a plane; on the sphere it squeezes the
    meridians by cos(theta) near the equator."""
    return x[..., :2]


def azimuthal_equidistant(x: torch.Tensor) -> torch.Tensor:
    """psi (cos phi, sin phi), psi = angle from the south pole: meridians keep their length."""
    psi = torch.arccos((-x[..., 2]).clamp(-1, 1))
    phi = torch.atan2(x[..., 1], x[..., 0])
    return psi[..., None] * torch.stack([phi.cos(), phi.sin()], dim=-1)


def test_sphere_samples_and_rings():
    x = sample_sphere(500, 90.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.norm(dim=1), torch.ones(500))
    assert (x[:, 2] <= 1e-6).all()
    rings = latitude_rings(4, 8, 90.0)
    torch.testing.assert_close(
        rings[:, :, 2], -torch.cos(torch.tensor([1, 2, 3, 4]) * math.pi / 8)[:, None].expand(4, 8)
    )
    u = tangent_basis(x)
    torch.testing.assert_close(u.transpose(1, 2) @ u, torch.eye(2).expand(500, 2, 2))
    torch.testing.assert_close(
        torch.einsum("ni,nij->nj", x, u), torch.zeros(500, 2), atol=1e-6, rtol=0
    )


def test_scores_on_closed_form_maps():
    cfg = ToyConfig(n_eval=400, n_rings=6)
    x = sample_sphere(50, 90.0, torch.Generator().manual_seed(1))
    # Orthographic: metric eigenvalues cos^2(theta) and 1, theta the polar angle.
    eig = torch.linalg.eigvalsh(tangent_metrics(orthographic, x))
    torch.testing.assert_close(eig[:, 0], x[:, 2] ** 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eig[:, 1], torch.ones(50), atol=1e-5, rtol=1e-5)
    equidistant, ortho = scores(azimuthal_equidistant, cfg), scores(orthographic, cfg)
    assert equidistant["ring_spacing_cv"] < 1e-4  # rings evenly spaced along every meridian
    assert ortho["ring_spacing_cv"] > 0.3
    assert 1 < equidistant["kappa"] < ortho["kappa"]
    assert 0.5 < equidistant["l_iso"] < ortho["l_iso"]


def test_toy_runs_end_to_end(tmp_path):
    cfg = ToyConfig(out_dir=str(tmp_path), steps=40, batch_size=64, n_eval=200, n_rings=5)
    result = run_toy(cfg)
    for name in ("toy_fig3.png", "toy_fig3.pdf", "toy_fig3.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "toy_fig3.json").read_text())
    assert set(saved["settings"]) == {"reconstruction", "euclidean", "spherical"}
    for numbers in result["settings"].values():
        assert all(math.isfinite(v) for v in numbers.values())
        assert numbers["l_iso"] >= 0.5 - 1e-6


def test_toy_figure_reads(tmp_path):
    """Titles that do not collide whatever the numbers (the orthographic map's kappa runs to
    thousands), and the figure says what kappa, ring CV and L_iso are."""
    import matplotlib.pyplot as plt

    cfg = ToyConfig(n_eval=400, n_rings=6)
    maps = {"reconstruction": orthographic, "euclidean": orthographic}
    maps["spherical"] = azimuthal_equidistant
    fig = toy_figure(maps, {name: scores(f, cfg) for name, f in maps.items()}, cfg)
    assert text_problems(fig) == []
    caption = fig.get_supxlabel()
    assert "condition number" in caption and "coefficient of variation" in caption
    assert [ax.get_title() for ax in fig.axes[:3]] == [TITLES[name] for name in maps]
    plt.close(fig)


def test_toy_config_is_checked():
    with pytest.raises(ValueError, match="cap_deg"):
        ToyConfig(cap_deg=0)
    with pytest.raises(ValueError, match="steps"):
        ToyConfig(steps=0)


@pytest.mark.slow
def test_spherical_metric_gives_the_most_even_rings(tmp_path):
    """The paper's Figure 3 claim at the default settings (about a minute on 2 cores)."""
    result = run_toy(ToyConfig(out_dir=str(tmp_path)))["settings"]
    sph, euc, rec = result["spherical"], result["euclidean"], result["reconstruction"]
    assert sph["ring_spacing_cv"] < min(euc["ring_spacing_cv"], rec["ring_spacing_cv"])
    assert sph["kappa"] < min(euc["kappa"], rec["kappa"])
    assert sph["l_iso"] < min(euc["l_iso"], rec["l_iso"])
