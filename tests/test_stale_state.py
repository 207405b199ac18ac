"""Stale state and concurrency: metrics are tied to the weights they measured, a done job
whose weights changed or vanished is not done, run files have one writer at a time, one bad
run does not stop an evaluation multirun, and inputs that used to go wrong silently (a
failed base, 16-bit images, unquoted job folders, another thread count on resume) are
handled or refused clearly."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from safetensors.torch import load_file, save_file

from isodiff.analysis.collect import collect_runs, job_row
from isodiff.cli import quote_paths
from isodiff.config import DataConfig, DatasetName
from isodiff.errors import ConfigError
from isodiff.evaluate import measure
from isodiff.evaluate.measure import EvaluationFailed, evaluate_run, update_record
from isodiff.evaluate.metrics import interp
from isodiff.evaluate.metrics.common import MetricResult
from isodiff.model.data import build_dataset
from isodiff.model.unet import resolve_checkpoint
from isodiff.runs.files import atomic_write_json, read_json
from isodiff.runs.status import (
    DONE,
    FAILED,
    RUNNING,
    WEIGHTS_CHANGED,
    job_state,
    read_status,
    stale_metrics,
    weights_digest,
    weights_record,
    write_status,
)
from isodiff.sweep import command as sweep
from isodiff.train.loop import environment_change
from tests.conftest import ROOT, refusal, run_cli, run_train_job
from tests.test_evaluate import compose_evaluate

RESUMABLE = [
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.grid_samples=0",
]
WEIGHTS = Path("final") / "unet_ema" / "diffusion_pytorch_model.safetensors"
# a job folder name as the sweep writes them: '=' and ',' in it
JOB_NAME = "iso.metric=spherical,lambda_iso=0.1,seed=0-0123abcd"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run_dir = run_train_job(RESUMABLE, tmp_path_factory.mktemp("ref") / "runs")
    return run_dir


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished job at its place under a new run root: (run root, job)."""
    run_root = tmp_path / "runs"
    job = run_root / finished.relative_to(finished.parents[2])
    shutil.copytree(finished, job)
    return run_root, job


def _evaluate(run_dir: Path, metrics: str = "[rtl]") -> dict:
    cfg = compose_evaluate(
        [
            f"run='{run_dir}'",
            "eval=smoke",
            f"metrics={metrics}",
            "progress=false",
            "eval.grid_samples=0",
        ]
    )
    return evaluate_run(cfg)


def _perturb(run_dir: Path) -> None:
    """Other weights in final/ (as a retrain under other settings leaves them)."""
    weights = load_file(run_dir / WEIGHTS)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, run_dir / WEIGHTS)


# --- metrics tied to the weights they measured ------------------------------------------------


def test_a_metric_of_other_weights_is_stale_and_computed_again(
    finished: Path, tmp_path: Path
) -> None:
    _, run_dir = _copy(finished, tmp_path)
    first = _evaluate(run_dir)["metrics"]["rtl"]
    assert first["protocol"]["weights_sha256"] == weights_digest(read_status(run_dir), "unet_ema")
    _perturb(run_dir)  # retrained: new weights, recorded as the job's own
    write_status(run_dir, DONE, weights=weights_record(run_dir))
    record = read_json(run_dir / "metrics.json")
    assert stale_metrics(record, read_status(run_dir)) == ["rtl"]
    assert sweep._state(run_dir) == "metrics stale"
    row = job_row(run_dir)
    assert "rtl measured other weights" in row["problem"] and "rtl.mrtl" not in row
    second = _evaluate(run_dir)["metrics"]["rtl"]  # not "up to date": computed again
    assert second["provenance"]["evaluated"] >= first["provenance"]["evaluated"]
    assert second["protocol"]["weights_sha256"] != first["protocol"]["weights_sha256"]
    assert stale_metrics(read_json(run_dir / "metrics.json"), read_status(run_dir)) == []
    assert sweep._state(run_dir) == "done"


def test_edited_weights_make_a_done_job_train_again(finished: Path, tmp_path: Path) -> None:
    run_root, run_dir = _copy(finished, tmp_path)
    _perturb(run_dir)
    state, problem = job_state(run_dir)
    assert state == WEIGHTS_CHANGED and "not the file the job wrote" in problem
    with pytest.raises(ConfigError, match="not the file the job wrote"):
        _evaluate(run_dir)
    status, _ = run_train_job(RESUMABLE, run_root)  # from its newest checkpoint: the same bits
    assert status["state"] == DONE and status["attempts"] == 2
    assert job_state(run_dir) == (DONE, None)
    ref, got = load_file(finished / WEIGHTS), load_file(run_dir / WEIGHTS)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def _swap_keeping_size_and_mtime(path: Path) -> None:
    """Other bytes, same size, the old mtime restored (as `cp -p`, `rsync -a` or
    `touch -r` leave a replaced file)."""
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_swapped_weights_of_the_same_size_and_mtime_are_not_trusted(
    finished: Path, tmp_path: Path
) -> None:
    """A skip and an evaluation hash the weights they rely on (listings keep the cheap
    size and mtime check): evaluation refuses in one line, exit 2, measuring nothing, and
    the job trains again rather than saying "done already"."""
    run_root, run_dir = _copy(finished, tmp_path)
    _swap_keeping_size_and_mtime(run_dir / WEIGHTS)
    assert job_state(run_dir)[0] == DONE  # the listing's shortcut
    assert job_state(run_dir, full=True) == (
        WEIGHTS_CHANGED,
        f"{WEIGHTS} is not the file the job wrote (its sha256 differs)",
    )
    result = run_cli("isodiff.evaluate", f"run={run_dir}", "eval=smoke", "metrics=[rtl]")
    line = refusal(result)
    assert f"{WEIGHTS} is not the file the job wrote" in line and "nothing is measured" in line
    record = read_json(run_dir / "metrics.json") or {"metrics": {}}
    assert "values" not in record["metrics"].get("rtl", {})
    status, _ = run_train_job(RESUMABLE, run_root)  # not skipped: trained again
    assert status["state"] == DONE and status["attempts"] == 2
    ref, got = load_file(finished / WEIGHTS), load_file(run_dir / WEIGHTS)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_named_folder_that_holds_another_config_is_refused(run_root: Path) -> None:
    """name=myrun lambda_iso=0, then name=myrun lambda_iso=0.1: the second used to print
    "done already: skipped" for a model that never existed. It is refused, naming the key;
    a key outside the job's identity (train.log_every) does not count."""
    args = [
        "tier=smoke",
        f"run_root={run_root}",
        "train.progress=false",
        "name=myrun",
        "train.steps=2",
        "train.grid_samples=0",
    ]
    first = run_cli("isodiff.train", *args, "lambda_iso=0")
    assert first.returncode == 0, first.stderr
    run_dir = run_root / "smoke" / "default" / "myrun"
    before = (run_dir / "status.json").read_text()
    second = run_cli("isodiff.train", *args, "lambda_iso=0.1")
    line = refusal(second)
    assert "lambda_iso (recorded 0.0, asked 0.1)" in line and "name=" in line, line
    assert "skipped" not in second.stdout + second.stderr
    assert (run_dir / "status.json").read_text() == before
    again = run_cli("isodiff.train", *args, "lambda_iso=0", "train.log_every=1")
    assert again.returncode == 0 and "done already: skipped" in again.stdout + again.stderr
    (run_dir / "config.yaml").write_text("lambda_iso: [")  # which job it holds is unknown
    broken = run_cli("isodiff.train", *args, "lambda_iso=0")
    assert broken.returncode == 2 and "config.yaml is unreadable" in broken.stderr, broken.stderr


def test_deleted_weights_are_noticed_everywhere(finished: Path, tmp_path: Path) -> None:
    run_root, run_dir = _copy(finished, tmp_path)
    shutil.rmtree(run_dir / "final" / "unet_ema")
    assert job_state(run_dir)[0] == WEIGHTS_CHANGED
    assert sweep._state(run_dir) == WEIGHTS_CHANGED  # not "done"
    (row,) = collect_runs(run_root).to_dict("records")
    assert row["state"] == WEIGHTS_CHANGED and "final/unet_ema/" in row["problem"]
    with pytest.raises(ConfigError, match="init_from=.*not done .*weights changed"):
        resolve_checkpoint(str(run_dir))
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == DONE and (run_dir / WEIGHTS).is_file()


# --- one writer per file ------------------------------------------------------------------------


def _many_updates(run_dir: str, worker: int) -> None:
    for i in range(25):
        update_record(Path(run_dir), f"m{worker}_{i}", {"values": {"v": worker * 100 + i}})


def test_concurrent_metric_writes_are_all_kept(tmp_path: Path) -> None:
    """Four processes each store 25 metrics of one run at once: none is lost."""
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_many_updates, args=(str(tmp_path), w)) for w in range(4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(60)
        assert proc.exitcode == 0
    metrics = read_json(tmp_path / "metrics.json")["metrics"]
    assert len(metrics) == 100
    assert metrics["m3_24"]["values"]["v"] == 324


@pytest.mark.slow
def test_two_evaluations_of_one_run_at_once_keep_both(finished: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / JOB_NAME
    shutil.copytree(finished, run_dir)
    args = [
        sys.executable,
        "-m",
        "isodiff.evaluate",
        f"run={run_dir}",
        "eval=smoke",
        "progress=false",
    ]
    procs = [
        subprocess.Popen(
            [*args, f"metrics={m}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for m in ("[rtl]", "[liso]")
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert set(read_json(run_dir / "metrics.json")["metrics"]) == {"rtl", "liso"}


def _wait_for(path: Path, text: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def test_a_second_process_waits_for_the_job_and_then_skips_it(
    finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _copy(finished, tmp_path)
    out = tmp_path / "second.out"
    lock = FileLock(str(run_dir / ".lock"))
    lock.acquire()  # a first process at work on the job
    try:
        with out.open("w") as sink:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "isodiff.train",
                    "tier=smoke",
                    f"run_root={run_root}",
                    "train.progress=false",
                    *RESUMABLE,
                ],
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        _wait_for(out, "waiting for the process that holds", timeout=120)
        assert proc.poll() is None and "status.json: done" in out.read_text()
    finally:
        lock.release()
    assert proc.wait(timeout=120) == 0
    assert "is done already: skipped" in out.read_text()
    assert read_status(run_dir)["attempts"] == 1


@pytest.mark.slow
def test_two_trainings_of_one_job_at_once_train_it_once(run_root: Path) -> None:
    """Two sweeps sharing a job on one fresh runs folder: one trains, the other waits and
    skips; the job ends done after one attempt (it used to collide on the checkpoint
    rename and end failed)."""
    args = [
        sys.executable,
        "-m",
        "isodiff.train",
        "tier=smoke",
        f"run_root={run_root}",
        "train.progress=false",
        *RESUMABLE,
    ]
    procs = [
        subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    (run_dir,) = run_root.glob("*/*/*")
    status = read_status(run_dir)
    assert status["state"] == DONE and status["attempts"] == 1
    assert sum("is done already: skipped" in out for out in outputs) == 1


# --- failures are recorded, and the rest goes on --------------------------------------------


def test_a_failing_metric_is_recorded_and_the_others_computed(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, run_dir = _copy(finished, tmp_path)
    real = measure.METRICS["rtl"]

    def broken(ctx: object, cfg: object) -> MetricResult:
        raise RuntimeError("index 7 is out of bounds (simulated)")  # the run's: a bug

    monkeypatch.setitem(measure.METRICS, "rtl", broken)
    with pytest.raises(EvaluationFailed, match="1 of 2 metrics failed .*rtl: RuntimeError"):
        _evaluate(run_dir, "[rtl,liso]")
    record = read_json(run_dir / "metrics.json")
    assert set(record["metrics"]) == {"liso"}
    assert "out of bounds" in record["failed"]["rtl"]["error"]
    assert record["failed"]["rtl"]["cause"] == "run"  # out of memory would be "environment"
    assert sweep._state(run_dir) == "evaluation failed"
    assert "rtl failed: RuntimeError: index 7 is out of bounds" in job_row(run_dir)["problem"]
    monkeypatch.setitem(measure.METRICS, "rtl", real)
    record = _evaluate(run_dir, "[rtl,liso]")  # liso is up to date; rtl now succeeds
    assert set(record["metrics"]) == {"rtl", "liso"} and "failed" not in record
    assert sweep._state(run_dir) == "done"


def test_an_evaluation_multirun_evaluates_every_run(finished: Path, tmp_path: Path) -> None:
    """A bad run first (done, weights non-finite) and a good one after it: the good one is
    evaluated, the bad one's failure is in its own metrics.json, the exit is non-zero."""
    bad, good = tmp_path / "bad" / JOB_NAME, tmp_path / "good" / JOB_NAME
    for run_dir in (bad, good):
        shutil.copytree(finished, run_dir)
    weights = load_file(bad / WEIGHTS)
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, bad / WEIGHTS)
    write_status(bad, DONE, weights=weights_record(bad))
    result = run_cli(
        "isodiff.evaluate",
        "-m",
        f"run={bad},{good}",
        "eval=smoke",
        "metrics=[liso]",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}/multirun",
    )
    assert result.returncode != 0
    assert set(read_json(good / "metrics.json")["metrics"]) == {"liso"}
    record = read_json(bad / "metrics.json")
    assert record["metrics"] == {} and "diverged" in record["failed"]["liso"]["error"]
    assert sweep._state(bad) == "evaluation failed"


# --- inputs that went wrong silently --------------------------------------------------------


@pytest.mark.parametrize("state", [FAILED, RUNNING])
def test_init_from_a_run_that_is_not_done_is_refused(
    state: str, finished: Path, tmp_path: Path
) -> None:
    _, run_dir = _copy(finished, tmp_path)
    write_status(run_dir, state, error="boom" if state == FAILED else None)
    with pytest.raises(ConfigError, match=f"not done \\(state: {state}"):
        resolve_checkpoint(str(run_dir))
    result = run_cli(
        "isodiff.train",
        "tier=smoke",
        f"run_root={tmp_path}/ft",
        f"init_from={run_dir}",
        "optim=finetune",
    )
    assert result.returncode == 2 and "init_from=" in result.stderr, result.stderr
    assert not (tmp_path / "ft").exists()


def test_16_bit_images_load_with_their_values(tmp_path: Path) -> None:
    root = tmp_path / "grey16"
    root.mkdir()
    wide = np.tile(np.linspace(0, 65535, 8).round().astype(np.uint16), (8, 1))
    Image.fromarray(wide).save(root / "a.png")
    with Image.open(root / "a.png") as img:
        assert img.mode.startswith("I")  # what PIL's convert("L") turned white
    ds = build_dataset(
        DataConfig(name=DatasetName.folder, root=str(root), resolution=8, flip=False)
    )
    image, _ = ds[0]
    want = np.round(wide / 65535 * 255) / 127.5 - 1
    np.testing.assert_allclose(image[0].numpy(), want, atol=1e-6)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_32_bit_images_are_refused_before_training(tmp_path: Path) -> None:
    root = tmp_path / "float32"
    root.mkdir()
    Image.fromarray(np.ones((8, 8), np.float32)).save(root / "a.tiff")
    with pytest.raises(ConfigError, match="data.root: .*a.tiff is a 32-bit float image"):
        build_dataset(DataConfig(name=DatasetName.folder, root=str(root), resolution=8))


def test_unquoted_job_folders_are_quoted_for_hydra(tmp_path: Path) -> None:
    one, two = tmp_path / JOB_NAME, tmp_path / "lambda_iso=0,seed=1-ffff0000"
    one.mkdir()
    two.mkdir()
    assert quote_paths([f"run={one}", "eval=smoke"]) == [f"run='{one}'", "eval=smoke"]
    assert quote_paths([f"run={one},{two}"]) == [f"run='{one}','{two}'"]  # a sweep over both
    assert quote_paths([f"init_from={one}"]) == [f"init_from='{one}'"]
    untouched = [f"run='{one}'", f"init_from={tmp_path}/no=such,folder", f"lambda_iso={one}"]
    assert quote_paths(untouched) == untouched
    # a run= that is no list of folders is one path, so that evaluate can say it is missing
    missing = f"{tmp_path}/no=such,folder"
    assert quote_paths([f"run={missing}"]) == [f"run='{missing}'"]


def test_an_unquoted_job_folder_works_on_the_command_line(finished: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / JOB_NAME
    shutil.copytree(finished, run_dir)
    result = run_cli(
        "isodiff.evaluate", f"run={run_dir}", "eval=smoke", "metrics=[liso]", "progress=false"
    )
    assert result.returncode == 0, result.stderr
    assert "liso" in read_json(run_dir / "metrics.json")["metrics"]
    missing = run_cli("isodiff.evaluate", f"run={tmp_path}/a=1,b=2", "eval=smoke")
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr


# --- what bitwise resume depends on -----------------------------------------------------------


def test_environment_change_names_what_differs() -> None:
    saved = {"torch": "2.14.1", "device": "cpu", "threads": 1, "processes": 1}
    assert environment_change(saved, dict(saved)) is None
    assert environment_change(None, saved) is None  # an older checkpoint: nothing to compare
    assert environment_change(saved, {**saved, "threads": 2}) == "threads=2 (checkpoint: 1)"


def test_a_resume_under_other_threads_is_warned_and_recorded(
    finished: Path, tmp_path: Path
) -> None:
    run_root, run_dir = _copy(finished, tmp_path)
    shutil.rmtree(run_dir / "final")
    write_status(run_dir, RUNNING)
    meta_path = run_dir / "checkpoints" / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["environment"]["threads"] == torch.get_num_threads()
    meta["environment"]["threads"] += 6  # written under another thread count
    meta_path.write_text(json.dumps(meta))
    status, _ = run_train_job(RESUMABLE, run_root)
    assert status["state"] == DONE
    (note,) = status["not_bitwise"]
    assert note.startswith("resumed at step 4 with threads=")
    assert "will not be bitwise" in (run_dir / "train.log").read_text()


def test_a_metric_whose_values_grew_is_computed_again(finished: Path, tmp_path: Path) -> None:
    """A record stored before a metric's VERSION (here: interp before its _cv value) is not
    "up to date": it is computed again and gains the new values; a metric without a VERSION
    keeps the protocol it always had."""
    _, run_dir = _copy(finished, tmp_path)
    record = _evaluate(run_dir, "[interp,rtl]")["metrics"]
    assert record["interp"]["protocol"]["version"] == interp.VERSION > 1
    assert "version" not in record["rtl"]["protocol"]
    stored = read_json(run_dir / "metrics.json")
    old = stored["metrics"]["interp"]
    del old["protocol"]["version"]  # as the metric stored it before
    del old["values"]["slerp_cv"]
    old["values"]["slerp_mean"] = -1.0  # markers: a recomputed value replaces its marker
    stored["metrics"]["rtl"]["values"]["mrtl"] = -1.0
    atomic_write_json(run_dir / "metrics.json", stored)
    again = _evaluate(run_dir, "[interp,rtl]")["metrics"]
    assert again["interp"]["protocol"]["version"] == interp.VERSION
    assert again["interp"]["values"] == record["interp"]["values"]  # computed again
    assert again["rtl"]["values"]["mrtl"] == -1.0  # up to date: kept as stored
