"""What a metric returns and how its config enters the protocol: light (numpy only), so that
the metric modules import it at module level without loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Recorded in the protocol of every metric on slerp paths: the official scripts differ on
# it from one to the next, isodiff uses geometry.slerp everywhere.
SLERP_CONVENTION = (
    "one angle per sample pair over all non-batch dims, nothing normalised, "
    "lerp where the angle < 1e-4"
)


@dataclass
class MetricResult:
    """values: the numbers; protocol: every choice that determines them (compared to decide
    whether a stored value is still valid); provenance: what produced them without changing
    them (weights' origin, timings); arrays: per-sample data for figures (eval/<metric>.npz)."""

    values: dict[str, float]
    protocol: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def protocol_of(cfg: Any) -> dict[str, Any]:
    """A metric config as protocol fields (without the on/off switch)."""
    fields = dataclasses.asdict(cfg)
    fields.pop("enabled", None)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in fields.items()}
