"""Isometric Diffusion on a diffusion transformer trained by flow matching: the
flow-matching core of diffusers' examples/dreambooth/train_dreambooth_sd3.py (timestep
density, sigmas from the FlowMatchEulerDiscreteScheduler's timesteps, x_t = (1 - sigma) x0 +
sigma noise, velocity target noise - x0) on a class-conditional DiTTransformer2DModel, with
the lines isodiff adds marked `# isodiff` (an import, the regulariser, the term).

h is the DiT's middle-block output (`h_encoder`); the window is in flow time, sigma >=
--window, whose default flow_window(0.5) = 0.775 is the paper's p = 0.5 on DDPM matched by
signal-to-noise ratio. Toy data (class-coloured fields) so that it runs offline in seconds;
with real latents only the data and the model size change.

    python examples/train_dit_flow.py --steps 2                    # toy size, seconds
    python examples/train_dit_flow.py --weighting-scheme logit_normal --output-dir dit-iso
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from isodiff import Regulariser, flow_window, h_encoder  # isodiff


def batches(args: argparse.Namespace) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [-1, 1], class labels): smooth random fields tinted by their class."""
    gen = torch.Generator().manual_seed(args.seed)
    tint = torch.rand(args.num_classes, 3, 1, 1, generator=gen) * 2 - 1
    while True:
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
        low = torch.rand(args.batch_size, 3, 4, 4, generator=gen) * 2 - 1
        field = F.interpolate(low, size=args.resolution, mode="bilinear")
        yield (0.5 * field + 0.5 * tint[labels]).clamp(-1, 1), labels


def mean_liso(seen: list[float]) -> str:  # isodiff
    """L_iso as printed: its mean over the steps since the last print that had a regularised
    sample (a step's L_iso alone is noisy)."""
    return f"L_iso {sum(seen) / len(seen):.4f} (mean of {len(seen)} steps)" if seen else "L_iso n/a"


def main(argv: list[str] | None = None) -> DiTTransformer2DModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--weighting-scheme", default="none", choices=["none", "logit_normal", "mode"]
    )
    parser.add_argument("--lambda-iso", type=float, default=1e-4)
    parser.add_argument(
        "--window",
        type=float,
        default=flow_window(0.5),
        help="L_iso on sigma >= window (flow time, 1 = noise)",
    )
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=3,
        out_channels=3,
        num_layers=6,
        sample_size=args.resolution,
        patch_size=2,
        num_embeds_ada_norm=args.num_classes,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    iso = Regulariser("spherical")  # isodiff: the sphere through x_t (isodiff.flow)
    T = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(args.seed + 1)
    seen: list[float] = []  # isodiff: L_iso since the last print
    for step, (images, labels) in zip(range(args.steps), batches(args), strict=False):
        noise = torch.randn_like(images)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=len(images),
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            generator=gen,
        )
        timesteps = scheduler.timesteps[(u * T).long()]
        sigmas = (timesteps / T).view(-1, 1, 1, 1)  # the script's get_sigmas, shift 1
        x_t = (1.0 - sigmas) * images + sigmas * noise
        pred = model(x_t, timestep=timesteps, class_labels=labels).sample
        loss = mse = F.mse_loss(pred.float(), (noise - images).float())
        if (m := sigmas.flatten() >= args.window).any():  # isodiff: the regularised sigmas
            l_iso = iso(h_encoder(model), x_t[m], timesteps[m], class_labels=labels[m])  # isodiff
            loss = mse + args.lambda_iso * l_iso  # isodiff
            seen.append(l_iso.item())  # isodiff
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} (mse {mse.item():.4f}), {mean_liso(seen)}")
            seen.clear()
    if args.output_dir:
        model.save_pretrained(args.output_dir)
    return model


if __name__ == "__main__":
    main()
