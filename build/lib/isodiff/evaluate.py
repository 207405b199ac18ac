"""`python -m isodiff.evaluate run=<run dir> eval=<smoke|quick|paper>`: evaluate a done run."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from isodiff import distributed
from isodiff.cli import USAGE, fail, hydra_main
from isodiff.config import CONF, UserError
from isodiff.evaluation import (
    EvaluationFailed,
    evaluate_run,
    register_schemas,
    to_evaluate_config,
)

register_schemas()
log = logging.getLogger("isodiff.evaluate")


@hydra.main(config_path=str(CONF), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> dict:
    if (rank := distributed.rank()) != 0:  # a multi-task profile: one evaluation per job
        log.info("rank %d: the evaluation runs on rank 0 alone", rank)
        return {}
    try:
        return evaluate_run(to_evaluate_config(cfg))
    except (UserError, EvaluationFailed) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher evaluates the other runs, then reports this one
        fail(err, code=1 if isinstance(err, EvaluationFailed) else USAGE)


def command() -> None:
    """The `isodiff-evaluate` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
