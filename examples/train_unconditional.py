"""Isometric Diffusion in a plain diffusers training loop: the core of diffusers'
examples/unconditional_image_generation/train_unconditional.py, with the lines isodiff adds
marked `# isodiff` (an import, the regulariser, the term).

    python examples/train_unconditional.py --train-data-dir /data/celebahq64 --resolution 64
    python examples/train_unconditional.py --steps 2 --resolution 16      # toy data, seconds

Fine-tuning a pretrained model, as the paper does: --init google/ddpm-ema-celebahq-256 (a hub
id or a local folder saved with save_pretrained).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from isodiff import Regulariser, h_encoder  # isodiff


def batches(args: argparse.Namespace) -> Iterator[torch.Tensor]:
    """Images in [-1, 1]: an image folder, or toy data (random colour fields) without one."""
    if args.train_data_dir is None:
        gen = torch.Generator().manual_seed(args.seed)
        while True:
            low = torch.rand(args.batch_size, 3, 4, 4, generator=gen) * 2 - 1
            yield F.interpolate(low, size=args.resolution, mode="bilinear")
    from torchvision import datasets, transforms

    folder = datasets.ImageFolder(
        args.train_data_dir,
        transforms.Compose(
            [
                transforms.Resize(args.resolution),
                transforms.CenterCrop(args.resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        ),
    )
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True)
    while True:
        yield from (images for images, _ in loader)


def mean_liso(seen: list[float]) -> str:  # isodiff
    """L_iso as printed: its mean over the steps since the last print that had a regularised
    sample (a step's L_iso alone is noisy)."""
    return f"L_iso {sum(seen) / len(seen):.4f} (mean of {len(seen)} steps)" if seen else "L_iso n/a"


def main(argv: list[str] | None = None) -> UNet2DModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data-dir", default=None)
    parser.add_argument("--init", default=None, help="a pretrained UNet2DModel to fine-tune")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-iso", type=float, default=1e-4)
    parser.add_argument("--window", type=float, default=0.5, help="L_iso on t >= window * T")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    unet = (
        UNet2DModel.from_pretrained(args.init)
        if args.init
        else UNet2DModel(
            sample_size=args.resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    iso = Regulariser("spherical")  # isodiff
    T = scheduler.config.num_train_timesteps
    seen: list[float] = []  # isodiff: L_iso since the last print
    for step, images in zip(range(args.steps), batches(args), strict=False):
        noise = torch.randn_like(images)
        t = torch.randint(0, T, (len(images),))
        x_t = scheduler.add_noise(images, noise, t)
        loss = mse = F.mse_loss(unet(x_t, t).sample, noise)
        if (m := t >= args.window * T).any():  # isodiff: the regularised timesteps
            l_iso = iso(h_encoder(unet), x_t[m], t[m])  # isodiff
            loss = mse + args.lambda_iso * l_iso  # isodiff
            seen.append(l_iso.item())  # isodiff
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} (mse {mse.item():.4f}), {mean_liso(seen)}")
            seen.clear()
    if args.output_dir:
        unet.save_pretrained(args.output_dir)
    return unet


if __name__ == "__main__":
    main()
