"""Where a plan stands (issue 27, item 5): each planned job's state read from its folder,
its cost estimated from the done jobs of its kind (never guessed where none measured it),
`--plan` printing both, and the analysis commands saying which spec has no runs and the
sweep that makes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from isodiff import cli
from isodiff.analysis import tables
from isodiff.analysis.claims import write_claims
from isodiff.analysis.index import lacking
from isodiff.analysis.synthetic import write_runs
from isodiff.errors import UserError
from isodiff.runs.status import weights_record
from isodiff.sweep import command as sweep
from isodiff.sweep import progress
from isodiff.sweep.progress import (
    DONE,
    EVALUATED,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    Measured,
    basis,
    estimate,
    measure_tier,
    planned_state,
)
from isodiff.sweep.specs import load_spec
from tests.conftest import run_cli

KIND = ("small", "finetune")


def _job(
    run_dir: Path,
    state: str = "done",
    seconds: dict[str, float | None] | None = None,
    steps: int = 600,
    steps_per_s: float | None = 2.0,
    model: str = "small",
    stage: str = "finetune",
    **status: object,
) -> Path:
    """A job folder as training and evaluation leave it: config.yaml, status.json (done:
    with the weights it records) and metrics.json (each metric's provenance seconds; None:
    a metric stored before seconds were recorded)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model}, "stage": stage}))
    record = {"state": state, **status}
    if state == "done":
        weights = run_dir / "final" / "unet_ema" / "w.safetensors"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"weights")
        record.update(step=steps, steps_per_s=steps_per_s, weights=weights_record(run_dir))
    (run_dir / "status.json").write_text(json.dumps(record))
    if seconds is not None:
        metrics = {
            name: {"values": {name: 1.0}, "provenance": {} if s is None else {"seconds": s}}
            for name, s in seconds.items()
        }
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return run_dir


def test_each_planned_job_has_the_state_its_folder_says(tmp_path: Path) -> None:
    planned = ["fid", "quality"]
    evaluated = _job(tmp_path / "a", seconds={"fid": 30.0, "quality": 20.0})
    done = _job(tmp_path / "b", seconds={"fid": 30.0})
    assert planned_state(evaluated, planned) == (EVALUATED, None)
    assert planned_state(done, planned) == (DONE, "to evaluate: quality")
    assert planned_state(tmp_path / "never", planned) == (PENDING, None)
    assert planned_state(_job(tmp_path / "c", "running"), planned)[0] == RUNNING
    assert planned_state(_job(tmp_path / "d", "interrupted"), planned)[0] == INTERRUPTED
    failed = _job(tmp_path / "e", "failed", error="RuntimeError: boom\ntraceback")
    assert planned_state(failed, planned) == (FAILED, "RuntimeError: boom")
    # a metric that failed since it was stored is to evaluate again
    record = json.loads((evaluated / "metrics.json").read_text())
    record["failed"] = {"quality": {"error": "ValueError: x", "when": "9999"}}
    (evaluated / "metrics.json").write_text(json.dumps(record))
    assert planned_state(evaluated, planned) == (DONE, "to evaluate: quality")
    # weights that changed after the job ended: it trains again
    (done / "final" / "unet_ema" / "w.safetensors").write_bytes(b"other weights!")
    state, why = planned_state(done, planned)
    assert state == PENDING and "w.safetensors" in why


def test_the_estimate_rests_on_the_medians_of_measured_jobs_of_the_same_kind() -> None:
    measured = [
        Measured(KIND, 600, rate, {"fid": s}) for rate, s in ((1.0, 10.0), (2.0, 20.0), (4.0, 90.0))
    ] + [Measured(("small", "base"), 8000, 100.0, {"fid": 1.0, "rtl": 5.0})]
    on = basis(measured)
    assert on.rate[KIND] == 2.0 and on.jobs[KIND] == 3 and on.seconds[(KIND, "fid")] == 20.0
    cost = estimate(KIND, 600, True, ["fid"], on)
    assert (cost.train_s, cost.eval_s, cost.unmeasured) == (300.0, 20.0, [])
    # rtl was measured only on bases: for a fine-tune it is unmeasured, not borrowed
    cost = estimate(KIND, 600, False, ["fid", "rtl"], on)
    assert (cost.train_s, cost.eval_s, cost.unmeasured) == (0.0, 20.0, ["rtl"])
    assert estimate(("tiny", "finetune"), 600, True, [], on).unmeasured == ["training"]
    assert estimate(KIND, None, True, [], on).unmeasured == ["training"]  # train.epochs


def test_measurements_are_read_from_status_and_metrics_files(tmp_path: Path) -> None:
    a = _job(tmp_path / "x" / "a", seconds={"fid": 30.0, "quality": None}, steps_per_s=3.0)
    _job(tmp_path / "x" / "b", "failed")  # not done: measures nothing
    found = measure_tier(tmp_path)
    assert list(found) == [a]
    assert found[a] == Measured(KIND, 600, 3.0, {"fid": 30.0})  # no seconds: not a zero
    assert found[a].train_s == 200.0


def test_plan_prints_each_jobs_state_and_the_plans_cost(tmp_path: Path) -> None:
    spec = tmp_path / "check.yaml"
    spec.write_text(
        "name: check\ntitle: state check\ndatasets: [shapes]\n"
        "overrides: [iso.metric=spherical, iso.window=0.5]\n"
        "grid: {lambda_iso: [0, 0.1, 0.2], seed: [0]}\nmetrics: [fid]\n"
        "rows: [data.name, lambda_iso]\n"
    )
    runs = tmp_path / "runs"
    ((compiled,), _, root) = sweep.compile_plans([load_spec(spec)], "smoke", [f"run_root={runs}"])
    base, *jobs = compiled.jobs
    assert jobs[0].model and jobs[0].steps  # the plan records what an estimate needs
    model, steps = jobs[0].model, jobs[0].steps
    _job(root / base.folder, model=model, stage="base", steps=40, steps_per_s=4.0, seconds={})
    kw = {"model": model, "steps": steps, "steps_per_s": steps / 300}  # 5 min a job
    _job(root / jobs[0].folder, seconds={"fid": 120.0, "quality": 60.0}, **kw)
    _job(root / jobs[1].folder, seconds={"fid": 240.0}, **kw)
    result = run_cli("isodiff.sweep", str(spec), "tier=smoke", f"run_root={runs}", "--plan")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "check (tier smoke): 4 jobs: 1 evaluated, 2 done, 1 pending" in out
    minutes = "5 min"
    assert f"trained in {minutes}, evaluated in 3 min" in out  # its own: 120 + 60 s
    assert "evaluated in 4 min, evaluate quality ~1 min" in out  # its missing metric
    assert f"train ~{minutes}, evaluate ~4 min" in out  # the pending job: medians 180 + 60 s
    assert f"to do: 1 to train (~{minutes} est.), 2 to evaluate (~5 min est.)" in out
    assert f"finetune: 2 measured jobs, median {steps / 300:.3g} steps/s" in out
    assert "base: 1 measured jobs, median 4 steps/s" in out


def test_plan_of_a_tree_without_measurements_says_unmeasured(tmp_path: Path) -> None:
    ((compiled,), _, root) = sweep.compile_plans(
        [load_spec("table_3")], "smoke", [f"run_root={tmp_path}"]
    )
    on = progress.basis(progress.measure_tier(root).values())
    now = sweep.standings(compiled, root, on)
    assert {s.state for s in now} == {PENDING}
    line = progress.headline("table_3", now)
    assert line.startswith(f"table_3: {len(compiled.jobs)} jobs, 0 done, {len(now)} to train,")
    assert line.endswith("unmeasured") and "training" in line and "est." not in line
    text = progress.describe(compiled, now, on, root)
    assert "no measured job" in text and "done: 0 jobs" in text


def test_a_sweep_reports_each_job_as_it_finishes(tmp_path: Path) -> None:
    jobs = {tmp_path / "shapes" / f"j{i}": ["fid"] for i in range(2)}
    watch = progress.Watch(jobs, (DONE, EVALUATED, FAILED, INTERRUPTED))
    assert watch.poll() == []
    first, second = jobs
    _job(first, steps=600, steps_per_s=2.0)
    assert watch.poll() == ["[1/2] shapes/j0 done (trained in 5 min)"]
    assert watch.poll() == []  # reported once
    _job(second, "failed", error="ValueError: bad")
    assert watch.poll() == ["[2/2] shapes/j1 failed: ValueError: bad"]


@pytest.mark.parametrize("module", ["isodiff.analysis.tables", "isodiff.analysis.figures"])
def test_a_requested_spec_without_runs_fails_with_the_sweep_that_makes_them(
    module: str, tmp_path: Path
) -> None:
    write_runs(tmp_path / "runs", load_spec("table_3"), "smoke")  # runs, of another table
    name = "table_4" if module.endswith("tables") else "figure_4"
    args = ["tier=smoke", f"run_root={tmp_path}/runs", f"out={tmp_path}/o"]
    result = run_cli(module, *args, name)
    assert result.returncode == 2, result.stderr
    assert f"python -m isodiff.sweep {name} tier=smoke run_root={tmp_path}/runs" in result.stderr
    assert "table_4" in result.stderr and not (tmp_path / "o").exists()


def test_all_tables_skip_the_specs_without_runs_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_runs(tmp_path / "runs", load_spec("table_3"), "smoke")
    specs = [load_spec(n) for n in ("table_1", "table_3", "table_4")]  # all, as far as it knows
    monkeypatch.setattr(tables, "all_specs", lambda: specs)
    written = tables.render_all(tmp_path / "runs", "smoke", tmp_path / "o")
    assert {p.name for p in written} == {"table_3.md", "table_3.tex", "table_3.csv"}
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"no runs yet under {tmp_path}/runs/smoke for table_1, table_4: ")
    assert line.endswith(
        f"`python -m isodiff.sweep <spec> tier=smoke run_root={tmp_path}/runs` makes them"
    )


def test_claims_named_without_runs_are_refused_and_the_index_says_what_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_runs(tmp_path / "runs", load_spec("table_3"), "smoke")
    with pytest.raises(UserError, match=r"table_1: no runs under .*isodiff.sweep table_1 tier"):
        write_claims(tmp_path / "runs", "smoke", tmp_path / "o", ["liso"])
    assert not (tmp_path / "o").exists()
    args = cli.parse([f"run_root={tmp_path}/runs", "tier=smoke", f"out={tmp_path}/o"])
    tables.render_all(args.run_root, "smoke", args.out, ["table_3"])
    options = f"tier=smoke run_root={tmp_path}/runs out={tmp_path}/o"
    assert lacking(args) == [
        f"no claims register yet: `python -m isodiff.analysis.claims {options}`",
        f"no figures yet: `python -m isodiff.analysis.figures {options}`",
    ]


def test_a_named_figure_with_runs_but_nothing_to_draw_says_so_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from isodiff.analysis import figures

    write_runs(tmp_path / "runs", load_spec("table_4"), "smoke")  # no eval/rtl.npz to draw
    args = [f"run_root={tmp_path}/runs", "tier=smoke", f"out={tmp_path}/o", "figure_4"]
    assert figures.main(args) == 1
    assert capsys.readouterr().out.startswith(
        "figure_4: nothing to draw: no done run of table_4 stores what it draws; "
        f"`python -m isodiff.sweep figure_4 tier=smoke run_root={tmp_path}/runs` evaluates them"
    )
