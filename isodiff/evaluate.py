"""`python -m isodiff.evaluate run=<run dir> eval=<smoke|quick|paper>`: evaluate a done run."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from isodiff import parallel
from isodiff.cli import USAGE, fail, hydra_main
from isodiff.config import CONF, ConfigError, UserError
from isodiff.evaluation import (
    EvaluateConfig,
    EvaluationFailed,
    evaluate_run,
    register_schemas,
    to_evaluate_config,
)

register_schemas()
log = logging.getLogger("isodiff.evaluate")


def check_run_folder(run: str) -> None:
    """ConfigError naming run= when it is a file (status.json, a weights file) rather than
    the run folder, with the folder to pass instead."""
    path = Path(run).expanduser()
    if path.exists() and not path.is_dir():
        parent = next((p for p in path.parents if (p / "status.json").is_file()), None)
        fix = f"run={parent}" if parent else "the folder of the run, which holds status.json"
        raise ConfigError(f"run={run!r} is a file, not a run folder: pass {fix}")


def check_device(name: str) -> None:
    """ConfigError naming device= when the device asked for is not on this machine: checked
    before any model or metric is loaded, so nothing is recorded as failed."""
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device(s) visible" if count else "no CUDA GPU visible"
            raise ConfigError(f"device={name!r}: {seen} here (torch.cuda.is_available() is "
                              f"{torch.cuda.is_available()}): use device=auto or device=cpu"
                              + (f", or cuda:0..cuda:{count - 1}" if count else ""))
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps': no Apple GPU here (torch.backends.mps.is_available()"
                          " is False): use device=auto or device=cpu")


def validate(cfg: EvaluateConfig, launched: bool) -> EvaluateConfig:
    """cfg's user errors before anything is read or written: run= a file, a missing device
    (a launcher's processes get theirs from it, `launched`)."""
    check_run_folder(cfg.run)
    if not launched:
        check_device(cfg.device)
    return cfg


@hydra.main(config_path=str(CONF), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> dict:
    ranks, device = parallel.join()  # a launcher's processes share the work (one writer)
    try:
        return evaluate_run(validate(to_evaluate_config(cfg), device is not None), ranks,
                            device)
    except (UserError, EvaluationFailed) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher evaluates the other runs, then reports this one
        fail(err, code=1 if isinstance(err, EvaluationFailed) else USAGE)


def command() -> None:
    """The `isodiff-evaluate` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
