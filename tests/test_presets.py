"""The paper tier's presets: each composes with every sweep axis, carries the released recipe,
describes its released checkpoint, and refuses to run without its prepared assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from isodiff.config import LoopConfig, to_train_config
from isodiff.model import paper_assets
from isodiff.model.unet import config_mismatch, init_unet
from isodiff.runs.identity import signature
from isodiff.sweep.specs import all_specs
from tests.conftest import CONF, ROOT, compose_train

PRESETS = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))
PAPER_DATASETS = ["ddpm_celebahq256", "ddpm_cifar10", "ddpm_church256", "ddpm_bedroom256"]

# The U-Net configs of the released checkpoints (their config.json on the hub, as published).
_DDPM_256 = {
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 256,
}
HUB_UNETS = {
    "ddpm_celebahq256": _DDPM_256,
    "ddpm_church256": _DDPM_256,
    "ddpm_bedroom256": _DDPM_256,
    "ddpm_cifar10": {
        **_DDPM_256,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "sample_size": 32,
    },
    "ldm_celebahq256": {
        "block_out_channels": [224, 448, 672, 896],
        "down_block_types": ["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
        "up_block_types": ["AttnUpBlock2D"] * 3 + ["UpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 32,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "in_channels": 3,
        "out_channels": 3,
        "sample_size": 64,
    },
}


@pytest.fixture
def assets_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An assets root where the LDM's autoencoder has its config.json (the latent's
    geometry is validated before anything runs); nothing else is prepared."""
    vq = tmp_path / "assets" / "checkpoints" / "ldm-celebahq-256" / "vqvae"
    vq.mkdir(parents=True)
    (vq / "config.json").write_text(
        json.dumps(
            {"_class_name": "VQModel", "latent_channels": 3, "block_out_channels": [128, 256, 512]}
        )
    )  # three levels: f = 4
    monkeypatch.setenv("ISODIFF_ASSETS", str(tmp_path / "assets"))
    return tmp_path / "assets"


def test_every_paper_dataset_has_a_preset() -> None:
    assert set(PAPER_DATASETS) | {"ldm_celebahq256"} == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_every_sweep_axis(
    preset: str, assets_root: Path, tmp_path: Path
) -> None:
    cfg = to_train_config(
        compose_train(
            [
                "tier=paper",
                f"preset={preset}",
                "lambda_iso=1e-3",
                "iso.metric=euclidean",
                "iso.window=0.25",
                "seed=3",
            ],
            tmp_path / "runs",
        )
    )
    assert (cfg.lambda_iso, cfg.iso.metric.value, cfg.iso.window, cfg.seed) == (
        1e-3,
        "euclidean",
        0.25,
        3,
    )
    assert Path(cfg.init_from).parent == assets_root / "checkpoints"
    assert Path(cfg.data.root).parent == assets_root / "data"
    assert len(cfg.assets.required) == 2 and cfg.assets.root == str(assets_root)
    # the released recipe (reference: AdamW lr 1e-5, betas 0.95/0.999, wd 1e-6, eps 1e-8,
    # constant LR, clip 1.0, EMA 0.9999 with warm-up power 3/4, fp16, 5 epochs)
    o, t = cfg.optim, cfg.train
    assert (o.lr, list(o.betas), o.weight_decay, o.eps, o.lr_schedule.value, o.grad_clip) == (
        1e-5,
        [0.95, 0.999],
        1e-6,
        1e-8,
        "constant",
        1.0,
    )
    assert (o.ema_decay, o.ema_warmup, o.ema_power) == (0.9999, True, 0.75)
    assert (t.epochs, t.mixed_precision.value) == (5, "fp16")
    ldm = preset.startswith("ldm")
    assert (t.batch_size, t.effective_batch) == ((2, 8) if ldm else (1, 32))
    assert cfg.regularised


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_model_is_the_released_checkpoints(
    preset: str, assets_root: Path, tmp_path: Path
) -> None:
    cfg = to_train_config(compose_train(["tier=paper", f"preset={preset}"], tmp_path))
    with torch.device("meta"):  # the config diffusers builds from the hub's, no weights
        released = UNet2DModel(**HUB_UNETS[preset]).config
    assert config_mismatch(cfg.model, released) == {}


def test_the_recipe_loop_on_four_and_eight_gpus() -> None:
    """The recipe's loop: 5 epochs of CelebA-HQ (30,000 images) at effective batch 32 on 4
    GPUs of batch 1 is accumulation 8 and 4,688 steps; on 8 GPUs, accumulation 4."""
    loop = LoopConfig(batch_size=1, effective_batch=32, epochs=5)
    four, eight = loop.resolved(30_000, 4), loop.resolved(30_000, 8)
    assert (four.grad_accum, four.steps) == (8, 4688)
    assert (eight.grad_accum, eight.steps) == (4, 4688)
    with pytest.raises(ValueError, match="train.effective_batch"):
        loop.resolved(30_000, 5)


def test_every_table_spec_sweeps_the_four_datasets_at_the_paper_tier() -> None:
    # on-demand specs (the CPU tier's fine-tune length curve) are not the paper's tables
    tables = [s for s in all_specs() if s.kind == "table" and not s.on_demand]
    need_labels = {"table_5", "table_6", "table_7"}  # editing / factors: no labels in folders
    for spec in tables:
        expected = [] if spec.name in need_labels else PAPER_DATASETS
        assert sorted(spec.datasets_for("paper")) == sorted(expected), spec.name


def _train(args: list[str], run_root: Path, assets: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ISODIFF_ASSETS": str(assets)}
    return subprocess.run(
        [sys.executable, "-m", "isodiff.train", *args, f"run_root={run_root}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )


def test_missing_assets_stop_the_job_naming_the_fetch_command(tmp_path: Path) -> None:
    proc = _train(["tier=paper", "preset=ddpm_cifar10"], tmp_path / "runs", tmp_path / "none")
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and "ddpm-cifar10-32" in message[0]
    assert "make paper-assets" in message[0] and "ONLY=ddpm-cifar10-32" in message[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_preset_fine_tunes_its_released_checkpoint(tmp_path: Path) -> None:
    """A checkpoint saved with save_pretrained (the hub's format) and a folder of images,
    prepared with manifests: the CIFAR-10 preset loads it and trains; a file damaged
    afterwards is named before anything runs."""
    assets = tmp_path / "assets"
    ckpt = paper_assets.asset_dir("ddpm-cifar10-32", assets)
    torch.manual_seed(0)
    UNet2DModel(**HUB_UNETS["ddpm_cifar10"]).save_pretrained(ckpt)
    paper_assets.write_manifest(ckpt, "ddpm-cifar10-32", "test")
    data = paper_assets.asset_dir("cifar10", assets)
    data.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(data / f"{i:05d}.png")
    paper_assets.write_manifest(data, "cifar10", "test")
    assert (
        init_unet(
            to_train_config(
                compose_train(
                    ["tier=paper", "preset=ddpm_cifar10", f"assets.root={assets}"], tmp_path
                )
            ).model,
            str(ckpt),
        ).config.sample_size
        == 32
    )
    short = [
        "tier=paper",
        "preset=ddpm_cifar10",
        "train.epochs=null",
        "train.steps=1",
        "train.effective_batch=2",
        "train.batch_size=2",
        "train.mixed_precision=no",
        "train.grid_samples=0",
        "train.progress=false",
        "data.flip=false",
    ]
    proc = _train(short, tmp_path / "runs", assets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(next((tmp_path / "runs").rglob("status.json")).read_text())
    assert status["state"] == "done" and status["grad_accum"] == 1
    weights = ckpt / "diffusion_pytorch_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(
        paper_assets.MissingAssetError, match="diffusion_pytorch_model.safetensors does not match"
    ):
        paper_assets.require(["ddpm-cifar10-32", "cifar10"], assets)  # what run_job calls


def test_a_paper_sweep_checks_every_preset_before_launching(tmp_path: Path) -> None:
    env = {**os.environ, "ISODIFF_ASSETS": str(tmp_path / "none")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "isodiff.sweep",
            "table_1",
            "tier=paper",
            f"run_root={tmp_path / 'runs'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "make paper-assets" in proc.stderr and "ONLY=ddpm-cifar10-32" in proc.stderr
    assert not (tmp_path / "runs").exists()  # no plan, no folder


def test_a_prepared_data_folder_enters_a_job_by_its_manifest_not_its_path(tmp_path: Path) -> None:
    names = {}
    for where in ("a", "b"):
        data = tmp_path / where / "images"
        data.mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(data / "00000.png")
        names[where] = signature(
            compose_train(
                ["tier=smoke", "data=folder", f"data.root={data}"], tmp_path
            ).hydra.run.dir
        )
        paper_assets.write_manifest(data, "cifar10", "test")
        names[where + "+manifest"] = signature(
            compose_train(
                ["tier=smoke", "data=folder", f"data.root={data}"], tmp_path
            ).hydra.run.dir
        )
    assert names["a"] != names["b"]  # a plain folder: by its path
    assert names["a+manifest"] == names["b+manifest"] != names["a"]  # the same files
