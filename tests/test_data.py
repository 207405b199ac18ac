"""Datasets are offline, deterministic, and their factors match their pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from isodiff.config import ConfigError, DataConfig, DatasetName
from isodiff.data import build_dataset, render_shapes


def _mask(image: np.ndarray) -> np.ndarray:
    return image.max(axis=0) > 0.5  # shape pixels are bright, the background is 0.1


def test_shapes_are_deterministic_by_seed() -> None:
    a = build_dataset(DataConfig(size=16, seed=3))
    b = build_dataset(DataConfig(size=16, seed=3))
    c = build_dataset(DataConfig(size=16, seed=4))
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    image, factors = a[0]
    assert image.shape == (3, 32, 32) and factors.shape == (5,)
    assert image.min() >= -1 and image.max() <= 1
    assert a.factor_names == ("shape", "hue", "size", "x", "y")


def test_train_and_test_splits_differ() -> None:
    cfg = DataConfig(size=8)
    assert not torch.equal(build_dataset(cfg, "train").tensors[1], build_dataset(cfg, "test")
                           .tensors[1])


@pytest.mark.parametrize("shape", [0, 1, 2])
def test_rendered_area_grows_with_the_size_factor(shape: int) -> None:
    sizes = np.linspace(0.12, 0.3, 5)
    factors = np.array([[shape, 0.3, s, 0.5, 0.5] for s in sizes])
    areas = [_mask(img).sum() for img in render_shapes(factors, 64)]
    assert all(np.diff(areas) > 0)
    # circle area = pi r^2 (in pixels), to within the anti-aliased rim
    if shape == 0:
        expected = np.pi * (sizes * 64) ** 2
        np.testing.assert_allclose(areas, expected, rtol=0.08)


def test_position_and_hue_factors_move_the_pixels() -> None:
    factors = np.array([[1, 0.0, 0.15, 0.3, 0.6], [1, 0.5, 0.15, 0.7, 0.4]])
    images = render_shapes(factors, 64)
    for img, (_, _, _, x, y) in zip(images, factors, strict=True):
        ys, xs = np.nonzero(_mask(img))
        assert abs((xs.mean() + 0.5) / 64 - x) < 0.02 and abs((ys.mean() + 0.5) / 64 - y) < 0.02
    red = images[0][:, 38, 19]  # inside shape 0 (hue 0: red)
    assert red[0] > 0.9 and red[1] < 0.3
    assert images[1][:, 25, 45].argmax() in (1, 2)  # hue 0.5: cyan


def test_shape_classes_differ_in_area_at_equal_size() -> None:
    factors = np.array([[k, 0.3, 0.25, 0.5, 0.5] for k in range(3)])
    circle, square, triangle = (_mask(img).sum() for img in render_shapes(factors, 64))
    assert circle > square > triangle  # pi r^2 > 2 r^2 > (3 sqrt 3 / 4) r^2


def test_mnist_from_the_packaged_file() -> None:
    ds = build_dataset(DataConfig(name=DatasetName.mnist, channels=1, size=100))
    image, label = ds[0]
    assert len(ds) == 100 and image.shape == (1, 32, 32)
    assert image[0, :2].eq(-1).all()  # zero padding 28 -> 32 is background
    assert 0 <= label.item() <= 9 and ds.factor_names == ("digit",)
    assert len(build_dataset(DataConfig(name=DatasetName.mnist, channels=1), "test")) == 10_000


def _folder(tmp_path, n: int = 3):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
            root / ("sub" if i % 2 else "") / f"{i}.png")
    return root


def test_folder_resizes_crops_and_flips(tmp_path) -> None:
    root = _folder(tmp_path)
    ds = build_dataset(DataConfig(name=DatasetName.folder, root=str(root), resolution=16,
                                  flip=True))
    assert len(ds) == 6
    image, _ = ds[0]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    torch.testing.assert_close(ds[3][0], image.flip(-1))


def test_folder_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.root=.*is not a folder"):
        build_dataset(DataConfig(name=DatasetName.folder, root=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build_dataset(DataConfig(name=DatasetName.folder, root=str(tmp_path / "empty")))
    root = _folder(tmp_path)
    (root / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ConfigError, match="cannot read image .*bad.png"):
        build_dataset(DataConfig(name=DatasetName.folder, root=str(root)))
