"""A tiny evaluation context for metric tests: random 16 px U-Net, shapes data, random-trunk
LPIPS (fast; its distances are not LPIPS, which these tests do not need)."""

from __future__ import annotations

from pathlib import Path

from isodiff.config import DataConfig, DiffusionConfig
from isodiff.evaluate.metrics.common import EvalContext
from isodiff.model.unet import HUNet
from tests.conftest import tiny_unet


def tiny_context(refs_dir: Path, batch_size: int = 16, unet: HUNet | None = None) -> EvalContext:
    return EvalContext(
        unet or tiny_unet(),
        DiffusionConfig(),
        DataConfig(resolution=16, size=64),
        seed=0,
        batch_size=batch_size,
        refs_dir=refs_dir,
        random_lpips=True,
    )
