"""Benchmark of one training step with and without the regulariser (`make bench`).

Each (architecture, variant) runs in a fresh process, so that its peak memory is its own:
the figure reported is the peak resident set size (ru_maxrss) minus the resident size after
the model and inputs were built, i.e. the most memory the step's activations, graphs and
gradients held at once. torch's CPU tensors are plain malloc, so RSS sees them (tracemalloc
would not); glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors
leave the RSS instead of lingering in the heap. Time is forward + backward of the
objective (the optimizer step is the same in every variant and left out): the process's
CPU time with one intra-op thread (default), which equals wall time on an idle machine and,
unlike wall time, is not inflated by other processes on a shared one; wall time is
recorded too. Minimum over the repeats after a warm-up run (ddpm_256: one run, no warm-up).

Variants (lambda_iso = 1, every sample regularised, t in [500, 1000)):
- plain: eps-MSE only.
- iso_fast: the library's path (isodiff.train.objective + isometry.Regulariser, spherical): the
  main forward's h reused, encoder-only JVP by double backward and one VJP.
- iso_official_style: what the official code does, written here from its description:
  stereographic chart of x_t, f = h from a FULL U-Net forward at the inverse chart,
  torch.autograd.functional.jvp twice and vjp once with create_graph, plus the MSE forward.
- path_length: the StyleGAN2 baseline (one VJP) on the main forward's h.
- smooth_diffusion: Smooth Diffusion's step-wise variation regulariser
  (isodiff.smoothness.StepVariationRegulariser through the training objective,
  `iso.metric=smooth_diffusion`): one VJP of x0_hat through the FULL U-Net, the main
  forward's eps reused, its gradient a double backward through the whole network.
- small only, to answer design questions: iso_separate (same loss, h from a separate encoder
  forward instead of the main one), iso_forward_mode (J u by torch.func.jvp on the encoder
  of the main forward), iso_half (iso.batch_fraction = 0.5).

    python -m benchmarks.train_step [--archs small,ddpm_256] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from isodiff import geometry as geo
from isodiff.config import CONF, DiffusionConfig, ModelConfig
from isodiff.isometry import Regulariser, draw_probes, higher_order_ad
from isodiff.model.diffusion import build_scheduler
from isodiff.model.unet import HUNet, build_unet
from isodiff.smoothness import StepVariationRegulariser
from isodiff.train.objective import DiffusionObjective

MODELS = CONF / "model"
# (resolution, channels, batch size, warm-up runs, timed runs, variants)
ARCHS = {
    "small": (
        32,
        1,
        16,
        1,
        3,
        [
            "plain",
            "iso_fast",
            "iso_official_style",
            "path_length",
            "smooth_diffusion",
            "iso_separate",
            "iso_forward_mode",
            "iso_half",
        ],
    ),
    "ddpm_256": (
        256,
        3,
        1,
        0,
        1,
        ["plain", "iso_fast", "iso_official_style", "path_length", "smooth_diffusion"],
    ),
}
LAMBDA_ISO = 1.0

Step = Callable[[HUNet, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def model_config(arch: str, resolution: int, channels: int) -> ModelConfig:
    yaml = OmegaConf.load(MODELS / f"{arch}.yaml")
    yaml.sample_size, yaml.in_channels, yaml.out_channels = resolution, channels, channels
    return ModelConfig(**OmegaConf.to_container(yaml))  # type: ignore[arg-type]


def _objective_step(reg: Regulariser | StepVariationRegulariser | None, lambda_iso: float) -> Step:
    scheduler = build_scheduler(DiffusionConfig())

    def step(unet, x0, noise, t, g):
        objective = DiffusionObjective(unet, scheduler, lambda_iso, reg)
        return objective(x0, noise, t, torch.ones_like(t, dtype=torch.bool), generator=g)["loss"]

    return step


def _iso_separate(unet, x0, noise, t, g):
    x_t = build_scheduler(DiffusionConfig()).add_noise(x0, noise, t)
    eps, _ = unet.eps_and_h(x_t, t)
    return F.mse_loss(eps, noise) + LAMBDA_ISO * Regulariser("spherical")(
        unet.encode_h, x_t, t, generator=g
    )


def _iso_forward_mode(unet, x0, noise, t, g):
    """J u by forward-mode AD through the main forward's encoder, then one VJP."""
    x_t = build_scheduler(DiffusionConfig()).add_noise(x0, noise, t).requires_grad_()
    u = geo.tangent_project(draw_probes(x_t, 1, "gaussian", g)[0], x_t.detach())
    with higher_order_ad():
        (h, skips, emb), (ju, _, _) = torch.func.jvp(lambda x: unet.encode(x, t)[:3], (x_t,), (u,))
        eps = unet.decode(h, skips, emb, t)
        (jtju,) = torch.autograd.grad(h, x_t, ju, create_graph=True)
    num = geo.sq_norm(geo.tangent_project(jtju, x_t.detach()))
    return F.mse_loss(eps, noise) + LAMBDA_ISO * num.mean() / geo.sq_norm(ju).mean() ** 2


def _iso_official_style(unet, x0, noise, t, g):
    """The official formulation: chart from |x_t|, inverse onto radius sqrt(D - 1), G = 1,
    full U-Net forwards inside torch.autograd.functional (JVP twice, VJP once)."""
    x_t = build_scheduler(DiffusionConfig()).add_noise(x0, noise, t)
    eps, _ = unet.eps_and_h(x_t, t)
    radius = math.sqrt(geo.dim(x_t) - 1)
    z = geo.stereographic(geo.onto_sphere(x_t, 1.0), 1.0)
    u = torch.randn(z.shape, generator=g).to(z)  # CPU generator; onto z's device (GPU tier)

    def f(zc):
        return unet.eps_and_h((radius * geo.inverse_stereographic(zc, 1.0)).view_as(x_t), t)[1]

    with higher_order_ad():
        _, ju = torch.autograd.functional.jvp(f, z, u, create_graph=True)
        _, ju2 = torch.autograd.functional.jvp(f, z, u, create_graph=True)
        _, jtju = torch.autograd.functional.vjp(f, z, ju2, create_graph=True)
    iso = geo.sq_norm(jtju).mean() / geo.sq_norm(ju).mean() ** 2
    return F.mse_loss(eps, noise) + LAMBDA_ISO * iso


def make_step(variant: str) -> Step:
    steps: dict[str, Callable[[], Step]] = {
        "plain": lambda: _objective_step(None, 0.0),
        "iso_fast": lambda: _objective_step(Regulariser("spherical"), LAMBDA_ISO),
        "iso_half": lambda: _objective_step(
            Regulariser("spherical", batch_fraction=0.5), LAMBDA_ISO
        ),
        "path_length": lambda: _objective_step(Regulariser("path_length"), LAMBDA_ISO),
        "smooth_diffusion": lambda: _objective_step(
            StepVariationRegulariser(build_scheduler(DiffusionConfig()).alphas_cumprod),
            LAMBDA_ISO,
        ),
        "iso_separate": lambda: _iso_separate,
        "iso_forward_mode": lambda: _iso_forward_mode,
        "iso_official_style": lambda: _iso_official_style,
    }
    return steps[variant]()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(arch: str, variant: str, threads: int) -> dict:
    """One (architecture, variant) in this process: times and peak memory."""
    resolution, channels, batch, warmup, repeats, _ = ARCHS[arch]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = build_unet(model_config(arch, resolution, channels))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, resolution, resolution, generator=g).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(500, 1000, (batch,), generator=g)
    step = make_step(variant)
    baseline = _rss_bytes()
    cpu, wall = [], []
    for _ in range(warmup + repeats):
        unet.zero_grad(set_to_none=True)
        tic, wall_tic = time.process_time(), time.perf_counter()
        step(unet, x0, noise, t, torch.Generator().manual_seed(1)).backward()
        cpu.append(time.process_time() - tic)
        wall.append(time.perf_counter() - wall_tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cpu, wall = cpu[warmup:], wall[warmup:]
    return {
        "arch": arch,
        "variant": variant,
        "batch_size": batch,
        "resolution": resolution,
        "channels": channels,
        "threads": threads,
        "times_s": cpu,
        "time_s": min(cpu),
        "median_s": statistics.median(cpu),
        "wall_s": min(wall),
        "peak_mem_mib": (peak - baseline) / 2**20,
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
    }


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for arch in {r["arch"] for r in rows}:
        by = {r["variant"]: r for r in rows if r["arch"] == arch}
        wanted = [  # (name, numerator, denominator, key)
            ("time iso_fast / plain (target <= 2.5)", "iso_fast", "plain", "time_s"),
            (
                "time iso_official_style / iso_fast (target >= 2.0)",
                "iso_official_style",
                "iso_fast",
                "time_s",
            ),
            (
                "peak mem iso_official_style / iso_fast (target > 1)",
                "iso_official_style",
                "iso_fast",
                "peak_mem_mib",
            ),
            ("time path_length / plain", "path_length", "plain", "time_s"),
            ("time smooth_diffusion / plain", "smooth_diffusion", "plain", "time_s"),
            ("time smooth_diffusion / iso_fast", "smooth_diffusion", "iso_fast", "time_s"),
            ("time iso_half / plain", "iso_half", "plain", "time_s"),
            ("time iso_separate / iso_fast", "iso_separate", "iso_fast", "time_s"),
            ("time iso_forward_mode / iso_fast", "iso_forward_mode", "iso_fast", "time_s"),
        ]
        out[arch] = {
            name: by[a][key] / by[b][key] for name, a, b, key in wanted if a in by and b in by
        }
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Regulariser benchmark (one training step, forward + backward)",
        "",
        f"{result['machine']}; torch {result['torch']}, {result['threads']} intra-op "
        f"thread(s); load average at start {result['load_avg']}, at end "
        f"{result['load_avg_end']}.",
        "",
        "Time: process CPU seconds, min over the timed runs (all runs listed); wall: min "
        "wall-clock seconds. Memory: peak RSS minus RSS after setup, fresh process per "
        "row. See benchmarks/train_step.py for the variants.",
        "",
        "| arch | variant | batch | time (CPU s) | runs (CPU s) | wall (s) | peak mem (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        reps = ", ".join(f"{v:.2f}" for v in r["times_s"])
        lines.append(
            f"| {r['arch']} | {r['variant']} | {r['batch_size']} | {r['time_s']:.2f} "
            f"| {reps} | {r['wall_s']:.2f} | {r['peak_mem_mib']:.0f} |"
        )
    lines += [
        f"| {f['arch']} | {f['variant']} | failed: {f['error']} | | | | |" for f in result["failed"]
    ]
    lines += ["", "| arch | ratio | value |", "|---|---|---|"]
    for arch, values in result["ratios"].items():
        lines += [f"| {arch} | {k} | {v:.2f} |" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="small,ddpm_256")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads)))
        return
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        sys.exit(f"--archs: unknown {unknown}; choose from {sorted(ARCHS)}")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "lambda_iso": LAMBDA_ISO,
        "rows": [],
        "failed": [],
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    for arch in archs:
        for variant in ARCHS[arch][5]:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.train_step",
                    "--worker",
                    arch,
                    variant,
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:  # e.g. killed for memory: say so, keep the other rows
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                result["failed"].append({"arch": arch, "variant": variant, "error": tail[0]})
                print(f"{arch:9s} {variant:19s} FAILED: {tail[0]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{arch:9s} {variant:19s} batch {row['batch_size']:3d}  "
                f"{row['time_s']:8.2f} s  {row['peak_mem_mib']:8.0f} MiB",
                flush=True,
            )
            result["rows"].append(row)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["ratios"] = ratios(result["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regulariser.json").write_text(json.dumps(result, indent=2))
    (out / "regulariser.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
