"""SLURM through submitit, against a real cluster: no mocks.

    tools/slurm-local.sh up && .venv/bin/pytest -m slurm      # or: tools/ci-slurm.sh

Every test here skips, with the reason, when no SLURM cluster answers. They expect the
single-node cluster of tools/slurm-local.sh (partition `debug`, profile cluster=slurm_local).
Jobs submit functions that live in the package: functions defined in a test module cannot
be unpickled inside the job.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest
import submitit
from omegaconf import OmegaConf

from isodiff.runs import distributed
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slurm

PARTITION = "debug"  # the partition of tools/slurm-local.sh and of cluster=slurm_local
SMOKE = ["tier=smoke", "cluster=slurm_local"]
T = TypeVar("T")


def _cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _skip(reason: str) -> NoReturn:
    # tools/ci-slurm.sh sets ISODIFF_REQUIRE_SLURM=1: there a missing cluster must fail.
    if os.environ.get("ISODIFF_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> dict[str, int]:
    """The cluster's partition `debug`; skips when no SLURM cluster answers."""
    hint = "bring one up with tools/slurm-local.sh up (as root), or run tools/ci-slurm.sh"
    if shutil.which("sinfo") is None:
        _skip(f"no SLURM here (sinfo not found): {hint}")
    try:
        out = _cmd("sinfo", "-h", "-p", PARTITION, "-o", "%a %t %c", timeout=20)
    except subprocess.TimeoutExpired:
        _skip(f"no SLURM cluster answers (sinfo timed out): {hint}")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        _skip(f"no SLURM cluster answers (sinfo: {last}): {hint}")
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not rows:
        _skip(
            f"no partition {PARTITION!r} on this cluster: these tests need the "
            "cluster of tools/slurm-local.sh"
        )
    # submitit learns job states only from sacct: without accounting it would hang.
    acct = _cmd("sacct", "-n", "-X", "-S", "now")
    if acct.returncode != 0:
        pytest.fail(
            f"SLURM answers but sacct fails ({acct.stderr.strip()}): submitit needs "
            "accounting (slurmdbd); tools/slurm-local.sh sets it up"
        )
    return {"cpus": max(int(r[2]) for r in rows)}


def _job_ids(folder: Path) -> list[str]:
    """SLURM job ids that submitit used under `folder` (one sub-folder per job or task)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name))


def _cancel_leftovers(folder: Path, grace: float = 15) -> None:
    """A failed test must not leave jobs holding the cluster's CPUs. Jobs that are only
    finishing (their result written) get `grace` seconds first: a scancel then would
    record them as CANCELLED."""
    ids = _job_ids(folder)
    if not ids:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _cmd("squeue", "-h", "-o", "%i", "-j", ",".join(ids)).stdout.strip():
            return
        time.sleep(0.5)
    _cmd("scancel", *ids)


@pytest.fixture
def executor(slurm: dict[str, int], tmp_path: Path) -> Iterator[submitit.AutoExecutor]:
    folder = tmp_path / "submitit"
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(
        slurm_partition=PARTITION, tasks_per_node=1, cpus_per_task=1, mem_gb=1, timeout_min=5
    )
    yield ex
    _cancel_leftovers(folder)


def _wait_for(what: str, get: Callable[[], T | None], timeout: float, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- submitit on its own --------------------------------------------------------------------


def test_submitit_job_returns_its_result(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(distributed.first_host, "gpu[003-004]")
    assert job.result() == "gpu003"


def test_two_tasks_form_one_gloo_group(executor: submitit.AutoExecutor) -> None:
    """The multi-GPU path on CPU: 2 SLURM tasks -> RANK/WORLD_SIZE -> accelerate, all-reduce."""
    executor.update_parameters(tasks_per_node=2)
    results = executor.submit(distributed.allreduce_check).results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert all(r["num_processes"] == 2 and r["sum"] == 3 for r in results)
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in results}) == 1


def test_job_that_raises_is_reported(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(int, "not a number")
    with pytest.raises(submitit.core.utils.FailedJobError, match="invalid literal for int"):
        job.result()


def test_impossible_request_fails_at_submission(
    executor: submitit.AutoExecutor, slurm: dict[str, int]
) -> None:
    executor.update_parameters(cpus_per_task=slurm["cpus"] * 32)
    tic = time.monotonic()
    with pytest.raises(
        submitit.core.utils.FailedJobError, match="More processors requested than permitted"
    ):
        executor.submit(distributed.first_host, "vm")
    assert time.monotonic() - tic < 10


# -- python -m isodiff.train -m ... cluster=slurm_local -----------------------------------


def _sweep_dir(run_root: Path) -> Path:
    return run_root / "smoke" / "default"


def _sweep_args(run_root: Path, *overrides: str) -> list[str]:
    return ["-m", *SMOKE, f"run_root={run_root}", *overrides]


def _sweep(run_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The whole multirun: Hydra's submitit launcher returns when every job has ended."""
    try:
        return run_cli("isodiff.train", *_sweep_args(run_root, *overrides), timeout=400)
    finally:
        _cancel_leftovers(_sweep_dir(run_root) / ".submitit")


def _statuses(run_root: Path) -> dict[float, dict]:
    """status.json of every job of the sweep, keyed by the job's lambda_iso."""
    found = {}
    for status in _sweep_dir(run_root).glob("*/status.json"):
        lam = OmegaConf.load(status.parent / "config.yaml").lambda_iso
        found[float(lam)] = OmegaConf.to_container(OmegaConf.load(status))
    return found


def _snapshot(run_root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file in every job folder."""
    return {
        str(p.relative_to(run_root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for status in _sweep_dir(run_root).glob("*/status.json")
        for p in status.parent.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def smoke_sweep(
    slurm: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    run_root = tmp_path_factory.mktemp("sweep") / "runs"
    return run_root, _sweep(run_root, "lambda_iso=0,1e-4")


def test_sweep_is_one_job_array_and_both_jobs_end_done(
    smoke_sweep: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_root, proc = smoke_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = _statuses(run_root)
    assert sorted(statuses) == [0.0, 1e-4]
    assert [s["state"] for s in statuses.values()] == ["done", "done"], statuses
    tasks = [i for i in _job_ids(_sweep_dir(run_root) / ".submitit") if "_" in i]
    array_ids = {t.split("_")[0] for t in tasks}
    assert len(array_ids) == 1 and sorted(t.split("_")[1] for t in tasks) == ["0", "1"], tasks
    array_id = array_ids.pop()

    def settled() -> dict[str, str] | None:
        # A task's result is written before its process exits: sacct can still say
        # RUNNING for a moment after the sweep has returned.
        acct = _cmd("sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State")
        states = dict(line.split("|") for line in acct.stdout.splitlines())
        live = {"PENDING", "RUNNING", "COMPLETING"}
        return states if len(states) == 2 and not live & set(states.values()) else None

    states = _wait_for(f"array {array_id} to leave the queue", settled, timeout=60, every=0.5)
    assert set(states.values()) == {"COMPLETED"}, states


def test_sweep_again_trains_nothing(smoke_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_root, _ = smoke_sweep
    before = _snapshot(run_root)
    assert any(k.endswith("status.json") for k in before)
    proc = _sweep(run_root, "lambda_iso=0,1e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(run_root) == before  # no file written, not even status.json
    assert all(s["attempts"] == 1 for s in _statuses(run_root).values())


def test_job_that_raises_ends_failed_while_the_other_finishes(
    slurm: dict[str, int], tmp_path: Path
) -> None:
    # lambda_iso=inf passes validation and makes the loss non-finite at run time.
    _sweep(tmp_path, "lambda_iso=0,inf")
    statuses = _statuses(tmp_path)
    assert statuses[0.0]["state"] == "done", statuses[0.0]
    failed = statuses[float("inf")]
    assert failed["state"] == "failed"
    assert "NonFiniteLossError" in failed["error"]
    assert "Traceback" in failed["traceback"] and "NonFiniteLossError" in failed["traceback"]


def test_two_task_job_trains_as_one_group(slurm: dict[str, int], tmp_path: Path) -> None:
    """tasks_per_node=2 (the multi-GPU layout, on CPU): one job, two ranks, one gloo group."""
    proc = _sweep(
        tmp_path,
        "lambda_iso=0",
        "hydra.launcher.tasks_per_node=2",
        "train.steps=4",
        "train.checkpoint_every=2",
    )
    run_dirs = [p.parent for p in _sweep_dir(tmp_path).glob("*/status.json")]
    assert len(run_dirs) == 1, (run_dirs, proc.stderr[-3000:])
    run_dir = run_dirs[0]
    status = OmegaConf.to_container(OmegaConf.load(run_dir / "status.json"))
    assert status["state"] == "done", (status, proc.stderr[-3000:])
    assert status["attempts"] == 1  # rank 1 does not keep the books
    # accelerate saves one RNG state per rank: both ranks took part in the checkpoint
    ckpts = sorted((run_dir / "checkpoints").glob("*/meta.json"))
    assert len(ckpts) == 1, ckpts
    assert sorted(p.name for p in ckpts[0].parent.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # no rank wrote after the rename


def test_sweep_with_an_impossible_request_fails_fast(slurm: dict[str, int], tmp_path: Path) -> None:
    tic = time.monotonic()
    proc = _sweep(tmp_path, "lambda_iso=0", f"hydra.launcher.cpus_per_task={slurm['cpus'] * 32}")
    assert proc.returncode != 0
    assert "More processors requested than permitted" in proc.stderr
    assert time.monotonic() - tic < 60  # Python's start-up; nothing waits on the queue
    assert not list(_sweep_dir(tmp_path).glob("*/status.json"))


def _complete_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("*/meta.json"))
    return ckpts[0].parent if ckpts else None


def _squeue_state(job_id: str) -> str:
    return _cmd("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()


def test_requeued_job_resumes_from_its_checkpoint_with_the_same_weights(
    slurm: dict[str, int], tmp_path: Path
) -> None:
    # SLURM kills a requeued job a few seconds after its SIGTERM (KillWait=2, which
    # submitit ignores), and it trains on meanwhile: up to ~50 steps at the 16 steps/s
    # measured here on an idle machine (100 steps were once all done before the kill). From
    # the first checkpoint (step 5), 300 steps leave room for a machine twice as fast.
    steps = 300
    overrides = (f"train.steps={steps}", "train.checkpoint_every=5")
    roots = {"requeued": tmp_path / "requeued", "reference": tmp_path / "reference"}
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "isodiff.train", *_sweep_args(root, *overrides)],
            cwd=ROOT,
            stdout=(tmp_path / f"{key}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for key, root in roots.items()
    }
    sweep_dir = _sweep_dir(roots["requeued"])
    try:
        run_dir = _wait_for(
            "the job's status.json", lambda: next(iter(sweep_dir.glob("*/status.json")), None), 240
        ).parent
        _wait_for("a first checkpoint", lambda: _complete_checkpoint(run_dir), 240, every=0.1)
        (job_id,) = _job_ids(sweep_dir / ".submitit")
        requeue = _cmd("scontrol", "requeue", job_id)
        assert requeue.returncode == 0, requeue.stderr
        # Slurm holds a requeued job back for ~2 minutes (BeginTime): release it now.
        _wait_for("the job to pend again", lambda: _squeue_state(job_id) == "PENDING", 60)
        release = _cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert release.returncode == 0, release.stderr
        for key, proc in procs.items():
            assert proc.wait(timeout=400) == 0, (tmp_path / f"{key}.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for root in roots.values():
            _cancel_leftovers(_sweep_dir(root) / ".submitit")

    status = OmegaConf.to_container(OmegaConf.load(run_dir / "status.json"))
    assert status["state"] == "done" and status["attempts"] == 2, status
    resumed = re.findall(r"resuming .* from step (\d+)", (run_dir / "train.log").read_text())
    assert len(resumed) == 1 and 0 < int(resumed[0]) < steps, (
        f"resumed from {resumed}: a job that ends before SLURM kills it resumes nothing; "
        "raise `steps` if this machine trains that fast"
    )

    from safetensors.torch import load_file

    reference_dir = next(_sweep_dir(roots["reference"]).glob("*/status.json")).parent
    assert reference_dir.name == run_dir.name
    for sub in ("unet", "unet_ema"):
        got = load_file(run_dir / "final" / sub / "diffusion_pytorch_model.safetensors")
        want = load_file(reference_dir / "final" / sub / "diffusion_pytorch_model.safetensors")
        assert got.keys() == want.keys()
        different = [k for k in got if not (got[k] == want[k]).all()]
        assert not different, f"{sub}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_two_task_evaluation_equals_one_task(slurm: dict[str, int], tmp_path: Path) -> None:
    """isodiff.evaluate under a 2-task SLURM job (the multi-GPU layout, on CPU): the tasks
    share every metric's chunks and give the metrics of a 1-task job, bit for bit."""
    proc = run_cli(
        "isodiff.train",
        "tier=smoke",
        "train.steps=2",
        "train.grid_samples=0",
        f"run_root={tmp_path / 'runs'}",
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "smoke" / "default").iterdir()
    records = {}
    for tasks in (1, 2):
        copy, sweep = tmp_path / f"run{tasks}", tmp_path / f"sweep{tasks}"
        shutil.copytree(run, copy)
        try:
            proc = run_cli(
                "isodiff.evaluate",
                "-m",
                f"run={copy}",
                "eval=smoke",
                "metrics=[fid,rtl,liso]",
                "batch_size=2",
                "eval.fid.n=8",
                "eval.fid.ref_n=8",
                "progress=false",
                f"refs_dir={tmp_path / 'refs'}",
                "cluster=slurm_local",
                f"hydra.launcher.tasks_per_node={tasks}",
                f"hydra.sweep.dir={sweep}",
                timeout=400,
            )
        finally:
            _cancel_leftovers(sweep / ".submitit")
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[tasks] = OmegaConf.to_container(OmegaConf.load(copy / "metrics.json"))
    assert "failed" not in records[2] and sorted(records[2]["metrics"]) == ["fid", "liso", "rtl"]
    for name, entry in records[1]["metrics"].items():
        assert records[2]["metrics"][name]["values"] == entry["values"], name
        assert (
            entry["provenance"]["processes"],
            records[2]["metrics"][name]["provenance"]["processes"],
        ) == (1, 2)
