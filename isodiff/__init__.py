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

from isodiff.adapters import h_encoder, transformer_blocks
from isodiff.isometry import (
    Regulariser,
    higher_order_ad,
    isometry_loss,
    isometry_loss_from_h,
    path_lengths,
    sample_timesteps,
)

__all__ = ["Regulariser", "h_encoder", "higher_order_ad", "isometry_loss",
           "isometry_loss_from_h", "path_lengths", "sample_timesteps", "transformer_blocks"]
