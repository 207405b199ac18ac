"""Paper-tier GPU benchmark: training step and evaluation forward (make bench TIER=paper).

Architectures: ddpm_256 (the pixel U-Net of google/ddpm-ema-celebahq-256, 3x256x256) and
ldm_celebahq256 (the U-Net of CompVis/ldm-celebahq-256 on its VQ-f4 latent, 3x64x64). For
each, dtype (fp32; bf16 = torch.autocast bfloat16 around the forward, fp32 weights, as
accelerate's mixed_precision=bf16) and variant (benchmarks.train_step's plain, iso_fast,
iso_official_style: lambda_iso = 1, every sample regularised, t in [500, 1000)):

- a full training step as isodiff.train.loop runs one: forward + backward, grad-norm clip,
  AdamW step, zero_grad, EMA update (optim defaults), at a fixed per-GPU batch; images/s =
  batch / median step time over the timed steps after warm-up (torch.cuda.synchronize
  around each), peak memory = max_memory_allocated since the setup (weights, grads, AdamW
  and EMA state included: what must fit);
- the largest per-GPU batch that fits: doubling then bisection up to a cap, an
  OutOfMemoryError meaning "does not fit" (cache emptied between tries), within the usable
  memory of an 80 GB card (--memory-gib; a larger GPU is capped to it with
  torch.cuda.set_per_process_memory_fraction) so that the figure answers the target; one
  process per search, or per probe with --fresh-probes; the timed rows are not capped;
- the no-grad fp32 U-Net forward (one DDIM step of the evaluation, TF32 off as
  isodiff.evaluate.measure runs it): image-steps per second, from which GPU-hours of evaluation
  follow (`evaluation_gpu_hours`), as those of training do from the steps' images/s.

Every row runs in a fresh process (a row that fails, e.g. out of memory, cannot poison the
next one). Targets: ddpm_256's iso step fits a per-GPU batch >= 8 on an 80 GB GPU, and an
iso step costs <= 2x a plain step. Results: <out>/paper.json and paper.md.

Needs CUDA; `--device cpu` runs the same code on the CPU as a test (fp32 unless --dtypes,
bf16 by CPU autocast; memory = the process's peak RSS; no batch search unless --search):

    python -m benchmarks.paper [--archs ddpm_256,ldm_celebahq256] [--out results/bench]
    python -m benchmarks.paper --device cpu --archs tiny --warmup 1 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.train_step import LAMBDA_ISO, make_step, model_config
from isodiff.config import OptimConfig
from isodiff.model.unet import HUNet, build_unet
from isodiff.runs.files import atomic_write_json, atomic_write_text

# arch -> (resolution, channels, default per-GPU batch of the timed rows). tiny: tests only.
ARCHS: dict[str, tuple[int, int, int]] = {
    "ddpm_256": (256, 3, 8),  # 8: the target batch
    "ldm_celebahq256": (64, 3, 16),  # the VQ-f4 latent of a 256x256 image
    "tiny": (16, 3, 4),
}
DEFAULT_ARCHS = "ddpm_256,ldm_celebahq256"
VARIANTS = ("plain", "iso_fast", "iso_official_style")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16: no GradScaler
TARGET_BATCH = 8  # per-GPU batch of the pixel DDPM's iso step at 256x256 on an 80 GB GPU
TARGET_ARCH = "ddpm_256"
TARGET_RATIO = 2.0  # iso step time / plain step time
# torch's usable memory on an 80 GB A100/H100 (the allocator sees ~79.3 GiB of 80 GiB).
MEMORY_GIB = 79.0
NO_CUDA = (
    "the paper-tier benchmark measures GPU training steps and needs a CUDA device "
    "(none is visible); pass --device cpu to run its code on the CPU as a test"
)
# Worked examples in paper.md: the paper tier's recipe and the eval preset's FID.
TRAIN_EXAMPLE = (5, 30_000)  # epochs x CelebA-HQ images
EVAL_EXAMPLE = (50_000, 100)  # samples x DDIM steps (conf/eval/paper.yaml fid)


# ---------------------------------------------------------------------------- GPU-hours


def gpu_hours(images: int, images_per_s: float, gpus: int = 1) -> float:
    """GPU-hours to process `images` at `images_per_s`, the throughput of the whole job of
    `gpus` GPUs (a per-GPU figure, as this benchmark measures, has gpus=1). Linear scaling
    is the caller's assumption: with N GPUs at N times one GPU's throughput the GPU-hours
    are one GPU's."""
    if images < 0 or not images_per_s > 0 or gpus < 1:
        raise ValueError(
            f"need images >= 0, images_per_s > 0, gpus >= 1; got {images}, {images_per_s}, {gpus}"
        )
    return images / images_per_s / 3600.0 * gpus


def training_gpu_hours(
    epochs: float, dataset_images: int, images_per_s: float, gpus: int = 1
) -> float:
    """GPU-hours of training: epochs x dataset images at the training step's images/s."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    return gpu_hours(epochs * dataset_images, images_per_s, gpus)  # type: ignore[arg-type]


def evaluation_gpu_hours(
    samples: int, ddim_steps: int, forward_images_per_s: float, gpus: int = 1
) -> float:
    """GPU-hours of sampling `samples` images by `ddim_steps` DDIM steps: one U-Net forward
    per image and step, at the no-grad forward throughput (image-steps/s)."""
    if ddim_steps < 0:
        raise ValueError(f"ddim_steps must be >= 0, got {ddim_steps}")
    return gpu_hours(samples * ddim_steps, forward_images_per_s, gpus)


# ----------------------------------------------------------------------- batch search


def largest_batch(
    fits: Callable[[int], bool], cap: int, start: int = 1
) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in [1, cap] for which fits() holds (0 if none), assuming fits is
    monotone: doubling from `start` (a batch known or guessed to fit) until a failure or
    the cap, then bisection between the last fit and the first failure. Returns it and the
    probes tried, in order."""
    tried: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        ok = fits(b)
        tried.append((b, ok))
        return ok

    lo, hi, b = 0, cap + 1, max(1, min(start, cap))  # lo fits, hi does not (cap + 1: unknown)
    if not probe(b):  # the start fails: bisect below it
        hi = b
    else:
        lo = b
        while lo < cap:
            b = min(2 * lo, cap)
            if not probe(b):
                hi = b
                break
            lo = b
    while hi - lo > 1 and lo < cap:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


# ---------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


OOM_MESSAGES = ("out of memory", "can't allocate memory", "ALLOC_FAILED")


def _is_oom(err: BaseException) -> bool:
    # Besides torch's OutOfMemoryError, allocation failures surface as RuntimeErrors: the
    # CPU allocator's, cuBLAS/cuDNN workspaces' (CUBLAS_STATUS_ALLOC_FAILED).
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MESSAGES)
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _allocated_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


class TrainStep:
    """One training step of isodiff.train.loop (objective under autocast, backward outside
    it, clip, AdamW, zero_grad, EMA), with the variant's objective from benchmarks.train_step."""

    def __init__(self, arch: str, variant: str, dtype: str, device: torch.device) -> None:
        from diffusers.training_utils import EMAModel  # as isodiff.train.loop

        resolution, channels, _ = ARCHS[arch]
        self.shape, self.device, self.dtype = (channels, resolution, resolution), device, dtype
        torch.manual_seed(0)
        self.unet: HUNet = build_unet(model_config(arch, resolution, channels)).to(device)
        self.unet.train()
        o = self.optim = OptimConfig()
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
            eps=o.eps,
        )
        self.ema = EMAModel(
            self.unet.parameters(),
            decay=o.ema_decay,
            use_ema_warmup=o.ema_warmup,
            power=o.ema_power,
        )
        self.ema.to(device)
        self.objective = make_step(variant)

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As benchmarks.train_step: a CPU generator, so the draws do not depend on the device.
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch, *self.shape, generator=g).clamp(-1, 1)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(500, 1000, (batch,), generator=g)
        return x0.to(self.device), noise.to(self.device), t.to(self.device)

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> float:
        with _autocast(self.device, self.dtype):
            loss = self.objective(self.unet, x0, noise, t, torch.Generator().manual_seed(1))
        loss.backward()
        params = list(self.unet.parameters())
        if self.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(params)
        return float(loss.detach())

    def fits(self, batch: int, steps: int = 2) -> float | None:
        """Peak MiB of `steps` steps at `batch` (2: the second holds the AdamW and EMA state
        the first created), or None when it runs out of memory."""
        _free(self.device)
        try:
            inputs = self.inputs(batch)
            for _ in range(steps):
                self(*inputs)
            _sync(self.device)
            return _peak_mib(self.device)
        except Exception as err:
            if not _is_oom(err):
                raise
        # Outside the handler: the traceback's frames (and the tensors they hold) are gone.
        self.unet.zero_grad(set_to_none=True)
        _free(self.device)
        return None


def _cap_memory(device: torch.device, memory_gib: float) -> float | None:
    """Limit the caching allocator to memory_gib (a larger GPU then behaves as an 80 GB
    one for what fits); returns the fraction applied (None: no cap needed or not CUDA)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if total <= memory_gib * 2**30:
        return None
    fraction = memory_gib * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def time_row(
    arch: str, dtype: str, variant: str, batch: int, device: torch.device, warmup: int, steps: int
) -> dict:
    """A timed row: images/s (median over `steps` after `warmup`) and peak memory."""
    row = {
        "arch": arch,
        "dtype": dtype,
        "variant": variant,
        "batch_size": batch,
        "resolution": ARCHS[arch][0],
        "channels": ARCHS[arch][1],
    }
    step = TrainStep(arch, dtype=dtype, variant=variant, device=device)
    inputs = step.inputs(batch)
    row["params_m"] = sum(p.numel() for p in step.unet.parameters()) / 1e6
    row["setup_mem_mib"] = _allocated_mib(device)
    _free(device)
    losses: list[float] = []
    times = _timed(lambda: losses.append(step(*inputs)), device, warmup, steps)
    if times is None:
        return {**row, "error": f"out of memory at batch {batch}"}
    median = statistics.median(times)
    return {
        **row,
        "times_s": times,
        "step_s": median,
        "images_per_s": batch / median,
        "peak_mem_mib": _peak_mib(device),
        "loss_finite": all(map(math.isfinite, losses)),
    }


def _timed(
    run: Callable[[], object], device: torch.device, warmup: int, steps: int
) -> list[float] | None:
    """Seconds of each timed call of `run` after `warmup` calls (None: out of memory)."""
    times = []
    try:
        for _ in range(warmup + steps):
            _sync(device)
            tic = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - tic)
    except Exception as err:
        if not _is_oom(err):
            raise
        return None
    return times[warmup:]


def search_row(
    arch: str,
    dtype: str,
    variant: str,
    device: torch.device,
    cap: int,
    start: int,
    memory_gib: float,
) -> dict:
    """The largest per-GPU batch that fits, probes in this process."""
    fraction = _cap_memory(device, memory_gib)
    step = TrainStep(arch, dtype=dtype, variant=variant, device=device)
    peaks: dict[int, float] = {}

    def fits(b: int) -> bool:
        peak = step.fits(b)
        if peak is not None:
            peaks[b] = peak
        return peak is not None

    row = {
        "arch": arch,
        "dtype": dtype,
        "variant": variant,
        "cap": cap,
        "memory_fraction": fraction,
        "fresh_probes": False,
    }
    try:
        best, tried = largest_batch(fits, cap, start)
    except Exception as err:  # neither fit nor out of memory: keep what was learnt
        return {
            **row,
            "error": f"{type(err).__name__}: {err}".splitlines()[0],
            "fits_at_least": max(peaks, default=0),
            "fitted": sorted(peaks),
        }
    return {
        **row,
        "max_batch": best,
        "capped": best == cap,
        "probes": tried,
        "peak_mem_mib": peaks.get(best),
    }


def forward_row(arch: str, batch: int, device: torch.device, warmup: int, steps: int) -> dict:
    """No-grad fp32 U-Net forward (one DDIM step per image): image-steps per second."""
    from isodiff.evaluate.measure import full_fp32  # evaluation's precision: TF32 off on CUDA

    full_fp32(device)
    resolution, channels, _ = ARCHS[arch]
    torch.manual_seed(0)
    unet = build_unet(model_config(arch, resolution, channels)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, resolution, resolution, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    row = {
        "arch": arch,
        "dtype": "fp32",
        "batch_size": batch,
        "resolution": resolution,
        "channels": channels,
        "tf32": False if device.type == "cuda" else None,
    }
    _free(device)
    with torch.no_grad():
        times = _timed(lambda: unet(x, t), device, warmup, steps)
    if times is None:
        return {**row, "error": f"out of memory at batch {batch}"}
    median = statistics.median(times)
    return {
        **row,
        "times_s": times,
        "step_s": median,
        "image_steps_per_s": batch / median,
        "peak_mem_mib": _peak_mib(device),
    }


# ----------------------------------------------------------------------------- report


def ratios(rows: list[dict]) -> list[dict]:
    """Per (arch, dtype): iso_fast / plain and iso_official_style / iso_fast."""
    out = []
    keys = sorted({(r["arch"], r["dtype"]) for r in rows}, key=str)
    for arch, dtype in keys:
        by = {
            r["variant"]: r
            for r in rows
            if (r["arch"], r["dtype"]) == (arch, dtype) and "step_s" in r
        }
        for a, b, key in (
            ("iso_fast", "plain", "step_s"),
            ("iso_official_style", "iso_fast", "step_s"),
            ("iso_official_style", "iso_fast", "peak_mem_mib"),
        ):
            if a in by and b in by:
                out.append(
                    {
                        "arch": arch,
                        "dtype": dtype,
                        "ratio": f"{key} {a} / {b}",
                        "value": by[a][key] / by[b][key],
                    }
                )
    return out


def targets(
    rows: list[dict], searches: list[dict], ratio_rows: list[dict], memory_gib: float
) -> list[dict]:
    """The two targets for each dtype (and arch, for the ratio); met None: not measured."""
    out = []
    dtypes = sorted({r["dtype"] for r in rows}) or ["fp32"]
    for dtype in dtypes:
        found = [
            s
            for s in searches
            if (s["arch"], s["dtype"], s["variant"]) == (TARGET_ARCH, dtype, "iso_fast")
            and "max_batch" in s
        ]
        value = found[0]["max_batch"] if found else None
        out.append(
            {
                "target": f"{TARGET_ARCH} iso_fast per-GPU batch >= {TARGET_BATCH} at "
                f"256x256 within {memory_gib:g} GiB (an 80 GB GPU)",
                "arch": TARGET_ARCH,
                "dtype": dtype,
                "value": value,
                "met": None if value is None else value >= TARGET_BATCH,
            }
        )
    for r in ratio_rows:
        if r["ratio"] == "step_s iso_fast / plain":
            out.append(
                {
                    "target": f"iso_fast step <= {TARGET_RATIO:g}x plain step",
                    "arch": r["arch"],
                    "dtype": r["dtype"],
                    "value": r["value"],
                    "met": r["value"] <= TARGET_RATIO,
                }
            )
    return out


def _fmt(v: object, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    gpu = result["gpu"]
    where = (
        f"{gpu['name']} ({gpu['total_mem_gib']:.1f} GiB), CUDA {result['cuda']}"
        if gpu
        else f"CPU ({result['machine']}; test mode, not a GPU figure)"
    )
    lines = [
        "# Paper-tier benchmark: training step and evaluation forward",
        "",
        f"{where}; torch {result['torch']}; {result['date']}"
        f"{'' if result['complete'] else ' (INCOMPLETE: still running or stopped)'}.",
        "",
        "Step: forward + backward + clip + AdamW + EMA (isodiff.train.loop's step), "
        f"lambda_iso = {result['lambda_iso']:g}, t in [500, 1000), every sample "
        "regularised; images/s = batch / median step time after "
        f"{result['warmup']} warm-up step(s) over {result['steps']}; peak memory: "
        f"{result['memory_kind']}. Max batch: doubling + bisection (cap "
        f"{result['batch_cap']}) within {result['memory_gib']:g} GiB. "
        "GPU-h per 1M images = 1e6 / (images/s) / 3600 on one GPU.",
        "",
        "| arch | dtype | variant | batch | step (s) | images/s | GPU-h / 1M img "
        "| peak mem (MiB) | max batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best = {(s["arch"], s["dtype"], s["variant"]): s for s in result["searches"]}
    for r in result["rows"]:
        s = best.get((r["arch"], r["dtype"], r["variant"]), {})
        found = "n/a" if "max_batch" not in s else f"{'>= ' if s['capped'] else ''}{s['max_batch']}"
        if "error" in s:
            found = f"failed: {s['error']}"
        if "error" in r:
            lines.append(
                f"| {r['arch']} | {r['dtype']} | {r['variant']} | {r['batch_size']} "
                f"| failed: {r['error']} | | | | {found} |"
            )
            continue
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['variant']} | {r['batch_size']} "
            f"| {r['step_s']:.3f} | {r['images_per_s']:.2f} "
            f"| {gpu_hours(10**6, r['images_per_s']):.2f} "
            f"| {_fmt(r['peak_mem_mib'], '.0f')} | {found} |"
        )
    lines += [
        "",
        "No-grad fp32 U-Net forward (one DDIM step; TF32 off as in evaluation):",
        "",
        "| arch | batch | image-steps/s | GPU-h / 1M image-steps | peak mem (MiB) |",
        "|---|---|---|---|---|",
    ]
    for f in result["forward"]:
        if "error" in f:
            lines.append(f"| {f['arch']} | {f['batch_size']} | failed: {f['error']} | | |")
        else:
            lines.append(
                f"| {f['arch']} | {f['batch_size']} | {f['image_steps_per_s']:.1f} "
                f"| {gpu_hours(10**6, f['image_steps_per_s']):.3f} "
                f"| {_fmt(f['peak_mem_mib'], '.0f')} |"
            )
    lines += ["", "| arch | dtype | ratio | value |", "|---|---|---|---|"]
    lines += [
        f"| {r['arch']} | {r['dtype']} | {r['ratio']} | {r['value']:.2f} |"
        for r in result["ratios"]
    ]
    lines += ["", "| target | arch | dtype | measured | met |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['arch']} | {t['dtype']} | {_fmt(t['value'], '.4g')} "
        f"| {'n/a' if t['met'] is None else ('yes' if t['met'] else 'NO')} |"
        for t in result["targets"]
    ]
    if result["examples"]:
        lines += [
            "",
            "Worked examples (one GPU's throughput; benchmarks.paper's "
            "training_gpu_hours / evaluation_gpu_hours):",
            "",
        ]
        lines += [f"- {e}" for e in result["examples"]]
    return "\n".join(lines) + "\n"


def examples(rows: list[dict], forward: list[dict]) -> list[str]:
    epochs, images = TRAIN_EXAMPLE
    samples, ddim = EVAL_EXAMPLE
    out = [
        f"train {r['arch']} {r['variant']} {r['dtype']} at batch {r['batch_size']}, "
        f"{epochs} epochs x {images:,} images: "
        f"{training_gpu_hours(epochs, images, r['images_per_s']):.2f} GPU-h"
        for r in rows
        if "images_per_s" in r and r["variant"] != "iso_official_style"
    ]
    out += [
        f"sample {samples:,} images x {ddim} DDIM steps with {f['arch']}: "
        f"{evaluation_gpu_hours(samples, ddim, f['image_steps_per_s']):.2f} GPU-h"
        for f in forward
        if "image_steps_per_s" in f
    ]
    return out


# ------------------------------------------------------------------------------- CLI


def _worker(args: argparse.Namespace) -> dict:
    kind, arch, dtype, variant, batch = args.worker
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if kind == "step":
        return time_row(arch, dtype, variant, int(batch), device, args.warmup, args.steps)
    if kind == "search":
        return search_row(arch, dtype, variant, device, args.batch_cap, int(batch), args.memory_gib)
    if kind == "probe":  # --fresh-probes: one probe of the search in this process
        _cap_memory(device, args.memory_gib)
        peak = TrainStep(arch, variant, dtype, device).fits(int(batch))
        return {"batch_size": int(batch), "fits": peak is not None, "peak_mem_mib": peak}
    return forward_row(arch, int(batch), device, args.warmup, args.steps)


def _run_worker(
    args: argparse.Namespace, kind: str, arch: str, dtype: str, variant: str, batch: int
) -> dict:
    """One row in a fresh process; a crash becomes the row's error."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.paper",
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--batch-cap",
        str(args.batch_cap),
        "--memory-gib",
        str(args.memory_gib),
        "--worker",
        kind,
        arch,
        dtype,
        variant,
        str(batch),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return {"arch": arch, "dtype": dtype, "variant": variant, "batch_size": batch, "error": tail[0]}


def _fresh_search(
    args: argparse.Namespace, arch: str, dtype: str, variant: str, start: int
) -> dict:
    """The batch search with every probe in a fresh process (slower: a process start and a
    model build per probe; immune to what an earlier out-of-memory left behind)."""
    peaks: dict[int, float] = {}

    def fits(b: int) -> bool:
        r = _run_worker(args, "probe", arch, dtype, variant, b)
        if "error" in r:  # neither fits nor out of memory: the search cannot go on
            raise RuntimeError(r["error"])
        if r["fits"]:
            peaks[b] = r["peak_mem_mib"]
        return bool(r["fits"])

    row = {"arch": arch, "dtype": dtype, "variant": variant, "cap": args.batch_cap}
    try:
        best, tried = largest_batch(fits, args.batch_cap, start)
    except RuntimeError as err:
        return {**row, "error": str(err)}
    return {
        **row,
        "max_batch": best,
        "capped": best == args.batch_cap,
        "probes": tried,
        "peak_mem_mib": peaks.get(best),
        "fresh_probes": True,
    }


def _environment(device: torch.device) -> dict:
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "total_mem_gib": props.total_memory / 2**30,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
        }
    return {
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "gpu": gpu,
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=DEFAULT_ARCHS, help=f"comma list of {sorted(ARCHS)}")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="results/bench")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default cuda; cpu: test mode"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="per-GPU batch of the timed rows (default per arch: "
        + ", ".join(f"{a} {b}" for a, (_, _, b) in ARCHS.items())
        + ")",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--forward-batch", type=int, default=32)
    p.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the max-batch search (default: on for CUDA, off for CPU)",
    )
    p.add_argument("--batch-cap", type=int, default=256)
    p.add_argument(
        "--fresh-probes",
        action="store_true",
        help="each probe of the search in a fresh process (default: one process "
        "per search, the cache emptied after an out-of-memory)",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=MEMORY_GIB,
        help="memory the search may use (default: an 80 GB card's)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads")
    p.add_argument(
        "--worker",
        nargs=5,
        metavar=("KIND", "ARCH", "DTYPE", "VARIANT", "BATCH"),
        help=argparse.SUPPRESS,
    )
    return p


def _list(value: str, known: Collection[str], flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        sys.exit(f"{flag}: unknown {unknown or value!r}; choose from {sorted(known)}")
    return items


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.device is None:
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    archs = _list(args.archs, ARCHS, "--archs")
    dtypes = _list(
        args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32"), DTYPES, "--dtypes"
    )
    variants = _list(args.variants, VARIANTS, "--variants")
    search = device.type == "cuda" if args.search is None else args.search
    result = {
        **_environment(device),
        "complete": False,
        "lambda_iso": LAMBDA_ISO,
        "warmup": args.warmup,
        "steps": args.steps,
        "batch_cap": args.batch_cap,
        "memory_gib": args.memory_gib,
        "search": search,
        "memory_kind": (
            "torch.cuda.max_memory_allocated (weights, grads, AdamW and EMA state included)"
            if device.type == "cuda"
            else "the worker process's peak RSS (CPU test mode)"
        ),
        "rows": [],
        "searches": [],
        "forward": [],
        "ratios": [],
        "targets": [],
        "examples": [],
    }
    out = Path(args.out)

    def save(complete: bool = False) -> None:
        # After every row, so that a long GPU run that stops leaves what it measured.
        result["complete"] = complete
        result["ratios"] = ratios(result["rows"])
        result["targets"] = targets(
            result["rows"], result["searches"], result["ratios"], args.memory_gib
        )
        result["examples"] = examples(result["rows"], result["forward"])
        atomic_write_json(out / "paper.json", result)
        atomic_write_text(out / "paper.md", markdown(result))

    for arch in archs:
        f = _run_worker(args, "forward", arch, "fp32", "forward", args.forward_batch)
        result["forward"].append(f)
        print(
            f"{arch:16s} forward fp32         batch {args.forward_batch:3d}  "
            + (
                f"FAILED: {f['error']}"
                if "error" in f
                else f"{f['image_steps_per_s']:9.1f} image-steps/s"
            ),
            flush=True,
        )
        save()
        batch = args.batch or ARCHS[arch][2]
        for dtype in dtypes:
            for variant in variants:
                r = _run_worker(args, "step", arch, dtype, variant, batch)
                result["rows"].append(r)
                print(
                    f"{arch:16s} {dtype:4s} {variant:19s} batch {batch:3d}  "
                    + (
                        f"FAILED: {r['error']}"
                        if "error" in r
                        else f"{r['images_per_s']:9.2f} images/s  {r['step_s']:8.3f} s  "
                        f"{r['peak_mem_mib']:9.0f} MiB"
                    ),
                    flush=True,
                )
                save()
                if not search:
                    continue
                start = batch if "error" not in r else 1  # the timed batch is known to fit
                s = (
                    _fresh_search(args, arch, dtype, variant, start)
                    if args.fresh_probes
                    else _run_worker(args, "search", arch, dtype, variant, start)
                )
                result["searches"].append(s)
                print(
                    f"{arch:16s} {dtype:4s} {variant:19s} max batch "
                    + (
                        f"FAILED: {s['error']}"
                        if "error" in s
                        else f"{'>= ' if s['capped'] else ''}{s['max_batch']}"
                    ),
                    flush=True,
                )
                save()
    save(complete=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
