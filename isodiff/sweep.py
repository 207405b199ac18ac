"""`python -m isodiff.sweep <spec> [tier=quick] [launcher overrides]`: run a spec end to end.

For each dataset: the tier's base model (trained once, shared by every spec), then the
spec's grid as one Hydra multirun of isodiff.train fine-tuned from it, then isodiff.evaluate
of the finished jobs on the metrics their specs show (and their figures draw).
Launcher overrides (`cluster=slurm_local`, `hydra/launcher=submitit_local`, ...) go to
both stages. Idempotent: finished jobs and computed metrics are skipped by the jobs
themselves; a grid whose jobs are all done is not launched at all. Job outcomes are read
from status files, never from exit codes.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from isodiff import runs
from isodiff.config import UserError
from isodiff.evaluation import METRICS, metric_of
from isodiff.specs import (
    EXPERIMENTS,
    Spec,
    TierPlan,
    all_specs,
    expand,
    grid_overrides,
    load_spec,
    tier_plan,
)

log = logging.getLogger("isodiff.sweep")
CONF = EXPERIMENTS.parent / "conf"
# The overrides that choose where jobs run: they go to every stage (training, evaluation).
LAUNCHER_KEYS = ("cluster=", "hydra/launcher=", "hydra.launcher.")
PRETRAINED = Path(__file__).resolve().parent / "pretrained"


def shipped_base(tier: str, dataset: str) -> Path:
    """The base isodiff ships for a dataset at this tier (isodiff/pretrained/<tier>/)."""
    path = PRETRAINED / tier / dataset
    if not (path / "config.json").is_file():
        raise UserError(f"no shipped {tier}-tier base for data={dataset} in {path}: train "
                        f"it with `make bases TIER={tier}`, or add `shipped: false` to the "
                        f"tier's plan in experiments/tiers.yaml to pretrain bases in the sweep")
    return path


def job_dir(overrides: list[str]) -> Path:
    """The folder `python -m isodiff.train <overrides>` writes to (composed, not run)."""
    import isodiff.train  # noqa: F401  (schemas and the job_name resolver)

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return Path(cfg.hydra.run.dir).resolve()


def _multirun(module: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", module, "-m", *args]
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=False)  # outcomes come from status files


def base_overrides(data: str, tier: str, plan: TierPlan, extra: list[str]) -> list[str]:
    """The isodiff.train overrides of a tier's base model of `data`."""
    return [f"tier={tier}", "experiment=base", f"data={data}", *(plan.base or []), *extra]


def base_stage(datasets: list[str], tier: str, plan: TierPlan, extra: list[str]
               ) -> dict[str, Path]:
    """The tier's base model of each dataset, trained once (one multirun over datasets)."""
    bases = {d: job_dir(base_overrides(d, tier, plan, extra)) for d in datasets}
    pending = [d for d, path in bases.items() if not runs.is_done(path)]
    if pending:
        _multirun("isodiff.train", base_overrides(",".join(pending), tier, plan, extra))
    return bases


def train_stage(spec: Spec, tier: str, plan: TierPlan, bases: dict[str, Path],
                extra: list[str]) -> list[Path]:
    """Train every job of the spec, one multirun per dataset; returns the job folders."""
    dirs: list[Path] = []
    for dataset in spec.datasets_for(tier):
        jobs = [j for j in expand(spec, tier) if j.dataset == dataset]
        common = [f"tier={tier}", *plan.finetune, *extra]
        base_dir = bases.get(dataset)
        if base_dir is not None:
            common.append(f"init_from='{base_dir}'")  # quoted: job folders hold '=' and ','
        common.append(f"experiment={dataset}")
        job_dirs = [job_dir([*common, *j.overrides]) for j in jobs]
        dirs += job_dirs
        if all(runs.is_done(d) for d in job_dirs):
            continue
        if base_dir is not None and (base_dir / "status.json").is_file() \
                and not runs.is_done(base_dir):  # a base trained by the sweep
            log.error("base model %s is not done (%s): skipping %d jobs of %s", base_dir,
                      (runs.read_status(base_dir) or {}).get("error"), len(jobs), dataset)
            continue
        _multirun("isodiff.train", [*common, *grid_overrides(spec, tier, dataset)])
    return dirs


def evaluation_metrics(table: Spec, tier: str) -> set[str]:
    """The isodiff.evaluate metrics a table's jobs need at this tier: those of its values,
    of every figure drawn from its runs, and the quality check every table shows."""
    figures = [s for s in all_specs() if s.kind == "figure" and s.source == table.name]
    return {"fid", "quality", *(metric_of(value) for spec in (table, *figures)
                                for value in spec.metrics_for(tier))}


def _interleaved(dirs: list[Path]) -> list[Path]:
    """Job folders with their datasets (parent folders) taken in turn: jobs that start
    together then build different datasets' caches (FID statistics, attribute
    classifiers) instead of waiting for one."""
    by_dataset: dict[Path, list[Path]] = {}
    for d in dirs:
        by_dataset.setdefault(d.parent, []).append(d)
    return [d for turn in itertools.zip_longest(*by_dataset.values()) for d in turn if d]


def evaluate_stage(jobs: dict[Path, set[str]], preset: str, extra: list[str]) -> None:
    """isodiff.evaluate of every finished job on the metrics it needs: one multirun per set
    of metrics (the jobs skip metrics already computed)."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    for run_dir, metrics in jobs.items():
        if runs.is_done(run_dir):
            groups.setdefault(tuple(m for m in METRICS if m in metrics), []).append(run_dir)
    for metrics, dirs in groups.items():
        quoted = ",".join(f"'{d}'" for d in _interleaved(dirs))  # folders hold '=' and ','
        _multirun("isodiff.evaluate", [f"run={quoted}", f"eval={preset}",
                                       f"metrics=[{','.join(metrics)}]", *extra])


def run_specs(specs: list[Spec], tier: str, extra: list[str]) -> dict[str, dict[str, int]]:
    """Bases, then every spec's training, then one evaluation of all their jobs; returns
    the job states per spec (from status files)."""
    plan = tier_plan(tier)
    tables = list({s.name: s for s in (load_spec(s.source) if s.kind == "figure" else s
                                       for s in specs)}.values())
    datasets = list(dict.fromkeys(d for s in tables for d in s.datasets_for(tier)))
    if plan.shipped:
        bases = {d: shipped_base(tier, d) for d in datasets}
    else:
        bases = base_stage(datasets, tier, plan, extra) if plan.base is not None else {}
    job_dirs = {s.name: train_stage(s, tier, plan, bases, extra) for s in tables}
    needs: dict[Path, set[str]] = {}
    for spec in tables:
        for run_dir in job_dirs[spec.name]:
            needs.setdefault(run_dir, set()).update(evaluation_metrics(spec, tier))
    # Evaluation takes only the launcher overrides; the rest are training keys.
    launch = [a for a in extra if a.startswith(LAUNCHER_KEYS)]
    evaluate_stage(needs, plan.eval, launch)
    counts = {}
    for name, dirs in job_dirs.items():
        states = [_state(d) for d in dirs]
        counts[name] = {s: states.count(s) for s in sorted(set(states))}
    return counts


def _state(run_dir: Path) -> str:
    """done (trained and evaluated, every metric of its weights), or what it lacks; the
    reasons are logged."""
    state, problem = runs.job_state(run_dir)
    if state != runs.DONE:
        if problem:
            log.error("%s: %s", run_dir, problem)
        return state
    try:
        record = runs.read_json(run_dir / "metrics.json")
    except runs.RunFileError as err:
        log.error("%s", err)
        return "metrics unreadable"
    if record is None:
        return "not evaluated"
    if failed := record.get("failed"):
        for name, failure in failed.items():
            log.error("%s: evaluation of %s failed: %s", run_dir, name, failure.get("error"))
        return "evaluation failed"
    if stale := runs.stale_metrics(record, runs.read_status(run_dir)):
        log.error("%s: %s measured other weights: evaluate it again", run_dir, ", ".join(stale))
        return "metrics stale"
    return state


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    names, rest = [a for a in argv if "=" not in a], [a for a in argv if "=" in a]
    tier = next((a.split("=", 1)[1] for a in rest if a.startswith("tier=")), "quick")
    extra = [a for a in rest if not a.startswith("tier=")]
    try:
        counts = run_specs([load_spec(n) for n in names], tier, extra)
    except UserError as err:
        print(f"isodiff.sweep: {err}", file=sys.stderr)
        return 2
    failed = 0  # jobs not done and evaluated
    for name, states in counts.items():
        log.info("%s (%s): %s", name, tier, states)
        failed += sum(n for s, n in states.items() if s != runs.DONE)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
