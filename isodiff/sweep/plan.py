"""The plan: every job a spec needs at a tier, compiled before anything runs.

Compiling composes each job's config exactly as `python -m isodiff.train` would and
validates it, so a misspelt key or a bad value in a spec stops the sweep before a folder
exists. The plan is written beside the runs (<run_root>/<tier>/plans/<spec>.json) with each
job's folder (relative to <run_root>/<tier>, so the runs can move), signature, stage and
the metrics it needs; tables and figures take their runs from it and from nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from isodiff.cli import one_line
from isodiff.config import compose, to_train_config
from isodiff.errors import ConfigError
from isodiff.runs.files import RunFileError, atomic_write_json, field_problem, read_json
from isodiff.runs.identity import base_identity
from isodiff.sweep.specs import Spec, all_specs, expand, grid_overrides

BASE, FINETUNE = "base", "finetune"


@dataclass(frozen=True)
class PlannedJob:
    folder: str  # <experiment>/<name>-<signature>, relative to <run_root>/<tier>
    stage: str  # base | finetune
    dataset: str
    point: dict[str, Any] = field(default_factory=dict)  # the spec's keys -> values
    metrics: list[str] = field(default_factory=list)  # what isodiff.evaluate computes
    base: str | None = None  # what it fine-tunes: a planned base's folder, or init_from
    model: str | None = None  # model.name: with the stage, which measured jobs it compares to
    steps: int | None = None  # train.steps (None: set by train.epochs, known at launch)


@dataclass
class Plan:
    spec: str
    tier: str
    jobs: list[PlannedJob]
    source: Spec | None = field(default=None, repr=False)  # the spec compiled (not saved)

    def finetunes(self) -> list[PlannedJob]:
        return [job for job in self.jobs if job.stage == FINETUNE]


def compose_job(overrides: list[str], validate: bool = True) -> DictConfig:
    """conf/train.yaml composed with overrides and validated (validate=False: composed
    only, for the keys every job shares); ConfigError names the key."""
    import isodiff.train.command  # noqa: F401  (schemas and the job_name resolver)

    try:
        cfg = compose("train", overrides, hydra_node=True)
        if validate:
            job = cfg.copy()
            with open_dict(job):
                del job["hydra"]
            to_train_config(job)
            _ = cfg.hydra.run.dir  # resolved here: its folder names are checked (folder_part)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from err
    return cfg


def tier_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_root).expanduser().resolve() / cfg.tier.name


def job_dir(overrides: list[str]) -> Path:
    """The folder `python -m isodiff.train <overrides>` writes to (composed, not run)."""
    cfg = compose_job(overrides)
    return Path(cfg.hydra.run.dir).expanduser().resolve()


def base_overrides(data: str, tier: str, extra: list[str]) -> list[str]:
    """The isodiff.train overrides of a tier's base model of `data` (a multirun when `data`
    lists several): the tier's base recipe (conf/recipe/<tier>_base.yaml)."""
    return [
        f"tier={tier}",
        "stage=base",
        "experiment=base",
        f"data={data}",
        "name_keys=[data.name]",
        *extra,
    ]


def name_keys(spec: Spec, tier: str) -> list[str]:
    """The keys that name a fine-tune's folder: those the specs of experiments/ (and this
    one) vary at this tier, sorted, so that a job shared by several tables has one folder
    and runs once, and tier-wide settings stay out of the name."""
    specs = [s for s in all_specs() if s.kind == "table"] + [spec]
    return sorted({k for s in specs for k in s.grid_for(tier)}) or ["data.name"]


def finetune_common(
    spec: Spec, tier: str, dataset: str, base: str | None, extra: list[str]
) -> list[str]:
    """The overrides every fine-tune of a spec's dataset shares (the tier's fine-tune
    recipe, conf/recipe/<tier>_finetune.yaml); the folder is named by name_keys."""
    keys = name_keys(spec, tier)
    common = [
        f"tier={tier}",
        "stage=finetune",
        *extra,
        f"experiment={dataset}",
        f"name_keys=[{','.join(keys)}]",
    ]
    if base is not None:
        common.append(f"init_from='{base}'")  # quoted: job folders hold '=' and ','
    return common


def _relative(path: Path, cfg: DictConfig) -> str:
    return str(path.relative_to(tier_dir(cfg)))


def _sized(cfg: DictConfig) -> dict[str, Any]:
    """What a cost estimate needs of a composed job: its model and its planned steps."""
    steps = cfg.train.steps if cfg.train.get("epochs") is None else None
    return {"model": str(cfg.model.name), "steps": steps}


def compile_plan(
    spec: Spec,
    tier: str,
    bases: dict[str, Path],
    trained: bool,
    metrics: list[str],
    extra: list[str],
) -> Plan:
    """Every job of the spec at this tier (its bases first when the sweep trains them),
    each composed and validated. `bases`: dataset -> the base its fine-tunes start from."""
    jobs: list[PlannedJob] = []
    for dataset in spec.datasets_for(tier):
        base = bases.get(dataset)
        base_ref = None
        if base is not None and trained:  # base: <tier folder>/base/<name>
            base_ref = "/".join(base.parts[-2:])
            sized = _sized(compose_job(base_overrides(dataset, tier, extra), validate=False))
            jobs.append(PlannedJob(base_ref, BASE, dataset, **sized))
        common = finetune_common(spec, tier, dataset, None if base is None else str(base), extra)
        for job in expand(spec, tier):
            if job.dataset != dataset:
                continue
            try:
                cfg = compose_job([*common, *job.overrides])
            except ConfigError as err:
                raise ConfigError(
                    f"spec {spec.name}, job {' '.join(job.overrides)}: {err}"
                ) from err
            folder = _relative(Path(cfg.hydra.run.dir).resolve(), cfg)
            point = dict(o.split("=", 1) for o in job.overrides[1:])  # after the dataset
            jobs.append(
                PlannedJob(
                    folder,
                    FINETUNE,
                    dataset,
                    point,
                    sorted(metrics),
                    base_ref or (None if base is None else base_identity(str(base))),
                    **_sized(cfg),
                )
            )
    return Plan(spec.name, tier, jobs, spec)


def plan_path(tier_root: Path, spec: str) -> Path:
    return tier_root / "plans" / f"{spec}.json"


def write_plan(plan: Plan, tier_root: Path) -> Path:
    """Write the plan (left as it is when unchanged: a repeated sweep rewrites nothing)."""
    path = plan_path(tier_root, plan.spec)
    record = {"spec": plan.spec, "tier": plan.tier, "jobs": [asdict(job) for job in plan.jobs]}
    try:
        before = read_json(path)
    except RunFileError:
        before = None  # a damaged plan is written again
    if before != json.loads(json.dumps(record)):
        atomic_write_json(path, record)
    return path


def _job_problem(index: int, job: Any) -> str | None:
    where = f"jobs[{index}]"
    if not isinstance(job, dict):
        return f"{where} is not an object"
    if unknown := sorted(set(job) - {f.name for f in fields(PlannedJob)}):
        return f"{where} has the unknown key {unknown[0]!r}"
    problem = (
        field_problem(job, "folder", "string", True, f"{where}.")
        or field_problem(job, "dataset", "string", True, f"{where}.")
        or field_problem(job, "point", "object", False, f"{where}.")
        or field_problem(job, "metrics", "list", False, f"{where}.")
        or field_problem(job, "base", "string", False, f"{where}.")
        or field_problem(job, "model", "string", False, f"{where}.")
        or field_problem(job, "steps", "int", False, f"{where}.")
    )
    if problem:
        return problem
    if job.get("stage") not in (BASE, FINETUNE):
        return f"{where}.stage is {job.get('stage')!r}, not {BASE!r} or {FINETUNE!r}"
    folder = Path(job["folder"])  # joined to the tier's folder: it must stay inside it
    if folder.is_absolute() or ".." in folder.parts or not folder.parts:
        return f"{where}.folder {job['folder']!r} is not a folder inside the tier's"
    return None


def plan_problem(record: dict[str, Any]) -> str | None:
    """A plan's shape as read_plan, tables and figures read it (None: fine)."""
    problem = (
        field_problem(record, "spec", "string", required=True)
        or field_problem(record, "tier", "string", required=True)
        or field_problem(record, "jobs", "list", required=True)
    )
    return problem or next(
        (p for i, job in enumerate(record["jobs"]) if (p := _job_problem(i, job))), None
    )


def read_plan(tier_root: Path, spec: str) -> Plan | None:
    """The plan the last sweep of `spec` wrote under tier_root (None: none was written);
    RunFileError, naming the file, when it does not parse, has the wrong shape, or is the
    plan of another spec (the commands that read it stop; a sweep writes it again)."""
    path = plan_path(tier_root, spec)
    record = read_json(path, shape=plan_problem)
    if record is None:
        return None
    if record["spec"] != spec:
        raise RunFileError(
            f"{path} is unreadable (wrong shape: the plan of spec {record['spec']!r}, not {spec!r})"
        )
    return Plan(record["spec"], record["tier"], [PlannedJob(**job) for job in record["jobs"]])


def multirun_overrides(
    spec: Spec, tier: str, dataset: str, base: str | None, extra: list[str]
) -> list[str]:
    """The isodiff.train multirun whose jobs are the plan's fine-tunes of `dataset`."""
    return [
        *finetune_common(spec, tier, dataset, base, extra),
        *grid_overrides(spec, tier, dataset),
    ]
