"""The config of `python -m isodiff.evaluate`, checked before torch loads.

EvalConfig (one preset of conf/eval/) has a section per metric of the registry
(isodiff.evaluate.metrics.registry: each metric module declares its config), so that adding a metric
adds its section here without an edit; EvaluateConfig is the command's config around it.
Light: Hydra, OmegaConf and the metric modules' configs, never torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from isodiff.config import CONF, DataConfig, closest, tier_config
from isodiff.errors import ConfigError
from isodiff.evaluate.metrics import Metric, registry
from isodiff.runs.identity import folder_part


def eval_config_class(metrics: dict[str, Metric]) -> type:
    """The dataclass of an eval preset: its name, one section per metric (eval.<name>: the
    metric's config, enabled or not) and the sample grid's size."""
    fields = [
        ("name", str, field(default="quick")),
        *((m.name, m.config, field(default_factory=m.config)) for m in metrics.values()),
        # samples.png: a grid of this many DDIM samples (eval.grid_steps) from fixed x_T
        ("grid_samples", int, field(default=64)),
        ("grid_steps", int, field(default=50)),
        # CPU only: torch's intra-op threads (null: torch's default). The smoke tier's tiny
        # models gain little from threads and lose several times over when OpenMP threads
        # contend with other processes (as train.cpu_threads)
        ("cpu_threads", int | None, field(default=None)),
    ]
    cls = dataclasses.make_dataclass(
        "EvalConfig",
        fields,
        namespace={
            "__doc__": "One preset of conf/eval/: per-metric sample counts and DDIM "
            "steps (a section per registered metric)."
        },
    )
    cls.__module__ = __name__  # where Hydra's and pickle's lookups find it
    return cls


EvalConfig = eval_config_class(registry())


def value_prefixes() -> dict[str, str]:
    """Which metric writes a value of metrics.json, by name or name prefix (each metric's
    declared values): the values a spec shows say which metrics its jobs need (tests check
    it against a real evaluation)."""
    return {prefix: m.name for m in registry().values() for prefix in m.values}


VALUE_PREFIXES = value_prefixes()


@dataclass
class EvaluateConfig:
    run: str | None = None  # a run directory whose status is done
    # or a model isodiff did not train (isodiff.evaluate.released): a diffusers U-Net or
    # pipeline folder, or a cached hub id, with the data it models (data=<group>)
    released: str | None = None
    data: DataConfig | None = None  # released=: its data, keys as training's (data=shapes)
    # released=: its folder's tier (null: eval's preset name; `tier` is training's group)
    released_tier: str | None = None
    run_root: str = "runs"  # released=: <run_root>/<tier>/released/<name>-<sha256 prefix>
    released_name: str | None = None  # released=: its folder's name (null: the model's)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: bool = True  # the EMA weights (final/unet_ema) when the run has them
    seed: int = 0  # sample i of every metric is seeded by (seed, i)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    metrics: list[str] | None = None  # only these (default: every enabled one)
    refs_dir: str | None = None  # dataset-level caches; default <run>/../../_refs
    force: bool = False  # recompute even when the stored protocol matches
    clip_sample: bool | None = None  # DDIM x0 clipping; null: the run's diffusion.clip_sample
    progress: bool = True
    wait: bool = False  # run= still training: wait for its job to end, then evaluate

    def __post_init__(self) -> None:
        names = list(registry())
        if unknown := set(self.metrics or ()) - set(names):
            near = [n for u in sorted(unknown) if (n := closest(u, names))]
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise ConfigError(f"metrics: unknown {sorted(unknown)}; {hint}use {names}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.eval.cpu_threads is not None and self.eval.cpu_threads < 1:
            raise ConfigError(f"eval.cpu_threads={self.eval.cpu_threads}: use >= 1, or null")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        if (self.run is None) == (self.released is None):
            raise ConfigError(
                "name one model: run=<a run folder> (isodiff's own run), or "
                "released=<a diffusers U-Net or pipeline folder, or a cached "
                "hub id> with data=<its data>"
            )
        if self.released is not None:
            self._check_released()
        elif given := [
            k for k in ("data", "released_tier", "released_name") if getattr(self, k) is not None
        ]:
            raise ConfigError(
                f"{', '.join(given)}: for released= only (a run's data and "
                "folder are its own): drop them"
            )

    def _check_released(self) -> None:
        """released= needs its data; its folder's tier and name are folder names."""
        if self.data is None:
            raise ConfigError(
                f"released={self.released!r} needs the data it models: "
                "data=shapes, data=mnist or data=folder data.root=<images> "
                "(with data.resolution= the model's size)"
            )
        if self.released_tier is None:
            if not (CONF / "tier" / f"{self.eval.name}.yaml").is_file():
                raise ConfigError(
                    f"eval={self.eval.name} is no tier's name: pass "
                    "released_tier= (smoke, quick or paper), the tier whose "
                    "folder holds the released model's"
                )
            self.released_tier = self.eval.name
        tier_config(self.released_tier)  # a tier's name, or ConfigError
        if self.released_name is not None:
            folder_part("released_name", self.released_name)


def metric_of(value: str) -> str:
    """The metric (a name of the registry) that computes `value`; a metric's own name stands
    for itself (figure specs name the metric whose arrays they draw)."""
    metrics, prefixes = registry(), value_prefixes()
    if value in metrics:
        return value
    for prefix, metric in prefixes.items():
        if value.startswith(prefix):
            return metric
    raise ConfigError(
        f"{value!r} is computed by no metric of isodiff.evaluate: name a value "
        f"of metrics.json (prefixes {list(prefixes)}) or a metric "
        f"({list(metrics)})"
    )


def register_schemas() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    """The composed config as an EvaluateConfig, every value checked (ConfigError)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg))
