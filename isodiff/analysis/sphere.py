"""The Figure 3 toy's model: an autoencoder of points of S^2, trained in three settings,
its scores and its figure (the command and its config: isodiff.analysis.toy)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from isodiff.analysis.toy import SETTINGS, TITLES
from isodiff.isometry import isometry_loss
from isodiff.runs.files import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from isodiff.analysis.toy import ToyConfig


def sample_sphere(n: int, cap_deg: float, generator: torch.Generator) -> Tensor:
    """n points uniform (by area) on S^2 without the cap of angle cap_deg around (0, 0, 1):
    uniform height z (Archimedes) and longitude."""
    z = -1 + (1 + math.cos(math.radians(cap_deg))) * torch.rand(n, generator=generator)
    phi = 2 * math.pi * torch.rand(n, generator=generator)
    s = (1 - z**2).clamp_min(0).sqrt()
    return torch.stack([s * phi.cos(), s * phi.sin(), z], dim=1)


def latitude_rings(n_rings: int, n_points: int, cap_deg: float) -> Tensor:
    """(n_rings, n_points, 3): rings equally spaced in polar angle from the south pole to the
    edge of the cap, each with the same longitudes (so ring k, point j lie on meridian j)."""
    theta = torch.linspace(0, math.pi - math.radians(cap_deg), n_rings + 1)[1:]  # from south
    phi = torch.linspace(0, 2 * math.pi, n_points + 1)[:-1]
    s, z = theta.sin()[:, None], -theta.cos()[:, None]
    return torch.stack([s * phi.cos(), s * phi.sin(), z.expand(-1, n_points)], dim=2)


def tangent_basis(x: Tensor) -> Tensor:
    """(N, 3, 2) orthonormal tangent basis (e_theta, e_phi) at points x of S^2."""
    theta = torch.arccos(x[:, 2].clamp(-1, 1))
    phi = torch.atan2(x[:, 1], x[:, 0])
    e_theta = torch.stack([theta.cos() * phi.cos(), theta.cos() * phi.sin(), -theta.sin()], 1)
    e_phi = torch.stack([-phi.sin(), phi.cos(), torch.zeros_like(phi)], 1)
    return torch.stack([e_theta, e_phi], dim=2)


def mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    # Smooth activations: L_iso differentiates the encoder's Jacobian.
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, d_out),
    )


def train_setting(cfg: ToyConfig, metric: str | None) -> tuple[nn.Module, float]:
    """Train encoder + decoder; returns the encoder and the final reconstruction MSE."""
    torch.manual_seed(cfg.seed)
    encoder, decoder = mlp(3, 2, cfg.hidden), mlp(2, 3, cfg.hidden)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    data = torch.Generator().manual_seed(cfg.seed + 1)
    probes = torch.Generator().manual_seed(cfg.seed + 2)
    for _ in range(cfg.steps):
        x = sample_sphere(cfg.batch_size, cfg.cap_deg, data)
        loss = (decoder(encoder(x)) - x).pow(2).sum(1).mean()
        if metric is not None:
            loss = loss + cfg.lambda_iso * isometry_loss(
                encoder, x, metric=metric, n_probes=cfg.n_probes, generator=probes
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = sample_sphere(cfg.n_eval, cfg.cap_deg, data)
        mse = float((decoder(encoder(x)) - x).pow(2).sum(1).mean())
    return encoder, mse


def tangent_metrics(encoder: nn.Module, x: Tensor) -> Tensor:
    """(N, 2, 2) pulled-back metrics (J U)^T (J U) on the tangent planes at x."""
    j = torch.func.vmap(torch.func.jacrev(encoder))(x)  # (N, 2, 3)
    ju = j @ tangent_basis(x)
    return ju.transpose(1, 2) @ ju


def scores(encoder: nn.Module, cfg: ToyConfig) -> dict[str, float]:
    """kappa, ring_spacing_cv and the exact spherical l_iso (module docstring)."""
    x = sample_sphere(cfg.n_eval, cfg.cap_deg, torch.Generator().manual_seed(cfg.seed + 3))
    with torch.no_grad():
        m = tangent_metrics(encoder, x)
        eig = torch.linalg.eigvalsh(m)  # ascending
        tr = eig.sum(1)
        l_iso = (eig.pow(2).sum(1).mean() / tr.mean() ** 2).item()
        rings = encoder(latitude_rings(cfg.n_rings, 72, cfg.cap_deg))  # (K, P, 2)
        spacing = (rings[1:] - rings[:-1]).norm(dim=2)
    return {
        "kappa": (eig[:, 1] / eig[:, 0]).mean().item(),
        "ring_spacing_cv": (spacing.std() / spacing.mean()).item(),
        "l_iso": l_iso,
    }


# What the numbers under the panels mean (the module docstring of isodiff.analysis.toy).
CAPTION = "\n".join(
    [
        r"$\kappa$: condition number of the encoder's metric $(JU)^\top JU$ pulled back to the"
        " sphere's tangent planes (U: an orthonormal tangent basis), mean over held-out points;"
        " 1 = conformal (a scaled isometry locally)",
        "ring CV: coefficient of variation of the latent distance between consecutive rings,"
        " along every meridian; 0 = evenly spaced, as the rings are on the sphere",
        r"$L_{iso}$: the encoder's exact spherical isometry loss on held-out points;"
        " 1/2 at best (a scaled isometry)",
    ]
)


def toy_figure(
    encoders: dict[str, Callable[[Tensor], Tensor]], numbers: dict[str, dict], cfg: ToyConfig
) -> Figure:
    """Three panels (the paper's layout): each latent, latitude rings coloured by height,
    its numbers beneath it and what they mean beneath the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rings = latitude_rings(cfg.n_rings, 200, cfg.cap_deg)
    heights = rings[:, 0, 2]
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(-1.0, float(heights.max()))
    fig = plt.figure(figsize=(4.2 * len(encoders) + 1, 5.6), layout="constrained")
    axes = fig.subplots(1, len(encoders))
    for ax, (name, encoder) in zip(axes, encoders.items(), strict=True):
        with torch.no_grad():
            z = encoder(rings)
        for k in range(len(rings)):
            closed = torch.cat([z[k], z[k, :1]])
            ax.plot(closed[:, 0], closed[:, 1], color=cmap(norm(float(heights[k]))), lw=1.6)
        n = numbers[name]
        ax.set_title(TITLES[name], fontsize=11)
        ax.set_xlabel(
            rf"$\kappa$ {n['kappa']:.3g}    ring CV {n['ring_spacing_cv']:.2f}"
            rf"    $L_{{iso}}$ {n['l_iso']:.3f}",
            fontsize=10,
        )
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=axes,
        shrink=0.8,
        label="height of the ring on the sphere (-1: south pole)",
    )
    fig.suptitle(
        f"The 2-D latent of an autoencoder of the unit sphere without its {cfg.cap_deg:g}"
        "\N{DEGREE SIGN} polar cap, trained three ways:\nlatitude rings, equally spaced on the"
        " sphere, as the encoder maps them (a scaled isometry keeps them evenly spaced)",
        fontsize=11,
    )
    fig.supxlabel(CAPTION, fontsize=8, ha="left", x=0.01, multialignment="left")
    return fig


def plot(
    encoders: dict[str, nn.Module], numbers: dict[str, dict], cfg: ToyConfig, out_dir: Path
) -> list[Path]:
    """The toy figure as toy_fig3.png and toy_fig3.pdf in out_dir."""
    import matplotlib.pyplot as plt

    fig = toy_figure(encoders, numbers, cfg)
    paths = [out_dir / "toy_fig3.png", out_dir / "toy_fig3.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Ops on a batch of 256 x 64 are too small for intra-op threads to pay for their
    # synchronisation (10x slower with 2 threads on a busy 2-core machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_toy(cfg: ToyConfig) -> dict:
    """Train the three settings, write the figure and toy_fig3.json; return the numbers."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    encoders, numbers = {}, {}
    with _one_thread():
        for name, metric in SETTINGS.items():
            encoders[name], mse = train_setting(cfg, metric)
            numbers[name] = {**scores(encoders[name], cfg), "reconstruction_mse": mse}
    paths = plot(encoders, numbers, cfg, out_dir)
    result = {
        "settings": numbers,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - tic,
        "figure": [str(p) for p in paths],
        "closest_to_scaled_isometry": min(numbers, key=lambda k: numbers[k]["kappa"]),
    }
    atomic_write_text(out_dir / "toy_fig3.json", json.dumps(result, indent=2))  # fsynced
    return result
