"""Counter-based seeds: every random draw is a pure function of (seed, what, step/index).

Training randomness for step s and sample i of an evaluation never depends on how many
draws came before, so resumed runs, other batch sizes and other process counts reproduce
the same numbers (the idea of EDM's StackedRandomGenerator).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads in `generator`: derive_seed serves light modules too
    import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of ints and strings (stable across runs and platforms)."""
    entropy = [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(*keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded from keys (draw on CPU, then move: device-independent)."""
    import torch

    return torch.Generator().manual_seed(derive_seed(*keys))
