"""`python -m isodiff.sweep <spec> [tier=quick] [launcher overrides]`: run a spec end to end.

For each dataset: the tier's base model (trained once, shared by every spec), then the
spec's grid as one Hydra multirun of isodiff.train fine-tuned from it, then one multirun
of isodiff.evaluate over the finished jobs. Launcher overrides (`cluster=slurm_local`,
`hydra/launcher=submitit_local`, ...) go to both multiruns. Idempotent: finished jobs and
computed metrics are skipped by the jobs themselves; a grid whose jobs are all done is not
launched at all. Job outcomes are read from status files, never from exit codes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from isodiff import runs
from isodiff.config import UserError
from isodiff.specs import EXPERIMENTS, Spec, TierPlan, expand, grid_overrides, load_spec, tier_plan

log = logging.getLogger("isodiff.sweep")
CONF = EXPERIMENTS.parent / "conf"


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


def train_stage(spec: Spec, tier: str, plan: TierPlan, extra: list[str]) -> list[Path]:
    """Train every job of the spec (bases first); returns the job folders in grid order."""
    dirs: list[Path] = []
    for dataset in spec.datasets_for(tier):
        jobs = [j for j in expand(spec, tier) if j.dataset == dataset]
        common = [f"tier={tier}", *plan.finetune, *extra]
        if plan.base is not None:
            base = [f"tier={tier}", "experiment=base", f"data={dataset}", *plan.base, *extra]
            base_dir = job_dir(base)
            if not runs.is_done(base_dir):
                _multirun("isodiff.train", base)
            common.append(f"init_from='{base_dir}'")  # quoted: job folders hold '=' and ','
        common.append(f"experiment={dataset}")
        job_dirs = [job_dir([*common, *j.overrides]) for j in jobs]
        if not all(runs.is_done(d) for d in job_dirs):
            if plan.base is not None and not runs.is_done(base_dir):
                log.error("base model %s is not done (%s): skipping %d jobs of %s", base_dir,
                          (runs.read_status(base_dir) or {}).get("error"), len(jobs), dataset)
            else:
                _multirun("isodiff.train", [*common, *grid_overrides(spec, tier, dataset)])
        dirs += job_dirs
    return dirs


def evaluate_stage(job_dirs: list[Path], preset: str, extra: list[str]) -> None:
    done = [d for d in job_dirs if runs.is_done(d)]
    if done:
        quoted = ",".join(f"'{d}'" for d in done)  # job folders hold '=' and ','
        _multirun("isodiff.evaluate", [f"run={quoted}", f"eval={preset}", *extra])


def run_spec(spec: Spec, tier: str, extra: list[str]) -> dict[str, int]:
    plan = tier_plan(tier)
    job_dirs = train_stage(spec, tier, plan, extra)
    evaluate_stage(job_dirs, plan.eval, extra)
    states = [(runs.read_status(d) or {}).get("state", "missing") for d in job_dirs]
    return {s: states.count(s) for s in sorted(set(states))}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    names, rest = [a for a in argv if "=" not in a], [a for a in argv if "=" in a]
    tier = next((a.split("=", 1)[1] for a in rest if a.startswith("tier=")), "quick")
    extra = [a for a in rest if not a.startswith("tier=")]
    try:
        specs = [load_spec(n) for n in names]
        failed = 0
        for spec in specs:
            if spec.kind == "figure":  # drawn from its source spec's runs
                spec = load_spec(spec.source)
            counts = run_spec(spec, tier, extra)
            log.info("%s (%s): %s", spec.name, tier, counts)
            failed += sum(n for s, n in counts.items() if s != runs.DONE)
    except UserError as err:
        print(f"isodiff.sweep: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
