"""Synthetic run folders shaped like real ones, for testing and benchmarking the analysis
without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from isodiff.runs.identity import config_hash
from isodiff.runs.status import weights_record
from isodiff.sweep.plan import FINETUNE, Plan, PlannedJob, write_plan
from isodiff.sweep.specs import Spec, expand


def nest(flat: dict[str, object]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def write_runs(
    root: Path, spec: Spec, tier: str, rng_seed: int = 0, fail: set[int] = frozenset()
) -> list[Path]:
    """One folder per job of `spec`, holding config.yaml, status.json and metrics.json with
    random metric values, and the spec's plan naming them; jobs whose index is in `fail`
    are written as failed."""
    rng = np.random.default_rng(rng_seed)
    dirs, planned = [], []
    for i, job in enumerate(expand(spec, tier)):
        flat = {
            "data.name": job.dataset,
            "tier.name": tier,
            "experiment": job.dataset,
            **{
                k: yaml.safe_load(v)
                for o in job.overrides
                if not o.startswith("data=")
                for k, v in [o.split("=", 1)]
            },
        }
        config = nest(flat)
        run_dir = root / tier / job.dataset / f"job{i:05d}-{config_hash(config)}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        state = {"state": "failed", "error": "RuntimeError: synthetic failure"}
        if i not in fail:  # done, with the weights it records
            weights = run_dir / "final" / "unet_ema" / "diffusion_pytorch_model.safetensors"
            weights.parent.mkdir(parents=True)
            weights.write_bytes(f"synthetic weights {i}".encode())
            state = {"state": "done", "step": 1, "weights": weights_record(run_dir)}
        (run_dir / "status.json").write_text(json.dumps(state))
        if i not in fail:
            metrics = {
                "metrics": {
                    m: {"values": {m: float(rng.uniform(1, 2))}} for m in spec.metrics_for(tier)
                }
            }
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
        dirs.append(run_dir)
        point = {
            k: v for o in job.overrides if not o.startswith("data=") for k, v in [o.split("=", 1)]
        }
        planned.append(
            PlannedJob(
                f"{job.dataset}/{run_dir.name}",
                FINETUNE,
                job.dataset,
                point,
                spec.metrics_for(tier),
            )
        )
    write_plan(Plan(spec.name, tier, planned), root / tier)
    return dirs
