"""LPIPS (Zhang et al. 2018) as a per-sample distance between two image batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# AlexNet's two stride-2 max-pools after a stride-4 conv leave no pixel below 32 px.
LPIPS_MIN_SIZE = 32


def lpips_input(images: torch.Tensor, min_size: int = LPIPS_MIN_SIZE) -> torch.Tensor:
    """Images in [-1, 1] as LPIPS takes them: RGB (grey repeated), at least min_size px
    (bilinear upsampling; a no-op for the paper's 32 and 256 px data)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if min(images.shape[-2:]) < min_size:
        scale = min_size / min(images.shape[-2:])
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    return images


def lpips_distance(model: torch.nn.Module) -> Distance:
    """(a, b) images in [-1, 1], (B, C, H, W) -> LPIPS(a_i, b_i), (B,) on the CPU."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = (lpips_input(x.to(device, torch.float32)) for x in (a, b))
        return model(a, b).flatten().cpu()

    return distance
