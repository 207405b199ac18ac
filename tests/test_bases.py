"""The shipped quick-tier bases and `python -m isodiff.sweep.bases` (make bases)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from isodiff.config import PRETRAINED
from isodiff.errors import ConfigError
from isodiff.runs.files import file_hashes
from isodiff.sweep import command as sweep
from isodiff.sweep.bases import MANIFEST, compare
from tests.conftest import refusal, run_cli

MANIFESTS = sorted(PRETRAINED.glob(f"*/{MANIFEST}"))


def test_the_quick_tier_ships_its_bases() -> None:
    assert [m.parent.name for m in MANIFESTS] == ["quick"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.parent.name)
def test_shipped_files_match_their_manifest_and_load_in_plain_diffusers(manifest: Path) -> None:
    record = json.loads(manifest.read_text())
    assert record["bases"], "a manifest without bases"
    for dataset, entry in record["bases"].items():
        folder = manifest.parent / dataset
        assert file_hashes(folder) == entry["files"], dataset
        # the verdict is recorded with its reasons, whichever it is
        assert entry["quality"]["passed"] == (not entry["quality"]["reasons"]), dataset
        assert {"fid_heldout", "fid_floor"} <= set(entry["quality"]["values"]), dataset
        unet = UNet2DModel.from_pretrained(folder, local_files_only=True)
        c = unet.config
        x = torch.zeros(1, c.in_channels, c.sample_size, c.sample_size)
        # h is the mid block's output, read by a hook on plain diffusers (not isodiff's
        # encoder): compressive, m <= n / 3, as in the paper's pixel DDPM (n / m = 6)
        seen: list[torch.Tensor] = []
        hook = unet.mid_block.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out))
        assert unet(x, 999).sample.shape == x.shape
        hook.remove()
        assert seen[0][0].numel() * 3 <= x[0].numel(), (dataset, tuple(seen[0].shape))


def test_an_altered_shipped_base_is_refused_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shipped base altered or truncated in a checkout: the sweep does not plan from it
    and a fine-tune does not start from it; one line names the file, exit 2, no folder."""
    copy = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED, copy)
    weights = copy / "quick" / "shapes" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # same size, other bytes
    monkeypatch.setattr(sweep, "PRETRAINED", copy)
    assert sweep.shipped_base("quick", "mnist") == copy / "quick" / "mnist"  # untouched
    with pytest.raises(
        ConfigError,
        match="diffusion_pytorch_model.safetensors differ from their sha256 in .*manifest.json",
    ):
        sweep.shipped_base("quick", "shapes")
    run_root = tmp_path / "runs"
    result = run_cli(
        "isodiff.train",
        "tier=quick",
        "stage=finetune",
        "data=shapes",
        f"init_from={weights.parent}",
        f"run_root={run_root}",
    )
    line = refusal(result)
    assert "diffusion_pytorch_model.safetensors differ" in line and "make bases" in line
    assert not run_root.exists()


def test_a_shipped_ddpm_base_is_not_fine_tuned_as_a_flow(tmp_path: Path) -> None:
    """The manifest records each base's diffusion settings: a fine-tune that would read the
    base's noise prediction as a velocity is one line naming both objectives, exit 2, no
    folder."""
    for entry in json.loads((PRETRAINED / "quick" / MANIFEST).read_text())["bases"].values():
        assert entry["diffusion"]["objective"] == "ddpm"
    run_root = tmp_path / "runs"
    args = ["tier=quick", "stage=finetune", "data=shapes", f"run_root={run_root}"]
    result = run_cli("isodiff.train", *args, "diffusion=flow", "lambda_iso=0.1")
    line = refusal(result)
    assert "diffusion.objective=flow does not match init_from=" in line, line
    assert "diffusion.objective=ddpm" in line and "manifest.json" in line, line
    assert not run_root.exists()


def _manifest(
    files: dict[str, str],
    passed: bool = True,
    device: str = "cpu (x86_64)",
    torch_version: str = "2.14.1",
) -> dict:
    quality = {"passed": passed, "reasons": [] if passed else ["FID 99 > 3x the floor 3"]}
    return {
        "device": device,
        "packages": {"torch": torch_version},
        "bases": {"mnist": {"files": files, "quality": quality}},
    }


def test_verification_is_bitwise_on_the_same_platform_and_by_quality_elsewhere() -> None:
    shipped = _manifest({"a.safetensors": "1", "config.json": "2"})
    assert compare(_manifest({"a.safetensors": "1", "config.json": "2"}), shipped) == []
    assert compare(_manifest({"a.safetensors": "9", "config.json": "2"}), shipped) == [
        "mnist: not bitwise equal to the shipped base (a.safetensors)"
    ]
    other_gpu = _manifest({"a.safetensors": "9", "config.json": "2"}, device="cuda:H200")
    assert compare(other_gpu, shipped) == []
    failing = _manifest({"a.safetensors": "9"}, passed=False, torch_version="2.15.0")
    assert compare(failing, shipped) == ["mnist: fails the quality check: FID 99 > 3x the floor 3"]
    assert compare({**shipped, "bases": {}}, shipped) == ["mnist: not retrained"]


@pytest.mark.slow
def test_make_bases_at_the_smoke_tier_end_to_end(tmp_path: Path) -> None:
    """Trains, evaluates and exports the smoke bases, writes the manifest; a second call
    redoes nothing and verifies bitwise against the first; a changed hash is reported."""
    out, run_root = tmp_path / "bases", tmp_path / "runs"
    args = ("tier=smoke", f"out={out}", f"run_root={run_root}")
    first = run_cli("isodiff.sweep.bases", *args, timeout=600)
    # Four training steps do not make a model that generates: exit 1, said per dataset.
    assert first.returncode == 1, first.stderr[-2000:]
    assert "shapes: FAILS the quality check" in first.stderr
    record = json.loads((out / MANIFEST).read_text())
    entry = record["bases"]["shapes"]
    assert file_hashes(out / "shapes") == entry["files"]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "samples.png"} <= set(
        entry["files"]
    )
    assert entry["steps"] == 4 and entry["training_seconds"] > 0
    assert {"fid_heldout", "fid_floor", "confident_shape", "confident_shape_real"} <= set(
        entry["quality"]["values"]
    )
    assert record["command"][:3] == ["python", "-m", "isodiff.sweep.bases"]
    assert record["git"]["commit"] and record["packages"]["torch"] == torch.__version__

    tampered = tmp_path / "shipped"
    tampered.mkdir()
    entry["files"]["config.json"] = "0" * 64
    (tampered / MANIFEST).write_text(json.dumps(record))
    again = run_cli("isodiff.sweep.bases", *args, f"verify={out}", timeout=600)
    assert "verify: every base matches" in again.stderr
    assert "train " not in again.stderr  # nothing retrained
    check = run_cli("isodiff.sweep.bases", *args, f"verify={tampered}", timeout=600)
    assert "shapes: not bitwise equal to the shipped base (config.json)" in check.stderr
