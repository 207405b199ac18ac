"""Where a run's numbers go besides its files: accelerate's trackers while it trains
(`train.log_with`: TensorBoard in <run>/tb by default, W&B or any accelerate tracker, none),
and its evaluation's metrics beside its hparams in <run>/tb/eval, so that TensorBoard's
HParams view (`tensorboard --logdir runs/<tier>`) shows a sweep's runs side by side.

Light on import: evaluate's command calls `log_evaluation` with torch already loaded, the
training loop passes its Accelerator in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from isodiff.runs import distributed
from isodiff.runs.files import up_to_date

log = logging.getLogger(__name__)
TB_DIR = "tb"  # <run>/tb: the training curves (accelerate's TensorBoard tracker's project)
EVAL_DIR = "eval"  # <run>/tb/eval: the last evaluation's hparams session and metrics
# The keys a sweep varies (and those a run's name_keys adds): the columns of HParams' table
HPARAM_KEYS = ("lambda_iso", "iso.metric", "iso.window", "seed", "data.name", "stage")

Scalar = bool | int | float | str


def hparams(config: Mapping[str, Any]) -> dict[str, Scalar]:
    """A run's resolved config (its config.yaml) -> the values of HPARAM_KEYS and of its
    name_keys, as the scalars TensorBoard and accelerate's trackers accept."""
    keys = [*HPARAM_KEYS, *(k for k in config.get("name_keys") or [] if k not in HPARAM_KEYS)]
    found = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            found[key] = node if isinstance(node, (bool, int, float, str)) else str(node)
    return found


def init_trackers(
    accelerator: Any, config: Mapping[str, Any], run_dir: Path, start_step: int
) -> None:
    """accelerator.init_trackers for a training job (an Accelerator made with
    log_with=train.log_with and project_dir=run_dir): TensorBoard writes <run>/tb and drops
    the events after start_step that an interrupted attempt left (a resume's curves are
    clean); another tracker gets one run per job folder, continued by a resume, and the
    job's hparams (TensorBoard's come with the evaluation: one HParams row per run)."""
    tracker = config["train"]["log_with"]
    if tracker == "none":
        return
    if tracker == "tensorboard":
        purge = {"tensorboard": {"purge_step": start_step + 1}}
        accelerator.init_trackers(TB_DIR, init_kwargs=purge)
        return
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir), "id": run_id, "resume": "allow"}}
    accelerator.init_trackers(
        f"isodiff-{config['tier']['name']}-{config['experiment']}",
        config=hparams(config),
        init_kwargs={tracker: kwargs.get(tracker, {})},
    )


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json's finite scalar values as `eval/<metric>/<value>`."""
    return {
        f"eval/{name}/{key}": float(value)
        for name, entry in record.get("metrics", {}).items()
        for key, value in (entry.get("values") or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def log_evaluation(run_dir: Path, record: Mapping[str, Any]) -> None:
    """The run's hparams with its evaluation's metric values (metrics.json's `record`) in
    <run>/tb/eval, replacing the previous evaluation's: one HParams row per run. Nothing
    for a run trained with train.log_with other than tensorboard, nor on ranks but 0."""
    path = run_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    tracker = config.get("train", {}).get("log_with", "tensorboard")  # older runs: TensorBoard
    values = metric_values(record)
    folder = run_dir / TB_DIR / EVAL_DIR
    if tracker != "tensorboard" or not values or distributed.rank() != 0:
        return
    if up_to_date(folder, run_dir / "metrics.json"):
        return  # nothing measured since it was written
    from torch.utils.tensorboard import SummaryWriter  # torch is loaded by the evaluation

    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(str(folder)) as writer:
        writer.add_hparams(hparams(config) or {"run": run_dir.name}, values, run_name=".")
    log.info("%s: hparams and %d metric values in %s", run_dir.name, len(values), folder)
