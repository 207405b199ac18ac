"""Experiment specs (experiments/*.yaml): one declarative file per paper table or figure.

A spec names its sweep (grid of training overrides per dataset, per tier where they
differ), the metrics, how rows are keyed and labelled, and the paper's values. The same
spec drives running (isodiff.sweep) and rendering (analysis.tables / analysis.figures).
What a tier does for every spec (where bases come from, the base and fine-tune recipes,
the evaluation preset) lives in conf/tier/<tier>.yaml and conf/recipe/<tier>_<stage>.yaml.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from isodiff.config import closest, shipped, tier_config
from isodiff.errors import ConfigError

EXPERIMENTS = shipped("experiments")


@dataclass
class SpecTier:
    """Per-tier replacements of a spec's datasets, grid axes and metrics."""

    datasets: list[str] | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    metrics: list[str] | None = None


DIRECTIONS = ("lower", "higher", "at_most")
SMALLEST_KINDS = ("relative", "absolute")


@dataclass
class Claim:
    """One claim of the paper (kind=claims): the metric that tests it, its direction (lower
    or higher is the claimed gain; at_most: the metric, lower-is-better, rises by at most
    the smallest effect) and the smallest effect that counts ({relative: fraction of the
    baseline's mean} or {absolute: in the metric's units}), judged on the runs of `source`:
    `treatment` vs `baseline` (grid key -> value; default: the source's control vs every
    other arm)."""

    id: str
    text: str
    metric: str
    direction: str
    smallest: dict[str, float]
    source: str | None = None  # a table spec; None: table_1
    treatment: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None


@dataclass
class ReleasedRow:
    """A model isodiff did not train, as a row of a table beside its runs
    (isodiff.evaluate.released): `model` a diffusers U-Net or pipeline folder, or a cached hub
    id; `dataset` the spec's dataset whose rows it joins; `data` the evaluate overrides of
    the data it models (default data=<dataset>); `label` its row's label. The sweep
    evaluates it (`released=<model> <data>`), tables find its folder by its files' sha256."""

    label: str
    model: str
    dataset: str
    data: list[str] = field(default_factory=list)

    def data_overrides(self) -> list[str]:
        return self.data or [f"data={self.dataset}"]


@dataclass
class Spec:
    name: str
    title: str
    kind: str = "table"  # table | figure | claims
    datasets: list[str] = field(default_factory=lambda: ["shapes"])
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    tiers: dict[str, SpecTier] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)  # values shown; a figure: its metric
    rows: list[str] = field(default_factory=list)  # config keys that make a row
    released: list[ReleasedRow] = field(default_factory=list)  # models isodiff did not train
    row_labels: dict[str, str] = field(default_factory=dict)  # "k=v,k=v" -> label
    # Row keys of the control (e.g. {lambda_iso: 0}): tables add every other row's paired
    # difference from it (same seed and other row keys), mean ± standard error.
    control: dict[str, Any] = field(default_factory=dict)
    lower_is_better: dict[str, bool] = field(default_factory=dict)
    paper: dict[str, dict[str, float | None]] = field(default_factory=dict)
    paper_source: str = ""
    figure: str | None = None  # kind=figure: the plot (analysis.figures.PLOTS)
    source: str | None = None  # kind=figure: the table spec whose runs it draws
    array: str | None = None  # kind=figure: the array of eval/<metric>.npz a picture shows
    notes: list[str] = field(default_factory=list)
    # Not part of `make reproduce`: rendered only once one of its jobs exists (or when named)
    on_demand: bool = False
    claims: list[Claim] = field(default_factory=list)  # kind=claims (analysis.claims)
    rule: str = ""  # kind=claims: how a claim's verdict follows from its runs

    def datasets_for(self, tier: str) -> list[str]:
        """The spec's datasets at a tier ([]: the spec has no jobs at that tier)."""
        override = self.tiers.get(tier)
        return override.datasets if override and override.datasets is not None else self.datasets

    def released_for(self, tier: str) -> list[ReleasedRow]:
        """The released models among the spec's rows at a tier (of its datasets there)."""
        return [r for r in self.released if r.dataset in self.datasets_for(tier)]

    def metrics_for(self, tier: str) -> list[str]:
        override = self.tiers.get(tier)
        return override.metrics if override and override.metrics else self.metrics

    def grid_for(self, tier: str) -> dict[str, list[Any]]:
        override = self.tiers.get(tier)
        return {**self.grid, **(override.grid if override else {})}


@dataclass(frozen=True)
class Job:
    """One training job of a spec: its overrides and its position in the grid."""

    dataset: str
    overrides: tuple[str, ...]
    point: tuple[tuple[str, Any], ...]  # (grid key, value) pairs


def _load(node: Any, schema: type, where: str) -> Any:
    """A YAML node validated against a schema; errors name the file and the key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {err}") from err


def load_spec(name_or_path: str | Path) -> Spec:
    """A spec by name (experiments/<name>.yaml) or path, validated against the schema."""
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "tiers")
        near = closest(str(name_or_path), names)
        hint = f"did you mean {near}? " if near else ""
        raise ConfigError(
            f"spec {str(name_or_path)!r} not found; {hint}known specs: {', '.join(names)}"
        )
    spec = _load(OmegaConf.load(path), Spec, str(path))
    for i, claim in enumerate(spec.claims):
        _check_claim(claim, f"{path}: claims[{i}]")
    return spec


def _check_claim(claim: Claim, where: str) -> None:
    """What the schema cannot say of a claim: its direction and one kind of smallest effect;
    ConfigError naming the key (`where` is the file and the claim's index)."""
    which = f"(claim {claim.id!r})"
    if claim.direction not in DIRECTIONS:
        raise ConfigError(
            f"{where}.direction: {claim.direction!r} is not one of {', '.join(DIRECTIONS)} {which}"
        )
    if len(claim.smallest) != 1 or next(iter(claim.smallest)) not in SMALLEST_KINDS:
        raise ConfigError(
            f"{where}.smallest: give exactly one of {{relative: x}} or "
            f"{{absolute: x}}, not {dict(claim.smallest)} {which}"
        )
    if not next(iter(claim.smallest.values())) > 0:
        raise ConfigError(f"{where}.smallest: the smallest effect must be > 0 {which}")


def all_specs() -> list[Spec]:
    return [load_spec(p) for p in sorted(EXPERIMENTS.glob("*.yaml")) if p.stem != "tiers"]


def format_value(value: Any) -> str:
    """A grid value as a Hydra override value."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def canonical(value: Any) -> str:
    """A value compared across specs, overrides and saved configs: "0", 0 and 0.0 agree."""
    if isinstance(value, bool):
        return str(value).lower()
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def dataset_override(tier: str, dataset: str) -> str:
    """The override a spec's dataset stands for at this tier: data=<name>, or at the paper
    tier preset=<name> (tier.dataset_group)."""
    return f"{tier_config(tier).dataset_group}={dataset}"


def grid_overrides(spec: Spec, tier: str, dataset: str) -> list[str]:
    """The Hydra multirun arguments whose cartesian product is the dataset's jobs."""
    return [
        dataset_override(tier, dataset),
        *spec.overrides,
        *(
            f"{k}={','.join(format_value(v) for v in values)}"
            for k, values in spec.grid_for(tier).items()
        ),
    ]


def expand(spec: Spec, tier: str) -> list[Job]:
    """Every training job of the spec at this tier, in grid order."""
    grid = spec.grid_for(tier)
    keys = list(grid)
    jobs = []
    for dataset in spec.datasets_for(tier):
        for values in itertools.product(*(grid[k] for k in keys)):
            point = tuple(zip(keys, values, strict=True))
            overrides = (
                dataset_override(tier, dataset),
                *spec.overrides,
                *(f"{k}={format_value(v)}" for k, v in point),
            )
            jobs.append(Job(dataset, overrides, point))
    return jobs
