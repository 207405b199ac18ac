"""Draw the Figure 3 toy of Hahm et al.: why the metric of X matters.

Examples:
  python -m isodiff.analysis.toy               # results/quick/figures/toy_fig3.{png,pdf,json}
  python -m isodiff.analysis.toy out_dir=/tmp/toy steps=300
  python -m isodiff.analysis.toy lambda_iso=0.1 cap_deg=60

Keys (key=value): python -m isodiff.analysis.toy --cfg job lists every key with its value;
conf/toy.yaml comments them.

Points on the unit sphere S^2 in R^3 (by default its lower hemisphere: a polar cap is left
out so that a 2-D latent holds the points without folding) are encoded by an autoencoder
with a 2-D latent, in three settings from one initialisation and one data stream:
reconstruction only; + lambda_iso L_iso with G = I on R^3; + lambda_iso L_iso with the
spherical metric (the encoder restricted to the sphere's tangent planes). The figure shows
each latent with latitude rings coloured by height; the numbers say which encoder is
closest to a scaled isometry of the sphere:

- kappa: condition number of the pulled-back metric (J U)^T (J U) on the tangent plane
  (U an orthonormal tangent basis), mean over held-out points; 1 for a conformal map;
- ring_spacing_cv: coefficient of variation of the latent distance between consecutive
  latitude rings (equally spaced on the sphere) along every meridian; 0 when rings are
  evenly spaced;
- l_iso: the exact spherical L_iso of the encoder on held-out points (minimum 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from isodiff.cli import hydra_main
from isodiff.config import CONF

SETTINGS = {"reconstruction": None, "euclidean": "euclidean", "spherical": "spherical"}
TITLES = {
    "reconstruction": "reconstruction only",
    "euclidean": r"+ $L_{iso}$, $G = I$",
    "spherical": r"+ $L_{iso}$, spherical $G$",
}


@dataclass
class ToyConfig:
    tier: str = "quick"
    out_dir: str = "results/quick/figures"
    seed: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    lambda_iso: float = 1.0
    n_probes: int = 2
    hidden: int = 64
    cap_deg: float = 90.0  # polar cap around the north pole that is left out
    n_rings: int = 10
    n_eval: int = 2000

    def __post_init__(self) -> None:
        if not 0 < self.cap_deg < 180:
            raise ValueError(f"cap_deg={self.cap_deg!r} is invalid: must be in (0, 180)")
        for key in ("steps", "batch_size", "n_probes", "hidden", "n_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid: must be >= 1")
        if self.n_rings < 3:
            raise ValueError(f"n_rings={self.n_rings!r} is invalid: must be >= 3")


ConfigStore.instance().store(name="toy_schema", node=ToyConfig)


@hydra.main(config_path=str(CONF), config_name="toy", version_base=None)
def main(cfg: DictConfig) -> None:
    from isodiff.analysis.sphere import run_toy  # torch loads once the config is valid

    result = run_toy(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    for name, n in result["settings"].items():
        print(f"{name:15s} " + "  ".join(f"{k} {v:.4f}" for k, v in n.items()))
    print(f"figure: {', '.join(result['figure'])} ({result['seconds']:.0f} s)")


def command() -> None:
    """The `isodiff-toy` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
