"""Evaluate one finished run: every enabled metric, recorded with its protocol.

    <run>/metrics.json   {"run": ..., "metrics": {<name>: {"values": {...},
                          "protocol": {...}, "provenance": {...}, "arrays": "eval/<name>.npz"}}}
    <run>/eval/<name>.npz   per-sample arrays for figures
    <run>/report.md      the run's page (isodiff.evaluate.report), rewritten when
                         metrics.json changes; its summary table ends the output

A metric whose stored protocol matches the requested one is skipped (idempotent). The
protocol holds the sha256 of the weights measured, so a metric of weights that changed is
computed again. Each metric is computed under its own lock (eval/.<name>.lock) and merged
into metrics.json under .metrics.json.lock, so concurrent evaluations of one run neither
repeat nor lose work; an interrupted evaluation keeps what it finished. A metric that fails
is recorded under "failed" with its cause (the run, or the environment: device, memory,
disk) and the others are still computed; a later success of the metric, or an evaluation
that finds it up to date, removes a failure it supersedes (superseded). Only runs
that are done, with the weights they recorded, are evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from isodiff.config import to_train_config
from isodiff.errors import ConfigError, UserError
from isodiff.evaluate import report
from isodiff.evaluate.config import EvalConfig, EvaluateConfig
from isodiff.evaluate.metrics import registry
from isodiff.evaluate.metrics.common import EvalContext, MetricResult, protocol_of
from isodiff.evaluate.parallel import Ranks
from isodiff.model import paper_assets, pictures
from isodiff.model.latent import build_codec
from isodiff.model.sampling import SAMPLERS
from isodiff.model.unet import (
    MAX_ABS_WEIGHT,
    HUNet,
    diverged,
    load_unet,
    resolve_checkpoint,
)
from isodiff.runs.files import (
    RunFileError,
    atomic_save,
    atomic_write_json,
    exclusive,
    up_to_date,
)
from isodiff.runs.identity import base_identity, provenance
from isodiff.runs.status import (
    DONE,
    ENVIRONMENT_MESSAGE,
    WEIGHTS_CHANGED,
    is_done,
    job_state,
    read_metrics,
    read_status,
    superseded,
    weights_digest,
)

log = logging.getLogger(__name__)

# name -> the metric's evaluate (its module declares it: isodiff.evaluate.metrics.registry); the
# name is also the config section of conf/eval/*.yaml
METRICS: dict[str, Callable[[EvalContext, Any], MetricResult]] = {
    name: metric.evaluate for name, metric in registry().items()
}


class EvaluationFailed(RuntimeError):
    """Some metrics of a run failed (each recorded under "failed" in its metrics.json)."""


def _json_normal(obj: Any) -> Any:
    """obj as it reads back from metrics.json (tuples -> lists, int keys -> str)."""
    return json.loads(json.dumps(obj, default=str))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_cpu_threads(threads: int | None) -> None:
    """torch's intra-op threads and the BLAS / OpenMP pools of numpy and scikit-learn
    (eval.cpu_threads; None: their defaults), for the command's process. Not in the
    protocol: it changes what the numbers cost, not the numbers."""
    if threads:
        from threadpoolctl import threadpool_limits  # (scikit-learn's dependency)

        torch.set_num_threads(threads)
        threadpool_limits(threads)  # kept: not used as a context manager


def full_fp32(device: torch.device) -> dict[str, Any]:
    """Every metric is specified in fp32: on CUDA, TF32 matmuls and convolutions (10-bit
    mantissas, which shift singular values and hence MCN/VoR) are switched off for the
    evaluation, and the protocol says so. A CPU has no TF32: its protocol is unchanged."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {"tf32": False}


def build_context(
    cfg: EvaluateConfig, ranks: Ranks | None = None, device: torch.device | None = None
) -> tuple[EvalContext, dict[str, Any]]:
    """The run's model and data as an EvalContext, and the protocol fields all metrics share.
    With several processes (ranks), each on its own `device`, the metrics share the work.

    Refuses a run that is not done (ConfigError naming the state and the fix).
    """
    run_dir = Path(cfg.run).expanduser()
    state, problem = job_state(run_dir, full=True)  # the metrics name these bits
    if state == WEIGHTS_CHANGED:
        raise ConfigError(
            f"run={cfg.run!r}: {problem}: nothing is measured; train the job "
            "again (its command, or the sweep that made it, retrains it)"
        )
    if state != DONE:
        raise ConfigError(
            f"run={cfg.run!r}: status is {state}; only a finished run can be "
            "evaluated: train it first (python -m isodiff.train ...), or pass "
            "the directory of a run whose status.json says done"
        )
    status = read_status(run_dir) or {}
    if status.get("released"):  # a model isodiff did not train (isodiff.evaluate.released)
        return _released_context(cfg, run_dir, status, ranks, device)
    train_cfg = to_train_config(OmegaConf.load(run_dir / "config.yaml"))
    if cfg.clip_sample is not None:
        train_cfg.diffusion.clip_sample = cfg.clip_sample
    _, subfolder = resolve_checkpoint(str(run_dir), cfg.ema)
    if train_cfg.assets.required:  # a paper-tier run: its data, checked as prepared
        paper_assets.require(train_cfg.assets.required, train_cfg.assets.root)
    unet = _checked(
        load_unet(str(run_dir), ema=cfg.ema).to(device or _device(cfg.device)),
        cfg.run,
        f"final/{subfolder}",
    )
    ctx = EvalContext(
        unet,
        train_cfg.diffusion,
        train_cfg.data,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        refs_dir=_refs_dir(cfg, run_dir),
        progress=cfg.progress,
        codec=build_codec(train_cfg.latent, unet.device),
        ranks=ranks,
    )
    common = {
        "seed": cfg.seed,
        "weights": f"final/{subfolder}",
        "weights_sha256": weights_digest(status, subfolder),
        "ema": subfolder == "unet_ema",
        "sampler": SAMPLERS[train_cfg.diffusion.objective],
        "clip_sample": train_cfg.diffusion.clip_sample,
        "data": ctx.data_key,
        **full_fp32(unet.device),
    }
    if train_cfg.latent.autoencoder:  # (a pixel model's protocol is what it was before)
        common["latent"] = {
            "autoencoder": base_identity(train_cfg.latent.autoencoder),
            "scale": ctx.codec.scale,
        }
    return ctx, common


def _checked(unet: HUNet, run: str, where: str) -> HUNet:
    """The U-Net, unless it holds diverged weights (ConfigError: nothing is measured)."""
    if bad := diverged(unet.named_parameters()):
        raise ConfigError(
            f"run={run!r}: {where} holds diverged weights (nan, "
            f"inf or |w| > {MAX_ABS_WEIGHT:g}) "
            f"({len(bad)} tensors, e.g. {bad[0]}): nothing is measured; retrain "
            "it with a lower optim.lr or lambda_iso"
        )
    return unet


def _refs_dir(cfg: EvaluateConfig, run_dir: Path) -> Path:
    # beside the tier's experiments, from the absolute path: `run=<job>/final/..` is no
    # job folder's parent
    return (
        Path(cfg.refs_dir)
        if cfg.refs_dir
        else Path(os.path.abspath(run_dir)).parent.parent / "_refs"
    )


def _released_context(
    cfg: EvaluateConfig,
    run_dir: Path,
    status: dict[str, Any],
    ranks: Ranks | None,
    device: torch.device | None,
) -> tuple[EvalContext, dict[str, Any]]:
    """build_context of a released model's folder: its U-Net read where it lies, hashed
    against the record first; its data and schedule from its config.yaml; the schedule
    and its origin in the protocol (a run's is fixed by its training config)."""
    from isodiff.evaluate.released import SUBFOLDER, check_files, data_and_diffusion

    unet_dir = check_files(run_dir, status)
    data, diffusion = data_and_diffusion(run_dir)
    if cfg.clip_sample is not None:
        diffusion.clip_sample = cfg.clip_sample
    unet = _checked(
        load_unet(str(unet_dir)).to(device or _device(cfg.device)), cfg.run, str(unet_dir)
    )
    size, channels = unet.config.sample_size, unet.config.in_channels
    if (data.resolution, data.channels) != (size, channels):
        raise ConfigError(
            f"released model {run_dir.name}: its U-Net models {channels}-channel "
            f"{size} px images, the data are {data.channels}-channel "
            f"{data.resolution} px: pass data.resolution={size} "
            f"data.channels={channels} (or the data it was trained on)"
        )
    ctx = EvalContext(
        unet,
        diffusion,
        data,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        refs_dir=_refs_dir(cfg, run_dir),
        progress=cfg.progress,
        ranks=ranks,
    )
    schedule = {
        k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(diffusion).items()
    }
    if schedule["objective"] == "ddpm":  # the protocol it had before diffusion.objective
        del schedule["objective"]
    common = {
        "seed": cfg.seed,
        "weights": SUBFOLDER,
        "weights_sha256": weights_digest(status, SUBFOLDER),
        "ema": False,
        "sampler": SAMPLERS[diffusion.objective],
        "clip_sample": diffusion.clip_sample,
        "data": ctx.data_key,
        "released": True,
        "schedule": {**schedule, "from": status["released"].get("schedule")},
        **full_fp32(unet.device),
    }
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
        grid = pictures.sample_grid(
            ctx.unet, ctx.diffusion, cfg.grid_samples, cfg.grid_steps, ctx.batch_size, ctx.codec
        )
        pictures.save_png(grid, path, scale=max(1, 64 // ctx.data.resolution))


def read_record(run_dir: Path) -> dict[str, Any]:
    """metrics.json, or an empty record (one damaged or of the wrong shape is computed
    again, with a warning)."""
    empty = {"run": str(run_dir), "metrics": {}}
    try:
        return read_metrics(run_dir) or empty
    except RunFileError as err:
        log.warning("%s: every metric is computed again", err)
        return empty


def update_record(
    run_dir: Path,
    name: str,
    entry: dict[str, Any] | None = None,
    failure: dict[str, Any] | None = None,
) -> None:
    """Store one metric's entry (or its failure) in metrics.json: read, change and write
    under .metrics.json.lock, so that concurrent evaluations of the run never lose a value.
    A new entry supersedes the metric's failed attempt (the latest attempt of a metric is
    what counts); neither given: only a failure that the stored entry supersedes
    (superseded) is removed."""
    with exclusive(run_dir / ".metrics.json.lock", f"metrics.json of {run_dir.name}"):
        record = read_record(run_dir)
        failed = record.setdefault("failed", {})
        if (
            entry is None
            and failure is None
            and not (name in failed and superseded(failed[name], record["metrics"].get(name)))
        ):
            return  # nothing superseded: nothing to write
        failed.pop(name, None)
        if entry is not None:
            record["metrics"][name] = entry
        if failure is not None:
            failed[name] = failure
        if not failed:
            del record["failed"]
        atomic_write_json(run_dir / "metrics.json", record)


def compute_entry(
    ctx: EvalContext,
    name: str,
    metric_cfg: Any,
    request: dict[str, Any],
    run_dir: Path,
    made_by: dict[str, Any],
) -> dict[str, Any]:
    """One metric computed: its metrics.json entry (its arrays written to eval/)."""
    start, sampling = time.perf_counter(), ctx.sampling_seconds
    result = METRICS[name](ctx, metric_cfg)
    # A metric adds protocol fields but never changes a requested one: the stored protocol
    # must match the next request, or the metric would be recomputed every time.
    if clash := sorted(
        k for k, v in _json_normal(result.protocol).items() if k in request and request[k] != v
    ):
        raise RuntimeError(
            f"{name} rewrites the requested protocol fields {clash}: name "
            "what it resolved differently (e.g. <field>_used)"
        )
    arrays = None
    if result.arrays and ctx.ranks.main:
        atomic_save(
            run_dir / "eval" / f"{name}.npz",
            lambda tmp, arrays=result.arrays: np.savez(tmp, **arrays),
        )
        arrays = f"eval/{name}.npz"
    values, dropped = finite_values(result.values)
    if dropped:
        log.warning(
            "%s: %s not finite: left out of the values (listed as nonfinite)",
            name,
            ", ".join(dropped),
        )
    log.debug("%s: %s", name, result.values)  # the summary shows its headline values
    return _json_normal(
        {
            "values": values,
            **({"nonfinite": dropped} if dropped else {}),
            "protocol": {**request, **result.protocol},
            "provenance": {
                **result.provenance,
                **made_by,
                "device": str(ctx.device),
                "processes": ctx.ranks.world,
                "seconds": time.perf_counter() - start,
                "sampling_seconds": ctx.sampling_seconds - sampling,
                "evaluated": _now(),
            },
            "arrays": arrays,
        }
    )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def failure_cause(err: BaseException) -> str:
    """ "environment" when an attempt failed for a reason outside the run (no such device,
    out of memory, a full disk), which another attempt elsewhere can clear; else "run"."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "environment"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.ENOMEM):
        return "environment"
    # (a UserError too: "device=cuda: no such device" is the machine's, not the run's)
    if isinstance(err, (RuntimeError, AssertionError, UserError)) and ENVIRONMENT_MESSAGE.search(
        str(err)
    ):
        return "environment"
    return "run"


def _failure(err: BaseException, request: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(),
        "cause": failure_cause(err),
        "when": _now(),
        **({"protocol": request} if request else {}),
    }


def values_version(name: str) -> dict[str, int]:
    """{"version": V} for a metric whose declaration has version V (bumped when its values
    change or grow, so that results stored before are computed again rather than kept
    without the new values); {} for version 1, so that protocols stored before versions
    stay valid."""
    version = registry()[name].version
    return {"version": version} if version > 1 else {}


def evaluate_run(
    cfg: EvaluateConfig, ranks: Ranks | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Compute every selected metric not already stored with the same protocol; returns
    the content of metrics.json. Raises EvaluationFailed, after trying every metric, when
    some failed. Under a launcher, the job's processes (`ranks`, each on its `device`)
    share every metric's batches and rank 0 alone writes (isodiff.evaluate.parallel)."""
    run_dir = Path(cfg.run).expanduser()
    names = cfg.metrics or [n for n in METRICS if getattr(cfg.eval, n).enabled]
    try:
        ctx, common = build_context(cfg, ranks, device)
    except Exception as err:
        if is_done(run_dir) and (ranks or Ranks()).main:  # measured by nobody: recorded
            for name in names:
                update_record(run_dir, name, failure=_failure(err))
        raise
    made_by = provenance()
    main = ctx.ranks.main  # the one writer; the other processes compute their share
    if main:
        write_samples(ctx, cfg.eval, run_dir / "samples.png")
        (run_dir / "eval").mkdir(exist_ok=True)  # arrays and per-metric locks
    failures, states = {}, {}
    for name in names:
        metric_cfg = getattr(cfg.eval, name)
        request = _json_normal({**common, **protocol_of(metric_cfg), **values_version(name)})
        with (
            exclusive(run_dir / "eval" / f".{name}.lock", f"{name} of {run_dir.name}")
            if main
            else contextlib.nullcontext()
        ):
            record = read_record(run_dir)
            stored = record["metrics"].get(name, {}).get("protocol", {})
            if ctx.ranks.share(
                not cfg.force and all(stored.get(k) == v for k, v in request.items())
            ):
                log.info("%s: up to date with this protocol, skipped", name)
                states[name] = report.SKIPPED
                if main and name in record.get("failed", {}):  # an older attempt that failed
                    update_record(run_dir, name)
                continue
            log.info("%s: computing", name)
            try:
                entry = compute_entry(ctx, name, metric_cfg, request, run_dir, made_by)
            except Exception as err:  # the other metrics are still computed
                log.exception("%s failed", name)
                failures[name] = f"{type(err).__name__}: {err}"
                states[name] = report.FAILED
                if main:
                    update_record(run_dir, name, failure=_failure(err, request))
                continue
            states[name] = report.COMPUTED
            if main:
                update_record(run_dir, name, entry)
                log.info("%s: done in %.1f s", name, entry["provenance"]["seconds"])
    record = read_record(run_dir)
    if main:
        if not up_to_date(run_dir / "report.md", run_dir / "metrics.json"):
            report.write_page(run_dir, record, states, _config_of(run_dir))
        log.info("%s", report.summary(record, states, run_dir))
    if failures:
        raise EvaluationFailed(
            f"{run_dir}: {len(failures)} of {len(names)} metrics failed ("
            + "; ".join(f"{k}: {v}" for k, v in failures.items())
            + "); each is recorded under 'failed' in its metrics.json"
        )
    return record


def _config_of(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as plain data (a released model's too), for its report.md."""
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
