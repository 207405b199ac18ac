"""One run identity from spec to table: the sweep's plan names every job's folder (by the
keys the spec varies, whole, then a signature that holds no path), everything is validated
before anything runs, and tables take their runs from the plan alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from isodiff.analysis.collect import collect_runs
from isodiff.analysis.synthetic import write_runs
from isodiff.analysis.tables import build_table
from isodiff.errors import ConfigError, UserError
from isodiff.runs import distributed
from isodiff.runs.identity import base_identity
from isodiff.runs.status import DONE, is_done, read_status
from isodiff.sweep import command as sweep
from isodiff.sweep import plan
from isodiff.sweep.specs import load_spec
from isodiff.train.job import run_job
from isodiff.train.loop import train
from tests.conftest import run_cli

SPEC = """\
name: {name}
title: plan check
datasets: [shapes]
overrides: [iso.metric=spherical, iso.window=0.5]
grid: {{{key}: {values}, seed: [0]}}
metrics: [fid]
rows: [data.name, {key}]
"""


def _spec(tmp_path: Path, key: str = "lambda_iso", values: str = "[0, 0.1]") -> Path:
    path = tmp_path / "check.yaml"
    path.write_text(SPEC.format(name="check", key=key, values=values))
    return path


def test_folders_are_named_by_the_keys_the_spec_varies(tmp_path: Path) -> None:
    plans, bases, root = sweep.compile_plans(
        [load_spec("table_1")], "quick", [f"run_root={tmp_path}"]
    )
    (table_1,) = plans
    folders = [job.folder for job in table_1.finetunes()]
    assert len(folders) == 20 and len(set(folders)) == 20
    # train.steps names the folder because a spec (finetune_length) varies it: the value is
    # the recipe's, so Table 1's runs are that spec's runs of the same length
    named = "iso.metric=spherical,iso.window=0.5,lambda_iso={},seed={},train.steps=600-"
    assert folders[0].startswith("shapes/" + named.format(0, 0))
    assert any(f.startswith("mnist/" + named.format(0.1, 4)) for f in folders)
    # the rest of the tier's recipe (optim, batch size, ...) is in config.yaml, not the name
    assert not any("optim" in f or "batch_size" in f for f in folders)
    assert root == tmp_path.resolve() / "quick" and not tmp_path.joinpath("quick").exists()


def test_a_job_shared_by_two_tables_has_one_folder(tmp_path: Path) -> None:
    """Table 1's lambda_iso = 0.1 spherical job is also Table 4's: one folder, trained once."""
    plans, _, _ = sweep.compile_plans(
        [load_spec("table_1"), load_spec("table_4")], "quick", [f"run_root={tmp_path}"]
    )
    table_1, table_4 = ({j.folder for j in p.finetunes()} for p in plans)
    shared = {
        f
        for f in table_1
        if "lambda_iso=0.1,seed=0,train.steps=600-" in f and f.startswith("shapes/")
    }
    assert len(shared) == 1 and shared <= table_4


def test_a_sweep_launches_only_the_datasets_it_names(tmp_path: Path) -> None:
    """`make reproduce` sweeps shapes only: the plan keeps mnist's jobs (the tables list them
    as not run); a dataset the specs do not have is refused by name."""
    plans, _, _ = sweep.compile_plans(
        [load_spec("table_1"), load_spec("table_5")], "quick", [f"run_root={tmp_path}"]
    )
    assert {j.dataset for p in plans for j in p.finetunes()} == {"shapes", "mnist"}
    assert sweep.launched_datasets(plans, None) == ["shapes", "mnist"]
    assert sweep.launched_datasets(plans, ["shapes"]) == ["shapes"]
    with pytest.raises(UserError, match=r"datasets=celeba: 'celeba' has no job .* shapes, mnist"):
        sweep.launched_datasets(plans, ["celeba"])


def test_plan_prints_and_launches_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "isodiff.sweep", str(_spec(tmp_path)), "tier=smoke", f"run_root={tmp_path}/runs", "--plan"
    )
    assert result.returncode == 0, result.stderr
    assert "base     base/data.name=shapes-" in result.stdout
    assert (
        "finetune shapes/iso.metric=spherical,iso.window=0.5,lambda_iso=0.1,seed=0,"
        in result.stdout
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "values", "named"),
    [
        ("iso.windw", "[0.5]", "iso.windw"),  # a misspelt key
        ("optim.lr_schedule", "[cosin]", "optim.lr_schedule"),  # a bad enum value
        ("lambda_iso", "[-1]", "lambda_iso"),  # out of range
    ],
)
def test_a_bad_spec_stops_before_anything_runs(
    key: str, values: str, named: str, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, key, values)
    with pytest.raises(ConfigError, match=named):
        sweep.compile_plans([load_spec(spec)], "smoke", [f"run_root={tmp_path}/runs"])
    result = run_cli("isodiff.sweep", str(spec), "tier=smoke", f"run_root={tmp_path}/runs")
    assert result.returncode == 2 and named in result.stderr and "check" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_base_is_identified_by_signature_or_content_never_by_path(tmp_path: Path) -> None:
    job = tmp_path / "a" / "base" / "data.name=shapes-0123abcd"
    assert base_identity(str(job)) == "run:0123abcd"  # planned, not trained yet
    job.mkdir(parents=True)
    (job / "status.json").write_text("{}")
    moved = tmp_path / "b" / "elsewhere" / job.name
    shutil.copytree(job, moved)
    assert base_identity(str(moved)) == "run:0123abcd"
    shipped = sweep.shipped_base("quick", "shapes")
    copy = tmp_path / "checkpoint"
    shutil.copytree(shipped, copy)
    assert base_identity(str(copy)) == base_identity(str(shipped))
    assert base_identity(str(copy)).startswith("checkpoint:")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert base_identity(str(copy)) != base_identity(str(shipped))
    assert base_identity("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"


def _train_planned(overrides: list[str]) -> Path:
    cfg = plan.compose_job(overrides)
    run_dir = Path(cfg.hydra.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    assert run_job(cfg, run_dir, train)["state"] == DONE
    return run_dir


def test_a_moved_runs_folder_reruns_nothing(tmp_path: Path) -> None:
    """A base and a fine-tune from it, trained under one runs folder, then the folder moved:
    the plan names the same folders, and they are done."""
    spec = load_spec(_spec(tmp_path))
    first = tmp_path / "first" / "runs"
    (compiled,), bases, root = sweep.compile_plans([spec], "smoke", [f"run_root={first}"])
    base = _train_planned(plan.base_overrides("shapes", "smoke", [f"run_root={first}"]))
    assert base == bases["shapes"]
    job = compiled.finetunes()[0]
    common = plan.finetune_common(spec, "smoke", "shapes", str(base), [f"run_root={first}"])
    point = [f"{k}={v}" for k, v in job.point.items()]
    assert _train_planned([*common, "data=shapes", *point]) == root / job.folder
    moved = tmp_path / "second" / "runs"
    shutil.move(tmp_path / "first", tmp_path / "second")
    (again,), bases, root = sweep.compile_plans([spec], "smoke", [f"run_root={moved}"])
    assert [j.folder for j in again.jobs] == [j.folder for j in compiled.jobs]
    assert is_done(bases["shapes"]) and is_done(root / job.folder)
    status = read_status(root / job.folder)
    assert status["attempts"] == 1


def test_a_decoy_run_never_reaches_the_table(tmp_path: Path) -> None:
    """A copy of a finished run with other steps and FID 1234, its config values those of a
    table row: not in the plan, so not in the table."""
    spec = load_spec("table_1")
    dirs = write_runs(tmp_path, spec, "quick")
    before = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    decoy = dirs[0].parent / "lambda_iso=0,seed=0-decoy000"
    shutil.copytree(dirs[0], decoy)
    config = yaml.safe_load((decoy / "config.yaml").read_text())
    config["train"] = {"steps": 999}
    (decoy / "config.yaml").write_text(yaml.safe_dump(config))
    record = json.loads((decoy / "metrics.json").read_text())
    record["metrics"]["fid"]["values"]["fid"] = 1234.0
    (decoy / "metrics.json").write_text(json.dumps(record))
    table = build_table(collect_runs(tmp_path / "quick"), spec, "quick")
    assert table.numbers.equals(before.numbers)
    assert "1234" not in table.display.to_string()


def test_the_best_is_bold_in_the_direction_the_metric_declares(tmp_path: Path) -> None:
    spec = load_spec("table_1")
    spec.metrics = ["fid", "psnr"]
    write_runs(tmp_path, spec, "quick")
    df = collect_runs(tmp_path / "quick")

    def bold_rows(table: object, metric: str) -> list[str]:
        shapes = table.numbers[table.numbers.index.str.startswith("shapes")]
        column = table.display.loc[shapes.index, metric]
        return list(column[column.str.startswith("**")].index)

    table = build_table(df, spec, "quick")
    shapes = table.numbers[table.numbers.index.str.startswith("shapes")]
    assert bold_rows(table, "fid") == [shapes["fid_mean"].idxmin()]
    assert bold_rows(table, "psnr") == [shapes["psnr_mean"].idxmax()]  # higher is better
    spec.lower_is_better = {"fid": False}  # a spec may declare its own direction
    assert bold_rows(build_table(df, spec, "quick"), "fid") == [shapes["fid_mean"].idxmax()]


def test_rank_counts_slurm_tasks_before_torch_knows_of_them() -> None:
    assert distributed.rank({}) == 0
    assert distributed.rank({"RANK": "3"}) == 3
    assert distributed.rank({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}) == 1
    assert distributed.rank({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "1"}) == 0


def test_the_length_curve_reuses_table_1s_runs_at_the_recipes_length(tmp_path: Path) -> None:
    """finetune_length varies train.steps; its jobs at the recipe's 600 steps are Table 1's
    seed-0 jobs (one folder each), so the curve costs only its other lengths."""
    plans, _, _ = sweep.compile_plans(
        [load_spec("table_1"), load_spec("finetune_length")], "quick", [f"run_root={tmp_path}"]
    )
    table_1, curve = ({j.folder for j in p.finetunes()} for p in plans)
    assert len(curve) == 16
    assert sorted(f.split("/")[0] for f in table_1 & curve) == ["mnist"] * 2 + ["shapes"] * 2
    assert all("seed=0,train.steps=600-" in f for f in table_1 & curve)
