"""h-encoders of diffusers U-Nets for the regulariser, read by a forward hook.

h is the output of the U-Net's mid block (Asyrp's h-space). `h_encoder(unet)` turns any
U-Net with a `mid_block` (diffusers' UNet2DModel, UNet2DConditionModel and their
subclasses) into the callable `(x_t, t, **condition) -> h` that `Regulariser` and
`isometry_loss` take: it runs the U-Net's own forward and stops it when the mid block has
produced h, so the up path is never run and no diffusers code is copied. Only torch is
imported here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class _ReachedH(Exception):
    """Raised by the hook to end the forward at the mid block, carrying its output."""

    def __init__(self, h: Tensor) -> None:
        super().__init__("mid block reached")
        self.h = h


def h_encoder(unet: nn.Module) -> Callable[..., Tensor]:
    """(x_t, t, **condition) -> h, the mid-block output of `unet` at (x_t, t).

    condition: what the U-Net's forward takes besides sample and timestep, e.g.
    `encoder_hidden_states=` of a text-conditional UNet2DConditionModel. Differentiable in
    x_t (and the weights) to any order, as the forward is.
    """
    block = getattr(unet, "mid_block", None)
    if block is None:
        raise TypeError(f"{type(unet).__name__} has no mid_block: h_encoder reads h at a "
                        "diffusers U-Net's mid block (UNet2DModel, UNet2DConditionModel)")

    def stop(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        raise _ReachedH(output)

    def encode(x_t: Tensor, t: Tensor | int, **condition: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        handle = block.register_forward_hook(stop)
        try:
            unet(x_t, t, **condition)
        except _ReachedH as reached:
            return reached.h
        finally:
            handle.remove()
        raise RuntimeError(f"{type(unet).__name__}'s forward never ran its mid block")

    return encode
