"""SLURM -> torch distributed environment (isodiff.runs.distributed), on CPU with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isodiff.runs.distributed import (
    export_torch_distributed_env,
    first_host,
    rank,
    tasks_on_node,
    torch_distributed_env,
)

ROOT = Path(__file__).resolve().parents[1]

# What srun sets for task 3 of 8 (4 per node) on the second of two nodes.
STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("vm", "vm"),
        ("gpu[003-004,7]", "gpu003"),
        ("gpu[12,15]-ib,cpu1", "gpu12-ib"),
        ("a1,a2", "a1"),
        ("node-[1-2]", "node-1"),
    ],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_first_host_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="node list"):
        first_host("")


@pytest.mark.parametrize(
    ("spec", "node", "n"),
    [
        ("4", 0, 4),
        ("2(x3),1", 2, 2),
        ("2(x3),1", 3, 1),
        ("1,3", 1, 3),
    ],
)
def test_tasks_on_node(spec: str, node: int, n: int) -> None:
    assert tasks_on_node(spec, node) == n


def test_mapping_multi_node() -> None:
    assert torch_distributed_env(STEP) == {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_single_node_uses_loopback_and_keeps_a_given_port() -> None:
    env = {
        **STEP,
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NODELIST": "vm",
        "SLURM_STEP_TASKS_PER_NODE": "8",
        "SLURM_NODEID": "0",
        "MASTER_PORT": "29500",
    }
    got = torch_distributed_env(env)
    assert got["MASTER_ADDR"] == "127.0.0.1"
    assert got["MASTER_PORT"] == "29500"
    assert got["LOCAL_WORLD_SIZE"] == "8"


@pytest.mark.parametrize(
    "env",
    [
        {},  # not in SLURM
        {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"},  # batch script, no srun
        {**STEP, "SLURM_STEP_NUM_TASKS": "1"},  # one task
        {**STEP, "RANK": "0", "WORLD_SIZE": "2"},  # torchrun / accelerate launch set it already
    ],
    ids=["no-slurm", "batch-step", "one-task", "launcher-set"],
)
def test_no_op(env: dict[str, str]) -> None:
    before = dict(env)
    assert export_torch_distributed_env(env, cuda=False) == {}
    assert env == before


@pytest.mark.parametrize("cuda", [True, False])
def test_export_sets_the_variables(cuda: bool) -> None:
    env = dict(STEP)
    set_ = export_torch_distributed_env(env, cuda=cuda)
    assert {k: env[k] for k in set_} == set_
    assert set_.keys() >= {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    # on CPU nodes accelerate must be told, or each process trains alone
    assert ("ACCELERATE_USE_CPU" in env) == (not cuda)
    assert rank(env) == 3
    assert rank({}) == 0


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_two_processes_from_slurm_variables_allreduce_over_gloo() -> None:
    """Two processes given only SLURM's variables form one gloo group through accelerate."""
    procs = []
    for r in range(2):
        env = {
            **_clean_env(),
            "SLURM_JOB_ID": str(os.getpid()),
            "SLURM_PROCID": str(r),
            "SLURM_LOCALID": str(r),
            "SLURM_NODEID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NUM_NODES": "1",
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "isodiff.runs.distributed"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = sorted(
        (json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 1]
    assert all(r["num_processes"] == 2 and r["sum"] == 3 for r in results)
    assert all(r["backend"] == "gloo" for r in results)


def test_torchrun_is_left_alone() -> None:
    """Under torchrun (RANK set) the export does nothing and accelerate still sees 2 ranks."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(20000 + os.getpid() % 20000),
            "-m",
            "isodiff.runs.distributed",
        ],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    # The two ranks share one stdout: their lines may come out joined ("{..}{..}").
    results, decoder, text = [], json.JSONDecoder(), out.stdout
    at = text.find("{")
    while at != -1:
        obj, end = decoder.raw_decode(text, at)
        results.append(obj)
        at = text.find("{", end)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["num_processes"] == 2 and r["sum"] == 3 for r in results)
