"""Latent diffusion with tiny autoencoders built in code (a VQModel and an AutoencoderKL):
the codec, validation before anything runs, and a latent model that trains, is evaluated
on decoded images and inverts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from omegaconf import open_dict
from PIL import Image

from isodiff.config import LatentConfig
from isodiff.errors import ConfigError
from isodiff.evaluate.measure import evaluate_run
from isodiff.model.latent import Autoencoder, Codec, build_codec
from tests.conftest import compose_train, run_train_job
from tests.test_evaluate import compose_evaluate

BLOCKS = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
}
LATENT = {"VQModel": 3, "AutoencoderKL": 4}  # latent channels; 16 px -> 8 px latents


def save_autoencoder(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = (
        VQModel(**BLOCKS, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3)
        if kind == "VQModel"
        else AutoencoderKL(**BLOCKS, latent_channels=4)
    )
    model.save_pretrained(folder / kind)
    return folder / kind


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("autoencoders")
    return {kind: save_autoencoder(kind, folder) for kind in LATENT}


@pytest.mark.parametrize("kind", list(LATENT))
def test_the_codec_encodes_without_a_graph_and_scales(
    kind: str, autoencoders: dict[str, Path]
) -> None:
    codec = build_codec(LatentConfig(autoencoder=str(autoencoders[kind])))
    assert isinstance(codec, Autoencoder) and codec.scale == pytest.approx(0.18215)
    images = torch.rand(2, 3, 16, 16, requires_grad=True) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, LATENT[kind], 8, 8) and z.grad_fn is None
    assert codec.decode(z).shape == (2, 3, 16, 16)
    # the scale multiplies the codes and divides them again before decoding
    doubled = build_codec(LatentConfig(autoencoder=str(autoencoders[kind]), scale=0.3643))
    torch.testing.assert_close(doubled.encode(images.detach()), 2 * z)
    torch.testing.assert_close(doubled.decode(2 * z), codec.decode(z))
    pixels = torch.zeros(1, 3, 4, 4)
    assert Codec().encode(pixels) is pixels and Codec().decode(pixels) is pixels


def _latent_overrides(kind: str, path: Path) -> list[str]:
    c = LATENT[kind]
    return [
        f"latent.autoencoder={path}",
        "diffusion.clip_sample=false",
        "model.sample_size=8",
        f"model.in_channels={c}",
        f"model.out_channels={c}",
    ]


def test_a_latent_model_is_validated_before_anything_runs(
    autoencoders: dict[str, Path], tmp_path: Path
) -> None:
    from isodiff.config import to_train_config

    path = autoencoders["VQModel"]
    good = _latent_overrides("VQModel", path)
    to_train_config(compose_train(["tier=smoke", *good], tmp_path))
    for bad, key in (
        (["model.in_channels=4"], "model.in_channels"),
        (["model.sample_size=16"], "model.sample_size"),
        (["diffusion.clip_sample=true"], "diffusion.clip_sample"),
        ([f"latent.autoencoder={tmp_path}"], "latent.autoencoder"),
    ):
        with pytest.raises(ConfigError, match=key):
            to_train_config(compose_train(["tier=smoke", *good, *bad], tmp_path))
    assert not (tmp_path / "smoke").exists()
    # a pixel job's name is that of its config without the latent node (so folders named
    # before latents existed stay valid); a latent job's differs and holds no path
    pixel_cfg = compose_train(["tier=smoke"], tmp_path)
    with open_dict(pixel_cfg):
        del pixel_cfg["latent"]
    pixel = compose_train(["tier=smoke"], tmp_path).name
    assert pixel_cfg.name == pixel
    latent = compose_train(["tier=smoke", *good], tmp_path).name
    assert pixel != latent and str(path) not in latent


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, metrics",
    [
        ("VQModel", None),  # every metric of the smoke preset
        ("AutoencoderKL", ["fid", "inversion", "liso", "linearity"]),
    ],
)
def test_a_latent_model_trains_evaluates_and_inverts(
    kind: str, metrics: list[str] | None, autoencoders: dict[str, Path], tmp_path: Path
) -> None:
    status, run_dir = run_train_job(_latent_overrides(kind, autoencoders[kind]), tmp_path / "runs")
    assert status["state"] == "done"
    extra = [f"metrics=[{','.join(metrics)}]"] if metrics else []
    record = evaluate_run(
        compose_evaluate([f"run='{run_dir}'", "eval=smoke", "progress=false", *extra])
    )
    stored = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert "failed" not in record and set(stored) == set(metrics or stored)
    protocol = stored["inversion"]["protocol"]
    assert protocol["latent"]["autoencoder"].startswith("checkpoint:")
    assert protocol["latent"]["scale"] == pytest.approx(0.18215)
    # inversion compares decoded reconstructions with the 16 px sources
    with __import__("numpy").load(run_dir / "eval" / "inversion.npz") as arrays:
        assert arrays["reconstructions"].shape[1:] == (3, 16, 16)
    # L_iso is measured on the latent sphere: n = C * H * W of the latent
    liso = stored["liso"]["values"]
    assert liso["liso_scaled"] == pytest.approx(liso["liso"] * (LATENT[kind] * 64 - 1))
    with Image.open(run_dir / "samples.png") as grid:  # decoded 16 px samples, 4 x 4
        assert grid.size == (4 * (4 * 17 + 1),) * 2
