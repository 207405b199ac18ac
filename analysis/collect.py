"""Walk a runs tree into one DataFrame: a row per job, from status files (never exit codes).

    python -m analysis.collect [runs/quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from isodiff.runs import read_status

STATUS_COLUMNS = ["state", "step", "final_loss", "steps_per_s", "attempts", "error", "updated"]


def collect_jobs(root: str | Path) -> pd.DataFrame:
    """One row per job folder (a folder holding status.json) under root."""
    rows = []
    for marker in sorted(Path(root).rglob("status.json")):
        status = read_status(marker.parent)
        rows.append({"path": str(marker.parent), "job": marker.parent.name,
                     **{k: status.get(k) for k in STATUS_COLUMNS}})
    return pd.DataFrame(rows, columns=["path", "job", *STATUS_COLUMNS])


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "runs")
    jobs = collect_jobs(root)
    if jobs.empty:
        print(f"no jobs under {root}")
        return 1
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(jobs.drop(columns=["path", "error", "updated"]).to_string(index=False))
    failed = jobs[jobs.state == "failed"]
    for _, job in failed.iterrows():
        print(f"FAILED {job.path}: {job.error}")
    print(f"{(jobs.state == 'done').sum()} done, {len(failed)} failed, "
          f"{(~jobs.state.isin(['done', 'failed'])).sum()} running or not started, under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
