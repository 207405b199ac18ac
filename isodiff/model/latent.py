"""Latent diffusion: a frozen autoencoder between the images and the space the U-Net models.

`Codec` is the identity of a pixel model. `Autoencoder` wraps a diffusers VQModel (the VQ-f4
of CompVis/ldm-celebahq-256) or AutoencoderKL saved with `save_pretrained`: images are
encoded with no gradient and no stored graph (a VQModel's pre-quantisation latents, an
AutoencoderKL's posterior mode, so an image has one code) and multiplied by the latent
scaling factor, the checkpoint config's `scaling_factor` unless `latent.scale` sets one;
decoding divides by it and decodes (a VQModel quantises first, as diffusers' LDMPipeline
does). The U-Net, its h and the regulariser act on the latent, whose sphere has
n = C·H·W of the latent; every image metric sees decoded images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from isodiff.config import LatentConfig


class Codec:
    """Images in [-1, 1] <-> the space the U-Net models: here the same (a pixel model)."""

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x


class Autoencoder(Codec):
    """A frozen diffusers autoencoder and its latent scaling factor."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        self.model, self.scale = model.eval().requires_grad_(False), scale
        self.vq = type(model).__name__ == "VQModel"

    @classmethod
    def load(cls, cfg: LatentConfig, device: torch.device | str = "cpu") -> Autoencoder:
        import diffusers  # the suite's dependency; the torch-only core never imports this

        kind, _, _ = cfg.geometry()
        model = getattr(diffusers, kind).from_pretrained(
            str(Path(cfg.autoencoder).expanduser()), local_files_only=True
        )
        scale = cfg.scale if cfg.scale is not None else model.config.get("scaling_factor", 1.0)
        return cls(model.to(device), float(scale))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        out = self.model.encode(images.to(self.device, torch.float32))
        z = out.latents if self.vq else out.latent_dist.mode()
        return (z * self.scale).to(images.device)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.model.decode(x.to(self.device, torch.float32) / self.scale).sample.to(x.device)


def build_codec(cfg: LatentConfig, device: torch.device | str = "cpu") -> Codec:
    """The identity for a pixel model, the frozen autoencoder of latent.autoencoder else."""
    return Autoencoder.load(cfg, device) if cfg.autoencoder else Codec()
