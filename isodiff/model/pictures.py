"""Pictures of models: sample grids and image strips as PNG files.

Every trained or loaded model gets a grid of DDIM samples from fixed x_T (sample i seeded
by (0, i), so grids of different runs and checkpoints show the same noise), because a
metric of a model that does not generate is not a result.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid

from isodiff.config import DiffusionConfig
from isodiff.model.latent import Codec
from isodiff.model.sampling import build_sampler, latents, to_images
from isodiff.model.unet import HUNet
from isodiff.runs.files import atomic_save

GRID_SEED = 0


def sample_grid(
    unet: HUNet,
    diffusion: DiffusionConfig,
    n: int,
    steps: int,
    batch_size: int = 64,
    codec: Codec | None = None,
) -> torch.Tensor:
    """n `steps`-step samples (DDIM, or a flow's Euler ODE) from the fixed x_T of samples
    0..n-1, as one (C, H, W) grid in [0, 1] with ceil(sqrt(n)) images a row (a latent
    model's decoded by `codec`)."""
    c = unet.config
    x_T = latents(GRID_SEED, range(n), (c.in_channels, c.sample_size, c.sample_size))
    x = build_sampler(unet, diffusion, steps, batch_size).sample(x_T).x
    images = to_images((codec or Codec()).decode(x))
    return tile(images, math.ceil(math.sqrt(n)))


def tile(images: torch.Tensor, per_row: int) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> one (C, H', W') grid in [0, 1], 1 px white gaps."""
    return make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=per_row, padding=1, pad_value=1.0)


def save_png(image: torch.Tensor, path: Path, scale: int = 1) -> None:
    """A (C, H, W) image in [0, 1] as an 8-bit PNG, each pixel repeated `scale` times
    (small images stay legible), written atomically."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels.permute(1, 2, 0).squeeze(-1).cpu().numpy()
    atomic_save(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
