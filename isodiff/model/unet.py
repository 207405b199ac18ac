"""U-Net with h-space access (Asyrp's h = mid-block output), builders and checkpoint loading."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from isodiff.config import Arch, ModelConfig, Objective
from isodiff.errors import ConfigError
from isodiff.model.dit import HDiT
from isodiff.runs.status import BASES_MANIFEST, DONE, base_entry, job_state, verify_base

EncoderState = tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]


class HUNet(UNet2DModel):
    """diffusers' UNet2DModel split at h so that h can be read, replaced or offset.

    `encode` runs only what h depends on (time embedding, conv_in, down blocks, mid block),
    so the isometric loss never pays for the up path. Weights, config and save/load are
    UNet2DModel's, so pretrained diffusers checkpoints load unchanged.
    """

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> EncoderState:
        """Returns (h, skip activations, time embedding, timesteps)."""
        if self.class_embedding is not None or self.config.center_input_sample:
            raise NotImplementedError("class-conditional or centred-input U-Nets")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        skip_sample = sample
        sample = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(
                    hidden_states=sample, temb=emb, skip_sample=skip_sample
                )
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        h = self.mid_block(sample, emb)
        return h, skips, emb, timesteps

    def decode(
        self,
        h: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        emb: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The up path from h: the epsilon prediction."""
        sample, skip_sample = h, None
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res, emb, skip_sample)
            else:
                sample = block(sample, res, emb)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(-1, *([1] * (sample.ndim - 1)))
        return sample

    def encode_h(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """h = mid-block output at (x_t, t), without the up path."""
        return self.encode(x_t, t)[0]

    def eps_and_h(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        *,
        h_offset: torch.Tensor | None = None,
        h_replace: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, h) from one forward. The up path sees h_replace, or h + h_offset (Asyrp
        editing); the returned h is always the encoder's own."""
        h, skips, emb, timesteps = self.encode(x_t, t)
        h_used = h_replace if h_replace is not None else h
        if h_offset is not None:
            h_used = h_used + h_offset
        return self.decode(h_used, skips, emb, timesteps), h


# The suite's denoisers: a U-Net or (model.arch=dit) a diffusion transformer, both with
# encode/decode/encode_h/eps_and_h.
Denoiser = HUNet | HDiT


def unet_kwargs(cfg: ModelConfig) -> dict:
    """ModelConfig -> UNet2DModel keyword arguments (DiTTransformer2DModel's with arch=dit)."""
    if cfg.arch == Arch.dit:
        return dit_kwargs(cfg)
    kwargs = dataclasses.asdict(cfg)
    for key in ("name", "arch", "dit", "h_block"):
        kwargs.pop(key)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        kwargs[key] = tuple(kwargs[key])
    return kwargs


def dit_kwargs(cfg: ModelConfig) -> dict:
    """ModelConfig (arch=dit) -> DiTTransformer2DModel keyword arguments: one class (HDiT
    is unconditional)."""
    return {
        **dataclasses.asdict(cfg.dit),
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "dropout": cfg.dropout,
        "num_embeds_ada_norm": 1,
    }


def build_unet(cfg: ModelConfig) -> Denoiser:
    """The denoiser of `cfg`, freshly initialised: HUNet, or HDiT with model.arch=dit."""
    if cfg.arch == Arch.dit:
        return HDiT(**dit_kwargs(cfg)).read_h_at(cfg.h_block)
    return HUNet(**unet_kwargs(cfg))


def model_class(source: str, subfolder: str | None) -> type[HUNet] | type[HDiT]:
    """The class of the weights at a local checkpoint (its config.json's _class_name):
    HDiT for a DiT, else HUNet (a hub id, whose config is not read before loading)."""
    config = Path(source) / (subfolder or "") / "config.json"
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return HUNet
    return HDiT if name in ("HDiT", "DiTTransformer2DModel") else HUNet


def _missing(init_from: str) -> ConfigError:
    return ConfigError(
        f"init_from={init_from!r} was not found. It must be one of: a finished isodiff run "
        "directory (with final/unet_ema), a local diffusers checkpoint directory (config.json "
        "and diffusion_pytorch_model.safetensors, directly or under unet/), or a Hugging Face "
        "hub id already in the local cache. On a machine with internet, fetch a hub model "
        "with `huggingface-cli download google/ddpm-ema-celebahq-256 --local-dir "
        "checkpoints/ddpm-ema-celebahq-256` and pass init_from=checkpoints/ddpm-ema-celebahq-256."
    )


def resolve_checkpoint(init_from: str, ema: bool = True) -> tuple[str, str | None]:
    """Where the U-Net weights of `init_from` live: (path or hub id, subfolder)."""
    path = Path(init_from).expanduser()
    if (path / "final").is_dir() or (path / "status.json").is_file():  # an isodiff run
        state, problem = job_state(path)
        if state != DONE:
            raise ConfigError(
                f"init_from={init_from!r} is an isodiff run that is not done "
                f"(state: {state}{': ' + problem if problem else ''}): only a "
                "done run is a base; finish it by running its command again, "
                "or pass another"
            )
        sub = "unet_ema" if ema and (path / "final" / "unet_ema").is_dir() else "unet"
        return str(path / "final"), sub
    if (path / "config.json").is_file():
        verify_base(path)  # a shipped base is what its manifest says
        return str(path), None
    if (path / "unet" / "config.json").is_file():
        return str(path), "unet"
    if path.exists() or init_from.startswith((".", "/", "~")) or init_from.count("/") != 1:
        raise _missing(init_from)
    return init_from, None  # a hub id: only the local cache is consulted


def base_objective(init_from: str) -> tuple[str, Path] | None:
    """The diffusion objective (`diffusion.objective`) the base `init_from` was trained with,
    and the file that records it: a run's config.yaml, or the manifest of exported bases;
    None where nothing records it (a diffusers checkpoint, a hub id)."""
    path = Path(init_from).expanduser()
    if (path / "config.yaml").is_file() and (path / "final").is_dir():  # an isodiff run
        diffusion = OmegaConf.load(path / "config.yaml").get("diffusion") or {}
        # runs from before the key existed trained DDPM, its default
        return str(diffusion.get("objective", Objective.ddpm.value)), path / "config.yaml"
    entry = base_entry(path) if (path / "config.json").is_file() else None
    if entry and "diffusion" in entry:
        return str(entry["diffusion"]["objective"]), path.parent / BASES_MANIFEST
    return None


def require_objective(init_from: str, objective: Objective) -> None:
    """ConfigError unless the base `init_from` was trained with `objective` (or nothing says):
    a DDPM base predicts noise, a flow base a velocity, and fine-tuning one as the other
    starts from a model whose every output is read wrongly."""
    recorded = base_objective(init_from)
    if recorded is None or recorded[0] == Objective(objective).value:
        return
    trained, where = recorded
    asked = Objective(objective).value
    raise ConfigError(
        f"diffusion.objective={asked} does not match init_from={init_from!r}, which was "
        f"trained with diffusion.objective={trained} ({where}): fine-tune it with "
        f"diffusion={trained}, or pass a base trained with diffusion={asked}"
    )


def load_unet(init_from: str, ema: bool = True) -> Denoiser:
    """Load pretrained weights into an HUNet (an HDiT for a DiT's), offline (never
    downloads)."""
    source, subfolder = resolve_checkpoint(init_from, ema)
    try:
        return model_class(source, subfolder).from_pretrained(
            source, subfolder=subfolder, local_files_only=True
        )
    except (OSError, ValueError) as err:
        if os.path.isdir(source):
            raise ConfigError(
                f"init_from={init_from!r}: cannot load a U-Net from {source}"
                f"{'/' + subfolder if subfolder else ''}: {err}"
            ) from err
        raise _missing(init_from) from err


# Trained diffusion U-Nets keep every weight within a few units (the shipped quick bases:
# max |w| 1.3); one beyond this has diverged even where it is finite (optim.lr=1e30 gives 1e30).
MAX_ABS_WEIGHT = 1e4


def diverged(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors that hold a nan, an inf or a value beyond MAX_ABS_WEIGHT."""
    with torch.no_grad():
        return [
            name
            for name, tensor in named
            if tensor.numel()
            and not (
                bool(torch.isfinite(tensor).all()) and float(tensor.abs().max()) <= MAX_ABS_WEIGHT
            )
        ]


def config_mismatch(cfg: ModelConfig, config: Mapping[str, Any]) -> dict[str, tuple]:
    """The keys where a loaded U-Net's config differs from `cfg`: (cfg's, the config's)."""
    return {
        key: (value, config.get(key))
        for key, value in unet_kwargs(cfg).items()
        if _comparable(value) != _comparable(config.get(key))
    }


def init_unet(cfg: ModelConfig, init_from: str | None) -> Denoiser:
    """The model named by `cfg`, or the pretrained `init_from` when its config matches cfg."""
    if init_from is None:
        return build_unet(cfg)
    unet = load_unet(init_from)
    if not isinstance(unet, HDiT if cfg.arch == Arch.dit else HUNet):
        raise ConfigError(
            f"init_from={init_from!r} holds a {type(unet).__name__}, not the "
            f"model.arch={Arch(cfg.arch).value} of model={cfg.name}; pick the "
            "model config that describes the checkpoint"
        )
    if differ := config_mismatch(cfg, unet.config):
        detail = ", ".join(f"{k}: model={v!r} checkpoint={c!r}" for k, (v, c) in differ.items())
        raise ConfigError(
            f"init_from={init_from!r} does not match model={cfg.name} ({detail}); "
            "pick the model config that describes the checkpoint"
        )
    return unet.read_h_at(cfg.h_block) if isinstance(unet, HDiT) else unet


def _comparable(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value
