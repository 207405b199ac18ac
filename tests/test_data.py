"""Datasets are offline, deterministic, and their factors match their pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from isodiff.config import DataConfig, DatasetName, to_train_config
from isodiff.errors import ConfigError
from isodiff.model.data import build_dataset, data_identity, render_shapes
from isodiff.runs.identity import config_hash
from tests.conftest import compose_train


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
    assert not torch.equal(
        build_dataset(cfg, "train").tensors[1], build_dataset(cfg, "test").tensors[1]
    )


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
            root / ("sub" if i % 2 else "") / f"{i}.png"
        )
    return root


def test_folder_resizes_crops_and_flips(tmp_path) -> None:
    root = _folder(tmp_path)
    ds = build_dataset(
        DataConfig(name=DatasetName.folder, root=str(root), resolution=16, flip=True)
    )
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


# --- folder attributes (CelebA's list_attr_celeba.txt format) -------------------------------

# As CelebA writes it: the count, the names (a trailing space), rows padded with runs of
# spaces; bare file names except sub/1.png, and a line for an image the folder lacks.
CELEBA = (
    "5\n"
    "5_o_Clock_Shadow Smiling Young \n"
    "3.png  1 -1  1\n"
    "0.png -1  1  1\n"
    "sub/1.png  1  1 -1\n"
    "2.png -1 -1 -1\n"
    "9.png  1  1  1\n"
)
# The folder's images in the dataset's (sorted) order and the 0/1 factors of their lines.
EXPECTED = {"0.png": [0, 1, 1], "2.png": [0, 0, 0], "sub/1.png": [1, 1, 0], "sub/3.png": [1, 0, 1]}


def _labelled(tmp_path, text: str = CELEBA, **kwargs) -> DataConfig:
    (tmp_path / "list_attr_celeba.txt").write_text(text)
    root = tmp_path / "imgs" if (tmp_path / "imgs").is_dir() else _folder(tmp_path, 4)
    return DataConfig(
        name=DatasetName.folder,
        root=str(root),
        resolution=8,
        attributes=str(tmp_path / "list_attr_celeba.txt"),
        **kwargs,
    )


def _key(cfg: DataConfig) -> str:  # EvalContext.data_key's formula
    return f"{cfg.name.value}-{config_hash(data_identity(cfg), exclude=('num_workers',))}"


def test_folder_attributes_are_0_1_factors_matched_by_file_name(tmp_path) -> None:
    ds = build_dataset(_labelled(tmp_path, flip=True))
    assert ds.factor_names == ("5_o_Clock_Shadow", "Smiling", "Young")
    assert ds.factor_kinds == ("categorical",) * 3
    assert [p.relative_to(tmp_path / "imgs").as_posix() for p in ds.files] == list(EXPECTED)
    for i, factors in enumerate(EXPECTED.values()):
        assert ds[i][1].dtype == torch.float32
        assert ds[i][1].tolist() == factors == ds[i + 4][1].tolist()  # a mirror keeps its own
    picked = build_dataset(_labelled(tmp_path, attribute_names=["Young", "Smiling"]))
    assert picked.factor_names == ("Young", "Smiling") and picked[3][1].tolist() == [1, 0]
    plain = build_dataset(DataConfig(name=DatasetName.folder, root=str(tmp_path / "imgs")))
    assert plain.factor_names == () and plain[0][1].shape == (0,)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Smiling Young\n0.png 1 1\n", r"line 1: expected the number of images"),
        ("1\n0.png 1 -1\n", r"line 2: expected the attribute names"),
        ("2\nSmiling Young\n0.png 1 1\n\n2.png 1\n", r"line 5: expected a file name and 2 values"),
        ("1\nSmiling Young\n0.png  0 -1\n", r"line 3: 0.png: Smiling is '0', not -1 or 1"),
        ("3\nSmiling Young\n0.png 1 1\n2.png 1 1\n", r"line 1: says 3 images, but 2 lines follow"),
        ("2\nSmiling Young\n0.png 1 1\n0.png 1 1\n", r"line 4: 0.png has a second line"),
        (
            "2\nSmiling Young\n0.png 1 1\n3.png 1 1\n",
            r"2 of the 4 images under data.root have no line in it \(first: 2.png, sub/1.png\)",
        ),
    ],
)
def test_bad_attribute_files_name_the_key_and_the_line(tmp_path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"^data.attributes=.*{match}"):
        build_dataset(_labelled(tmp_path, text))


def test_attribute_config_errors_name_the_key(tmp_path) -> None:
    cfg = _labelled(tmp_path)
    (tmp_path / "list_attr_celeba.txt").unlink()
    with pytest.raises(ConfigError, match=r"^data.attributes=.*is not a file"):
        build_dataset(cfg)
    with pytest.raises(ConfigError, match=r"^data.attributes=.*is not a file"):
        data_identity(cfg)
    with pytest.raises(ConfigError, match=r"^data.attribute_names: Smilng not in"):
        build_dataset(_labelled(tmp_path, attribute_names=["Smilng"]))
    for name, channels in ((DatasetName.shapes, 3), (DatasetName.mnist, 1)):
        with pytest.raises(ConfigError, match=rf"^data.attributes=.*data={name.value} has its"):
            DataConfig(name=name, channels=channels, attributes=cfg.attributes)
    with pytest.raises(ConfigError, match=r"^data.attribute_names=.*set data.attributes"):
        DataConfig(attribute_names=["Smiling"])


def test_a_bare_name_matches_only_one_image(tmp_path) -> None:
    """sub/0.png and 0.png both end in 0.png: the line `0.png` is the root's image alone."""
    cfg = _labelled(tmp_path, "4\nSmiling\n0.png 1\n2.png 1\n1.png -1\n3.png 1\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "sub" / "0.png")
    with pytest.raises(ConfigError, match=r"1 of the 5 images .*\(first: sub/0.png\)"):
        build_dataset(cfg)


def test_attributes_leave_the_job_identity_unchanged(tmp_path) -> None:
    """Training never reads the labels: same job folder, and an existing run's config (from
    before the keys existed) keeps its signature."""
    common = ["tier=smoke", "data=folder", "data.root=/nonexistent", "name_keys=[lambda_iso]"]
    plain = compose_train(common, tmp_path)
    labelled = compose_train(
        [*common, "data.attributes=/data/list_attr_celeba.txt", "data.attribute_names=[Smiling]"],
        tmp_path,
    )
    assert plain.hydra.run.dir == labelled.hydra.run.dir
    assert to_train_config(labelled).data.attributes == "/data/list_attr_celeba.txt"
    fields = dataclasses.asdict(DataConfig(name=DatasetName.folder, root="/x"))
    before = {k: v for k, v in fields.items() if k not in ("attributes", "attribute_names")}
    set_ = {**fields, "attributes": "/x.txt", "attribute_names": ["Smiling"]}
    assert (
        config_hash({"data": before})
        == config_hash({"data": fields})
        == config_hash({"data": set_})
    )


def test_data_key_is_unchanged_without_attributes_and_follows_the_file(tmp_path) -> None:
    # The keys of these configs before data.attributes existed (stored protocols hold them).
    assert _key(DataConfig()) == "shapes-3da9982c"
    assert (
        _key(
            DataConfig(
                name=DatasetName.folder,
                root="/data/celebahq256",
                resolution=256,
                size=None,
                flip=True,
            )
        )
        == "folder-cd9c1300"
    )
    cfg = _labelled(tmp_path)
    keys = {
        _key(dataclasses.replace(cfg, attributes=None)),
        _key(cfg),
        _key(dataclasses.replace(cfg, attribute_names=["Smiling"])),
    }
    assert len(keys) == 3
    (tmp_path / "list_attr_celeba.txt").write_text(CELEBA.replace("2.png -1", "2.png  1"))
    assert _key(cfg) not in keys  # an edited file: a new classifier
    (tmp_path / "list_attr_celeba.txt").write_text(CELEBA)
    assert _key(cfg) in keys
