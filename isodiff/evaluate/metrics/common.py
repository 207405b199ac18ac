"""What every metric draws on: the model under evaluation, its data and the metric networks.

`EvalContext` hands metrics a sampler per step count (DDIM, or a flow run's Euler ODE),
LPIPS distances, the run's datasets and a folder for dataset-level caches; `MetricResult`
is what a metric returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from isodiff.config import DataConfig, DiffusionConfig
from isodiff.errors import ConfigError
from isodiff.evaluate import networks
from isodiff.evaluate.metrics.perceptual import Distance, lpips_distance

# (light pieces, re-exported: what every metric returns and records)
from isodiff.evaluate.metrics.result import SLERP_CONVENTION, MetricResult, protocol_of  # noqa: F401
from isodiff.evaluate.parallel import Ranks
from isodiff.geometry import lerp, slerp
from isodiff.model.data import build_dataset, data_identity
from isodiff.model.latent import Codec
from isodiff.model.sampling import Sampler, SampleRNG, build_sampler, latents, to_images
from isodiff.model.unet import HUNet
from isodiff.runs.identity import config_hash

T = TypeVar("T")
log = logging.getLogger(__name__)
PATHS = {"slerp": slerp, "lerp": lerp}


def path_points(
    x0: torch.Tensor, x1: torch.Tensor, points: int, path: str = "slerp"
) -> torch.Tensor:
    """(P, *x) endpoints -> (P * points, *x): path(x0, x1, w) at w = 0, 1/(points-1), .., 1,
    pair-major."""
    w = torch.linspace(0, 1, points, dtype=torch.float64).to(x0.dtype)
    return torch.stack([PATHS[path](x0, x1, wk) for wk in w], dim=1).reshape(-1, *x0.shape[1:])


class EvalContext:
    """A trained U-Net with its diffusion and data configs, and the shared machinery.

    seed: base of the per-sample seeds (sample i uses (seed, i)); batch_size: samples per
    network call; refs_dir: cache of per-dataset artefacts (FID statistics, attribute
    classifiers), shared by the runs of a tier; random_lpips: random LPIPS trunks, for
    unit tests only (their provenance says so, and evaluate refuses to record them);
    cache_bytes: memory for generated images shared between metrics (`generated`); codec:
    a latent model's autoencoder (isodiff.model.latent), which every image passes through;
    ranks: the job's processes, which share the chunks of `map` (isodiff.evaluate.parallel).
    """

    def __init__(
        self,
        unet: HUNet,
        diffusion: DiffusionConfig,
        data: DataConfig,
        *,
        seed: int = 0,
        batch_size: int = 64,
        refs_dir: Path | str = "refs",
        progress: bool = False,
        random_lpips: bool = False,
        cache_bytes: int = 2**30,
        codec: Codec | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.unet, self.diffusion, self.data = unet.float().eval(), diffusion, data
        self.ranks = ranks or Ranks()
        self.seed, self.batch_size, self.progress = seed, batch_size, progress
        self.refs_dir, self.random_lpips = Path(refs_dir), random_lpips
        self.codec = codec or Codec()
        self._samplers: dict[int, Sampler] = {}
        self._lpips: dict[str, networks.Loaded] = {}
        self._datasets: dict[str, Dataset] = {}
        self._images: dict[tuple[int, int], torch.Tensor] = {}
        self._free_bytes = cache_bytes

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def x_shape(self) -> tuple[int, int, int]:
        """The shape of x_T and of everything DDIM runs on: the image's for a pixel model,
        the latent's for a latent one."""
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """DDIM outputs -> images in [-1, 1] (decoded first by a latent model's codec)."""
        return to_images(self.codec.decode(x))

    def real_codes(self, split: str, n: int, key: str) -> torch.Tensor:
        """The first n images of a split in the space DDIM runs on (`real_batches`, encoded
        by a latent model's codec), on the CPU."""
        return torch.cat([self.codec.encode(x).cpu() for x in self.real_batches(split, n, key)])

    @property
    def data_key(self) -> str:
        """Identity of the dataset (cache keys of reference statistics and classifiers); with
        data.attributes, of the attribute file's content too (data.data_identity)."""
        fields = data_identity(self.data)
        return f"{self.data.name.value}-{config_hash(fields, exclude=('num_workers',))}"

    def ddim(self, steps: int) -> Sampler:
        """The run's deterministic sampler with `steps` steps: DDIM, or for
        diffusion.objective=flow the Euler ODE (isodiff.model.sampling.build_sampler), with
        the same interface and seeds."""
        if steps not in self._samplers:
            self._samplers[steps] = build_sampler(self.unet, self.diffusion, steps, self.batch_size)
        return self._samplers[steps]

    def generated(self, steps: int, rows: range) -> torch.Tensor:
        """DDIM-`steps` images in [-1, 1] (CPU) of samples `rows`, x_T of sample i seeded by
        (seed, i). Kept per sample while the cache has room, so metrics that draw the same
        samples (FID, separability) run DDIM once for them."""
        images = {i: self._images[(steps, i)] for i in rows if (steps, i) in self._images}
        missing = [i for i in rows if i not in images]
        if missing:
            x_T = latents(self.seed, missing, self.x_shape)
            new = self.images(self.ddim(steps).sample(x_T).x).cpu()
            for i, image in zip(missing, new, strict=True):
                images[i] = image
                if image.nbytes <= self._free_bytes:
                    self._images[(steps, i)] = image
                    self._free_bytes -= image.nbytes
        return torch.stack([images[i] for i in rows])

    @property
    def samplers(self) -> dict[int, Sampler]:
        """The samplers used so far, by number of steps."""
        return dict(self._samplers)

    @property
    def sampling_seconds(self) -> float:
        return sum(s.seconds for s in self._samplers.values())

    def lpips(self, net: str) -> tuple[Distance, str]:
        """LPIPS-<net> as a distance, and its weights' provenance."""
        if net not in self._lpips:
            self._lpips[net] = networks.lpips_model(
                net, random_trunk=self.random_lpips, device=self.device
            )
        loaded = self._lpips[net]
        return lpips_distance(loaded.module), loaded.weights

    @contextlib.contextmanager
    def building(self, artefact: Path) -> Iterator[None]:
        """Held while a dataset-level cache file in refs_dir is checked and built: parallel
        evaluations of one dataset (a local pool, a SLURM array) build it once, the others
        wait and read it."""
        artefact.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(artefact.with_name(f".{artefact.name}.lock"))):
            yield

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = build_dataset(self.data, split)
        return self._datasets[split]

    def real_batches(self, split: str, n: int, key: str) -> Iterator[torch.Tensor]:
        """The first n images of a split in batches, (B, C, H, W) in [-1, 1]; refuses a
        split with fewer (key: the config key that asked for n)."""
        for rows in self.chunks(n, f"{split} images"):
            yield self.real_images(split, rows, n, key)

    def real_images(self, split: str, rows: range, n: int, key: str) -> torch.Tensor:
        """Images `rows` of the first n of a split, (B, C, H, W) in [-1, 1]; refuses a split
        with fewer than n (key: the config key that asked for n)."""
        dataset = self.dataset(split)
        if n > len(dataset):
            raise ConfigError(
                f"{key}={n} asks for more images than the {split} split of "
                f"data={self.data.name.value} holds ({len(dataset)})"
            )
        return torch.stack([dataset[i][0] for i in rows])

    def chunks(self, n: int, desc: str, size: int | None = None) -> Iterator[range]:
        """Index ranges covering range(n), one batch each, with a progress bar."""
        size = size or self.batch_size
        starts = range(0, n, size)
        for lo in tqdm(
            starts, desc=desc, disable=not (self.progress and self.ranks.main), leave=False
        ):
            yield range(lo, min(lo + size, n))

    def map(self, fn: Callable[[range], T], n: int, desc: str, size: int | None = None) -> list[T]:
        """fn of every chunk of `chunks`, in order. With several processes each computes
        the chunks that are its share and all receive every result (isodiff.evaluate.parallel), so
        fn must depend on its rows alone."""
        size = size or self.batch_size
        mine = {
            k: fn(rows) for k, rows in enumerate(self.chunks(n, desc, size)) if self.ranks.mine(k)
        }
        return self.ranks.gather(mine, -(-n // size))

    def shared_cache(
        self, path: Path, build: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """A dataset-level .npz cache whose build may itself use `map`: rank 0 holds the
        lock and decides, every process builds when it is missing, rank 0 writes."""
        with self.building(path) if self.ranks.main else contextlib.nullcontext():
            if self.ranks.share(not path.is_file()):
                arrays = build()
                if self.ranks.main:
                    networks.atomic_save(path, lambda tmp: np.savez(tmp, **arrays))
                    log.info("cached %s", path)
                return arrays
        with np.load(path) as stored:
            return dict(stored)

    def endpoints(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, SampleRNG]:
        """Pair i of every interpolation metric: (x0, x1) ~ N(0, I), seeded by (seed, i); the
        generators go on with each sample's stream for any further draws (PPL's w)."""
        rng = SampleRNG(self.seed, list(indices))
        return rng.randn(*self.x_shape), rng.randn(*self.x_shape), rng
