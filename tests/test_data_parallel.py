"""Two CPU processes (torchrun, gloo) compute what one process computes: training with half
the accumulation gives one process's loss curve and weights, and a data-parallel evaluation
gives one process's metrics and arrays, with rank 0 the only writer."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
# The smoke tier on shapes with the regulariser on: 4 steps of 16 images (4 per micro-batch)
TRAIN = [
    "tier=smoke",
    "data=shapes",
    "lambda_iso=0.1",
    "train.steps=4",
    "train.log_every=1",
    "train.batch_size=4",
    "train.effective_batch=16",
    "train.progress=false",
    "train.grid_samples=0",
]
SHARDED = ["fid", "ppl", "rtl", "interp", "inversion", "jacobian", "liso"]
# batches of 2: every metric has several chunks, so both ranks compute some; FID on 8
# images (Inception at 299 px is most of the time on a CPU)
EVAL = ["batch_size=2", "eval.fid.n=8", "eval.fid.ref_n=8"]
# One intra-op thread in every process: the thread count changes float summation order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(module: str, args: list[str], processes: int) -> None:
    launch = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
        ]
        if processes > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launch, "-m", module, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same job trained by one process (accumulation 4) and by two (accumulation 2)."""
    root = tmp_path_factory.mktemp("dp")
    runs = {}
    for processes in (1, 2):
        _run("isodiff.train", [*TRAIN, f"run_root={root / str(processes)}"], processes)
        (runs[processes],) = (root / str(processes) / "smoke" / "default").iterdir()
    return runs


def _curve(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(row[k]) for k in ("loss", "mse", "iso")} for row in csv.DictReader(f)]


def test_two_processes_train_as_one_with_double_accumulation(trained: dict[int, Path]) -> None:
    one, two = trained[1], trained[2]
    assert one.name == two.name  # one job, whatever the process count
    status = {n: json.loads((run / "status.json").read_text()) for n, run in trained.items()}
    assert (status[1]["grad_accum"], status[2]["grad_accum"]) == (4, 2)
    assert status[2]["environment"]["processes"] == 2
    a, b = _curve(one), _curve(two)
    assert len(a) == len(b) == 4
    for row_a, row_b in zip(a, b, strict=True):  # the same data and noise in every step:
        for key in row_a:  # only the order of the gradient sums differs
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-6, abs=1e-9), key
    assert a[0]["loss"] != a[-1]["loss"]  # it trained
    for sub in ("unet", "unet_ema"):
        wa = load_file(one / "final" / sub / "diffusion_pytorch_model.safetensors")
        wb = load_file(two / "final" / sub / "diffusion_pytorch_model.safetensors")
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst < 1e-5, (sub, worst)


def test_two_processes_evaluate_as_one(trained: dict[int, Path], tmp_path: Path) -> None:
    """The metrics that share their chunks (and liso, FID's reference statistics, the
    samples grid), from copies of one run: the same values, protocols and arrays, bit for
    bit (each chunk is computed as one process computes it)."""
    runs = {}
    for processes in (1, 2):
        runs[processes] = tmp_path / f"run{processes}"
        shutil.copytree(trained[1], runs[processes])
        _run(
            "isodiff.evaluate",
            [
                f"run={runs[processes]}",
                "eval=smoke",
                "progress=false",
                f"metrics=[{','.join(SHARDED)}]",
                *EVAL,
                f"refs_dir={tmp_path / f'refs{processes}'}",
            ],
            processes,
        )
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert "failed" not in one and "failed" not in two
    assert sorted(one["metrics"]) == sorted(two["metrics"]) == sorted(SHARDED)
    for name, entry in one["metrics"].items():
        assert two["metrics"][name]["values"] == entry["values"], name
        assert two["metrics"][name]["protocol"] == entry["protocol"], name
        assert (
            entry["provenance"]["processes"],
            two["metrics"][name]["provenance"]["processes"],
        ) == (1, 2)
    for path in sorted((runs[1] / "eval").glob("*.npz")):
        with np.load(path) as a, np.load(runs[2] / "eval" / path.name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (path.name, key)

    # one writer: no stray files from rank 1 (the same folder listing as one process)
    def names(run: Path) -> list[str]:  # TensorBoard names its files by time and pid
        return sorted(p.name for p in run.rglob("*") if "tfevents" not in p.name)

    assert names(runs[2]) == names(runs[1])
