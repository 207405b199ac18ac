"""Run an experiment spec end to end: train its grid, evaluate the finished jobs.

Examples:
  python -m isodiff.sweep table_1 tier=smoke                 # every stage, smoke-sized
  python -m isodiff.sweep table_1 tier=quick --plan          # the jobs and metrics, nothing run
  python -m isodiff.sweep table_1 datasets=shapes cluster=slurm_local

Keys: tier=smoke|quick|paper (default quick), datasets=shapes[,mnist], --plan; a spec is a
file of experiments/ (table_1 ... table_7, figure_*); any other key=value is a training
override for every job (python -m isodiff.train --cfg job lists them).

For each dataset: the tier's base model (trained once, shared by every spec), then the
spec's grid as one Hydra multirun of isodiff.train fine-tuned from it, then isodiff.evaluate
of the finished jobs on the metrics their specs show (and their figures draw).
First every job is compiled into the plan (composed and validated: a bad key or value in
a spec stops here, before any folder exists), written to <run_root>/<tier>/plans/<spec>.json;
`--plan` prints it and launches nothing. Launcher overrides (`cluster=slurm_local`,
`hydra/launcher=submitit_local`, ...) go to both stages. `datasets=` launches only those
datasets' jobs (the plan keeps every job; the others show as not run). Idempotent:
finished jobs and computed metrics are skipped by the jobs themselves; a grid whose jobs
are all done is not launched at all. Job outcomes are read from status files, never from
exit codes.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from pathlib import Path

from isodiff import cli
from isodiff.config import PRETRAINED, BaseSource, tier_config
from isodiff.errors import UserError
from isodiff.evaluate.config import metric_of
from isodiff.evaluate.metrics import registry
from isodiff.model import paper_assets
from isodiff.runs.files import RunFileError
from isodiff.runs.status import (
    DONE,
    cause_of,
    is_done,
    job_state,
    open_failures,
    read_metrics,
    read_status,
    stale_metrics,
    verify_base,
)
from isodiff.sweep import plan, progress
from isodiff.sweep.specs import Spec, all_specs, dataset_override, load_spec

log = logging.getLogger("isodiff.sweep")
# The overrides that choose where jobs run: they go to every stage (training, evaluation).
LAUNCHER_KEYS = ("cluster=", "hydra/launcher=", "hydra.launcher.")
POLL_S = 10.0  # how often a running stage's job folders are looked at for progress


def shipped_base(tier: str, dataset: str) -> Path:
    """The base isodiff ships for a dataset at this tier (isodiff/pretrained/<tier>/)."""
    path = PRETRAINED / tier / dataset
    if not (path / "config.json").is_file():
        raise UserError(
            f"no shipped {tier}-tier base for data={dataset} in {path}: train "
            f"it with `make bases TIER={tier}`, or set `tier.bases: trained` in "
            f"conf/tier/{tier}.yaml to pretrain bases in the sweep"
        )
    verify_base(path)  # before any plan is made from it
    return path


def _multirun(module: str, args: list[str], watch: progress.Watch | None = None) -> None:
    """Run a multirun to its end (outcomes come from status files, not its exit code),
    logging the jobs `watch` sees finish meanwhile."""
    cmd = [sys.executable, "-m", module, "-m", *args]
    log.info("$ %s", " ".join(cmd))
    with subprocess.Popen(cmd) as proc:
        while watch is not None:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            finally:
                for line in watch.poll():
                    log.info("%s", line)


def base_stage(datasets: list[str], tier: str, extra: list[str]) -> dict[str, Path]:
    """The tier's base model of each dataset, trained once (one multirun over datasets)."""
    bases = {d: plan.job_dir(plan.base_overrides(d, tier, extra)) for d in datasets}
    pending = [d for d, path in bases.items() if not is_done(path)]
    if pending:
        _multirun("isodiff.train", plan.base_overrides(",".join(pending), tier, extra))
    return bases


def train_stage(
    spec: Spec,
    compiled: plan.Plan,
    root: Path,
    bases: dict[str, Path],
    extra: list[str],
    datasets: list[str],
    watch: progress.Watch | None = None,
) -> None:
    """Train the plan's fine-tunes of the spec on those datasets, one multirun per dataset."""
    tier = compiled.tier
    for dataset in (d for d in spec.datasets_for(tier) if d in datasets):
        dirs = [root / job.folder for job in compiled.finetunes() if job.dataset == dataset]
        if all(is_done(d) for d in dirs):
            continue
        base_dir = bases.get(dataset)
        if (
            base_dir is not None and (base_dir / "status.json").is_file() and not is_done(base_dir)
        ):  # a base trained by the sweep
            log.error(
                "base model %s is not done (%s): skipping %d jobs of %s",
                base_dir,
                job_state(base_dir)[1],
                len(dirs),
                dataset,
            )
            continue
        _multirun(
            "isodiff.train",
            plan.multirun_overrides(
                spec, tier, dataset, None if base_dir is None else str(base_dir), extra
            ),
            watch,
        )


def evaluation_metrics(table: Spec, tier: str) -> set[str]:
    """The isodiff.evaluate metrics a table's jobs need at this tier: those of its values,
    of every figure drawn from its runs, and the quality check every table shows."""
    figures = [s for s in all_specs() if s.kind == "figure" and s.source == table.name]
    return {
        "fid",
        "quality",
        *(metric_of(value) for spec in (table, *figures) for value in spec.metrics_for(tier)),
    }


def _interleaved(dirs: list[Path]) -> list[Path]:
    """Job folders with their datasets (parent folders) taken in turn: jobs that start
    together then build different datasets' caches (FID statistics, attribute
    classifiers) instead of waiting for one."""
    by_dataset: dict[Path, list[Path]] = {}
    for d in dirs:
        by_dataset.setdefault(d.parent, []).append(d)
    return [d for turn in itertools.zip_longest(*by_dataset.values()) for d in turn if d]


def evaluate_stage(
    jobs: dict[Path, set[str]],
    preset: str,
    extra: list[str],
    watch: progress.Watch | None = None,
) -> None:
    """isodiff.evaluate of every finished job on the metrics it needs: one multirun per set
    of metrics (the jobs skip metrics already computed)."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    for run_dir, metrics in jobs.items():
        if is_done(run_dir):
            groups.setdefault(tuple(m for m in registry() if m in metrics), []).append(run_dir)
    for metrics, dirs in groups.items():
        quoted = ",".join(f"'{d}'" for d in _interleaved(dirs))  # folders hold '=' and ','
        _multirun(
            "isodiff.evaluate",
            [f"run={quoted}", f"eval={preset}", f"metrics=[{','.join(metrics)}]", *extra],
            watch,
        )


def compile_plans(
    specs: list[Spec], tier: str, extra: list[str]
) -> tuple[list[plan.Plan], dict[str, Path], Path]:
    """Every job of the specs' tables, composed and validated before anything runs:
    (one plan per table, dataset -> base, the tier's folder)."""
    for spec in specs:
        if spec.kind not in ("table", "figure"):  # kind=claims: judged on other specs' runs
            raise UserError(
                f"spec {spec.name} (kind: {spec.kind}) has no jobs: sweep the "
                "tables it cites, then `python -m isodiff.analysis.claims`"
            )
    settings = tier_config(tier)
    tables = list(
        {
            s.name: s for s in (load_spec(s.source) if s.kind == "figure" else s for s in specs)
        }.values()
    )
    datasets = list(dict.fromkeys(d for s in tables for d in s.datasets_for(tier)))
    trained = settings.bases == BaseSource.trained
    if settings.bases == BaseSource.shipped:
        bases = {d: shipped_base(tier, d) for d in datasets}
    elif trained:
        bases = {d: plan.job_dir(plan.base_overrides(d, tier, extra)) for d in datasets}
    else:
        bases = {}  # given: init_from= among the overrides
    plans = [
        plan.compile_plan(t, tier, bases, trained, sorted(evaluation_metrics(t, tier)), extra)
        for t in tables
    ]
    root = plan.tier_dir(plan.compose_job([f"tier={tier}", *extra], validate=False))
    return plans, bases, root


def plan_for(spec: Spec, tier: str, root: Path) -> plan.Plan:
    """The plan of a table spec's runs under a tier's folder: the one its last sweep wrote,
    or else the one a sweep without extra overrides would compile."""
    return (
        plan.read_plan(root, spec.name)
        or compile_plans([spec], tier, [f"run_root={root.parent}"])[0][0]
    )


def standings(
    compiled: plan.Plan, root: Path, on: progress.Basis, datasets: list[str] | None = None
) -> list[progress.JobStanding]:
    """The plan's jobs (of those datasets; default all) as they stand, with their costs."""
    return [
        progress.standing(job, root / job.folder, on)
        for job in compiled.jobs
        if datasets is None or job.dataset in datasets
    ]


def launched_datasets(plans: list[plan.Plan], only: list[str] | None) -> list[str]:
    """The plans' datasets that a sweep launches: all, or those `datasets=` names."""
    planned = list(dict.fromkeys(job.dataset for p in plans for job in p.finetunes()))
    if only is None:
        return planned
    if unknown := [d for d in only if d not in planned]:
        raise UserError(
            f"datasets={','.join(only)}: {unknown[0]!r} has no job in these "
            f"specs at this tier; use some of {', '.join(planned) or '(none)'}"
        )
    return only


def run_specs(
    specs: list[Spec], tier: str, extra: list[str], only: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """The plans (written beside the runs), then the bases, every spec's training, and one
    evaluation of all their jobs (of the datasets `only` names, default all); returns the
    states of the launched jobs per spec (from status files)."""
    plans, bases, root = compile_plans(specs, tier, extra)
    datasets = launched_datasets(plans, only)
    for dataset in datasets:
        # every preset's assets, before anything is launched (its jobs validated above)
        assets = plan.compose_job(
            [f"tier={tier}", dataset_override(tier, dataset), *extra], validate=False
        ).assets
        paper_assets.require(assets.required, assets.root)
    for compiled in plans:
        log.info("plan: %s", plan.write_plan(compiled, root))
    settings = tier_config(tier)
    on = progress.basis(progress.measure_tier(root).values())
    watches = {}
    for compiled in plans:
        now = standings(compiled, root, on, datasets)
        log.info("%s", progress.headline(compiled.spec, now))
        watches[compiled.spec] = progress.Watch(
            {root / s.job.folder: s.job.metrics for s in now if s.to_train},
            (progress.DONE, progress.EVALUATED, progress.FAILED, progress.INTERRUPTED),
        )
    if bases and settings.bases == BaseSource.trained:
        base_stage([d for d in bases if d in datasets], tier, extra)
    for compiled in plans:
        train_stage(compiled.source, compiled, root, bases, extra, datasets, watches[compiled.spec])
    launched = [
        (compiled, [j for j in compiled.finetunes() if j.dataset in datasets]) for compiled in plans
    ]
    needs: dict[Path, set[str]] = {}
    for _, jobs in launched:
        for job in jobs:
            needs.setdefault(root / job.folder, set()).update(job.metrics)
    # Evaluation takes only the launcher overrides; the rest are training keys.
    launch = [a for a in extra if a.startswith(LAUNCHER_KEYS)]
    lacking = {
        d: sorted(m) for d, m in needs.items() if is_done(d) and progress.to_evaluate(d, sorted(m))
    }
    evaluate_stage(needs, settings.eval, launch, progress.Watch(lacking, (progress.EVALUATED,)))
    counts = {}
    for compiled, jobs in launched:
        states = [_state(root / job.folder) for job in jobs]
        states += released_stage(compiled.source, tier, root, datasets, settings.eval, launch)
        counts[compiled.spec] = {s: states.count(s) for s in sorted(set(states))}
    return counts


def released_stage(
    table: Spec | None, tier: str, root: Path, datasets: list[str], preset: str, launch: list[str]
) -> list[str]:
    """isodiff.evaluate of the table's released models (spec `released:` rows) of these
    datasets, each read where it lies and measured in its folder under <root>/released/
    (found by its files' sha256: one evaluated before is up to date); their states."""
    if table is None or not (
        rows := [r for r in table.released_for(tier) if r.dataset in datasets]
    ):
        return []
    from isodiff.evaluate.released import folder_of  # (loads torch)

    metrics = sorted(evaluation_metrics(table, tier), key=list(registry()).index)
    states = []
    for row in rows:
        _multirun(
            "isodiff.evaluate",
            [
                f"released='{row.model}'",
                *row.data_overrides(),
                f"eval={preset}",
                f"released_tier={tier}",
                f"run_root='{root.parent}'",
                f"metrics=[{','.join(metrics)}]",
                *launch,
            ],
        )
        try:
            folder = folder_of(row.model, root)
        except UserError as err:
            log.error("%s, released %s: %s", table.name, row.label, err)
            folder = None
        states.append(_state(folder) if folder is not None else "not evaluated")
    return states


def _state(run_dir: Path) -> str:
    """done (trained and evaluated, every metric of its weights), or what it lacks; the
    reasons are logged."""
    state, problem = job_state(run_dir)
    if state != DONE:
        if problem:
            log.error("%s: %s", run_dir, problem)
        return state
    try:
        record = read_metrics(run_dir)
    except RunFileError as err:  # does not parse, or has the wrong shape
        log.error("%s", err)
        return "metrics unreadable"
    if record is None:
        return "not evaluated"
    if failed := open_failures(record):  # a failure a later success superseded is gone
        for name, failure in failed.items():
            log.error(
                "%s: evaluation of %s failed%s: %s",
                run_dir,
                name,
                " outside the run" if cause_of(failure) == "environment" else "",
                failure["error"],
            )
        return "evaluation failed"
    if stale := stale_metrics(record, read_status(run_dir)):
        log.error("%s: %s measured other weights: evaluate it again", run_dir, ", ".join(stale))
        return "metrics stale"
    return state


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not argv:
        print(__doc__)
        return 2
    return cli.run(__doc__, argv, _sweep)


def _sweep(argv: list[str]) -> int:
    got = cli.parse_options(argv, ("tier", "datasets"), flags=("--plan",), overrides=True)
    tier = got.values.get("tier", "quick")
    only = got.values["datasets"].strip("[]").split(",") if "datasets" in got.values else None
    specs = [load_spec(n) for n in got.names]
    if "--plan" in got.flags:
        plans, _, root = compile_plans(specs, tier, got.overrides)
        launched = launched_datasets(plans, only)
        print(
            f"# under {root}; nothing is launched (a sweep would launch the jobs of "
            f"{', '.join(launched)})"
        )
        on = progress.basis(progress.measure_tier(root).values())
        print("\n".join(progress.describe(p, standings(p, root, on), on, root) for p in plans))
        return 0
    counts = run_specs(specs, tier, got.overrides, only)
    failed = 0  # jobs not done and evaluated
    for name, states in counts.items():
        shown = ", ".join(
            f"{n} {'done and evaluated' if s == DONE else s}" for s, n in states.items()
        )
        log.info("%s (%s): %d jobs: %s", name, tier, sum(states.values()), shown)
        failed += sum(n for s, n in states.items() if s != DONE)
    return 1 if failed else 0


def command() -> None:
    """The `isodiff-sweep` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
