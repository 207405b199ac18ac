"""`python -m isodiff.evaluate`: presets compose, unfinished runs are refused, and a trained
smoke run gets every metric, recorded with its protocol, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from isodiff.config import compose
from isodiff.errors import ConfigError
from isodiff.evaluate import measure
from isodiff.evaluate.config import (
    EvaluateConfig,
    metric_of,
    register_schemas,
    to_evaluate_config,
)
from isodiff.evaluate.measure import METRICS, evaluate_run
from tests.conftest import CONF, run_cli, run_train_job

register_schemas()


def compose_evaluate(overrides: list[str]) -> EvaluateConfig:
    return to_evaluate_config(compose("evaluate", overrides))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "eval").glob("*.yaml")))
def test_every_eval_preset_composes(preset: str) -> None:
    cfg = compose_evaluate(["run=/nowhere", f"eval={preset}"])
    assert cfg.eval.name == preset
    assert all(hasattr(cfg.eval, name) for name in METRICS)


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="metrics"):
        compose_evaluate(["run=/nowhere", "metrics=[fid,nonsense]"])
    with pytest.raises(ConfigError, match="eval.fid.mode"):
        compose_evaluate(["run=/nowhere", "eval.fid.mode=sharp"])
    with pytest.raises(ConfigError, match="device='gpu'"):
        compose_evaluate(["run=/nowhere", "device=gpu"])


def test_a_run_that_is_not_done_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "job"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    result = run_cli("isodiff.evaluate", f"run={run}", "eval=smoke")
    assert result.returncode == 2
    assert "is still training" in result.stderr  # no pid: its folder's writes tell
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_smoke_run_end_to_end(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train the smoke tier, evaluate every metric with real metric weights, then again:
    the second pass recomputes nothing."""
    status, run_dir = run_train_job([], run_root)
    assert status["state"] == "done"
    cfg = compose_evaluate([f"run={run_dir}", "eval=smoke", "progress=false"])
    record = evaluate_run(cfg)
    assert set(record["metrics"]) == set(METRICS)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored == record
    for name, entry in stored["metrics"].items():
        protocol, provenance = entry["protocol"], entry["provenance"]
        assert {"seed", "ema", "weights", "sampler", "clip_sample"} <= set(protocol), name
        assert protocol["clip_sample"] is True, name  # the default, as the official code
        assert provenance["packages"]["torch"] and "seconds" in provenance
        assert "random-trunk" not in json.dumps(provenance), name
        if entry["arrays"]:
            assert (run_dir / entry["arrays"]).is_file()
        # the sweep finds a value's metric by name: every value of every metric maps back
        assert {metric_of(value) for value in entry["values"]} == {name}
    assert stored["metrics"]["fid"]["protocol"]["n"] == 8
    assert stored["metrics"]["rtl"]["values"]["mrtl"] >= 1
    assert list((run_root / "smoke" / "_refs").glob("fid-*.npz"))
    # The picture beside the numbers: 16 samples (smoke preset) in a 4 x 4 grid of 16 px
    # images scaled 4x, 1 px gaps.
    with Image.open(run_dir / "samples.png") as grid:
        assert grid.size == (4 * (4 * 17 + 1),) * 2

    def fail(*args: object) -> None:
        raise AssertionError("recomputed a metric stored with the same protocol")

    monkeypatch.setattr(measure, "METRICS", dict.fromkeys(METRICS, fail))
    assert evaluate_run(cfg) == record


def test_evaluation_is_full_fp32_on_cuda_and_says_so() -> None:
    import torch

    from isodiff.evaluate.measure import full_fp32

    assert full_fp32(torch.device("cpu")) == {}  # no TF32 on a CPU: the protocol is as before
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        assert full_fp32(torch.device("cuda", 0)) == {"tf32": False}
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
