"""Faults and bad input, as an adversary tries them: a damaged checkpoint is skipped on
resume, diverged weights are never marked done or measured, an unreadable run file is that
run's problem alone, and every bad value ends in one line, exit 2, with no folder made."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from isodiff.analysis.collect import collect_runs
from isodiff.analysis.tables import spec_rows
from isodiff.errors import UserError
from isodiff.evaluate import measure
from isodiff.evaluate.metrics.common import MetricResult
from isodiff.runs import files
from isodiff.runs.files import _fsync, atomic_write_json, read_json, replace_durably
from isodiff.runs.identity import require_inside
from isodiff.runs.status import DONE, RUNNING, UNREADABLE, read_status, weights_record, write_status
from isodiff.sweep.plan import FINETUNE, Plan, PlannedJob, write_plan
from isodiff.sweep.specs import load_spec
from isodiff.train.loop import DivergedWeightsError
from tests.conftest import refusal, run_cli, run_train_job
from tests.test_evaluate import compose_evaluate

# train.steps=6 with a checkpoint every 2 steps keeps step 2 and step 4 (the end is final/)
RESUMABLE = [
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.grid_samples=0",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_dir = run_train_job(RESUMABLE, tmp_path_factory.mktemp("ref") / "runs")
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "unet_ema" / "diffusion_pytorch_model.safetensors")


def _interrupted_copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The finished job as a kill after its step-4 checkpoint leaves it: no final, running."""
    run_root = tmp_path / "runs"
    copy = run_root / finished.relative_to(finished.parents[2])
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "final")
    write_status(copy, RUNNING)
    return run_root, copy


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "meta.json"]
)
def test_resume_skips_a_damaged_newest_checkpoint(
    damaged: str, finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _interrupted_copy(finished, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000004"
    _truncate(newest / damaged)
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == "done"
    log = (run_dir / "train.log").read_text()
    assert "step_00000004 does not load" in log and "resuming" in log
    assert (run_dir / "checkpoints" / ".corrupt-step_00000004").is_dir()
    # resumed from step 2: bitwise the weights of the uninterrupted job
    ref, got = _weights(finished), _weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_users_copy_in_checkpoints_is_neither_resumed_nor_rotated(
    finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _interrupted_copy(finished, tmp_path)
    ckpts = run_dir / "checkpoints"
    # copies of step 2 named like checkpoints, one of them sorting after every real one
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000002.bak")
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_99999999x")
    shutil.rmtree(ckpts / "step_00000004")  # resumes from 2, writes 4 again and rotates
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == "done"
    ref, got = _weights(finished), _weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # resumed from the real step 2
    assert {p.name for p in ckpts.iterdir()} == {
        "step_00000002",
        "step_00000004",
        "step_00000002.bak",
        "step_99999999x",
    }


def test_resume_fails_naming_the_files_when_no_checkpoint_loads(
    finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _interrupted_copy(finished, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        _truncate(run_dir / "checkpoints" / step / "model.safetensors")
    with pytest.raises(UserError, match="no checkpoint of .* loads: step_00000004 .*step_0000"):
        run_train_job(RESUMABLE, run_root)
    assert read_status(run_dir)["state"] == "failed"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]  # nothing moved: the user decides


def test_non_finite_weights_fail_the_job(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last update overflows (the loss it came from was finite): not done, no final."""
    step = torch.optim.AdamW.step

    def overflowing(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    with pytest.raises(DivergedWeightsError, match="lower optim.lr=.* or lambda_iso=0.1"):
        run_train_job(["lambda_iso=0.1", "train.steps=1", "train.grid_samples=0"], run_root)
    (run_dir,) = run_root.glob("*/*/*")
    status = read_status(run_dir)
    assert status["state"] == "failed" and "EMA weights" in status["error"]
    assert not (run_dir / "final").exists()


def test_finite_weights_that_diverged_fail_the_job(run_root: Path) -> None:
    """optim.lr=1e30: one step leaves weights of ~1e30, finite, with a finite loss."""
    with pytest.raises(DivergedWeightsError, match=r"\|w\| > 10000.*lower optim.lr=1e\+30"):
        run_train_job(["optim.lr=1e30", "train.steps=1", "train.grid_samples=0"], run_root)
    (run_dir,) = run_root.glob("*/*/*")
    assert read_status(run_dir)["state"] == "failed"
    assert not (run_dir / "final").exists()


def test_evaluation_refuses_non_finite_weights(finished: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "job"
    shutil.copytree(finished, run_dir)
    path = run_dir / "final" / "unet_ema" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], math.nan)
    save_file(weights, path)
    result = run_cli("isodiff.evaluate", f"run={run_dir}", "eval=smoke", "metrics=[rtl]")
    assert result.returncode == 2 and "not the file the job wrote" in result.stderr
    assert not (run_dir / "metrics.json").exists()  # not done: nothing is written
    # as if an older isodiff had recorded these weights: done, but not measurable
    write_status(run_dir, DONE, weights=weights_record(run_dir))
    result = run_cli("isodiff.evaluate", f"run={run_dir}", "eval=smoke", "metrics=[rtl]")
    assert result.returncode == 2
    assert "diverged weights" in result.stderr and "Traceback" not in result.stderr
    record = read_json(run_dir / "metrics.json")
    assert record["metrics"] == {} and "diverged" in record["failed"]["rtl"]["error"]


def test_a_non_finite_metric_is_never_written_as_a_value(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "job"
    shutil.copytree(finished, run_dir)
    monkeypatch.setitem(
        measure.METRICS,
        "rtl",
        lambda ctx, cfg: MetricResult({"mrtl": math.nan, "rtl_max": 2.0}, {}),
    )
    cfg = compose_evaluate(
        [f"run={run_dir}", "eval=smoke", "metrics=[rtl]", "progress=false", "eval.grid_samples=0"]
    )
    entry = measure.evaluate_run(cfg)["metrics"]["rtl"]
    assert entry["values"] == {"rtl_max": 2.0} and entry["nonfinite"] == ["mrtl"]
    assert "NaN" not in (run_dir / "metrics.json").read_text()


def test_unreadable_run_files_are_that_runs_problem(finished: Path, tmp_path: Path) -> None:
    """A table of two jobs, one with a malformed status.json and one with a malformed
    metrics.json: collection goes on, and the table lists both problems."""
    spec = load_spec("table_1")
    root = tmp_path / "runs" / "smoke"
    jobs = []
    for lam, broken in (("0", "status.json"), ("0.1", "metrics.json")):
        job = root / "shapes" / f"job-{lam}"
        shutil.copytree(finished, job)
        config = yaml.safe_load((job / "config.yaml").read_text())
        config.update(experiment="shapes", lambda_iso=float(lam), seed=0)
        config["iso"].update(metric="spherical", window=0.5)
        assert config["data"]["name"] == "shapes" and config["tier"]["name"] == "smoke"
        (job / "config.yaml").write_text(yaml.safe_dump(config))
        atomic_write_json(job / "metrics.json", {"metrics": {}})
        (job / broken).write_text('{"state": "do')
        jobs.append(job)
    point = {"iso.metric": "spherical", "iso.window": "0.5", "seed": "0"}
    write_plan(
        Plan(
            "table_1",
            "smoke",
            [
                PlannedJob(f"shapes/job-{lam}", FINETUNE, "shapes", {**point, "lambda_iso": lam})
                for lam in ("0", "0.1")
            ],
        ),
        root,
    )
    df = collect_runs(root)
    assert len(df) == 2
    rows = df.set_index("job")
    assert rows.loc["job-0", "state"] == "unreadable"
    assert "status.json is unreadable" in rows.loc["job-0", "error"]
    assert "metrics.json is unreadable" in rows.loc["job-0.1", "problem"]
    assert read_status(jobs[0])["state"] == UNREADABLE  # not done: it runs again
    _, problems = spec_rows(df, spec, "smoke")
    assert any("status.json is unreadable" in p for p in problems)
    assert any("metrics.json is unreadable" in p for p in problems)


def test_a_job_with_an_unreadable_status_runs_again_and_ends_done(
    finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _interrupted_copy(finished, tmp_path)
    (run_dir / "status.json").write_text("{not json")
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == "done"
    ref, got = _weights(finished), _weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["cluster=nosuch"], ["cluster=nosuch", "local_pool"]),
        (["tier=nosuch"], ["tier=nosuch", "quick"]),
        (["model=nosuch"], ["model=nosuch", "small"]),
        (["train.steps=abc"], ["train.steps", "Integer"]),
        (["+foo=1"], ["foo is not a config key"]),
        (["foo=1"], ["foo is not a config key"]),
        (["seed=-1"], ["seed=-1", ">= 0"]),
        (["optim.lr_schedule=cosin"], ["optim.lr_schedule", "cosine_with_restarts"]),
        (["data.channels=1"], ["data.channels=1", "data.channels=3"]),
        (["init_from=runs/a=1,b=2"], ["must be quoted"]),
        (["diffusion.beta_schedule=cosin"], ["diffusion.beta_schedule", "squaredcos_cap_v2"]),
        (
            ["model=tiny", "model.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]"],
            ["model.down_block_types", "AttnDownBlock2D"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_folder(
    args: list[str], names: list[str], tmp_path: Path
) -> None:
    run_root = tmp_path / "runs"
    result = run_cli(
        "isodiff.train", "tier=smoke", f"run_root={run_root}", *args, HYDRA_FULL_ERROR=""
    )
    line = refusal(result)
    assert all(name in line for name in names), line
    assert "HYDRA_FULL_ERROR" not in result.stderr
    assert not run_root.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["name=.."],
        ["name="],
        ["name=../../y"],
        ["name=a/b"],
        ["experiment=../../../x"],
        ["experiment=."],
        ["name=a\tb"],
        ["tier.name=.."],
        ["-m", "experiment=..", "lambda_iso=0,0.1"],
    ],
)
def test_a_folder_name_that_leaves_its_place_is_refused_before_any_folder(
    args: list[str], tmp_path: Path
) -> None:
    """name=, experiment= and the tier's name are one folder each under run_root: `..`,
    '/', empty or unprintable values would write outside it or into a folder above the
    job's (single runs and multiruns alike)."""
    run_root = tmp_path / "a" / "b" / "runs"  # ../../../x would land in tmp_path/a/b/x
    run_root.parent.mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    result = run_cli(
        "isodiff.train", *args, "tier=smoke", f"run_root={run_root}", HYDRA_FULL_ERROR=""
    )
    line = refusal(result)
    assert "is invalid: it names one folder under run_root" in line, line
    key = next(a for a in args if a != "-m").split("=")[0]
    assert line.startswith(f"error: {key}="), line
    assert sorted(tmp_path.rglob("*")) == before


def test_a_spec_whose_folder_names_leave_their_place_stops_the_plan() -> None:
    """The sweep names folders by its specs' datasets (experiment=<dataset>): the plan
    checks them as the job would, before anything runs."""
    from isodiff.sweep.plan import compose_job

    with pytest.raises(UserError, match=r"experiment='\.\./x' is invalid"):
        compose_job(["tier=smoke", "experiment=../x"])


def test_a_job_folder_outside_run_root_is_refused(tmp_path: Path) -> None:
    """The proof beside the folder-name check: a job path (however made) that does not lie
    inside run_root is refused before anything is written."""
    with pytest.raises(UserError, match="not inside run_root"):
        require_inside(tmp_path / "runs" / "smoke" / ".." / ".." / "x", tmp_path / "runs")
    with pytest.raises(UserError, match="not inside run_root"):
        require_inside(tmp_path / "runs", tmp_path / "runs")
    require_inside(tmp_path / "runs" / "smoke" / "default" / "job", tmp_path / "runs")


def test_renames_into_place_reach_the_disk_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync of every file and folder under the source before the rename, of the folder
    that holds the destination after it (status, metrics, checkpoints, final/)."""
    events: list[tuple[str, Path]] = []
    fsync, replace = _fsync, files.os.replace
    monkeypatch.setattr(files, "_fsync", lambda p: (events.append(("fsync", Path(p))), fsync(p)))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (events.append(("replace", Path(b))), replace(a, b))
    )
    src = tmp_path / ".tmp-final"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.safetensors").write_bytes(b"w")
    replace_durably(src, tmp_path / "final")
    assert set(events[:3]) == {
        ("fsync", src / "unet"),
        ("fsync", src),
        ("fsync", src / "unet" / "w.safetensors"),
    }
    assert events[3:] == [("replace", tmp_path / "final"), ("fsync", tmp_path)]
    events.clear()
    atomic_write_json(tmp_path / "status.json", {"state": "done"})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[1:] == [("replace", tmp_path / "status.json"), ("fsync", tmp_path)]
    assert read_json(tmp_path / "status.json") == {"state": "done"}


@pytest.mark.parametrize(
    "module", ["isodiff.analysis.tables", "isodiff.analysis.figures", "isodiff.analysis.index"]
)
def test_analysis_of_a_tier_without_runs_fails_clearly(module: str, tmp_path: Path) -> None:
    for tier, message in (("nosuch", "tier='nosuch' is not a tier"), ("smoke", "no runs under")):
        result = run_cli(module, f"tier={tier}", f"run_root={tmp_path}", f"out={tmp_path}/o")
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()
    assert run_cli(module, "--help").returncode == 0
