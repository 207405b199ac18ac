"""h-encoders of diffusers U-Nets and diffusion transformers for the regulariser, read by a
forward hook.

U-Nets: h is the output of the U-Net's mid block (Asyrp's h-space). `h_encoder(unet)` turns
any U-Net with a `mid_block` (diffusers' UNet2DModel, UNet2DConditionModel and their
subclasses) into the callable `(x_t, t, **condition) -> h` that `Regulariser` and
`isometry_loss` take: it runs the U-Net's own forward and stops it when the mid block has
produced h, so the up path is never run and no diffusers code is copied.

Transformers (DiT, PixArt, SD3, Flux, or any model with a list of transformer blocks): h is
the image tokens at the output of the middle block, and the forward stops there in the same
way (see `h_encoder`). Only torch is imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

# The block lists searched by default, concatenated in the order the forward runs them:
# DiT, PixArt and SD3 have `transformer_blocks`; Flux runs its double-stream
# `transformer_blocks`, then its `single_transformer_blocks`.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class _ReachedH(Exception):
    """Raised by the hook to end the forward at h's block, carrying h."""

    def __init__(self, h: Tensor) -> None:
        super().__init__("mid block reached")
        self.h = h


def transformer_blocks(
    model: nn.Module, block_lists: Sequence[str] = BLOCK_LISTS
) -> list[nn.Module]:
    """The model's transformer blocks in forward order: the concatenation of those of its
    attributes named in `block_lists` that exist (Flux: its 19 double-stream blocks, then its
    38 single-stream blocks, 57 in all)."""
    blocks: list[nn.Module] = []
    for name in block_lists:
        found = getattr(model, name, None)
        if isinstance(found, nn.ModuleList | list | tuple):
            blocks.extend(found)
    return blocks


def middle_block_index(n_blocks: int) -> int:
    """(n - 1) // 2: h after half the depth (block 13 of DiT-XL's 28, the 14th; for odd n the
    middle block itself; Flux-dev's 57 blocks: 28, its 10th single-stream block)."""
    return (n_blocks - 1) // 2


def _image_stream(output: Tensor | tuple, index: int) -> Tensor:
    """A block's image tokens: the block's tensor output, or element `index` of its tuple
    (SD3's and Flux's blocks return (encoder_hidden_states, hidden_states): index -1)."""
    return output if isinstance(output, Tensor) else output[index]


def h_block(
    model: nn.Module, block: int | None = None, block_lists: Sequence[str] = BLOCK_LISTS
) -> nn.Module:
    """The module whose output is h (see `h_encoder`): a U-Net's mid block, or block `block`
    (the middle one when None) of a transformer's concatenated block lists."""
    unet_block = getattr(model, "mid_block", None)
    if block is None and unet_block is not None:
        return unet_block
    blocks = transformer_blocks(model, block_lists)
    if not blocks and unet_block is not None:
        raise TypeError(
            f"block={block!r} indexes a transformer's blocks; "
            f"{type(model).__name__}'s h is its mid_block (leave block None)"
        )
    if not blocks:
        # a diffusers pipeline holds its denoiser as .unet or .transformer
        inner = next((n for n in ("unet", "transformer") if hasattr(model, n)), None)
        raise TypeError(
            f"{type(model).__name__} has no mid_block and no transformer blocks "
            f"(attributes {tuple(block_lists)}): h_encoder reads h at a diffusers "
            "U-Net's mid block or at a transformer's middle block (block_lists= "
            "names the block lists of other models)"
            + (f"; for a pipeline, pass its model: h_encoder(pipe.{inner})" if inner else "")
        )
    return blocks[middle_block_index(len(blocks)) if block is None else block]  # IndexError


@contextlib.contextmanager
def recording_h(
    model: nn.Module,
    block: int | None = None,
    *,
    block_lists: Sequence[str] = BLOCK_LISTS,
    output: int = -1,
) -> Iterator[list[Tensor]]:
    """Records h during the model's own full forwards, without stopping them: yields a
    list to which each forward inside the block appends its h (the h that `h_encoder` with
    the same arguments returns). Lets a training loss reuse the main forward's h for L_iso
    (`Regulariser(..., h=h)`), saving the encoder forward."""
    seen: list[Tensor] = []
    handle = h_block(model, block, block_lists).register_forward_hook(
        lambda module, inputs, out: seen.append(_image_stream(out, output))
    )
    try:
        yield seen
    finally:
        handle.remove()


def h_encoder(
    model: nn.Module,
    block: int | None = None,
    *,
    block_lists: Sequence[str] = BLOCK_LISTS,
    output: int = -1,
    shared: dict[str, Tensor] | None = None,
) -> Callable[..., Tensor]:
    """(x_t, t, **condition) -> h, the h of `model` at (x_t, t).

    U-Net (a model with a `mid_block`, and `block` None): h is the mid-block output, as
    Asyrp's h-space; the U-Net is called as `unet(x_t, t, **condition)`.

    Transformer (a model with the block lists `block_lists`, DiT, PixArt, SD3 and Flux by
    default): h is the output of block `block` of the concatenated list (negative indices
    count from the end), the middle block `(n - 1) // 2` by default, i.e. the image tokens
    (B, tokens, width) after half the depth; for Flux the list is its double-stream blocks
    followed by its single-stream blocks. A block returning a tuple gives element `output`
    (the image stream; SD3/Flux blocks return (text, image), hence -1). The model is called
    as `model(x_t, timestep=t, **condition, **shared)`: class_labels (DiT),
    encoder_hidden_states (PixArt, SD3, Flux), pooled_projections (SD3, Flux) go in
    `condition`, which the Regulariser slices with the batch; `shared` holds what is not
    per sample and must not be sliced (Flux's img_ids, txt_ids).

    Why this h. Asyrp's h is the U-Net's bottleneck: the deepest, lowest-resolution feature
    map, between the down path that encodes x_t and the up path that decodes it, where
    semantic edits live. A diffusion transformer keeps one token grid and one width through
    every block, so no layer is a bottleneck by shape; the closest analogue is by depth, the
    middle of the stack, where the first half has mixed global information into each token
    and the second half has not yet turned it back into the noise or velocity prediction
    (U-ViT, Bao et al. 2023, makes this explicit: long skips join each block of its first
    half to its mirror in the second, around a mid block, as a U-Net's skips do). It is a
    convention, not a theorem: `block` chooses another depth. In either case the forward
    stops at h, so the later blocks never run.

    Differentiable in x_t (and the weights) to any order, as the forward is.
    """
    shared = dict(shared or {})
    target = h_block(model, block, block_lists)
    if block is None and getattr(model, "mid_block", None) is not None:
        return _unet_encoder(model, target, shared)

    def stop(module: nn.Module, inputs: tuple, out: Tensor | tuple) -> None:
        raise _ReachedH(_image_stream(out, output))

    def encode(x_t: Tensor, t: Tensor | float, **condition: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        handle = target.register_forward_hook(stop)
        try:
            model(x_t, timestep=t, **condition, **shared)
        except _ReachedH as reached:
            return reached.h
        finally:
            handle.remove()
        raise RuntimeError(
            f"{type(model).__name__}'s forward never ran its h block "
            "(skipped, or not in its forward)"
        )

    return encode


def _unet_encoder(
    unet: nn.Module, block: nn.Module, shared: dict[str, Tensor]
) -> Callable[..., Tensor]:
    """The mid-block encoder of a U-Net (see `h_encoder`)."""

    def stop(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        raise _ReachedH(output)

    def encode(x_t: Tensor, t: Tensor | int, **condition: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        handle = block.register_forward_hook(stop)
        try:
            unet(x_t, t, **condition, **shared)
        except _ReachedH as reached:
            return reached.h
        finally:
            handle.remove()
        raise RuntimeError(f"{type(unet).__name__}'s forward never ran its mid block")

    return encode
