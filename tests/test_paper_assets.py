"""Paper-tier assets: fetch (with the network replaced), manifests, verification and the CLI.

Expectations are computed here independently: sha256 with hashlib, pixels from the pickles,
bytes from the lmdb, resizes with PIL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from isodiff.errors import UserError
from isodiff.model import paper_assets as pa
from isodiff.model.unet import load_unet

lmdb = pytest.importorskip("lmdb")

CKPT = "ddpm-cifar10-32"
CKPT_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}  # save_pretrained's


def _command(name: str, root: Path) -> str:
    return f"make paper-assets ASSETS={root.absolute()} ONLY={name}"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in ("MANIFEST.json", ".verified.json")
    }


def _age(folder: Path, seconds: float = 3600) -> None:
    """Move every file's mtime into the past, as for a download made an hour ago."""
    for path in folder.rglob("*"):
        old = path.stat().st_mtime - seconds
        os.utime(path, (old, old))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """snapshot_download replaced: writes a tiny diffusers U-Net; records the repo ids."""
    calls: list[str] = []

    def fake(repo_id: str, local_dir: str) -> str:
        calls.append(repo_id)
        torch.manual_seed(0)
        UNet2DModel(
            sample_size=8,
            block_out_channels=(8, 16),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        ).save_pretrained(local_dir)
        return local_dir

    monkeypatch.setattr(pa, "snapshot_download", fake)
    return calls


def test_checkpoint_is_fetched_with_a_manifest_and_loads(tmp_path: Path, hub: list[str]) -> None:
    path = pa.fetch(CKPT, tmp_path)
    assert path == tmp_path / "checkpoints" / CKPT and hub == ["google/ddpm-cifar10-32"]
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["asset"] == CKPT and "google/ddpm-cifar10-32" in manifest["source"]
    assert set(manifest["files"]) == CKPT_FILES
    for rel, entry in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert pa.verify(CKPT, tmp_path) == path
    pa.require([CKPT], tmp_path)
    unet = load_unet(str(path))
    torch.manual_seed(0)
    expected = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).state_dict()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, expected[key]), key
    pa.fetch(CKPT, tmp_path)  # verifies: nothing is downloaded again
    assert hub == ["google/ddpm-cifar10-32"]


def test_a_corrupt_byte_is_caught_even_after_a_cached_verification(
    tmp_path: Path, hub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pa.fetch(CKPT, tmp_path)
    weights = path / "diffusion_pytorch_model.safetensors"
    pa.verify(CKPT, tmp_path)  # files this young are hashed but not stamped:
    data = bytearray(weights.read_bytes())
    mtime = weights.stat().st_mtime_ns
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(mtime, mtime))  # a write within the same mtime tick
    with pytest.raises(pa.MissingAssetError, match="diffusion_pytorch_model.safetensors"):
        pa.verify(CKPT, tmp_path)
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    _age(path)
    pa.verify(CKPT, tmp_path)  # hashes and stamps the (old) files
    hashed: list[Path] = []
    real = pa.sha256
    monkeypatch.setattr(pa, "sha256", lambda p: hashed.append(p) or real(p))
    pa.verify(CKPT, tmp_path)
    assert hashed == []  # the stamp spares rehashing
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, one byte differs
    with pytest.raises(pa.MissingAssetError) as err:
        pa.verify(CKPT, tmp_path)
    assert err.value.state == "corrupt" and err.value.asset == CKPT
    message = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in message and "sha256" in message
    assert _command(CKPT, tmp_path) in message and "\n" not in message
    assert f"python -m isodiff.model.paper_assets fetch {CKPT} --root" in message
    pa.fetch(CKPT, tmp_path)  # a corrupt asset is fetched again
    assert len(hub) == 2
    pa.verify(CKPT, tmp_path)


def test_missing_file_and_missing_manifest_are_named(tmp_path: Path, hub: list[str]) -> None:
    path = pa.fetch(CKPT, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(pa.MissingAssetError, match=r"config\.json is missing") as err:
        pa.require([CKPT], tmp_path)
    assert _command(CKPT, tmp_path) in str(err.value) and "other" not in str(err.value)
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"short")
    with pytest.raises(pa.MissingAssetError, match=r"config\.json is missing \(and 1 other"):
        pa.verify(CKPT, tmp_path)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(pa.MissingAssetError, match="not prepared") as err:
        pa.verify(CKPT, tmp_path)
    assert err.value.state == "missing" and _command(CKPT, tmp_path) in str(err.value)
    assert isinstance(err.value, UserError)


def test_a_failed_download_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(repo_id: str, local_dir: str) -> str:
        (Path(local_dir) / "config.json").write_text("{}")
        raise ConnectionError("network down")

    monkeypatch.setattr(pa, "snapshot_download", broken)
    with pytest.raises(UserError, match="ConnectionError: network down") as err:
        pa.fetch(CKPT, tmp_path)
    assert _command(CKPT, tmp_path) in str(err.value)
    with pytest.raises(pa.MissingAssetError, match="not prepared"):
        pa.verify(CKPT, tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture
def cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list[Path]]:
    """A fake cifar-10-batches-py (5 batches of 3 images) as the 'download'."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (15, 3072), dtype=np.uint8)
    batches = tmp_path / "fake" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for b in range(5):
        with open(batches / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(
                {
                    b"data": data[3 * b : 3 * b + 3],
                    b"labels": [b] * 3,
                    b"batch_label": b"training batch",
                },
                f,
            )
    calls: list[Path] = []
    monkeypatch.setattr(pa, "download_cifar10", lambda cache: calls.append(cache) or batches)
    return data, calls


def test_cifar10_pngs_hold_the_pickle_pixels(tmp_path: Path, cifar) -> None:
    data, calls = cifar
    folder = pa.fetch("cifar10", tmp_path / "assets")
    assert calls == [tmp_path / "assets" / "downloads" / "cifar10"]
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(15)]
    for i, row in enumerate(data):
        expected = row.reshape(3, 32, 32).transpose(1, 2, 0)  # CIFAR: R plane, G, B
        image = Image.open(folder / f"{i:05d}.png")
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)


def test_fetch_is_idempotent_and_redoes_a_folder_without_manifest(tmp_path: Path, cifar) -> None:
    _, calls = cifar
    folder = pa.fetch("cifar10", tmp_path)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    pa.fetch("cifar10", tmp_path)
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    good = (folder / "00003.png").read_bytes()
    (folder / "MANIFEST.json").unlink()  # as after an export killed half-way
    (folder / "00003.png").write_bytes(b"half a png")
    (folder / "stale.png").write_bytes(b"from an older run")
    pa.fetch("cifar10", tmp_path)
    assert len(calls) == 2 and (folder / "00003.png").read_bytes() == good
    assert not (folder / "stale.png").exists()
    pa.verify("cifar10", tmp_path, full=True)


def test_full_verification_hashes_data(tmp_path: Path, cifar) -> None:
    folder = pa.fetch("cifar10", tmp_path)
    png = folder / "00000.png"
    data = bytearray(png.read_bytes())
    data[-20] ^= 0x01
    png.write_bytes(bytes(data))
    pa.verify("cifar10", tmp_path)  # fast mode: sizes only
    with pytest.raises(pa.MissingAssetError, match=r"00000\.png does not match its sha256"):
        pa.verify("cifar10", tmp_path, full=True)


# --------------------------------------------------------------------------- LSUN


def _encoded(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def lsun_db(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """An lmdb like LSUN's: hex keys, encoded images as values (webp and jpeg)."""
    db = tmp_path / "src" / "church_outdoor_train_lmdb"
    db.mkdir(parents=True)
    items = {
        hashlib.sha1(bytes([i])).hexdigest().encode(): _encoded(i, "WEBP" if i % 2 else "JPEG")
        for i in range(5)
    }
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()
    return db, [items[key] for key in sorted(items)]  # lmdb iterates in key order


def _expected_lsun(values: list[bytes], per_folder: int) -> dict[str, bytes]:
    suffix = {b"RIFF": ".webp", b"\xff\xd8\xff\xe0": ".jpg"}
    return {f"{i // per_folder:03d}/{i:07d}{suffix[v[:4]]}": v for i, v in enumerate(values)}


def test_lsun_export_is_byte_identical(
    tmp_path: Path, lsun_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, values = lsun_db
    monkeypatch.setattr(pa, "PER_FOLDER", 2)
    folder = pa.fetch("lsun_church256", tmp_path / "assets", lsun_source=db)
    assert _files(folder) == _expected_lsun(values, 2)
    assert {".webp", ".jpg"} == {Path(n).suffix for n in _files(folder)}
    pa.verify("lsun_church256", tmp_path / "assets", full=True)


def test_lsun_download_zip_and_limit(
    tmp_path: Path, lsun_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, values = lsun_db
    archive = tmp_path / "bedroom_train_lmdb.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in db.iterdir():
            z.write(f, f"bedroom_train_lmdb/{f.name}")
    urls: list[str] = []

    def download(url: str, dest: Path) -> Path:
        urls.append(url)
        shutil.copy(archive, dest)
        return dest

    monkeypatch.setattr(pa, "download_url", download)
    root = tmp_path / "assets"
    folder = pa.fetch("lsun_bedroom256", root, limit=2)
    assert urls == ["http://dl.yf.io/lsun/scenes/bedroom_train_lmdb.zip"]
    assert _files(folder) == dict(list(_expected_lsun(values, 10_000).items())[:2])
    pa.fetch("lsun_bedroom256", root, limit=2)  # same limit: left alone
    assert len(_files(folder)) == 2
    pa.fetch("lsun_bedroom256", root, lsun_source=archive)  # no limit now: all of it
    assert _files(folder) == _expected_lsun(values, 10_000)
    assert urls == ["http://dl.yf.io/lsun/scenes/bedroom_train_lmdb.zip"]


# --------------------------------------------------------------------------- CelebA-HQ


def test_celebahq_from_a_zip_is_256_in_name_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sources = {
        name: rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        for name, side in [("10.png", 512), ("2.png", 64), ("0.png", 512), ("1.png", 300)]
    }
    archive = tmp_path / "celeba-hq.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, pixels in sources.items():  # stored out of order
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            z.writestr(f"CelebA-HQ-img/{name}", buffer.getvalue())
        z.writestr("CelebA-HQ-img/README.txt", "not an image")
        z.writestr("CelebAMask-HQ-mask-anno/0/00000_hair.png", buffer.getvalue())  # a mask
    folder = pa.fetch("celebahq256", tmp_path / "assets", celebahq_source=archive)
    assert sorted(_files(folder)) == [f"{i:05d}.png" for i in range(4)]
    for i, name in enumerate(["0.png", "1.png", "2.png", "10.png"]):  # numbered order
        out = Image.open(folder / f"{i:05d}.png")
        expected = Image.fromarray(sources[name]).resize((256, 256), Image.Resampling.LANCZOS)
        assert out.size == (256, 256) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_celebahq_from_a_folder(tmp_path: Path) -> None:
    source = tmp_path / "celeba_hq_256"
    source.mkdir()
    for i in (3, 1, 2):  # a 256 JPG mirror: already the right size, kept as decoded
        Image.new("RGB", (256, 256), (i * 60, 0, 0)).save(source / f"{i}.jpg", quality=95)
    folder = pa.fetch("celebahq256", tmp_path / "assets", celebahq_source=source)
    for i, name in enumerate(["1.jpg", "2.jpg", "3.jpg"]):
        expected = np.asarray(Image.open(source / name).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:05d}.png")), expected)


# --------------------------------------------------------------------------- CLI


def test_cli_verify_exit_codes(
    tmp_path: Path, hub: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    pa.fetch(CKPT, tmp_path)
    assert pa.main(["verify", CKPT, "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["ok", CKPT]
    assert pa.main(["verify", "--root", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(pa.ASSETS)
    states = {line.split()[1]: line.split()[0] for line in lines}
    assert states[CKPT] == "ok" and states["cifar10"] == "missing"
    (tmp_path / "checkpoints" / CKPT / "config.json").write_text("{}")
    assert pa.main(["verify", CKPT, "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().out.startswith("corrupt")


def test_cli_celebahq_without_source_is_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "isodiff.model.paper_assets",
            "fetch",
            "celebahq256",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--celebahq-source" in done.stderr and "CelebAMask-HQ" in done.stderr
    assert not (tmp_path / "data" / "celebahq256").exists()


def test_cli_fetch_all_stops_at_celebahq_before_any_download(
    tmp_path: Path, hub: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        pa.main(["fetch", "--root", str(tmp_path)])
    assert exit_.value.code == 2 and hub == []
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_unknown_asset_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        pa.main(["verify", "imagenet", "--root", "x"])
    assert exit_.value.code == 2 and "choose from" in capsys.readouterr().err
