"""Evaluate one finished run: every enabled metric, recorded with its protocol.

    <run>/metrics.json   {"run": ..., "metrics": {<name>: {"values": {...},
                          "protocol": {...}, "provenance": {...}, "arrays": "eval/<name>.npz"}}}
    <run>/eval/<name>.npz   per-sample arrays for figures

A metric whose stored protocol matches the requested one is skipped (idempotent); metrics.json
is rewritten atomically after each metric, so an interrupted evaluation keeps what it
finished. Only runs whose status is `done` are evaluated.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from isodiff import pictures
from isodiff.assets import atomic_save
from isodiff.config import ConfigError, to_train_config
from isodiff.metrics import (
    fid,
    interp,
    inversion,
    jacobian,
    liso,
    ppl,
    quality,
    rtl,
    separability,
)
from isodiff.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.models import load_unet, nonfinite, resolve_checkpoint
from isodiff.runs import (
    DONE,
    RunFileError,
    atomic_write_json,
    provenance,
    read_json,
    read_status,
)

log = logging.getLogger(__name__)

# name -> the module's evaluate; the name is also the config section of conf/eval/*.yaml
METRICS: dict[str, Callable[[EvalContext, Any], MetricResult]] = {
    "fid": fid.evaluate, "ppl": ppl.evaluate, "rtl": rtl.evaluate, "interp": interp.evaluate,
    "jacobian": jacobian.evaluate, "separability": separability.evaluate,
    "inversion": inversion.evaluate, "quality": quality.evaluate, "liso": liso.evaluate,
}
# Which metric writes a value of metrics.json, by name or name prefix: the values a spec
# shows say which metrics its jobs need (tests check it against a real evaluation).
VALUE_PREFIXES = {"fid": "fid", "ppl_": "ppl", "mrtl": "rtl", "rtl_": "rtl", "slerp_": "interp",
                  "lerp_": "interp", "mcn_": "jacobian", "vor_": "jacobian",
                  "ls_": "separability", "error_": "separability", "mse": "inversion",
                  "psnr": "inversion", "lpips": "inversion",
                  "confident_": "quality", "classes_": "quality", "liso": "liso"}


@dataclass
class EvalConfig:
    """One preset of conf/eval/: per-metric sample counts and DDIM steps."""

    name: str = "quick"
    fid: fid.FIDConfig = field(default_factory=fid.FIDConfig)
    ppl: ppl.PPLConfig = field(default_factory=ppl.PPLConfig)
    rtl: rtl.RTLConfig = field(default_factory=rtl.RTLConfig)
    interp: interp.InterpConfig = field(default_factory=interp.InterpConfig)
    jacobian: jacobian.JacobianConfig = field(default_factory=jacobian.JacobianConfig)
    separability: separability.SeparabilityConfig = field(
        default_factory=separability.SeparabilityConfig)
    inversion: inversion.InversionConfig = field(default_factory=inversion.InversionConfig)
    quality: quality.QualityConfig = field(default_factory=quality.QualityConfig)
    liso: liso.LisoConfig = field(default_factory=liso.LisoConfig)
    # samples.png: a grid of this many DDIM samples (eval.grid_steps) from fixed x_T
    grid_samples: int = 64
    grid_steps: int = 50


@dataclass
class EvaluateConfig:
    run: str = MISSING  # a run directory whose status is done
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: bool = True  # the EMA weights (final/unet_ema) when the run has them
    seed: int = 0  # sample i of every metric is seeded by (seed, i)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    metrics: list[str] | None = None  # only these (default: every enabled one)
    refs_dir: str | None = None  # dataset-level caches; default <run>/../../_refs
    force: bool = False  # recompute even when the stored protocol matches
    clip_sample: bool | None = None  # DDIM x0 clipping; null: the run's diffusion.clip_sample
    progress: bool = True

    def __post_init__(self) -> None:
        if unknown := set(self.metrics or ()) - set(METRICS):
            raise ConfigError(f"metrics: unknown {sorted(unknown)}; use {list(METRICS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")


def metric_of(value: str) -> str:
    """The metric (a key of METRICS) that computes `value`; a metric's own name stands for
    itself (figure specs name the metric whose arrays they draw)."""
    if value in METRICS:
        return value
    for prefix, metric in VALUE_PREFIXES.items():
        if value.startswith(prefix):
            return metric
    raise ConfigError(f"{value!r} is computed by no metric of isodiff.evaluate: name a value "
                      f"of metrics.json (prefixes {list(VALUE_PREFIXES)}) or a metric "
                      f"({list(METRICS)})")


def register_schemas() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg))


def _json_normal(obj: Any) -> Any:
    """obj as it reads back from metrics.json (tuples -> lists, int keys -> str)."""
    return json.loads(json.dumps(obj, default=str))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_context(cfg: EvaluateConfig) -> tuple[EvalContext, dict[str, Any]]:
    """The run's model and data as an EvalContext, and the protocol fields all metrics share.

    Refuses a run that is not done (ConfigError naming the state and the fix).
    """
    run_dir = Path(cfg.run).expanduser()
    status = read_status(run_dir)
    if status is None or status.get("state") != DONE:
        state = "missing (no status.json)" if status is None else status.get("state")
        raise ConfigError(f"run={cfg.run!r}: status is {state}; only a finished run can be "
                          "evaluated: train it first (python -m isodiff.train ...), or pass "
                          "the directory of a run whose status.json says done")
    train_cfg = to_train_config(OmegaConf.load(run_dir / "config.yaml"))
    if cfg.clip_sample is not None:
        train_cfg.diffusion.clip_sample = cfg.clip_sample
    _, subfolder = resolve_checkpoint(str(run_dir), cfg.ema)
    unet = load_unet(str(run_dir), ema=cfg.ema).to(_device(cfg.device))
    if bad := nonfinite(unet.named_parameters()):
        raise ConfigError(f"run={cfg.run!r}: final/{subfolder} holds non-finite weights "
                          f"({len(bad)} tensors, e.g. {bad[0]}): nothing is measured; retrain "
                          "it with a lower optim.lr or lambda_iso")
    refs_dir = Path(cfg.refs_dir) if cfg.refs_dir else run_dir.parent.parent / "_refs"
    ctx = EvalContext(unet, train_cfg.diffusion, train_cfg.data, seed=cfg.seed,
                      batch_size=cfg.batch_size, refs_dir=refs_dir, progress=cfg.progress)
    common = {"seed": cfg.seed, "weights": f"final/{subfolder}",
              "ema": subfolder == "unet_ema", "sampler": "DDIM eta=0 fp32",
              "clip_sample": train_cfg.diffusion.clip_sample, "data": ctx.data_key}
    return ctx, common


def finite_values(values: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """The finite values, and the names of the others (nan/inf never reach metrics.json as
    numbers, so never a table)."""
    finite = {k: v for k, v in values.items() if math.isfinite(float(v))}
    return finite, sorted(set(values) - set(finite))


def write_samples(ctx: EvalContext, cfg: EvalConfig, path: Path) -> None:
    """The picture beside the numbers: a grid of the evaluated weights' samples (made once:
    the weights of a done run do not change)."""
    if cfg.grid_samples and not path.is_file():
        grid = pictures.sample_grid(ctx.unet, ctx.diffusion, cfg.grid_samples, cfg.grid_steps,
                                    ctx.batch_size)
        pictures.save_png(grid, path, scale=max(1, 64 // ctx.data.resolution))


def evaluate_run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Compute every selected metric not already stored with the same protocol; returns
    the content of metrics.json."""
    ctx, common = build_context(cfg)
    run_dir = Path(cfg.run).expanduser()
    path = run_dir / "metrics.json"
    try:
        record = read_json(path) or {"run": str(run_dir), "metrics": {}}
    except RunFileError as err:
        log.warning("%s: every metric is computed again", err)
        record = {"run": str(run_dir), "metrics": {}}
    names = cfg.metrics or [n for n in METRICS if getattr(cfg.eval, n).enabled]
    made_by = provenance()
    write_samples(ctx, cfg.eval, run_dir / "samples.png")
    for name in names:
        metric_cfg = getattr(cfg.eval, name)
        request = _json_normal({**common, **protocol_of(metric_cfg)})
        stored = record["metrics"].get(name, {}).get("protocol", {})
        if not cfg.force and all(stored.get(k) == v for k, v in request.items()):
            log.info("%s: up to date with this protocol, skipped", name)
            continue
        log.info("%s: computing", name)
        start, sampling = time.perf_counter(), ctx.sampling_seconds
        result = METRICS[name](ctx, metric_cfg)
        arrays = None
        if result.arrays:
            atomic_save(run_dir / "eval" / f"{name}.npz",
                        lambda tmp, arrays=result.arrays: np.savez(tmp, **arrays))
            arrays = f"eval/{name}.npz"
        values, dropped = finite_values(result.values)
        if dropped:
            log.warning("%s: %s not finite: left out of the values (listed as nonfinite)",
                        name, ", ".join(dropped))
        record["metrics"][name] = _json_normal({
            "values": values, **({"nonfinite": dropped} if dropped else {}),
            "protocol": {**request, **result.protocol},
            "provenance": {**result.provenance, **made_by, "device": str(ctx.device),
                           "seconds": time.perf_counter() - start,
                           "sampling_seconds": ctx.sampling_seconds - sampling,
                           "evaluated": dt.datetime.now(dt.timezone.utc).isoformat(
                               timespec="seconds")},
            "arrays": arrays,
        })
        atomic_write_json(path, record)
        log.info("%s: %s", name, result.values)
    return record
