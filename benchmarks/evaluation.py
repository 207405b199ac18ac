"""Benchmark of the metric suite: its time against pure DDIM sampling of the same samples.

A U-Net of the tier's config (random weights: the cost does not depend on them) is
evaluated with every metric of an eval preset. The dataset-level caches (FID reference
statistics, attribute predictor) are built first and left out, as every run of a tier after
the first finds them. Then the DDIM trajectories the suite ran (same counts, steps, batch
size) are sampled again with nothing else, and

    overhead = suite time / pure DDIM time - 1        (target <= 0.2)

On a CPU the clock is the process's CPU time with one intra-op thread (equal to wall time on
an idle machine, not inflated by other processes); on a GPU it is wall time. Both are
recorded.

    python -m benchmarks.evaluation [--tier quick] [--preset quick] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from isodiff import config
from isodiff.evaluate import config as evaluate_config
from isodiff.evaluate import networks
from isodiff.evaluate.measure import METRICS
from isodiff.evaluate.metrics.attributes import attribute_model
from isodiff.evaluate.metrics.common import EvalContext
from isodiff.evaluate.metrics.fid import reference_stats
from isodiff.model.sampling import DDIM, latents
from isodiff.model.unet import build_unet


def _clock(cuda: bool) -> tuple[float, float]:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float], cuda: bool) -> dict[str, float]:
    wall, cpu = _clock(cuda)
    return {"wall_s": wall - start[0], "cpu_s": cpu - start[1]}


def bench(tier: str, preset: str, batch_size: int, refs_dir: Path) -> dict:
    config.register_schemas()
    evaluate_config.register_schemas()
    train_cfg = config.to_train_config(config.compose("train", [f"tier={tier}", "name=bench"]))
    eval_cfg = evaluate_config.to_evaluate_config(
        config.compose("evaluate", ["run=bench", f"eval={preset}", f"batch_size={batch_size}"])
    ).eval
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    unet = build_unet(train_cfg.model).to("cuda" if cuda else "cpu")
    ctx = EvalContext(
        unet, train_cfg.diffusion, train_cfg.data, batch_size=batch_size, refs_dir=refs_dir
    )
    enabled = [name for name in METRICS if getattr(eval_cfg, name).enabled]
    if "fid" in enabled:  # per-dataset caches, built once per tier
        f, inception = eval_cfg.fid, networks.inception(eval_cfg.fid.mode, ctx.device).module
        reference_stats(ctx, f.ref_split, f.ref_n, f.mode, inception, "eval.fid.ref_n")
        reference_stats(ctx, "test", f.n, f.mode, inception, "eval.fid.n")
    if "separability" in enabled:
        attribute_model(ctx, eval_cfg.separability.classifier)

    per_metric, start = {}, _clock(cuda)
    for name in enabled:
        t = _clock(cuda)
        METRICS[name](ctx, getattr(eval_cfg, name))
        per_metric[name] = _elapsed(t, cuda)
        print(f"{name}: {per_metric[name]}", flush=True)
    suite = _elapsed(start, cuda)

    trajectories = {steps: ddim.trajectories for steps, ddim in ctx.samplers.items()}
    start = _clock(cuda)
    for steps, n in trajectories.items():
        ddim = DDIM(unet, train_cfg.diffusion, steps, batch_size)
        for lo in range(0, n, batch_size):
            ddim.sample(latents(0, range(lo, min(lo + batch_size, n)), ctx.x_shape))
    pure = _elapsed(start, cuda)
    clock = "wall_s" if cuda else "cpu_s"
    return {
        "tier": tier,
        "preset": preset,
        "batch_size": batch_size,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "clock": clock,
        "suite": suite,
        "per_metric": per_metric,
        "pure_ddim": pure,
        "trajectories_by_steps": trajectories,
        "overhead": suite[clock] / pure[clock] - 1,
        "target_overhead": 0.2,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="quick")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = bench(args.tier, args.preset, args.batch_size, networks.cache_dir() / "bench-refs")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("suite", "pure_ddim", "overhead")}, indent=2))


if __name__ == "__main__":
    main()
