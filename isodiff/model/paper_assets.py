"""Prepare the paper tier's released checkpoints and datasets once, on a machine with internet.

Examples:
  python -m isodiff.model.paper_assets list
  python -m isodiff.model.paper_assets fetch --root assets --celebahq-source ~/celebahq.zip
  python -m isodiff.model.paper_assets verify --root assets --full

  fetch [names]   prepare the assets (default: all); one that verifies is left alone.
                  --celebahq-source P (a folder or .zip of CelebA-HQ images: needed),
                  --lsun-source P (an LSUN lmdb zip or folder), --limit N (LSUN: first N)
  verify [names]  one line per asset: ok / missing / corrupt; exit 1 unless all are ok.
                  --full: also the sha256 of data files (of checkpoints: always)
  list            the assets and where they come from

Checkpoints go to <root>/checkpoints/<name>/ (hub snapshots), the four datasets to
<root>/data/<name>/ (image folders for `data=folder`); <root>/downloads/ caches the raw
downloads. Each asset folder gets a MANIFEST.json (sha256 and size of every file), written
atomically and last: a half-prepared asset has none and is prepared again. Paper-tier
commands `require` the assets (ISODIFF_ASSETS=<root> or assets.root=) and never download.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from isodiff.errors import UserError
from isodiff.runs.files import (
    atomic_write_json,
    field_problem,
    mapping_problem,
    replace_durably,
    sha256,
)
from isodiff.runs.status import MANIFEST

STAMP = ".verified.json"  # sha256 results of checkpoint files, keyed by (size, mtime_ns)
_NOT_LISTED = {MANIFEST, STAMP, ".cache"}  # .cache: huggingface_hub's resume metadata
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
LSUN_URL = "http://dl.yf.io/lsun/scenes/{category}_train_lmdb.zip"  # as fyu/lsun download.py
PER_FOLDER = 10_000  # LSUN export: files per sub-folder
CELEBAHQ_SIZE = 256
_MAGIC = [(".webp", b"WEBP", 8), (".jpg", b"\xff\xd8\xff", 0), (".png", b"\x89PNG", 0)]
_RACY_NS = 2_000_000_000  # a file this young may change within its mtime tick: not stamped


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "checkpoint" (a hub snapshot) or "data" (an image folder)
    source: str  # hub id, URL, or where the user gets it


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        *(
            Asset(name, "checkpoint", repo)
            for name, repo in [
                ("ddpm-ema-celebahq-256", "google/ddpm-ema-celebahq-256"),
                ("ldm-celebahq-256", "CompVis/ldm-celebahq-256"),
                ("ddpm-cifar10-32", "google/ddpm-cifar10-32"),
                ("ddpm-ema-church-256", "google/ddpm-ema-church-256"),
                ("ddpm-ema-bedroom-256", "google/ddpm-ema-bedroom-256"),
            ]
        ),
        Asset("cifar10", "data", "torchvision.datasets.CIFAR10(train=True)"),
        Asset("celebahq256", "data", "--celebahq-source (CelebA-HQ, user-provided)"),
        Asset("lsun_church256", "data", LSUN_URL.format(category="church_outdoor")),
        Asset("lsun_bedroom256", "data", LSUN_URL.format(category="bedroom")),
    ]
}


class MissingAssetError(UserError, RuntimeError):
    """An asset that is not prepared (state "missing") or fails its manifest ("corrupt")."""

    def __init__(self, message: str, asset: str, state: str) -> None:
        super().__init__(message)
        self.asset, self.state = asset, state


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise UserError(f"unknown paper asset {name!r}; choose from: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_dir(name: str, root: str | Path) -> Path:
    folder = "checkpoints" if _asset(name).kind == "checkpoint" else "data"
    return Path(root).expanduser().absolute() / folder / name


def fetch_command(name: str, root: str | Path) -> str:
    root = Path(root).expanduser().absolute()
    extra = " --celebahq-source PATH" if name == "celebahq256" else ""
    return (
        f"make paper-assets ASSETS={root} ONLY={name} (equivalently: python -m "
        f"isodiff.model.paper_assets fetch {name} --root {root}{extra})"
    )


# Manifests and checks.


def _listed(folder: Path) -> Iterator[Path]:
    """The asset's files, sorted; the manifest, the stamp and hub metadata are not listed."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in _NOT_LISTED and not rel.name.endswith(".tmp"):
            yield path


def write_manifest(
    folder: str | Path, name: str, source: str, extra: dict[str, Any] | None = None
) -> Path:
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"sha256": sha256(path), "size": path.stat().st_size}
        for path in tqdm(list(_listed(folder)), desc=f"{name}: sha256", unit="file", leave=False)
    }
    manifest = {
        "asset": name,
        "source": source,
        "files": files,
        **(extra or {}),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(folder / MANIFEST, manifest)  # temp file + os.replace
    return folder / MANIFEST


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _file_entry(rel: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"files[{rel!r}] is not an object"
    where = Path(rel)  # joined to the asset's folder: it must stay inside it
    if where.is_absolute() or ".." in where.parts or not where.parts:
        return f"files[{rel!r}] is not a file inside the asset's folder"
    return field_problem(entry, "sha256", "string", True, f"files[{rel!r}].") or field_problem(
        entry, "size", "int", True, f"files[{rel!r}]."
    )


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """MANIFEST.json's shape as verify reads it (None: fine)."""
    return mapping_problem(manifest.get("files"), "files", _file_entry)


def _stamp(folder: Path) -> dict[str, Any]:
    """STAMP, a cache of sha256 results: one of another shape is ignored (all hashed)."""
    stamp = _read_json(folder / STAMP) or {}
    return {rel: key for rel, key in stamp.items() if isinstance(key, list)}


def verify(name: str, root: str | Path, full: bool = False) -> Path:
    """The asset's folder when its manifest verifies: every file there with its size, and
    its sha256 for checkpoints (cached in STAMP) or with full=True; else MissingAssetError."""
    asset, folder = _asset(name), asset_dir(name, root)
    manifest = _read_json(folder / MANIFEST)
    if manifest is None:
        raise MissingAssetError(
            f"paper asset {name} is not prepared (no readable {MANIFEST} "
            f"in {folder}); on a machine with internet, run: "
            f"{fetch_command(name, root)}",
            name,
            "missing",
        )
    if problem := manifest_problem(manifest):
        raise MissingAssetError(
            f"paper asset {name}: {folder / MANIFEST} is unreadable (wrong "
            f"shape: {problem}); fetch it again: "
            f"{fetch_command(name, root)}",
            name,
            "corrupt",
        )
    hashed = full or asset.kind == "checkpoint"
    old = _stamp(folder) if asset.kind == "checkpoint" else {}
    stamp, problems, now = {}, [], time.time_ns()
    for rel, entry in manifest["files"].items():
        try:
            st = (folder / rel).stat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        key = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        if st.st_size != entry["size"]:
            problems.append(f"{rel} has {st.st_size} bytes, the manifest {entry['size']}")
        elif hashed and old.get(rel) != key and sha256(folder / rel) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in {MANIFEST}")
        elif now - st.st_mtime_ns > _RACY_NS:  # an older mtime moves on any later write
            stamp[rel] = key
    if asset.kind == "checkpoint" and stamp != old:
        with contextlib.suppress(OSError):  # a read-only asset root still verifies
            atomic_write_json(folder / STAMP, stamp)
    if problems:
        n = len(problems) - 1
        more = f" (and {n} other file{'s' * (n > 1)})" if n else ""
        raise MissingAssetError(
            f"paper asset {name} in {folder} is corrupt: {problems[0]}"
            f"{more}; fetch it again: {fetch_command(name, root)}",
            name,
            "corrupt",
        )
    return folder


def require(names: Iterable[str], root: str | Path) -> None:
    """Every named asset verifies (fast mode); else the first one's MissingAssetError."""
    for name in names:
        verify(name, root)


# Downloads: module-level so that tests replace them; nothing else touches the network.


def snapshot_download(repo_id: str, local_dir: str) -> str:
    from huggingface_hub import snapshot_download as download  # only fetch needs the hub

    return download(repo_id, local_dir=local_dir)


def download_url(url: str, dest: Path) -> Path:
    """url into dest, via dest.part (resumed with a Range request where the server allows)."""
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request) as response:
        resumed = response.status == 206
        total = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total or None,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=dest.name,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    replace_durably(part, dest)  # complete on disk before it is complete by name
    return dest


def download_cifar10(cache: Path) -> Path:
    """The `cifar-10-batches-py` folder of torchvision's CIFAR-10 download (md5-checked)."""
    from torchvision.datasets import CIFAR10

    CIFAR10(str(cache), train=True, download=True)
    return cache / "cifar-10-batches-py"


# Exports of the raw downloads into image folders.


def export_cifar10(batches: Path, out: Path) -> int:
    """The five training pickles as <index:05d>.png, in pickle order (50,000 images)."""
    index = 0
    for b in tqdm(range(1, 6), desc="cifar10", unit="batch"):
        with open(batches / f"data_batch_{b}", "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        for image in images.transpose(0, 2, 3, 1):  # CIFAR rows are channel-first
            Image.fromarray(image).save(out / f"{index:05d}.png")
            index += 1
    return index


def _celebahq_images(source: Path) -> Iterator[Image.Image]:
    """The source's images in natural name order (numbered releases keep their order); of
    a CelebAMask-HQ release only CelebA-HQ-img/ (its masks are PNGs too)."""

    def key(name: str) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    archive = zipfile.ZipFile(source) if zipfile.is_zipfile(source) else None
    if archive is None and not source.is_dir():
        raise UserError(f"--celebahq-source {source}: not a folder or a .zip of images")
    names = (
        archive.namelist()
        if archive
        else [p.relative_to(source).as_posix() for p in source.rglob("*")]
    )
    names = [n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    names = [n for n in names if "CelebA-HQ-img" in n.split("/")] or names
    with archive or contextlib.nullcontext():
        for n in sorted(names, key=key):
            yield Image.open(io.BytesIO(archive.read(n)) if archive else source / n)


def export_celebahq(source: Path, out: Path) -> int:
    """CelebA-HQ at any resolution -> 256x256 PNGs <i:05d>.png, in the source's name order."""
    count = 0
    for count, image in enumerate(tqdm(_celebahq_images(source), desc="celebahq256"), 1):
        side = min(image.size)  # CelebA-HQ is square; crop the centre of anything else
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.convert("RGB").crop((left, top, left + side, top + side))
        if side != CELEBAHQ_SIZE:
            image = image.resize((CELEBAHQ_SIZE, CELEBAHQ_SIZE), Image.Resampling.LANCZOS)
        image.save(out / f"{count - 1:05d}.png")
    if count == 0:
        raise UserError(f"--celebahq-source {source}: no .png/.jpg/.webp images in it")
    return count


def image_suffix(data: bytes) -> str:
    """The suffix of an encoded image from its magic bytes (LSUN values are webp or jpeg)."""
    for suffix, magic, at in _MAGIC:
        if data[at : at + len(magic)] == magic:
            return suffix
    raise UserError(f"an LSUN value that is not webp, jpeg or png (starts {data[:12]!r})")


def export_lsun(db: Path, out: Path, limit: int | None = None) -> int:
    """The lmdb's values in key order, bytes unchanged, as <i//10000:03d>/<i:07d><suffix>."""
    try:
        import lmdb
    except ImportError as err:
        raise UserError("LSUN needs the lmdb package: pip install 'isodiff[paper]'") from err
    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, max_readers=1)
    with env, env.begin() as txn:
        total = env.stat()["entries"] if limit is None else min(limit, env.stat()["entries"])
        cursor, count = txn.cursor(), 0
        for _, value in tqdm(cursor, total=total, desc=db.name, unit="img"):
            if count == total:
                break
            folder = out / f"{count // PER_FOLDER:03d}"
            folder.mkdir(exist_ok=True)
            (folder / f"{count:07d}{image_suffix(value)}").write_bytes(value)
            count += 1
    return count


def _lsun_db(source: Path, downloads: Path) -> Path:
    """The lmdb folder of an LSUN folder, or of a zip (extracted once into downloads/)."""
    if zipfile.is_zipfile(source):
        target = downloads / source.name.removesuffix(".zip")
        if not any(target.rglob("data.mdb")):
            tmp = target.with_name(target.name + ".extracting")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(source) as archive:
                archive.extractall(tmp)
            shutil.rmtree(target, ignore_errors=True)
            # a killed extraction (or a power loss) is never mistaken for a done one
            replace_durably(tmp, target)
        source = target
    hits = sorted(source.rglob("data.mdb")) if source.is_dir() else []
    if not hits:
        raise UserError(f"--lsun-source {source}: not an LSUN lmdb folder (data.mdb) or zip")
    return hits[0].parent


def _clear(folder: Path) -> None:
    """An empty asset folder; huggingface_hub's .cache stays, so downloads resume."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (p for p in folder.iterdir() if p.name != ".cache"):
        (shutil.rmtree if path.is_dir() and not path.is_symlink() else os.remove)(path)


def fetch(
    name: str,
    root: str | Path,
    *,
    celebahq_source: str | Path | None = None,
    lsun_source: str | Path | None = None,
    limit: int | None = None,
) -> Path:
    """Prepare one asset and write its manifest; an asset that verifies is left alone."""
    asset, folder = _asset(name), asset_dir(name, root)
    downloads = Path(root).expanduser().absolute() / "downloads"
    with contextlib.suppress(MissingAssetError):
        verify(name, root)
        if not name.startswith("lsun") or _read_json(folder / MANIFEST).get("limit") == limit:
            return folder
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of images")
    if name == "celebahq256" and celebahq_source is None:  # before anything is removed
        raise UserError(
            "celebahq256: CelebA-HQ has no canonical download URL. Get its images "
            "from the PGGAN release (github.com/tkarras/progressive_growing_of_gans)"
            " or CelebAMask-HQ (github.com/switchablenorms/CelebAMask-HQ, "
            "CelebA-HQ-img/), then pass --celebahq-source PATH (a folder or .zip)"
        )
    _clear(folder)  # no manifest from here until the asset is complete
    extra: dict[str, Any] = {}
    try:
        if asset.kind == "checkpoint":
            snapshot_download(asset.source, local_dir=str(folder))
            source = f"https://huggingface.co/{asset.source}"
        elif name == "cifar10":
            export_cifar10(download_cifar10(downloads / "cifar10"), folder)
            source = asset.source
        elif name == "celebahq256":
            source = str(Path(celebahq_source).expanduser().absolute())
            export_celebahq(Path(source), folder)
        else:
            if lsun_source is None:
                downloads.mkdir(parents=True, exist_ok=True)
                zip_path = download_url(asset.source, downloads / asset.source.rsplit("/", 1)[1])
                source = asset.source
            else:
                zip_path = Path(lsun_source).expanduser().absolute()
                source = str(zip_path)
            extra["limit"] = limit
            export_lsun(_lsun_db(zip_path, downloads), folder, limit)
    except OSError as err:  # a lost connection or a full disk: one line, and how to go on
        raise UserError(
            f"preparing paper asset {name} failed ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); run again (downloads resume): "
            f"{fetch_command(name, root)}"
        ) from err
    write_manifest(folder, name, source, extra)
    return folder


# The command line.


def main(argv: list[str] | None = None) -> int:
    from isodiff.cli import fail  # one line on stderr, exit 2 (the project's convention)

    parser = argparse.ArgumentParser(
        prog="python -m isodiff.model.paper_assets",
        description=__doc__,  # --help starts with what the command does, then its examples
        usage=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["fetch", "verify", "list"])
    parser.add_argument("names", nargs="*")
    for option in ("--root", "--celebahq-source", "--lsun-source"):
        parser.add_argument(option)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    try:
        names = args.names or list(ASSETS)
        for name in names:
            _asset(name)
        if args.action == "list":
            for asset in ASSETS.values():
                print(f"{asset.name:22} {asset.kind:10} {asset.source}")
            return 0
        if args.root is None:
            raise UserError(f"{args.action} needs --root DIR (the assets root folder)")
        if args.action == "fetch":
            options = {
                "celebahq_source": args.celebahq_source,
                "limit": args.limit,
                "lsun_source": args.lsun_source,
            }
            # CelebA-HQ without a source first: its error comes before hours of downloads
            names.sort(key=lambda n: n != "celebahq256" or args.celebahq_source is not None)
            for name in names:
                print(f"{name}: ready in {fetch(name, args.root, **options)}")
            return 0
        status = 0
        for name in names:
            try:
                print(f"ok       {name:22} {verify(name, args.root, args.full)}")
            except MissingAssetError as err:
                print(f"{err.state:8} {name:22} {err}")
                status = 1
        return status
    except UserError as err:
        fail(err)


def command() -> None:
    """The `isodiff-paper-assets` console command."""
    sys.exit(main())


if __name__ == "__main__":
    command()
