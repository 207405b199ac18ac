"""Train a diffusion model, with the isometric regulariser lambda_iso * L_iso when lambda_iso > 0.

Examples:
  python -m isodiff.train tier=smoke                          # seconds: a tiny U-Net on shapes
  python -m isodiff.train stage=finetune lambda_iso=0.1       # quick: 600 steps from its base
  python -m isodiff.train -m stage=finetune lambda_iso=0,0.1  # a Hydra multirun: one job each

Without stage=finetune (or init_from=), a job trains the tier's model from scratch: 8,000
steps at the quick tier, hours on a CPU (its first line says so).

A job writes <run_root>/<tier>/<experiment>/<job>/ (status.json, config.yaml, train.log,
checkpoints/, final/); the same command skips it when done and resumes it otherwise. Then:
python -m isodiff.evaluate run=<that folder>.

Keys: key=value sets one, group=option picks a file of conf/<group>/ (below).
  python -m isodiff.train --cfg job     every key with its value (after your overrides)
  conf/train.yaml                       the main keys, commented (lambda_iso, iso.*, seed)
  isodiff/config.py                     each key's type, range and meaning
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from isodiff.cli import FAILED, Interrupted, fail, hydra_main, job_failure
from isodiff.config import CONF, TrainConfig, register_schemas
from isodiff.errors import UserError
from isodiff.runs.distributed import export_torch_distributed_env
from isodiff.runs.identity import FOLDER_NAME_EXCLUDES, folder_part, job_name
from isodiff.train.job import run_job

register_schemas()
OmegaConf.register_new_resolver("job_name", job_name, replace=True)
OmegaConf.register_new_resolver("folder", folder_part, replace=True)
OmegaConf.register_new_resolver(
    "folder_name_excludes", lambda: list(FOLDER_NAME_EXCLUDES), replace=True
)
log = logging.getLogger("isodiff.train")
logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def _train(cfg: TrainConfig, run_dir: Path) -> dict:
    from isodiff.train.loop import train  # torch & co. load only once the config is valid

    return train(cfg, run_dir)


@hydra.main(config_path=str(CONF), config_name="train", version_base=None)
def main(cfg: DictConfig) -> dict:
    export_torch_distributed_env()  # SLURM tasks -> torch ranks, before any Accelerator
    hydra_cfg = HydraConfig.get()
    try:
        return run_job(cfg, Path(hydra_cfg.runtime.output_dir), _train)
    except UserError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweeper runs the other jobs, then reports this one
        fail(err)  # here, not in hydra_main: Hydra would first log the job's overrides
    except Interrupted as err:  # status interrupted: the line says how to resume
        fail(err.message, code=err.code)
    except Exception as err:  # recorded as failed, the traceback in the job's train.log
        if hydra_cfg.mode == RunMode.MULTIRUN or (line := job_failure(err)) is None:
            raise
        fail(line, code=FAILED)


def command() -> None:
    """The `isodiff-train` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
