"""How far |x_t| strays from the radius its flow time predicts (isodiff.flow's docstring):
x_t = (1 - t) x0 + t noise against flow_radius(t) = sqrt(n ((1 - t)^2 sigma_data^2 + t^2)),
over a batch of real images (MNIST, isodiff's shapes; sigma_data their rms), and L_iso on a
tiny DiT evaluated at x_t itself and at x_t moved onto that sphere (and Euclidean).

    python examples/flow_radius.py                 # MNIST and shapes, 512 images
    python examples/flow_radius.py --data shapes --images 16 --dit-images 4
"""

from __future__ import annotations

import argparse

import torch

from isodiff import Regulariser, h_encoder
from isodiff.flow import flow_radius, flow_window, interpolate, radius_deviation
from isodiff.geometry import onto_sphere

TIMES = (0.0, 0.1, 0.25, 0.5, round(flow_window(0.5), 3), 0.9, 1.0)


def images(name: str, count: int) -> torch.Tensor:
    """The first `count` images of an offline dataset of the suite, in [-1, 1]."""
    from isodiff.config import DataConfig, DatasetName
    from isodiff.model.data import build_dataset

    cfg = (
        DataConfig(name=DatasetName.mnist, resolution=28, channels=1, size=count)
        if name == "mnist"
        else DataConfig(name=DatasetName.shapes, size=count)
    )
    data = build_dataset(cfg)
    return torch.stack([data[i][0] for i in range(count)]).float()


def radius_table(x0: torch.Tensor, seed: int = 0) -> list[dict[str, float]]:
    """Per t: flow_radius / sqrt(n), and the mean, max and signed mean of the deviation."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigma = float(x0.pow(2).mean().sqrt())
    rows = []
    for t in TIMES:
        dev = radius_deviation(x0, noise, t, sigma)
        rows.append(
            {
                "t": t,
                "radius_over_sqrt_n": float(flow_radius(t, 1, sigma)),
                "mean_abs": float(dev.abs().mean()),
                "max_abs": float(dev.abs().max()),
                "mean": float(dev.mean()),
            }
        )
    return rows


def liso_table(x0: torch.Tensor, seed: int = 0, n_probes: int = 16) -> list[dict[str, float]]:
    """L_iso of a tiny (untrained) class-conditional DiT at x_t, at x_t on the flow_radius
    sphere, and Euclidean at x_t, per t."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    c, size = x0.shape[1], x0.shape[-1]
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=c,
        out_channels=c,
        num_layers=4,
        sample_size=size,
        patch_size=4 if size % 4 == 0 else 2,
        num_embeds_ada_norm=10,
    )
    labels = torch.arange(len(x0)) % 10
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigma = float(x0.pow(2).mean().sqrt())
    rows = []
    for t in TIMES[1:]:
        x_t, ts = interpolate(x0, noise, t), torch.full((len(x0),), 1000.0 * t)
        moved = onto_sphere(x_t, flow_radius(t, x0[0].numel(), sigma).to(x0))
        row = {"t": t}
        for name, metric, x in [
            ("spherical_at_x_t", "spherical", x_t),
            ("spherical_at_radius", "spherical", moved),
            ("euclidean", "euclidean", x_t),
        ]:
            value = Regulariser(metric, n_probes=n_probes)(
                h_encoder(dit),
                x,
                ts,
                class_labels=labels,
                generator=torch.Generator().manual_seed(seed + 1),
            )
            row[name] = float(value.detach())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, list]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist,shapes")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--dit-images", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    for name in args.data.split(","):
        x0 = images(name, max(args.images, args.dit_images))
        radius, liso = radius_table(x0[: args.images]), liso_table(x0[: args.dit_images])
        out[name] = {"radius": radius, "liso": liso}
        print(f"{name}: {tuple(x0.shape[1:])}, sigma_data {float(x0.pow(2).mean().sqrt()):.3f}")
        for r in radius:
            print(
                f"  t={r['t']:.3f}  r(t)/sqrt(n)={r['radius_over_sqrt_n']:.3f}  "
                f"|dev| mean {100 * r['mean_abs']:.2f} %  max {100 * r['max_abs']:.2f} %"
            )
        for r in liso:
            print(
                f"  t={r['t']:.3f}  L_iso at x_t {r['spherical_at_x_t']:.6f}  at r(t) "
                f"{r['spherical_at_radius']:.6f}  euclidean {r['euclidean']:.6f}"
            )
    return out


if __name__ == "__main__":
    main()
