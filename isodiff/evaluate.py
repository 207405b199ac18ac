"""`python -m isodiff.evaluate run=<run dir> eval=<smoke|quick|paper>`: evaluate a done run."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from isodiff import parallel
from isodiff.cli import USAGE, fail, hydra_main
from isodiff.config import CONF, UserError, check_device, check_run_folder
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
    ranks, device = parallel.join()  # a launcher's processes share the work (one writer)
    try:
        typed = to_evaluate_config(cfg)
        # user errors before anything is read or written (a launcher's processes get their
        # device from it); in isodiff.config, so that a launcher pickles main by reference
        check_run_folder(typed.run)
        if device is None:
            check_device(typed.device)
        return evaluate_run(typed, ranks, device)
    except (UserError, EvaluationFailed) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher evaluates the other runs, then reports this one
        fail(err, code=1 if isinstance(err, EvaluationFailed) else USAGE)


def command() -> None:
    """The `isodiff-evaluate` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
