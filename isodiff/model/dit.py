"""A small diffusion transformer with h-space access, for `model.arch=dit`.

HDiT is diffusers' DiTTransformer2DModel made unconditional and given the interface of the
U-Net's HUNet (`encode`, `decode`, `encode_h`, `eps_and_h`), so that training, sampling and
every metric that reads h take either model.

Unconditional: diffusers' DiT is class-conditional (adaLN-Zero on a timestep + class
embedding). HDiT is built with one class (num_embeds_ada_norm=1) and every sample gets the
same label 0, with the label dropout of classifier-free guidance off: the class embedding is
then a learned constant added to the timestep embedding, and the model is an unconditional
epsilon-predictor trained by the suite's DDPM objective (a velocity-predictor with
diffusion=flow).

h: the output of the middle block, (n - 1) // 2 of the n blocks, or of block `model.h_block`
(`read_h_at`), read by the library's `isodiff.adapters.h_encoder` (see its docstring for why
the middle). The block is kept in the model's config (`_h_block`: diffusers saves and loads
keys with a leading underscore without passing them to __init__), so a saved run's weights
read h where it was trained. Its image tokens
(B, tokens, width) are returned as the feature map (B, width, rows, cols) of the patch
grid, the shape of a U-Net's h: L_iso and every metric flatten h, and a permutation of its
coordinates changes no norm, while the map lets the metrics that pool h spatially
(eval.jacobian.h_pool) pool neighbouring patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from isodiff.adapters import h_encoder, middle_block_index

# (h, skips (none), class labels, timesteps): HUNet's EncoderState, in the slots decode reads
DiTState = tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]


class HDiT(DiTTransformer2DModel):
    """DiTTransformer2DModel, unconditional, split at h (the middle block's output).

    Weights, config and save/load are DiTTransformer2DModel's; `encode` runs the blocks up
    to h only, `decode` the rest and the output head.
    """

    @property
    def h_index(self) -> int:
        """The block whose output is h (from 0): `read_h_at`'s, else the middle one, as
        h_encoder's default."""
        n, block = len(self.transformer_blocks), self.config.get("_h_block")
        return middle_block_index(n) if block is None else block % n

    def read_h_at(self, block: int | None) -> HDiT:
        """h is the output of block `block` (negative: from the end; None: the middle one)
        from now on and in what save_pretrained writes."""
        n = len(self.transformer_blocks)
        if block is not None and not -n <= block < n:
            raise IndexError(f"h block {block} of a DiT with {n} blocks")
        self.register_to_config(_h_block=block)
        return self

    def _one_class(self) -> None:
        """No label dropout: it would swap label 0 for the guidance row at random, from the
        global RNG (neither unconditional nor reproducible). Done here, not in __init__:
        diffusers builds models from __init__'s signature, which a subclass must keep."""
        if not getattr(self, "_labels_fixed", False):
            for module in self.modules():
                if isinstance(module, LabelEmbedding):
                    module.dropout_prob = 0.0
            self._labels_fixed = True

    def labels(self, sample: torch.Tensor) -> torch.Tensor:
        """The one class label, 0, for every sample."""
        return torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | None = None,
        class_labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> object:
        """diffusers' forward, with label 0 when none is given (what h_encoder calls)."""
        self._one_class()
        if class_labels is None:
            class_labels = self.labels(hidden_states)
        return super().forward(
            hidden_states, timestep=timestep, class_labels=class_labels, **kwargs
        )

    def _timesteps(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        # as h_encoder expands them, so that encode's h is bitwise encode_h's
        return torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])

    def _grid(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """(B, tokens, width) -> (B, width, rows, cols), the patch grid's feature map."""
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, rows, n // rows)

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> DiTState:
        """(h, (), labels, timesteps): the blocks up to h's, not the rest."""
        self._one_class()
        timesteps, labels = self._timesteps(sample, timestep), self.labels(sample)
        tokens = self.pos_embed(sample)
        for block in self.transformer_blocks[: self.h_index + 1]:
            tokens = block(tokens, timestep=timesteps, class_labels=labels)
        return self._grid(tokens, sample.shape[-2] // self.patch_size), (), labels, timesteps

    def decode(
        self,
        h: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        labels: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The blocks after h and the output head (diffusers' forward from there): the
        epsilon prediction."""
        rows, cols = h.shape[-2:]
        tokens = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks[self.h_index + 1 :]:
            tokens = block(tokens, timestep=timesteps, class_labels=labels)
        conditioning = self.transformer_blocks[0].norm1.emb(
            timesteps, labels, hidden_dtype=tokens.dtype
        )
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        tokens = self.norm_out(tokens) * (1 + scale[:, None]) + shift[:, None]
        tokens = self.proj_out_2(tokens)
        p, c = self.patch_size, self.out_channels
        tokens = tokens.reshape(-1, rows, cols, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", tokens).reshape(-1, c, rows * p, cols * p)

    def encode_h(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """h at (x_t, t), read by the library's h_encoder (the forward stops at h's block)."""
        tokens = h_encoder(self, self.h_index)(x_t, t, class_labels=self.labels(x_t))
        return self._grid(tokens, x_t.shape[-2] // self.patch_size)

    def eps_and_h(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        *,
        h_offset: torch.Tensor | None = None,
        h_replace: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, h) from one forward, as HUNet.eps_and_h."""
        h, skips, labels, timesteps = self.encode(x_t, t)
        h_used = h_replace if h_replace is not None else h
        if h_offset is not None:
            h_used = h_used + h_offset
        return self.decode(h_used, skips, labels, timesteps), h
