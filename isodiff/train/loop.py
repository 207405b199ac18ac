"""The training loop: accelerate, EMA, checkpoints with rotation and exact resume.

Every random draw of step s comes from a generator seeded by (seed, s, micro-batch's place
in the step over all processes) and the data order from one seeded by (seed, epoch), so a
job resumed from its last checkpoint reaches bitwise the weights of an uninterrupted one (on
CPU), and W processes draw what one process accumulating W times as often draws.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from isodiff.config import IsoMetric, TrainConfig
from isodiff.errors import UserError
from isodiff.lora import add_lora, lora_parameters, merged_state_dict
from isodiff.model import pictures, seeding
from isodiff.model.data import build_dataset
from isodiff.model.diffusion import noising
from isodiff.model.latent import Codec, build_codec
from isodiff.model.unet import MAX_ABS_WEIGHT, Denoiser, diverged, init_unet
from isodiff.runs.files import (
    field_problem,
    file_hashes,
    mapping_problem,
    read_json,
    replace_durably,
)
from isodiff.runs.status import read_status, write_status
from isodiff.runs.tracking import init_trackers
from isodiff.train.objective import (
    DiffusionObjective,
    build_objective,
    draw_timesteps,
    window_start,
)

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d{{8}})")  # what save_checkpoint names


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became nan/inf: the job stops and nothing is written as final."""


class DivergedWeightsError(UserError, RuntimeError):
    """Training ended with nan, inf or out-of-range weights (model.unet.diverged): the job fails
    instead of being marked done."""


class StepBatches:
    """Batch sampler: micro-batch m of process r holds the dataset positions
    [m*B*W + r*B, m*B*W + (r+1)*B) of an endless stream of per-epoch permutations."""

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.n, generator=seeding.generator(self.seed, "data", epoch))
            }
        return int(self._perms[epoch][position % self.n])

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        while True:
            first = (micro * self.world + self.rank) * self.batch_size
            yield [self._index(p) for p in range(first, first + self.batch_size)]
            micro += 1


@dataclass
class TrainState:
    """What the loop needs besides the prepared objective."""

    accelerator: Accelerator
    objective: DiffusionObjective
    unet: Denoiser  # HUNet, or HDiT with model.arch=dit
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    codec: Codec  # images -> the space the U-Net models (the identity for a pixel model)


def build_state(cfg: TrainConfig, accelerator: Accelerator) -> TrainState:
    """The model, objective, optimizer and EMA of `cfg` (whose train.steps is resolved)."""
    torch.manual_seed(seeding.derive_seed(cfg.seed, "init"))
    unet = init_unet(cfg.model, cfg.init_from)
    lora = cfg.train.lora
    if lora.rank:  # the base frozen: only the adapter's weights train (after init's draws)
        add_lora(unet, lora.rank, lora.alpha, lora.targets)
    # the regulariser's running mean (path_length, smooth_diffusion) is a buffer of the
    # objective: accelerate's save_state/load_state checkpoint it with the weights
    objective = build_objective(cfg, unet)
    o = cfg.optim
    # the trainable parameters: all of them, or the adapter's (the same list without LoRA)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps
    )
    # Stepped by us once per optimizer step (accelerate's wrapper would step it per process).
    lr_scheduler = get_scheduler(
        o.lr_schedule.value,
        optimizer,
        num_warmup_steps=o.warmup_steps,
        num_training_steps=cfg.train.steps,
    )
    ema = EMAModel(
        unet.parameters(),
        decay=o.ema_decay,
        use_ema_warmup=o.ema_warmup,
        power=o.ema_power,
        model_cls=type(unet),
        model_config=unet.config,
    )
    objective, optimizer = accelerator.prepare(objective, optimizer)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema, lr_scheduler)
    return TrainState(
        accelerator,
        objective,
        accelerator.unwrap_model(objective).unet,
        ema,
        optimizer,
        lr_scheduler,
        build_codec(cfg.latent, accelerator.device),
    )


def check_weights(state: TrainState, cfg: TrainConfig) -> None:
    """Raises DivergedWeightsError naming the diverged tensors of the weights or of their
    EMA, and the settings to lower."""
    names = [n for n, _ in state.unet.named_parameters()]
    bad = {
        "weights": diverged(state.unet.named_parameters()),
        "EMA weights": diverged(zip(names, state.ema.shadow_params, strict=True)),
    }
    if any(bad.values()):
        detail = "; ".join(
            f"{kind}: {len(found)} tensors, e.g. {found[0]}" for kind, found in bad.items() if found
        )
        raise DivergedWeightsError(
            f"training ended with diverged weights (nan, inf or |w| > {MAX_ABS_WEIGHT:g}; "
            f"{detail}); nothing was saved as final: "
            f"lower optim.lr={cfg.optim.lr:g} or lambda_iso={cfg.lambda_iso:g}"
        )


def environment(acc: Accelerator) -> dict[str, Any]:
    """What decides the bits of a step besides the config. It is recorded, not part of the
    job's identity (the same job gets the same folder on any machine); a resume under
    another one is warned about and recorded in status.json as `not_bitwise`."""
    return {
        "torch": torch.__version__,
        "device": str(acc.device),
        "cuda": torch.version.cuda if acc.device.type == "cuda" else None,
        "threads": torch.get_num_threads() if acc.device.type == "cpu" else None,
        "processes": acc.num_processes,
    }


def environment_change(saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """How `now` differs from the environment a checkpoint was written under (None: same)."""
    if saved is None:
        return None  # a checkpoint of an older isodiff: nothing to compare
    changed = [
        f"{k}={now.get(k)} (checkpoint: {saved.get(k)})"
        for k in sorted({*saved, *now})
        if saved.get(k) != now.get(k)
    ]
    return ", ".join(changed) or None


def checkpoint_meta_problem(meta: dict[str, Any]) -> str | None:
    """A checkpoint's meta.json shape as resume reads it (None: fine): without the sha256
    of its files a checkpoint could not be checked before it is loaded."""
    return (
        field_problem(meta, "step", "int", required=True)
        or mapping_problem(
            meta.get("files"),
            "files",
            lambda name, digest: (
                None if isinstance(digest, str) else f"files[{name!r}] is not a sha256 string"
            ),
        )
        or field_problem(meta, "environment", "object")
    )


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints renamed into place (named exactly as save_checkpoint names them, holding
    meta.json), newest first. Anything else in checkpoints/ (a user's `step_00000003.bak`)
    is neither resumed from nor rotated away."""
    found = [
        (int(match[1]), p)
        for p in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
        if (match := CHECKPOINT_NAME.fullmatch(p.name)) and (p / "meta.json").is_file()
    ]
    return sorted(found, reverse=True)


def resume(state: TrainState, run_dir: Path) -> tuple[int, str | None]:
    """Load the newest checkpoint that loads completely; returns its step (0: none) and
    how the environment differs from the one that wrote it (None: same, or no checkpoint).

    A checkpoint can be complete and still damaged (a full disk, a killed copy): one whose
    files do not load is skipped, with the reason, and once an older one has loaded it is
    moved to checkpoints/.corrupt-* so that training can write that step again. Fails,
    naming them and moving nothing, when checkpoints exist and none loads.
    """
    acc, skipped = state.accelerator, []
    for step, path in complete_checkpoints(run_dir):
        try:
            meta = read_json(path / "meta.json", shape=checkpoint_meta_problem)
            if meta["step"] != step:  # a folder renamed by hand: its state is of another step
                raise ValueError(f"meta.json records step {meta['step']}, its name {step}")
            if (found := file_hashes(path, skip="meta.json")) != meta["files"]:
                changed = sorted(
                    k for k in {*found, *meta["files"]} if found.get(k) != meta["files"].get(k)
                )
                raise ValueError(f"{', '.join(changed)} differ from their sha256 in meta.json")
            acc.load_state(str(path))
        except Exception as err:  # any damaged file: safetensors, torch pickles, JSON
            skipped.append((path, f"{type(err).__name__}: {str(err)[:200]}"))
            log.warning("checkpoint %s does not load (%s): skipped", path, skipped[-1][1])
            continue
        acc.wait_for_everyone()
        for bad, _ in skipped if acc.is_main_process else []:
            aside = bad.with_name(f".corrupt-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            bad.rename(aside)
        if skipped:
            log.warning(
                "resuming from %s, the newest checkpoint that loads; the damaged "
                "ones are kept as checkpoints/.corrupt-*",
                path.name,
            )
        if change := environment_change(meta.get("environment"), environment(acc)):
            log.warning(
                "resuming %s at step %d with %s: the weights will not be bitwise "
                "those of an uninterrupted run",
                run_dir.name,
                step,
                change,
            )
        return step, change
    if skipped:
        raise UserError(
            f"no checkpoint of {run_dir} loads: "
            + "; ".join(f"{p.name} ({why})" for p, why in skipped)
            + ": delete its checkpoints/ folder to train it from step 0"
        )
    return 0, None


def save_checkpoint(state: TrainState, run_dir: Path, step: int, keep: int) -> None:
    """accelerate save_state into a temp folder, then rename: a kill never leaves a
    checkpoint that looks complete. Older checkpoints beyond `keep` are removed."""
    acc = state.accelerator
    ckpt_dir = run_dir / "checkpoints"
    tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every rank's files are in tmp before it is renamed
    if acc.is_main_process:
        # written last: the sha256 of every file, checked before a resume loads them
        (tmp / "meta.json").write_text(
            json.dumps({"step": step, "files": file_hashes(tmp), "environment": environment(acc)})
        )
        replace_durably(tmp, ckpt_dir / f"{CHECKPOINT_PREFIX}{step:08d}")
        for _, old in complete_checkpoints(run_dir)[keep:]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def write_grid(state: TrainState, cfg: TrainConfig, run_dir: Path, step: int) -> None:
    """samples/step_<step>.png (and TensorBoard's samples image, train.log_with=tensorboard):
    the EMA weights' DDIM samples from fixed x_T. Sampling draws from its own generators and
    leaves the weights as they were, so a run with grids trains bitwise as one without."""
    loop = cfg.train
    if not (loop.grid_samples and state.accelerator.is_main_process):
        return
    params, mode = list(state.unet.parameters()), state.unet.training
    state.ema.store(params)
    state.ema.copy_to(params)
    try:
        grid = pictures.sample_grid(
            state.unet, cfg.diffusion, loop.grid_samples, loop.grid_steps, codec=state.codec
        )
    finally:
        state.ema.restore(params)
        state.unet.train(mode)
    pictures.save_png(
        grid, run_dir / "samples" / f"step_{step:08d}.png", scale=max(1, 64 // cfg.data.resolution)
    )
    if loop.log_with == "tensorboard":
        state.accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, step)


def save_weights(unet: Denoiser, path: Path) -> None:
    """unet.save_pretrained(path); a LoRA-adapted model as its class without adapters, the
    adapter merged into the base weights (base + scale * B A), so that final/ loads for
    evaluation and as a base like any run's."""
    if not lora_parameters(unet):
        unet.save_pretrained(path)
        return
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(merged_state_dict(unet))
    plain.save_pretrained(path)


def save_final(state: TrainState, run_dir: Path) -> None:
    """final/unet (raw weights) and final/unet_ema, via a temp folder and one rename."""
    if not state.accelerator.is_main_process:
        return
    tmp, final = run_dir / ".tmp-final", run_dir / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(state.unet, tmp / "unet")
    params = list(state.unet.parameters())
    state.ema.store(params)
    state.ema.copy_to(params)
    save_weights(state.unet, tmp / "unet_ema")
    state.ema.restore(params)
    shutil.rmtree(final, ignore_errors=True)
    replace_durably(tmp, final)


class MetricLog:
    """metrics.csv and the trackers (accelerate's), main process only; rows past a resume
    point are dropped, and TensorBoard's events past it too (runs.tracking.init_trackers)."""

    FIELDS = ("step", "loss", "mse", "iso", "iso_active", "lr", "steps_per_s", "liso_heldout")

    def __init__(self, acc: Accelerator, run_dir: Path, start_step: int) -> None:
        self.acc, self.enabled = acc, acc.is_main_process
        if not self.enabled:
            return
        self.path = run_dir / "metrics.csv"
        rows = []
        if self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        known = {k: v for k, v in row.items() if math.isfinite(v)}  # iso: nan when unmeasured
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: known.get(k, "") for k in self.FIELDS})
        self.acc.log({f"train/{k}": v for k, v in known.items() if k != "step"}, step=row["step"])


class Window:
    """The loss terms of the micro-batches since the last logged step, over every process:
    L_iso as its mean over the iso-active samples, their fraction (iso_active), MSE and the
    weighted total (loss) as means over micro-batches. One step's L_iso is noisy, and with
    iso.schedule=micro_batch about p of the steps have no iso-active sample at all."""

    KEYS = ("loss", "mse", "iso_sum", "active", "samples", "micro")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, out: dict[str, float], active: int, samples: int) -> None:
        """One micro-batch: its objective's terms, its iso-active and all samples."""
        terms = {"loss": out["loss"], "mse": out["mse"], "iso_sum": out.get("iso", 0.0) * active}
        for key, value in {**terms, "active": active, "samples": samples, "micro": 1}.items():
            self.sums[key] += value

    def means(self, acc: Accelerator | None = None) -> dict[str, float]:
        """The window's means (iso: nan when no sample was iso-active); with `acc`, over all
        its processes (a collective: every process calls it)."""
        sums = list(self.sums.values())
        if acc is not None and acc.num_processes > 1:
            sums = acc.reduce(torch.tensor(sums, dtype=torch.float64, device=acc.device), "sum")
            sums = sums.tolist()
        loss, mse, iso_sum, active, samples, micro = sums
        return {
            "loss": loss / micro,
            "mse": mse / micro,
            "iso": iso_sum / active if active else math.nan,
            "iso_active": active / samples,
        }

    @staticmethod
    def postfix(means: dict[str, float], penalty: str) -> dict[str, str]:
        """The progress bar's columns; `penalty` names the regulariser (IsoMetric.penalty)."""
        return {
            "loss": f"{means['loss']:.4f}",
            "mse": f"{means['mse']:.4f}",
            penalty: "n/a" if math.isnan(means["iso"]) else f"{means['iso']:.4f}",
            "iso_active": f"{means['iso_active']:.0%}",
        }


class HeldoutCurve:
    """Held-out L_iso (metrics.liso's liso_scaled) of the trained U-Net on the first
    train.heldout_n test images, fixed noise and probes, at the window's first, middle and
    last timesteps: comparable across steps and across the runs of a table."""

    def __init__(self, cfg: TrainConfig, codec: Codec, device: torch.device) -> None:
        test = build_dataset(cfg.data, "test")
        n = min(cfg.train.heldout_n, len(test))
        self.x_0 = codec.encode(torch.stack([test[i][0] for i in range(n)]).to(device)).cpu()
        T, start = cfg.diffusion.num_train_timesteps, window_start(cfg)
        self.timesteps = sorted({start, (start + T) // 2, T - 1})
        self.noising = noising(cfg.diffusion)
        self.device = device

    def __call__(self, unet: Denoiser) -> float:
        from isodiff.evaluate.metrics.liso import heldout_liso  # the metric's quantity, one batch

        return heldout_liso(
            unet.encode_h, self.x_0, 0, self.timesteps, self.noising, device=self.device
        )


def record_resume(run_dir: Path, start_step: int, change: str | None) -> None:
    """Note in status.json how this attempt's weights may differ from an uninterrupted run's
    (the list is reset when the job starts again from step 0)."""
    if (status := read_status(run_dir)) is None:
        return
    before = status.get("not_bitwise") or []
    record = [
        *(before if start_step else []),
        *([f"resumed at step {start_step} with {change}"] if change else []),
    ]
    if record != before:
        write_status(run_dir, status["state"], not_bitwise=record or None)


def accumulate(
    state: TrainState,
    cfg: TrainConfig,
    acc: Accelerator,
    batches: Iterator,
    step: int,
    window: Window,
) -> None:
    """Forward and backward of the step's micro-batches; their loss terms into `window`."""
    loop = cfg.train
    for micro in range(loop.grad_accum):
        x0 = state.codec.encode(next(batches)[0].to(acc.device))  # no graph: frozen
        # keyed by the micro-batch's place in the step over all processes (its data's place
        # too, StepBatches): W processes draw what one process accumulating W times as often
        # draws, and a single process draws what it always drew
        g = seeding.generator(
            cfg.seed, "train", step, micro * acc.num_processes + acc.process_index, 0
        )
        t, iso_mask = draw_timesteps(cfg, x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g).to(acc.device)
        sync = (
            contextlib.nullcontext()
            if micro == loop.grad_accum - 1
            else acc.no_sync(state.objective)
        )
        with sync, acc.autocast():
            out = state.objective(x0, noise, t.to(acc.device), iso_mask.to(acc.device), generator=g)
        loss = out["loss"]
        if not torch.isfinite(loss):
            values = {k: float(v.detach()) for k, v in out.items()}
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({values}); lower optim.lr or lambda_iso, "
                "or train with train.mixed_precision=no"
            )
        acc.backward(loss / loop.grad_accum)
        terms = {k: float(v.detach()) for k, v in out.items()}
        window.add(terms, int(iso_mask.sum()), len(iso_mask))


def above_progress_bar() -> contextlib.AbstractContextManager:
    """Within: the terminal's log lines print above the progress bar, not through it. Only
    where logging prints to the terminal (tqdm's helper would add a handler otherwise)."""
    terminal = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
    ]
    return logging_redirect_tqdm() if terminal else contextlib.nullcontext()


def describe(row: dict[str, float], penalty: str) -> str:
    """A logged row as one line of the log (train.log and the terminal); `penalty` names
    the regulariser (IsoMetric.penalty)."""
    iso = "n/a" if math.isnan(row["iso"]) else f"{row['iso']:.4g}"
    heldout = f", held-out L_iso {row['liso_heldout']:.4g}" if "liso_heldout" in row else ""
    return (
        f"loss {row['loss']:.4g} (mse {row['mse']:.4g}), {penalty} {iso} "
        f"on {row['iso_active']:.0%} of the samples, lr {row['lr']:.3g}, "
        f"{row['steps_per_s']:.3g} steps/s{heldout}"
    )


def update(state: TrainState, cfg: TrainConfig, acc: Accelerator) -> None:
    """The optimiser's step: gradient clipping, parameters, learning rate, EMA."""
    if cfg.optim.grad_clip > 0:
        acc.clip_grad_norm_(state.unet.parameters(), cfg.optim.grad_clip)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.step(state.unet.parameters())


def train(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train (or resume) the job in run_dir; returns a summary for status.json."""
    # 1. The accelerator, the data, and the job's state resumed from its newest checkpoint
    log_with = cfg.train.log_with
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision.value,
        log_with=None if log_with == "none" else log_with,
        project_dir=str(run_dir),
    )
    if cfg.train.cpu_threads and acc.device.type == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads)
    dataset: Dataset = build_dataset(cfg.data, "train")
    # images: a pass over the distinct images (data.flip's mirrored copies are not new ones)
    images = len(dataset) // (2 if cfg.data.flip else 1)
    cfg = dataclasses.replace(cfg, train=cfg.train.resolved(images, acc.num_processes))
    state, loop = build_state(cfg, acc), cfg.train
    start_step, change = resume(state, run_dir)
    if start_step:
        log.info("resuming %s from step %d", run_dir, start_step)
    if acc.is_main_process:
        record_resume(run_dir, start_step, change)

    # 2. The data stream from that step on; the logs and the held-out L_iso curve
    batches = iter(
        DataLoader(
            dataset,
            num_workers=cfg.data.num_workers,
            batch_sampler=StepBatches(
                len(dataset),
                loop.batch_size,
                cfg.seed,
                start_step * loop.grad_accum,
                acc.process_index,
                acc.num_processes,
            ),
        )
    )
    config = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    init_trackers(acc, config, run_dir, start_step)
    metric_log = MetricLog(acc, run_dir, start_step)
    progress = tqdm(
        total=loop.steps,
        initial=start_step,
        desc=f"train {run_dir.name}",
        disable=not (acc.is_main_process and loop.progress),
        dynamic_ncols=True,
    )
    curve = (
        HeldoutCurve(cfg, state.codec, acc.device)
        if loop.heldout_every and acc.is_main_process
        else None
    )
    if curve is not None and start_step == 0:
        metric_log.write({"step": 0, "liso_heldout": curve(state.unet)})

    # 3. The steps: accumulate, update, log, checkpoint
    tic, last_logged, last, window = time.perf_counter(), start_step, {}, Window()
    penalty = IsoMetric(cfg.iso.metric).penalty
    with above_progress_bar():
        for step in range(start_step, loop.steps):
            accumulate(state, cfg, acc, batches, step, window)
            update(state, cfg, acc)
            done = step + 1
            progress.update(1)
            progress.set_postfix(Window.postfix(window.means(), penalty))  # this process's, so far
            # every process takes the same branch (Window.means is collective); the main one
            # measures
            heldout = bool(loop.heldout_every) and (
                done % loop.heldout_every == 0 or done == loop.steps
            )
            if done % loop.log_every == 0 or done == loop.steps or heldout:
                elapsed = time.perf_counter() - tic
                last = {
                    "step": done,
                    **window.means(acc),
                    "lr": state.lr_scheduler.get_last_lr()[0],
                    "steps_per_s": (done - last_logged) / max(elapsed, 1e-9),
                }
                if heldout and curve is not None:
                    last["liso_heldout"] = curve(state.unet)
                metric_log.write(last)
                progress.set_postfix(Window.postfix(last, penalty))
                if acc.is_main_process:
                    log.info("step %d/%d: %s", done, loop.steps, describe(last, penalty))
                tic, last_logged, window = time.perf_counter(), done, Window()
            if done % loop.checkpoint_every == 0 and done < loop.steps:
                save_checkpoint(state, run_dir, done, loop.keep_checkpoints)
                write_grid(state, cfg, run_dir, done)
    progress.close()

    # 4. The final weights: checked for divergence, saved, and their sample grid
    check_weights(state, cfg)
    save_final(state, run_dir)
    write_grid(state, cfg, run_dir, loop.steps)
    for tracker in acc.trackers:  # not acc.end_training: it would end the process group
        tracker.finish()
    acc.wait_for_everyone()
    return {
        "step": loop.steps,
        "grad_accum": loop.grad_accum,
        "environment": environment(acc),
        "final_loss": last.get("loss", math.nan),  # the means over the last logged window
        "final_mse": last.get("mse", math.nan),
        "steps_per_s": last.get("steps_per_s"),
    }
