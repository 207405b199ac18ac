"""Every JSON file isodiff reads is checked by shape, not only by syntax (issue 25, item 4),
and failed metric entries are superseded (item 5).

A file that parses but has the wrong shape (`"weights": ["x"]`, `"metrics": []`,
`{"state": 3}`, a plan `{}`) is its run's listed problem, like one that does not parse: a
job is not done and runs again, collect and tables list it; a command that needs the file
stops with one line naming it. A metric that failed for a reason outside the run (device,
memory) is recorded as such, and a later success for the same weights and protocol removes
the failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from isodiff.analysis.collect import collect_runs, job_row
from isodiff.analysis.tables import spec_rows
from isodiff.evaluate import measure
from isodiff.evaluate.measure import EvaluationFailed, failure_cause, update_record
from isodiff.evaluate.metrics.common import MetricResult
from isodiff.model import paper_assets
from isodiff.runs.files import RunFileError, atomic_write_json, atomic_write_text, replace_durably
from isodiff.runs.status import (
    BASES_MANIFEST,
    DONE,
    RUNNING,
    UNREADABLE,
    cause_of,
    is_done,
    job_state,
    read_metrics,
    read_status,
    superseded,
    verify_base,
    weights_record,
    write_status,
)
from isodiff.sweep import command as sweep
from isodiff.sweep import plan
from isodiff.sweep.plan import FINETUNE, Plan, PlannedJob, read_plan, write_plan
from isodiff.sweep.specs import load_spec
from tests.conftest import refusal, run_cli, run_train_job
from tests.test_evaluate import compose_evaluate
from tests.test_faults import RESUMABLE, _interrupted_copy, _weights

POINT = {"iso.metric": "spherical", "iso.window": "0.5", "seed": "0"}


def _done_job(job: Path) -> Path:
    """A done job folder as status.json describes one (weights recorded), without training:
    what collect, tables and the sweep's bookkeeping read."""
    (job / "final" / "unet_ema").mkdir(parents=True)
    (job / "final" / "unet_ema" / "w.safetensors").write_bytes(b"weights")
    write_status(job, DONE, weights=weights_record(job), step=6)
    return job


def _write(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def _table_of_two(root: Path) -> list[Path]:
    """Two done jobs of table_1 at the smoke tier, planned (lambda_iso 0 and 0.1)."""
    jobs = [_done_job(root / "shapes" / f"job-{lam}") for lam in ("0", "0.1")]
    for job in jobs:
        atomic_write_json(job / "metrics.json", {"metrics": {}})
    write_plan(
        Plan(
            "table_1",
            "smoke",
            [
                PlannedJob(f"shapes/job-{lam}", FINETUNE, "shapes", {**POINT, "lambda_iso": lam})
                for lam in ("0", "0.1")
            ],
        ),
        root,
    )
    return jobs


# --- item 4: status.json -------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        {"state": 3},
        {"weights": {}},
        [],
        {"state": "done", "weights": ["x"]},
        {"state": "done", "weights": {"unet_ema/w": {"sha256": 1, "size": 1, "mtime_ns": 1}}},
        {"state": "done", "weights": {"unet_ema/w": "abc"}},
        {"state": "running", "attempts": "2"},
        {"state": "done", "not_bitwise": "resumed"},
    ],
    ids=str,
)
def test_a_status_of_the_wrong_shape_is_unreadable_not_done(status: Any, tmp_path: Path) -> None:
    job = _done_job(tmp_path / "job")
    _write(job / "status.json", status)
    state, problem = job_state(job, full=True)
    assert state == UNREADABLE and not is_done(job)  # it runs again
    assert f"{job / 'status.json'} is unreadable" in problem
    row = job_row(job)  # collect lists it, and goes on
    assert row["state"] == UNREADABLE and "status.json is unreadable" in row["problem"]
    assert sweep._state(job) == UNREADABLE
    write_status(job, RUNNING, attempts=1)  # none of the bad fields is kept
    assert read_status(job)["state"] == RUNNING


def test_a_job_whose_status_has_the_wrong_shape_runs_again_and_ends_done(tmp_path: Path) -> None:
    """The real job: a done status whose weights record is a list (a hand edit) is not
    trusted as done; the job trains again and ends done with a proper record."""
    status, run_dir = run_train_job(["train.steps=2", "train.grid_samples=0"], tmp_path / "r")
    assert status["state"] == DONE
    _write(run_dir / "status.json", {**status, "weights": ["x"]})
    status, _ = run_train_job(["train.steps=2", "train.grid_samples=0"], tmp_path / "r")
    assert status["state"] == DONE and isinstance(status["weights"], dict)
    assert job_state(run_dir, full=True) == (DONE, None)


# --- item 4: metrics.json ------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"metrics": []},
        {},
        {"metrics": {"fid": []}},
        {"metrics": {"fid": {"values": []}}},
        {"metrics": {"fid": {"values": {"fid": "12"}}}},
        {"metrics": {"fid": {"values": {"fid": 1.0}, "protocol": []}}},
        {"metrics": {}, "failed": []},
        {"metrics": {}, "failed": {"fid": {"error": 3}}},
        {"metrics": {}, "failed": {"fid": {"error": "x", "cause": "gremlins"}}},
    ],
    ids=str,
)
def test_metrics_of_the_wrong_shape_are_that_runs_problem(record: Any, tmp_path: Path) -> None:
    job = _done_job(tmp_path / "job")
    _write(job / "metrics.json", record)
    with pytest.raises(RunFileError, match=r"metrics\.json is unreadable \(wrong shape"):
        read_metrics(job)
    assert "metrics.json is unreadable (wrong shape" in job_row(job)["problem"]
    assert sweep._state(job) == "metrics unreadable"
    assert measure.read_record(job)["metrics"] == {}  # evaluation computes them again
    assert is_done(job)  # the training is not in doubt


def test_a_table_lists_both_wrong_shapes_and_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "smoke"
    bad_status, bad_metrics = _table_of_two(root)
    _write(bad_status / "status.json", {"state": "done", "weights": ["x"]})
    _write(bad_metrics / "metrics.json", {"metrics": []})
    df = collect_runs(root)
    assert len(df) == 2
    _, problems = spec_rows(df, load_spec("table_1"), "smoke")
    assert any("lambda_iso=0," in p and "status.json is unreadable" in p for p in problems)
    assert any("lambda_iso=0.1," in p and "metrics.json is unreadable" in p for p in problems)


# --- item 4: plans -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({}, "spec is missing"),
        ([], "a JSON list"),
        ({"spec": "table_1", "tier": "smoke"}, "jobs is missing"),
        ({"spec": "table_1", "tier": "smoke", "jobs": {}}, "jobs is an object"),
        ({"spec": "table_1", "tier": "smoke", "jobs": [3]}, r"jobs\[0\] is not an object"),
        (
            {"spec": "table_1", "tier": "smoke", "jobs": [{"folder": "a/b", "stage": "finetune"}]},
            r"jobs\[0\]\.dataset is missing",
        ),
        (
            {
                "spec": "table_1",
                "tier": "smoke",
                "jobs": [{"folder": "a/b", "stage": "x", "dataset": "shapes"}],
            },
            "stage is 'x'",
        ),
        (
            {
                "spec": "table_1",
                "tier": "smoke",
                "jobs": [{"folder": "a/b", "stage": "finetune", "dataset": "shapes", "extra": 1}],
            },
            "unknown key 'extra'",
        ),
        (
            {
                "spec": "table_1",
                "tier": "smoke",
                "jobs": [{"folder": "../../x", "stage": "finetune", "dataset": "shapes"}],
            },
            "not a folder inside the tier's",
        ),
        ({"spec": "table_2", "tier": "smoke", "jobs": []}, "the plan of spec 'table_2'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_plan_of_the_wrong_shape_names_its_path(record: Any, why: str, tmp_path: Path) -> None:
    path = plan.plan_path(tmp_path, "table_1")
    path.parent.mkdir(parents=True)
    _write(path, record)
    with pytest.raises(RunFileError, match=why) as err:
        read_plan(tmp_path, "table_1")
    assert str(path) in str(err.value)
    write_plan(Plan("table_1", "smoke", []), tmp_path)  # a sweep writes it again
    assert read_plan(tmp_path, "table_1").jobs == []


def test_tables_with_a_plan_of_the_wrong_shape_stop_in_one_line(tmp_path: Path) -> None:
    """A plan `{}` crashed tables with KeyError: 'spec'; now: one line naming it, exit 2."""
    root = tmp_path / "runs" / "smoke"
    _table_of_two(root)
    _write(plan.plan_path(root, "table_1"), {})
    result = run_cli(
        "isodiff.analysis.tables",
        "tier=smoke",
        f"run_root={tmp_path / 'runs'}",
        f"out={tmp_path / 'out'}",
        "table_1",
    )
    line = refusal(result)
    assert str(plan.plan_path(root, "table_1")) in line, line
    assert "wrong shape: spec is missing" in line


# --- item 4: manifests and checkpoint meta.json ---------------------------------------------


@pytest.mark.parametrize(
    "bases",
    [
        [],
        {"shapes": []},
        {"shapes": {"files": ["config.json"]}},
        {"shapes": {"files": {"config.json": 1}}},
        {"shapes": {}},
        {"shapes": {"files": {}, "diffusion": "ddpm"}},
        {"shapes": {"files": {}, "diffusion": {"beta_end": 0.02}}},
    ],
    ids=str,
)
def test_a_bases_manifest_of_the_wrong_shape_never_passes_a_base(
    bases: Any, tmp_path: Path
) -> None:
    """Before, `"bases": []` or an entry that is no object let the base through unchecked."""
    base = tmp_path / "quick" / "shapes"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    manifest = tmp_path / "quick" / BASES_MANIFEST
    _write(manifest, {"device": "cpu", "packages": {"torch": torch.__version__}, "bases": bases})
    with pytest.raises(RunFileError, match="wrong shape") as err:
        verify_base(base)
    assert str(manifest) in str(err.value)
    _write(
        manifest,
        {
            "device": "cpu",
            "packages": {"torch": torch.__version__},
            "bases": {"mnist": {"files": {}}},
        },
    )
    verify_base(base)  # a folder the manifest does not list passes, as before


@pytest.mark.parametrize(
    "files",
    [{"config.json": "abc"}, ["config.json"], {"../../etc/x": {"sha256": "a", "size": 1}}],
    ids=str,
)
def test_an_asset_manifest_of_the_wrong_shape_is_corrupt(files: Any, tmp_path: Path) -> None:
    folder = paper_assets.asset_dir("ddpm-cifar10-32", tmp_path)
    folder.mkdir(parents=True)
    _write(folder / paper_assets.MANIFEST, {"asset": "ddpm-cifar10-32", "files": files})
    with pytest.raises(paper_assets.MissingAssetError, match="wrong shape") as err:
        paper_assets.verify("ddpm-cifar10-32", tmp_path)
    assert err.value.state == "corrupt" and str(folder / paper_assets.MANIFEST) in str(err.value)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_dir = run_train_job(RESUMABLE, tmp_path_factory.mktemp("ref") / "runs")
    return run_dir


@pytest.mark.parametrize(
    "meta",
    [
        {},
        [],
        {"step": 4, "files": ["model.safetensors"]},
        {"step": 4, "files": {"a": 1}},
        "wrong step",
        {"step": 4, "files": "x", "environment": []},
    ],
    ids=str,
)
def test_a_checkpoint_whose_meta_has_the_wrong_shape_is_skipped(
    meta: Any, finished: Path, tmp_path: Path
) -> None:
    """Like a damaged checkpoint: skipped with its reason, the job resumes from the one
    before (bitwise). `{}` (no sha256 of the files) used to load unchecked; a meta.json of
    step 2 in a folder named step 4 would have resumed step 2's state as step 4."""
    run_root, run_dir = _interrupted_copy(finished, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000004"
    if meta == "wrong step":
        shutil.rmtree(newest)
        shutil.copytree(run_dir / "checkpoints" / "step_00000002", newest)
    else:
        _write(newest / "meta.json", meta)
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == DONE
    log = (run_dir / "train.log").read_text()
    assert "step_00000004 does not load" in log and "resuming" in log
    assert (run_dir / "checkpoints" / ".corrupt-step_00000004").is_dir()
    ref, got = _weights(finished), _weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# --- renames into place: fsync first -----------------------------------------------------------


def test_downloads_and_the_toy_result_are_renamed_into_place_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[tuple[Path, Path]] = []
    real = replace_durably
    monkeypatch.setattr(
        paper_assets, "replace_durably", lambda a, b: (moved.append((Path(a), Path(b))), real(a, b))
    )
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    dest = paper_assets.download_url(source.as_uri(), tmp_path / "dest.bin")
    assert dest.read_bytes() == b"data"
    assert moved == [(tmp_path / "dest.bin.part", tmp_path / "dest.bin")]
    import isodiff.analysis.sphere

    assert isodiff.analysis.sphere.atomic_write_text is atomic_write_text  # temp, fsync, rename


# --- item 5: failed metric entries are superseded -----------------------------------------------


def test_failure_causes() -> None:
    assert failure_cause(MemoryError()) == "environment"
    assert failure_cause(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "environment"
    assert failure_cause(RuntimeError("Found no NVIDIA driver on your system")) == "environment"
    assert failure_cause(AssertionError("Torch not compiled with CUDA enabled")) == "environment"
    assert failure_cause(OSError(28, "No space left on device")) == "environment"
    assert failure_cause(ValueError("shapes do not match")) == "run"
    assert failure_cause(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == "run"
    assert (
        failure_cause(
            RuntimeError(
                "Expected all tensors to be on the same device, but "
                "found at least two devices, cuda:0 and cpu!"
            )
        )
        == "run"
    )
    assert failure_cause(RuntimeError("CUDA error: device-side assert triggered")) == "run"


def _entry(evaluated: str, **protocol: Any) -> dict[str, Any]:
    return {
        "values": {"mrtl": 1.0},
        "protocol": {"seed": 0, **protocol},
        "provenance": {"evaluated": evaluated},
    }


def _failure(when: str, cause: str, **protocol: Any) -> dict[str, Any]:
    return {
        "error": "RuntimeError: x",
        "cause": cause,
        "when": when,
        **({"protocol": {"seed": 0, **protocol}} if protocol else {}),
    }


def test_which_failures_a_stored_metric_supersedes() -> None:
    early, late = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    assert superseded(_failure(late, "environment"), _entry(early))  # any order
    assert superseded(_failure(late, "environment", n=8), _entry(early, n=8))
    assert not superseded(_failure(late, "environment", n=9), _entry(early, n=8))
    assert not superseded(_failure(late, "environment"), None)
    assert superseded(_failure(early, "run", n=8), _entry(late, n=8))  # a later success
    assert not superseded(_failure(late, "run", n=8), _entry(early, n=8))  # news
    legacy = {"error": "RuntimeError: Found no NVIDIA driver on your system", "when": late}
    assert cause_of(legacy) == "environment" and superseded(legacy, _entry(early))
    assert cause_of({"error": "MemoryError: "}) == "environment"
    assert cause_of({"error": "ValueError: bad"}) == "run"


def test_collect_reports_environment_failures_apart_and_not_once_superseded(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "smoke"
    superseded_job, open_job = _table_of_two(root)
    early, late = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    # a valid rtl, and a device failure after it (device=cuda on a CPU box)
    atomic_write_json(
        superseded_job / "metrics.json",
        {"metrics": {"rtl": _entry(early)}, "failed": {"rtl": _failure(late, "environment")}},
    )
    atomic_write_json(
        open_job / "metrics.json", {"metrics": {}, "failed": {"rtl": _failure(late, "environment")}}
    )
    rows = collect_runs(root).set_index("job")
    assert rows.loc["job-0", ["problem", "environment"]].isna().all()
    assert rows.loc["job-0", "mrtl"] == 1.0 and sweep._state(superseded_job) == DONE
    assert pd.isna(rows.loc["job-0.1", "problem"])  # not the run's problem
    assert "rtl failed outside the run: RuntimeError: x" in rows.loc["job-0.1", "environment"]
    assert sweep._state(open_job) == "evaluation failed"
    _, problems = spec_rows(collect_runs(root), load_spec("table_1"), "smoke")
    assert len(problems) == 1 and "lambda_iso=0.1" in problems[0], problems
    assert problems[0].endswith(
        ": rtl failed outside the run: RuntimeError: x (evaluate it "
        "again where the device and memory are there)"
    )
    result = run_cli("isodiff.analysis.collect", str(root))
    assert result.returncode == 0
    assert f"ENVIRONMENT {open_job}: rtl failed outside the run" in result.stdout
    assert "PROBLEM" not in result.stdout


def test_update_record_removes_only_a_superseded_failure(tmp_path: Path) -> None:
    early, late = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    atomic_write_json(
        tmp_path / "metrics.json",
        {
            "metrics": {"rtl": _entry(early), "ppl": _entry(early)},
            "failed": {"rtl": _failure(late, "environment"), "ppl": _failure(late, "run")},
        },
    )
    for name in ("rtl", "ppl"):
        update_record(tmp_path, name)
    assert set(read_metrics(tmp_path)["failed"]) == {"ppl"}  # a run failure after: news


def _evaluate(run_dir: Path, *extra: str) -> dict:
    cfg = compose_evaluate(
        [
            f"run='{run_dir}'",
            "eval=smoke",
            "metrics=[rtl]",
            "progress=false",
            "eval.grid_samples=0",
            *extra,
        ]
    )
    return measure.evaluate_run(cfg)


def test_an_out_of_memory_failure_is_recorded_as_environment_and_superseded(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "job"
    shutil.copytree(finished, run_dir)
    real = measure.METRICS["rtl"]

    def out_of_memory(ctx: object, cfg: object) -> MetricResult:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(measure.METRICS, "rtl", out_of_memory)
    with pytest.raises(EvaluationFailed):
        _evaluate(run_dir)
    failure = read_metrics(run_dir)["failed"]["rtl"]
    assert failure["cause"] == "environment" and "protocol" in failure
    assert (
        job_row(run_dir)["problem"] is None and "out of memory" in job_row(run_dir)["environment"]
    )
    monkeypatch.setitem(measure.METRICS, "rtl", real)
    record = _evaluate(run_dir)
    assert "rtl" in record["metrics"] and "failed" not in record
    assert sweep._state(run_dir) == DONE


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_failure_after_a_valid_metric_is_superseded_by_the_next_evaluation(
    finished: Path, tmp_path: Path
) -> None:
    """device=cuda on a CPU box after rtl was computed: the failure is recorded as the
    environment's; the next evaluation on the CPU finds rtl up to date and removes it
    (before, it stayed under `failed` beside the valid metric for ever)."""
    run_dir = tmp_path / "job"
    shutil.copytree(finished, run_dir)
    _evaluate(run_dir)
    with contextlib.suppress(Exception):  # the failure is what is recorded, not how it ends
        _evaluate(run_dir, "device=cuda")
    record = read_metrics(run_dir)
    if "failed" in record:  # recorded (an entry point may refuse the device before that)
        assert record["failed"]["rtl"]["cause"] == "environment"
        assert job_row(run_dir)["problem"] is None
    assert sweep._state(run_dir) == DONE  # a valid metric supersedes it already
    record = _evaluate(run_dir)
    assert "failed" not in record and "failed" not in read_metrics(run_dir)
