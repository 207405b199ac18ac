"""isodiff: the isometric regulariser of Isometric Diffusion (Hahm et al., ICML 2024) and an
experiment suite for it.

The regulariser needs only torch:

    from isodiff import Regulariser, h_encoder, sample_timesteps
    reg = Regulariser("spherical")                       # L_iso on the sphere of x_t
    loss = mse + lambda_iso * reg(h_encoder(unet), x_t[mask], t[mask])

`h_encoder` reads h at a U-Net's mid block or at a diffusion transformer's middle block (DiT,
PixArt, SD3, Flux). `isometry_loss(f, x)` is the same quantity for any map f;
`sample_timesteps` draws t with the mask of the regularised window t >= p T. For
rectified-flow training, `flow_matching_loss` is the velocity loss + lambda * L_iso in
diffusers' FlowMatch conventions (isodiff.flow), with `sample_flow_timesteps` and
`flow_window`; for LoRA fine-tuning, `add_lora` (isodiff.lora, peft imported when called).
Importing these loads torch alone; the suite (training, evaluation, sweeps, tables) lives in
the other submodules and imports diffusers, accelerate and hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the core module that defines it. Loaded on first use (PEP 562), so that the suite's
# commands, which live in sub-packages, report a config error before torch loads.
_API = {
    **dict.fromkeys(("h_encoder", "recording_h", "transformer_blocks"), "isodiff.adapters"),
    **dict.fromkeys(("flow_matching_loss", "flow_window", "sample_flow_timesteps"), "isodiff.flow"),
    **dict.fromkeys(
        (
            "Regulariser",
            "higher_order_ad",
            "isometry_loss",
            "isometry_loss_from_h",
            "path_lengths",
            "sample_timesteps",
        ),
        "isodiff.isometry",
    ),
    "add_lora": "isodiff.lora",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'isodiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
