"""Typed schemas of the training config (one dataclass per config group).

Hydra merges the YAML files of conf/ onto these schemas, so an unknown key or a wrong type
fails at composition with the key's full name. Ranges and cross-field rules are checked in
`__post_init__`, which runs when `to_object` turns the composed config into dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from isodiff.errors import ConfigError


def shipped(name: str) -> Path:
    """A folder the repository keeps at its top level (conf, experiments): there in a
    checkout, inside the package in an installed wheel (pyproject's package-dir)."""
    package = Path(__file__).resolve().parent
    return package / name if (package / name).is_dir() else package.parent / name


CONF = shipped("conf")
PRETRAINED = shipped("pretrained")  # the bases a tier ships: pretrained/<tier>/<dataset>


def closest(word: str, choices: Iterable[object]) -> str | None:
    """The choice a misspelt word most likely meant (difflib), None when none is close."""
    found = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key(full_key: str, siblings: Iterable[object], command: str) -> str:
    """The line for a key that no schema has: the nearest key beside it, and how to list them."""
    parent, _, key = full_key.rpartition(".")
    near = closest(key, siblings)
    hint = f"did you mean {parent}{'.' if parent else ''}{near}?" if near else "check its spelling"
    return f"{full_key} is not a config key: {hint} ({command} --cfg job lists every key)"


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


class IsoMetric(str, Enum):
    """Riemannian metric of the latent X (`iso.metric`)."""

    none = "none"
    euclidean = "euclidean"
    spherical = "spherical"
    isodiff_compat = "isodiff_compat"
    path_length = "path_length"
    # Smooth Diffusion's step-wise variation regulariser (isodiff/smoothness.py), the peer's
    smooth_diffusion = "smooth_diffusion"

    @property
    def penalty(self) -> str:
        """The name the training log gives this metric's penalty: only the isometric ones
        are L_iso (held-out L_iso, measured alike for every metric, stays comparable);
        Smooth Diffusion's is its paper's L_reg (isodiff/smoothness.py)."""
        return {"path_length": "L_path", "smooth_diffusion": "L_reg"}.get(self.value, "L_iso")


class IsoRadius(str, Enum):
    """Radius of the sphere that the spherical chart lives on (`iso.radius`)."""

    norm = "norm"  # each sample's own |x_t|: the point is x_t itself
    sqrt_n = "sqrt_n"  # the paper's sqrt(dim): x_t is projected radially onto it
    official = "official"  # the official code's inconsistent chart (see isometry.py)


class IsoSchedule(str, Enum):
    """How the timestep window is applied (`iso.schedule`)."""

    micro_batch = "micro_batch"  # official: one regime draw per micro-batch
    per_sample = "per_sample"  # each sample draws its own regime


class Probe(str, Enum):
    gaussian = "gaussian"
    rademacher = "rademacher"


class DatasetName(str, Enum):
    shapes = "shapes"
    mnist = "mnist"
    folder = "folder"


class LRSchedule(str, Enum):
    """`optim.lr_schedule`: the schedules of diffusers.optimization.get_scheduler that need
    only warm-up and training steps."""

    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Stage(str, Enum):
    """`stage`: which recipe of the tier a job follows (conf/recipe/<tier>_<stage>.yaml)."""

    none = "none"  # the tier's training values alone
    base = "base"  # pretraining the tier's base model of a dataset
    finetune = "finetune"  # fine-tuning from a base (init_from), as every spec's job does


class BaseSource(str, Enum):
    """`tier.bases`: where a tier's fine-tunes start."""

    shipped = "shipped"  # isodiff/pretrained/<tier>/<dataset> (`make bases` remakes them)
    trained = "trained"  # the sweep pretrains them (stage=base) before the fine-tunes
    given = "given"  # the user's checkpoint (init_from=)


class BetaSchedule(str, Enum):
    """`diffusion.beta_schedule`: diffusers' DDPMScheduler schedules."""

    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"
    sigmoid = "sigmoid"


# The U-Net blocks HUNet's split forward supports (diffusers' UNet2DModel without cross
# attention); others fail here rather than when the job has started.
DOWN_BLOCKS = (
    "DownBlock2D",
    "AttnDownBlock2D",
    "ResnetDownsampleBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
)
UP_BLOCKS = (
    "UpBlock2D",
    "AttnUpBlock2D",
    "ResnetUpsampleBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
)


class Objective(str, Enum):
    """`diffusion.objective`: what the denoiser is trained to predict, and how it samples."""

    ddpm = "ddpm"  # epsilon on DDPM's x_t; DDIM (isodiff.model.sampling.DDIM)
    flow = "flow"  # rectified-flow velocity, isodiff.flow's conventions; Euler (FlowEuler)


class Arch(str, Enum):
    """`model.arch`: the denoiser's backbone."""

    unet = "unet"  # diffusers' UNet2DModel, h at its mid block (isodiff.model.unet.HUNet)
    dit = "dit"  # diffusers' DiTTransformer2DModel, h at its middle block (model.dit.HDiT)


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class IsoConfig:
    metric: IsoMetric = IsoMetric.spherical
    window: float = 0.5  # the paper's p: iso loss on t in [p*T, T)
    schedule: IsoSchedule = IsoSchedule.micro_batch
    radius: IsoRadius = IsoRadius.norm
    n_probes: int = 1
    probe: Probe = Probe.gaussian
    batch_fraction: float = 1.0  # share of a regularised micro-batch that gets the iso term
    # running-mean rate of the path-length baseline, and of smooth_diffusion's a (the peer's
    # official decay is 0.01, the default)
    path_length_decay: float = 0.01

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.window < 1.0,
            "iso.window",
            self.window,
            "the timestep window p must be in [0, 1): iso loss on t in [p*T, T)",
        )
        _check(self.n_probes >= 1, "iso.n_probes", self.n_probes, "use at least 1 probe")
        _check(
            0.0 < self.batch_fraction <= 1.0,
            "iso.batch_fraction",
            self.batch_fraction,
            "must be in (0, 1]",
        )
        _check(
            0.0 < self.path_length_decay <= 1.0,
            "iso.path_length_decay",
            self.path_length_decay,
            "must be in (0, 1]",
        )
        # isometry.py: the official loss draws its chart probe from a Gaussian only
        _check(
            self.metric != IsoMetric.isodiff_compat or self.probe == Probe.gaussian,
            "iso.probe",
            Probe(self.probe).value,
            "iso.metric=isodiff_compat is the "
            "official loss, whose chart probe is Gaussian: use iso.probe=gaussian, or "
            "another iso.metric (euclidean, spherical) with iso.probe=rademacher",
        )
        # smoothness.py: the peer draws one Gaussian dx0 per sample, on every sample
        if self.metric == IsoMetric.smooth_diffusion:
            for key, value, default in (
                ("iso.probe", Probe(self.probe).value, Probe.gaussian.value),
                ("iso.n_probes", self.n_probes, 1),
                ("iso.batch_fraction", self.batch_fraction, 1.0),
            ):
                _check(
                    value == default,
                    key,
                    value,
                    f"iso.metric=smooth_diffusion draws one Gaussian dx0 for every sample "
                    f"(Smooth Diffusion's definition): use {key}={default}",
                )


@dataclass
class DataConfig:
    name: DatasetName = DatasetName.shapes
    resolution: int = 32
    channels: int = 3
    root: str | None = None  # folder: the image directory
    size: int | None = 10_000  # number of items (shapes: generated; others: first N; null: all)
    seed: int = 0  # shapes: the factor draw
    flip: bool = False  # folder: add mirrored copies (EDM's xflip)
    num_workers: int = 0
    # folder: the images' attributes as factors, from a file in CelebA's list_attr_celeba.txt
    # format (image count, attribute names, `file v1 v2 ..` of -1/1); null: no factors
    attributes: str | None = None
    attribute_names: list[str] | None = None  # folder: keep only these attributes (null: all)

    def __post_init__(self) -> None:
        _check(self.resolution >= 8, "data.resolution", self.resolution, "must be >= 8")
        _check(self.channels in (1, 3), "data.channels", self.channels, "must be 1 or 3")
        _check(
            self.size is None or self.size >= 1,
            "data.size",
            self.size,
            "must be >= 1 or null (all)",
        )
        _check(
            self.name != DatasetName.shapes or self.channels == 3,
            "data.channels",
            self.channels,
            "data=shapes is coloured: use data.channels=3",
        )
        _check(
            self.name != DatasetName.folder or bool(self.root),
            "data.root",
            self.root,
            "data=folder needs data.root=/path/to/images",
        )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _check(
            self.seed >= 0,
            "data.seed",
            self.seed,
            "must be >= 0 (numpy seeds the draw of the shapes' factors with it)",
        )
        _check(
            self.attributes is None or self.name == DatasetName.folder,
            "data.attributes",
            self.attributes,
            f"data={DatasetName(self.name).value} has its own factors: "
            "attribute files are for data=folder; drop data.attributes",
        )
        names = self.attribute_names
        _check(
            names is None or self.attributes is not None,
            "data.attribute_names",
            names,
            "selects attributes of data.attributes: set data.attributes=/path/to/"
            "list_attr_celeba.txt, or data.attribute_names=null",
        )
        _check(
            names is None or len(set(names)) == len(names) >= 1,
            "data.attribute_names",
            names,
            "list each attribute once, at least one (null: all of the file's)",
        )


@dataclass
class DiTConfig:
    """`model.dit.*`: arguments of diffusers' DiTTransformer2DModel (read when model.arch=dit;
    sample_size, in_channels, out_channels and dropout are model's own)."""

    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 16

    def __post_init__(self) -> None:
        for key in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim"):
            value = getattr(self, key)
            _check(value >= 1, f"model.dit.{key}", value, "must be >= 1")


@dataclass
class ModelConfig:
    """Arguments of diffusers' UNet2DModel (names kept as diffusers spells them), or with
    arch=dit those of its DiTTransformer2DModel (`dit`)."""

    name: str = "tiny"
    arch: Arch = Arch.unet
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = 1
    attention_head_dim: int | None = 8
    norm_num_groups: int = 8
    norm_eps: float = 1e-5
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    dit: DiTConfig = field(default_factory=DiTConfig)
    # The transformer block whose output is h (negative counts from the end); None: the
    # middle one, adapters.h_encoder's default. A U-Net's h is its mid block.
    h_block: int | None = None

    def __post_init__(self) -> None:
        if self.arch == Arch.dit:  # the U-Net fields are not read
            n = self.dit.num_layers
            _check(
                self.h_block is None or -n <= self.h_block < n,
                "model.h_block",
                self.h_block,
                f"name one of the {n} blocks of model.dit.num_layers (-{n}..{n - 1}) or null",
            )
            return
        _check(
            self.h_block is None,
            "model.h_block",
            self.h_block,
            "a U-Net's h is its mid block: use null, or a transformer (model.arch=dit)",
        )
        n = len(self.block_out_channels)
        _check(
            len(self.down_block_types) == n and len(self.up_block_types) == n,
            "model.down_block_types",
            self.down_block_types,
            "block_out_channels, down_block_types and up_block_types need equal lengths",
        )
        for key, blocks, known in (
            ("model.down_block_types", self.down_block_types, DOWN_BLOCKS),
            ("model.up_block_types", self.up_block_types, UP_BLOCKS),
        ):
            _check(set(blocks) <= set(known), key, blocks, f"use blocks of {list(known)}")
        _check(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
            "model.norm_num_groups",
            self.norm_num_groups,
            "must divide every entry of model.block_out_channels",
        )


@dataclass
class DiffusionConfig:
    # flow: x_t = (1 - t) x0 + t noise with t in [0, 1] and the model at timestep t T,
    # velocity noise - x0 (isodiff/flow.py); the betas and prediction_type are DDPM's
    objective: Objective = Objective.ddpm
    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = BetaSchedule.linear
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    # DDIM sampling clamps its x0 prediction to [-1, 1] (diffusers' DDIMScheduler
    # clip_sample, on in the official code); inversion never clips.
    clip_sample: bool = True

    def __post_init__(self) -> None:
        _check(
            self.num_train_timesteps >= 2,
            "diffusion.num_train_timesteps",
            self.num_train_timesteps,
            "must be >= 2",
        )
        _check(
            0.0 < self.beta_start < self.beta_end < 1.0,
            "diffusion.beta_start",
            (self.beta_start, self.beta_end),
            "need 0 < beta_start < beta_end < 1",
        )
        _check(
            self.prediction_type == "epsilon",
            "diffusion.prediction_type",
            self.prediction_type,
            "only epsilon prediction is supported",
        )
        _check(
            self.objective == Objective.ddpm or not self.clip_sample,
            "diffusion.clip_sample",
            self.clip_sample,
            "the flow sampler (Euler, as diffusers') does not clip: use false with "
            "diffusion.objective=flow",
        )


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    eps: float = 1e-8
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # diffusers EMAModel warm-up: decay = 1 - (1 + step/gamma)^-power
    ema_power: float = 0.75

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "need two values in [0, 1)",
        )
        _check(0.0 <= self.ema_decay < 1.0, "optim.ema_decay", self.ema_decay, "must be in [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class LoraOptions:
    """`train.lora.*`: a LoRA fine-tune (isodiff.lora.add_lora): the base frozen, only the
    adapter trains; final/ holds the adapter merged into the base weights."""

    rank: int = 0  # 0: off (every weight trains)
    alpha: float | None = None  # null: rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "train.lora.rank", self.rank, "must be >= 0 (0: no LoRA)")
        _check(
            self.alpha is None or self.alpha > 0,
            "train.lora.alpha",
            self.alpha,
            "must be > 0 or null (rank)",
        )
        _check(
            len(self.targets) >= 1,
            "train.lora.targets",
            self.targets,
            "name at least one module (diffusers' attention: to_k, to_q, to_v, to_out.0)",
        )


# accelerate's trackers (its LoggerType but `all`), each the name of the package it needs
TRACKERS = (
    "tensorboard",
    "wandb",
    "trackio",
    "comet_ml",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
    "aim",
)


@dataclass
class LoopConfig:
    """Length and bookkeeping of one training job (`train.*`)."""

    steps: int = 100  # optimizer steps (replaced by train.epochs when that is set)
    batch_size: int = 16  # per process and micro-batch
    grad_accum: int = 1
    # Images per optimizer step over all processes; grad_accum then follows from the process
    # count (effective_batch / (batch_size x processes)), so a job is the same job on any
    # number of GPUs. null: grad_accum as given.
    effective_batch: int | None = None
    # Length in passes over the training images (the released recipes' 5 epochs): steps =
    # ceil(epochs x images / effective batch). null: train.steps.
    epochs: float | None = None
    mixed_precision: MixedPrecision = MixedPrecision.no
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    # Where the curves go (isodiff.runs.tracking): tensorboard (<run>/tb), another of
    # accelerate's trackers (TRACKERS), or none
    log_with: str = "tensorboard"
    # CPU only: torch's intra-op threads (null = torch's default). Small U-Nets gain little
    # from threads and lose ~10x when OpenMP threads contend with other processes.
    cpu_threads: int | None = None
    # A grid of EMA samples (DDIM from fixed x_T) at every checkpoint and at the end:
    # samples/step_*.png and TensorBoard. 0 disables.
    grid_samples: int = 64
    grid_steps: int = 50
    # Held-out L_iso of the trained U-Net (eval.liso's quantity, on heldout_n test images)
    # every heldout_every steps, in metrics.csv's liso_heldout: the curve that says how long
    # a fine-tune must be. 0 disables.
    heldout_every: int = 0
    heldout_n: int = 32
    lora: LoraOptions = field(default_factory=LoraOptions)

    def __post_init__(self) -> None:
        _check(
            self.heldout_every >= 0,
            "train.heldout_every",
            self.heldout_every,
            "must be >= 0 (0: no held-out L_iso during training)",
        )
        for key in (
            "steps",
            "batch_size",
            "grad_accum",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "heldout_n",
        ):
            value = getattr(self, key)
            _check(value >= 1, f"train.{key}", value, "must be >= 1")
        _check(
            self.grid_samples >= 0,
            "train.grid_samples",
            self.grid_samples,
            "must be >= 0 (0: no sample grids)",
        )
        _check(self.grid_steps >= 1, "train.grid_steps", self.grid_steps, "must be >= 1")
        _check(
            self.log_with in (*TRACKERS, "none"),
            "train.log_with",
            self.log_with,
            f"use one of accelerate's trackers ({', '.join(TRACKERS)}) or none",
        )
        _check(
            self.log_with == "none" or importlib.util.find_spec(self.log_with) is not None,
            "train.log_with",
            self.log_with,
            f"its package is not installed: pip install {self.log_with}, "
            "or train.log_with=tensorboard (or none)",
        )
        _check(
            self.cpu_threads is None or self.cpu_threads >= 1,
            "train.cpu_threads",
            self.cpu_threads,
            "must be >= 1 or null (torch's default)",
        )
        _check(
            self.effective_batch is None or self.effective_batch >= 1,
            "train.effective_batch",
            self.effective_batch,
            "must be >= 1 or null",
        )
        _check(
            self.effective_batch is None or self.grad_accum == 1,
            "train.grad_accum",
            self.grad_accum,
            "train.effective_batch sets the accumulation from the process "
            "count: set one of them (train.grad_accum=1 or train.effective_batch=null)",
        )
        _check(
            self.epochs is None or self.epochs > 0,
            "train.epochs",
            self.epochs,
            "must be > 0 or null (train.steps)",
        )

    def resolved(self, images: int, processes: int) -> LoopConfig:
        """This loop on `processes` processes over `images` training images: grad_accum from
        effective_batch, steps from epochs (ConfigError when the batch does not divide)."""
        grad_accum = self.grad_accum
        if self.effective_batch is not None:
            per_step = self.batch_size * processes
            _check(
                self.effective_batch % per_step == 0,
                "train.effective_batch",
                self.effective_batch,
                f"must be a multiple of train.batch_size x processes "
                f"({self.batch_size} x {processes} = {per_step}): change train.batch_size "
                "or the number of GPUs",
            )
            grad_accum = self.effective_batch // per_step
        steps = self.steps
        if self.epochs is not None:
            steps = max(
                1, math.ceil(self.epochs * images / (self.batch_size * grad_accum * processes))
            )
        return dataclasses.replace(
            self, steps=steps, grad_accum=grad_accum, effective_batch=None, epochs=None
        )


@dataclass
class TierConfig:
    """What a tier is besides its training values (conf/tier/<name>.yaml, the one place a
    tier is defined): where its fine-tunes' bases come from and its evaluation presets."""

    name: str = "smoke"
    bases: BaseSource = BaseSource.trained
    eval: str = "smoke"  # the isodiff.evaluate preset of the fine-tunes (conf/eval/)
    base_eval: str = "base"  # the preset of a base's quality check (`make bases`)
    # The config group a spec's datasets name: `data` (data=shapes), or `preset` at the paper
    # tier (preset=ddpm_celebahq256: checkpoint, model, data and recipe together)
    dataset_group: str = "data"

    def __post_init__(self) -> None:
        _check(
            self.dataset_group in ("data", "preset"),
            "tier.dataset_group",
            self.dataset_group,
            "use data or preset",
        )
        for key in ("eval", "base_eval"):
            preset = getattr(self, key)
            _check(
                (CONF / "eval" / f"{preset}.yaml").is_file(),
                f"tier.{key}",
                preset,
                "is not a preset in conf/eval/",
            )


AUTOENCODERS = ("VQModel", "AutoencoderKL")  # the diffusers classes latent.autoencoder may name


@dataclass
class LatentConfig:
    """Latent diffusion (isodiff.model.latent): the U-Net models the codes of a frozen
    autoencoder."""

    # a diffusers VQModel or AutoencoderKL folder (save_pretrained); null: a pixel model
    autoencoder: str | None = None
    scale: float | None = None  # latent scaling factor; null: the checkpoint's scaling_factor

    def geometry(self) -> tuple[str, int, int]:
        """(class name, latent channels, downsampling factor) from the autoencoder's
        config.json, without loading its weights (validation before anything runs)."""
        path = Path(self.autoencoder or "").expanduser() / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"latent.autoencoder={self.autoencoder!r}: no readable "
                f"config.json ({err}); point it at a VQModel or AutoencoderKL "
                "folder saved with save_pretrained (e.g. the vqvae/ subfolder "
                "of CompVis/ldm-celebahq-256)"
            ) from err
        kind = config.get("_class_name")
        if kind not in AUTOENCODERS:
            raise ConfigError(
                f"latent.autoencoder={self.autoencoder!r} is a {kind}: use a "
                f"folder of one of {AUTOENCODERS}"
            )
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        return kind, int(config["latent_channels"]), factor


@dataclass
class AssetsConfig:
    """The paper tier's checkpoints and datasets, prepared once by `make paper-assets`
    (isodiff.model.paper_assets) and checked against their manifests before a job runs."""

    root: str = "assets"  # conf/train.yaml: $ISODIFF_ASSETS, else ./assets
    required: list[str] = field(default_factory=list)  # asset names a preset needs


@dataclass
class TrainConfig:
    seed: int = 0
    lambda_iso: float = 0.0
    init_from: str | None = None  # run dir, diffusers checkpoint dir or cached hub id
    experiment: str = "default"
    run_root: str = "runs"
    name: str = "default"  # job folder name; conf/train.yaml derives it from the overrides
    # the keys whose values name the job's folder (null: its command-line overrides)
    name_keys: list[str] | None = None
    iso: IsoConfig = field(default_factory=IsoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    tier: TierConfig = field(default_factory=TierConfig)
    stage: Stage = Stage.none
    latent: LatentConfig = field(default_factory=LatentConfig)
    assets: AssetsConfig = field(default_factory=AssetsConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(
            self.lambda_iso >= 0,
            "lambda_iso",
            self.lambda_iso,
            "the weight of the isometric loss must be >= 0 (0 trains plain DDPM)",
        )
        if self.stage == Stage.finetune and self.init_from is None:
            tier, data = self.tier.name, self.data.name.value
            raise ConfigError(
                f"init_from is not set: stage=finetune fine-tunes a base and tier={tier} "
                f"ships none for data={data}: pass init_from=<a done run, a diffusers "
                "checkpoint folder or a cached hub id>, e.g. the run of `python -m "
                f"isodiff.train tier={tier} data={data} stage=base`"
            )
        _check(
            self.train.lora.rank == 0 or self.init_from is not None,
            "train.lora.rank",
            self.train.lora.rank,
            "LoRA adapts a trained base: set init_from= (or stage=finetune), or train.lora.rank=0",
        )
        _check(
            self.train.lora.rank == 0 or importlib.util.find_spec("peft") is not None,
            "train.lora.rank",
            self.train.lora.rank,
            "LoRA needs peft: pip install 'isodiff[lora]', or train.lora.rank=0",
        )
        if self.diffusion.objective == Objective.flow:  # isodiff/flow.py's conventions
            _check(
                self.iso.metric not in (IsoMetric.smooth_diffusion, IsoMetric.isodiff_compat),
                "iso.metric",
                IsoMetric(self.iso.metric).value,
                "is defined on DDPM's epsilon and noise schedule, not with "
                "diffusion.objective=flow: use spherical, euclidean or path_length",
            )
            _check(
                self.iso.radius == IsoRadius.norm,
                "iso.radius",
                IsoRadius(self.iso.radius).value,
                "with diffusion.objective=flow |x_t| moves with t: the sphere is x_t's own "
                "(isodiff/flow.py): use iso.radius=norm",
            )
        channels, size, what = self.data.channels, self.data.resolution, "data"
        if self.latent.autoencoder:  # the U-Net models the autoencoder's latents
            _, channels, factor = self.latent.geometry()
            size, what = self.data.resolution // factor, "the latent of latent.autoencoder"
            _check(
                not self.diffusion.clip_sample,
                "diffusion.clip_sample",
                True,
                "latents are not in [-1, 1]: latent diffusion needs "
                "diffusion.clip_sample=false (as diffusers' LDM pipelines)",
            )
        _check(
            self.model.in_channels == channels,
            "model.in_channels",
            self.model.in_channels,
            f"must equal the channels of {what} ({channels})",
        )
        _check(
            self.model.out_channels == channels,
            "model.out_channels",
            self.model.out_channels,
            f"must equal the channels of {what} ({channels})",
        )
        _check(
            self.model.sample_size == size,
            "model.sample_size",
            self.model.sample_size,
            f"must equal the resolution of {what} ({size})",
        )
        if self.model.arch == Arch.dit:  # DiT cuts the image into patch_size^2 tiles
            patch = self.model.dit.patch_size
            _check(
                size % patch == 0,
                "model.dit.patch_size",
                patch,
                f"must divide the size of {what} ({size}): e.g. model.dit.patch_size="
                f"{max(d for d in (1, 2, 4, 8) if size % d == 0)}",
            )
            return
        # Every block but the last halves the image; the up path concatenates the skips, so
        # an odd size on the way down (9 -> 5 -> 10) no longer matches on the way up.
        halvings = len(self.model.block_out_channels) - 1
        if size % 2**halvings:
            fit = max(2**halvings, round(size / 2**halvings) * 2**halvings)
            _check(
                False,
                "data.resolution",
                self.data.resolution,
                f"the U-Net halves {what}'s size ({size}) {halvings} time(s) "
                f"(model.block_out_channels has {halvings + 1} blocks), so it must be a "
                f"multiple of {2**halvings}: e.g. data.resolution="
                f"{fit * (self.data.resolution // size)}",
            )

    @property
    def regularised(self) -> bool:
        return self.lambda_iso > 0 and self.iso.metric != IsoMetric.none


def default_base(*, _root_: DictConfig) -> str | None:
    """`init_from` unless given (conf/train.yaml): at stage=finetune, at a tier whose bases
    ship, the shipped base of the job's data, as the sweep fine-tunes it (the signature holds
    a base by its files, so it is the sweep's job); None elsewhere (TrainConfig then asks a
    fine-tune for init_from=)."""
    tier = _root_.tier
    base = PRETRAINED / str(tier.name) / DatasetName(_root_.data.name).value
    fine_tune = Stage(_root_.stage) == Stage.finetune
    shipped_here = BaseSource(tier.bases) == BaseSource.shipped
    return str(base) if fine_tune and shipped_here and (base / "config.json").is_file() else None


def spec_dataset(*, _root_: DictConfig) -> str:
    """A job's dataset as the tier's specs name it, the sweep's experiment= of its
    fine-tunes (conf/stage/finetune.yaml): its data, or its preset at a tier whose specs
    name presets (tier.dataset_group; its data when no preset is chosen)."""
    by_preset = _root_.tier.dataset_group == "preset" and HydraConfig.initialized()
    preset = HydraConfig.get().runtime.choices.get("preset") if by_preset else None
    return str(preset) if preset else DatasetName(_root_.data.name).value


def register_schemas() -> None:
    """Make the schemas available to conf/ (`defaults: [train_schema, ...]`), and the
    resolvers of the defaults that follow the stage (init_from, experiment)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("default_base", default_base, replace=True)
    OmegaConf.register_new_resolver("spec_dataset", spec_dataset, replace=True)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed DictConfig -> validated TrainConfig (raises ConfigError on bad values)."""
    # Re-merging a plain container into the schema refuses keys forced in with `+key=`.
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    except ConfigKeyError as err:
        siblings = err.parent_node.keys() if err.parent_node is not None else ()
        raise ConfigError(unknown_key(err.full_key, siblings, "python -m isodiff.train")) from err
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def check_run_folder(run: str) -> None:
    """ConfigError naming run= unless it is a folder that a job wrote status.json in: a path
    that does not exist (with the nearest existing name), a file of a run (status.json, a
    weights file: with its folder), a folder that is no run (with a run below it, if any)."""
    path = Path(run).expanduser()
    if not path.exists():
        raise ConfigError(f"run={run!r} does not exist: {_nearest(path)}")
    if not path.is_dir():
        parent = next((p for p in path.parents if (p / "status.json").is_file()), None)
        fix = f"run={parent}" if parent else "the folder of the run, which holds status.json"
        raise ConfigError(f"run={run!r} is a file, not a run folder: pass {fix}")
    if not (path / "status.json").is_file():
        # the first run below it (bounded: a tier's folder holds <experiment>/<job>/)
        below = next(
            (s.parent for d in (1, 2, 3) for s in path.glob("*/" * d + "status.json")), None
        )
        hint = f"; pass one of the runs below it, e.g. run={below}" if below else ""
        raise ConfigError(
            f"run={run!r} is not a run folder (it holds no status.json): a run folder is "
            "<run_root>/<tier>/<experiment>/<job>/ as python -m isodiff.train writes it, with "
            f"status.json, config.yaml and final/{hint}"
        )


def _nearest(path: Path) -> str:
    """What exists of a missing path: its deepest existing folder, and the name there that
    its first missing part most likely meant (the rest of the path kept)."""
    base, rest = path, []
    while not base.exists():
        base, rest = base.parent, [base.name, *rest]
    try:
        names = sorted(p.name for p in base.iterdir() if p.is_dir())
    except OSError:  # not a folder, or not ours to list: no guess
        names = []
    near = closest(rest[0], names)
    where = f"{Path.cwd() if base == Path() else base} has no {rest[0]!r}"  # '.': say which
    return f"{where}; did you mean run={Path(base, near, *rest[1:])}?" if near else where


def check_device(name: str) -> None:
    """ConfigError naming device= when the device asked for is not on this machine: checked
    before any model or metric is loaded, so nothing is recorded as failed."""
    import torch  # here: config.py stays light for the commands that never need torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device(s) visible" if count else "no CUDA GPU visible"
            raise ConfigError(
                f"device={name!r}: {seen} here (torch.cuda.is_available() is "
                f"{torch.cuda.is_available()}): use device=auto or device=cpu"
                + (f", or cuda:0..cuda:{count - 1}" if count else "")
            )
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "device='mps': no Apple GPU here (torch.backends.mps.is_available()"
            " is False): use device=auto or device=cpu"
        )


def tier_config(tier: str) -> TierConfig:
    """The `tier` node of conf/tier/<tier>.yaml, validated (ConfigError for an unknown tier)."""
    path = CONF / "tier" / f"{tier}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONF / "tier").glob("*.yaml"))
        near = closest(tier, names)
        hint = f"did you mean tier={near}? " if near else ""
        raise ConfigError(f"tier={tier!r} is not a tier: {hint}(conf/tier/: {', '.join(names)})")
    node = OmegaConf.load(path).get("tier", {})
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TierConfig), node))
    except OmegaConfBaseException as err:
        raise ConfigError(f"conf/tier/{tier}.yaml: {err}") from err


def compose(
    name: str, overrides: list[str], conf: Path = CONF, hydra_node: bool = False
) -> DictConfig:
    """conf/<name>.yaml composed with overrides as its command would compose it; hydra_node:
    with the `hydra` node, made the current HydraConfig (so that ${hydra:...} resolves)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base=None):
        cfg = hydra_compose(name, overrides=overrides, return_hydra_config=hydra_node)
    if hydra_node:
        HydraConfig.instance().set_config(cfg)
    return cfg
