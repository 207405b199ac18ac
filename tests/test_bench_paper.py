"""The paper-tier GPU benchmark, on the CPU: its test mode end to end, its refusal without
CUDA, the batch search, the GPU-hours helpers and the LDM model config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import paper as bp
from benchmarks.train_step import model_config
from isodiff.config import to_train_config
from isodiff.model.unet import build_unet
from tests.conftest import compose_train

CPU = torch.device("cpu")


def test_cpu_test_mode_end_to_end(tmp_path):
    bp.main(
        [
            "--device",
            "cpu",
            "--archs",
            "tiny",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "paper.json").read_text())
    assert result["complete"] and result["device"] == "cpu" and result["gpu"] is None
    assert {(r["arch"], r["dtype"], r["variant"]) for r in result["rows"]} == {
        ("tiny", "fp32", v) for v in bp.VARIANTS
    }
    for r in result["rows"]:
        assert "error" not in r, r
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["batch_size"] == bp.ARCHS["tiny"][2] and len(r["times_s"]) == 2
        assert r["peak_mem_mib"] > 0 and r["loss_finite"]
    (forward,) = result["forward"]
    assert forward["arch"] == "tiny" and forward["image_steps_per_s"] > 0
    assert result["searches"] == []  # no batch search on CPU unless asked
    names = {(r["dtype"], r["ratio"]) for r in result["ratios"]}
    assert ("fp32", "step_s iso_fast / plain") in names
    assert ("fp32", "step_s iso_official_style / iso_fast") in names
    ratio = [t for t in result["targets"] if t["arch"] == "tiny"]
    assert len(ratio) == 1 and ratio[0]["met"] == (ratio[0]["value"] <= bp.TARGET_RATIO)
    (batch_target,) = [t for t in result["targets"] if t["arch"] == bp.TARGET_ARCH]
    assert batch_target["met"] is None  # ddpm_256 not measured here
    md = (tmp_path / "paper.md").read_text()
    assert "iso_official_style" in md and "image-steps/s" in md and "test mode" in md
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temp files


@pytest.mark.parametrize("argv", [[], ["--device", "cuda"]])
def test_without_cuda_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bp.main([*argv, "--out", str(tmp_path / "bench")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "bench").exists()


def test_gpu_hours_closed_form():
    assert bp.gpu_hours(3600, 1.0) == pytest.approx(1.0)
    assert bp.gpu_hours(7200, 4.0, gpus=8) == pytest.approx(4.0)  # 0.5 h wall x 8 GPUs
    assert bp.gpu_hours(0, 5.0) == 0.0
    # 5 epochs x 30,000 images at 25 images/s: 150,000 / 25 = 6000 s = 5/3 h
    assert bp.training_gpu_hours(5, 30_000, 25.0) == pytest.approx(5 / 3)
    assert bp.training_gpu_hours(0.5, 7200, 2.0, gpus=2) == pytest.approx(1.0)
    # 50,000 samples x 100 DDIM steps at 1000 image-steps/s: 5000 s
    assert bp.evaluation_gpu_hours(50_000, 100, 1000.0) == pytest.approx(5000 / 3600)
    assert bp.evaluation_gpu_hours(360, 10, 1.0, gpus=3) == pytest.approx(3.0)
    for bad in ((-1, 1.0), (10, 0.0), (10, float("nan"))):
        with pytest.raises(ValueError):
            bp.gpu_hours(*bad)
    with pytest.raises(ValueError):
        bp.gpu_hours(10, 1.0, gpus=0)
    with pytest.raises(ValueError):
        bp.training_gpu_hours(-1, 10, 1.0)


@pytest.mark.parametrize("limit", [0, 1, 2, 7, 8, 37, 100, 255, 256, 1000])
@pytest.mark.parametrize("start", [1, 8, 300])
def test_largest_batch_doubling_then_bisection(limit, start):
    cap = 256
    best, tried = bp.largest_batch(lambda b: b <= limit, cap, start)
    assert best == min(limit, cap)
    assert all(ok == (b <= limit) for b, ok in tried)
    assert len({b for b, _ in tried}) == len(tried) <= 2 * math.log2(cap) + 2  # no repeats
    assert all(1 <= b <= cap for b, _ in tried)


def test_search_row_and_out_of_memory_on_cpu(monkeypatch):
    row = bp.search_row("tiny", "fp32", "iso_fast", CPU, cap=4, start=1, memory_gib=79.0)
    assert row["max_batch"] == 4 and row["capped"]
    assert row["probes"] == [(1, True), (2, True), (4, True)] and row["peak_mem_mib"] > 0
    step = bp.TrainStep("tiny", "plain", "fp32", CPU)

    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    monkeypatch.setattr(bp.TrainStep, "__call__", oom)
    assert step.fits(2) is None  # an out-of-memory means "does not fit", not a crash

    def other(*_):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(bp.TrainStep, "__call__", other)
    with pytest.raises(RuntimeError, match="a real bug"):
        step.fits(2)


def test_ldm_celebahq256_config_matches_the_hub_unet():
    cfg = model_config("ldm_celebahq256", 64, 3)
    # the hub's unet/config.json values that the YAML leaves to the schema's defaults
    assert (cfg.norm_eps, cfg.flip_sin_to_cos, cfg.freq_shift, cfg.downsample_padding) == (
        1e-5,
        True,
        0,
        1,
    )
    unet = build_unet(cfg)
    n = sum(p.numel() for p in unet.parameters())
    assert n == pytest.approx(274e6, rel=0.02), n  # CompVis/ldm-celebahq-256's U-Net: ~274 M
    with torch.no_grad():
        h = unet.encode_h(torch.randn(1, 3, 64, 64), torch.tensor([500]))
    assert h.shape == (1, 896, 8, 8)


def test_search_keeps_what_it_learnt_when_a_probe_fails(monkeypatch):
    def fits(self, batch, steps=2):
        if batch > 2:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
        return 1.0

    monkeypatch.setattr(bp.TrainStep, "fits", fits)
    row = bp.search_row("tiny", "fp32", "plain", CPU, cap=8, start=1, memory_gib=79.0)
    assert "CUDNN_STATUS_NOT_SUPPORTED" in row["error"] and row["fits_at_least"] == 2

    # --fresh-probes: the same search, each probe a worker (stubbed here: no processes)
    answers = {b: {"fits": b <= 5, "peak_mem_mib": float(b)} for b in range(1, 9)}
    monkeypatch.setattr(bp, "_run_worker", lambda args, kind, a, d, v, b: answers[b])
    args = bp._parser().parse_args(["--device", "cpu", "--batch-cap", "8"])
    row = bp._fresh_search(args, "tiny", "fp32", "plain", 4)
    assert row["max_batch"] == 5 and not row["capped"] and row["peak_mem_mib"] == 5.0
    answers[8] = {"arch": "tiny", "error": "Segmentation fault"}
    assert bp._fresh_search(args, "tiny", "fp32", "plain", 4)["error"] == "Segmentation fault"


def test_ldm_celebahq256_composes_on_the_vq_f4_latent(tmp_path):
    vq = tmp_path / "vqvae"  # only config.json is read before anything runs
    vq.mkdir()
    (vq / "config.json").write_text(
        json.dumps(
            {"_class_name": "VQModel", "latent_channels": 3, "block_out_channels": [128, 256, 512]}
        )
    )
    cfg = to_train_config(
        compose_train(
            [
                "model=ldm_celebahq256",
                f"latent.autoencoder={vq}",
                "data.resolution=256",
                "diffusion.clip_sample=false",
                "model.sample_size=64",
            ],
            tmp_path,
        )
    )
    assert (cfg.model.sample_size, cfg.model.in_channels, cfg.model.out_channels) == (64, 3, 3)
