"""`python -m isodiff.sweep` end to end on the smoke tier: a spec becomes trained and
evaluated jobs, and an evaluated released model, then a table; re-running is idempotent;
a lost status reruns exactly that job; a failing job shows as missing, with its reason,
beside filled cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_released import save_model

pytestmark = pytest.mark.slow

SPEC = """\
name: {name}
title: sweep check
datasets: [shapes]
overrides: [iso.metric=spherical, iso.window=0.5]
grid: {{lambda_iso: {lambdas}, seed: [0]}}
metrics: [fid, mrtl]
rows: [data.name, lambda_iso]
"""
# A model isodiff did not train, saved outside any run folder: a row beside the runs
RELEASED = """\
released:
  - {{label: released DDPM, model: {model}, dataset: shapes,
     data: [data=shapes, data.resolution=16, data.size=256]}}
"""


def _spec(tmp_path: Path, name: str, lambdas: str, released: Path | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = SPEC.format(name=name, lambdas=lambdas)
    path.write_text(text + (RELEASED.format(model=released) if released else ""))
    return path


def _snapshot(run_root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file of every job, by path."""
    return {
        str(p.relative_to(run_root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in run_root.rglob("*")
        if p.is_file() and "multirun.yaml" not in p.name
    }


def _sweep(spec: Path, run_root: Path):
    # the launcher of `make reproduce`: a local pool, for training and evaluation alike
    return run_cli(
        "isodiff.sweep",
        str(spec),
        "tier=smoke",
        f"run_root={run_root}",
        "cluster=local_pool",
        timeout=600,
    )


def _table(spec: Path, run_root: Path, out: Path) -> str:
    proc = run_cli(
        "isodiff.analysis.tables", str(spec), "tier=smoke", f"run_root={run_root}", f"out={out}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / "smoke" / "tables" / f"{spec.stem}.md").read_text()


def test_sweep_trains_evaluates_is_idempotent_and_reports_failures(tmp_path: Path) -> None:
    run_root, out = tmp_path / "runs", tmp_path / "results"
    released = save_model(tmp_path / "elsewhere" / "ddpm")
    spec = _spec(tmp_path, "check", "[0, 0.1]", released)
    proc = _sweep(spec, run_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (run_root / "smoke" / "shapes").glob("*/status.json"))
    assert len(jobs) == 2
    # the released model was measured by the sweep in a folder of its own, by its sha256
    (measured,) = (run_root / "smoke" / "released").glob("*/metrics.json")
    assert {"fid", "rtl"} <= set(json.loads(measured.read_text())["metrics"])
    table = _table(spec, run_root, out)
    rows = [line for line in table.splitlines() if line.startswith("| shapes")]
    assert len(rows) == 3 and "| row | fid | mrtl |" in table
    assert any("released DDPM" in row for row in rows), table
    assert all("–" not in row for row in rows), table  # every cell filled
    # only the metrics of the spec's values and the quality check were evaluated (it has
    # no figures); four smoke steps do not make a model that generates, and the row says so
    for job in jobs:
        assert set(json.loads((job / "metrics.json").read_text())["metrics"]) == {
            "fid",
            "rtl",
            "quality",
        }
    assert all("**fails** (1/1): FID" in row for row in rows), table

    before = _snapshot(run_root)
    assert _sweep(spec, run_root).returncode == 0
    assert _snapshot(run_root) == before  # nothing trained, evaluated or rewritten

    (jobs[1] / "status.json").unlink()
    assert _sweep(spec, run_root).returncode == 0
    after = _snapshot(run_root)
    changed = {Path(k).parts[2] for k in set(after) | set(before) if after.get(k) != before.get(k)}
    assert changed == {jobs[1].name}, changed

    failing = _spec(tmp_path, "check_fail", "[0, 0.1, .inf]")  # a non-finite loss
    proc = _sweep(failing, run_root)
    assert proc.returncode == 1
    table = _table(failing, run_root, out)
    assert "missing: " in table and "NonFiniteLossError" in table
    filled = [
        line for line in table.splitlines() if line.startswith("| shapes") and "–" not in line
    ]
    assert len(filled) == 2, table
