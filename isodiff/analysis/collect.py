"""List every job of a runs tree: its state, step, loss and problems, from status files.

Examples:
  python -m isodiff.analysis.collect                      # every job under runs/
  python -m isodiff.analysis.collect runs/quick           # one tier's

It takes one folder (default runs) and no keys. In Python, `collect_runs(root)` is one
DataFrame with a row per job (read from status files, never exit codes), its config
flattened to dotted keys and its metric values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from isodiff.runs.files import RunFileError
from isodiff.runs.status import (
    UNREADABLE,
    WEIGHTS_CHANGED,
    cause_of,
    job_state,
    open_failures,
    read_metrics,
    read_status,
    stale_metrics,
)

STATUS_COLUMNS = ["state", "step", "final_loss", "steps_per_s", "attempts", "error"]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: 1,000 runs in ~1 s


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (hashable table keys)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return flat


def metric_values(metrics_json: dict[str, Any]) -> dict[str, float]:
    """metrics.json {"metrics": {metric: {"values": {name: number}, ...}}} -> {name: number}
    (see isodiff.evaluate.measure)."""
    return {
        name: value
        for entry in metrics_json.get("metrics", {}).values()
        for name, value in entry.get("values", {}).items()
    }


def job_row(run_dir: Path) -> dict[str, Any]:
    """A job's row; a file of it that does not parse or has the wrong shape is named in
    `problem` (the job's own problem: collection goes on with the others), a metric that
    failed for a reason outside the run in `environment`."""
    status, problems = read_status(run_dir) or {}, []
    state, problem = job_state(run_dir)
    if state in (UNREADABLE, WEIGHTS_CHANGED):
        problems.append(problem)
    config, cfg = run_dir / "config.yaml", {}
    try:
        loaded = yaml.load(config.read_text(), Loader=_Loader) if config.exists() else {}
        if not isinstance(loaded or {}, dict):  # a hand edit: the row keeps no config
            problems.append(
                f"{config} is unreadable (a YAML {type(loaded).__name__}, not a mapping)"
            )
        else:
            cfg = flatten(loaded or {})
    except yaml.YAMLError as err:
        problems.append(f"{config} is unreadable ({type(err).__name__})")
    try:
        record = read_metrics(run_dir, {})
    except RunFileError as err:  # does not parse, or has the wrong shape
        record = {}
        problems.append(str(err))
    if stale := stale_metrics(record, status):  # never shown as numbers of these weights
        problems.append(f"{', '.join(stale)} measured other weights (evaluate the run again)")
        record = {
            **record,
            "metrics": {k: v for k, v in record["metrics"].items() if k not in stale},
        }
    # A failure of the environment (device, memory) is not the run's problem: listed apart,
    # and not at all once a metric of the same weights and protocol supersedes it.
    failures = open_failures(record)
    problems += [
        f"{name} failed: {failure['error']}"
        for name, failure in failures.items()
        if cause_of(failure) != "environment"
    ]
    environment = [
        f"{name} failed outside the run: {failure['error']} (evaluate it again "
        "where the device and memory are there)"
        for name, failure in failures.items()
        if cause_of(failure) == "environment"
    ]
    return {
        "path": str(run_dir),
        "job": run_dir.name,
        **{k: status.get(k) for k in STATUS_COLUMNS},
        "state": state,  # weights checked
        "problem": "; ".join(problems) or None,
        "environment": "; ".join(environment) or None,
        **{f"cfg.{k}": v for k, v in cfg.items()},
        **metric_values(record),
    }


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per job folder (a folder holding status.json) under root (a tier's folder:
    <run_root>/<tier>, whose plans/ say which runs belong to which table)."""
    rows = [job_row(marker.parent) for marker in sorted(Path(root).rglob("status.json"))]
    df = (
        pd.DataFrame(rows)
        if rows
        else pd.DataFrame(columns=["path", "job", *STATUS_COLUMNS, "problem", "environment"])
    )
    df.attrs["root"] = str(root)  # where tables find the plans of these runs
    return df


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    root = Path(argv[0] if argv else "runs")
    jobs = collect_runs(root)
    if jobs.empty:
        print(f"no jobs under {root}")
        return 1
    shown = ["job", "state", "step", "final_loss", "steps_per_s", "attempts"]
    with pd.option_context("display.width", 160, "display.max_colwidth", 70):
        print(jobs[shown].to_string(index=False))
    failed = jobs[jobs.state == "failed"]
    for _, job in failed.iterrows():
        print(f"FAILED {job.path}: {job.error}")
    for _, job in jobs[jobs.problem.notna()].iterrows():
        print(f"PROBLEM {job.path}: {job.problem}")
    for _, job in jobs[jobs.environment.notna()].iterrows():
        print(f"ENVIRONMENT {job.path}: {job.environment}")
    print(
        f"{(jobs.state == 'done').sum()} done, {len(failed)} failed, "
        f"{(~jobs.state.isin(['done', 'failed'])).sum()} running or not started, under {root}"
    )
    return 0


def command() -> None:
    """The `isodiff-collect` console command."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    command()
