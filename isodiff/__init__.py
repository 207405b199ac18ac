"""isodiff: the isometric regulariser of Isometric Diffusion (Hahm et al., ICML 2024) and an
experiment suite for it.

The regulariser needs only torch:

    from isodiff import Regulariser, h_encoder, sample_timesteps
    reg = Regulariser("spherical")                       # L_iso on the sphere of x_t
    loss = mse + lambda_iso * reg(h_encoder(unet), x_t[mask], t[mask])

`isometry_loss(f, x)` is the same quantity for any map f; `sample_timesteps` draws t with
the mask of the regularised window t >= p T. Importing these loads torch alone; the suite
(training, evaluation, sweeps, tables) lives in the other submodules and imports diffusers,
accelerate and hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the core module that defines it. Loaded on first use (PEP 562), so that the suite's
# commands, which live in sub-packages, report a config error before torch loads.
_API = {"h_encoder": "isodiff.adapters", "Regulariser": "isodiff.isometry",
        "higher_order_ad": "isodiff.isometry", "isometry_loss": "isodiff.isometry",
        "isometry_loss_from_h": "isodiff.isometry", "path_lengths": "isodiff.isometry",
        "sample_timesteps": "isodiff.isometry"}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'isodiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
