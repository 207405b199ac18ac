"""`python -m isodiff.evaluate run=<run dir> eval=<smoke|quick|paper>`: evaluate a done run;
`released=<diffusers folder | cached hub id> data=<its data>`: a model isodiff did not train
(isodiff.evaluate.released), in a folder of its own under <run_root>/<tier>/released/."""

from __future__ import annotations

import logging
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from isodiff.cli import USAGE, fail, hydra_main
from isodiff.config import CONF, check_device, check_run_folder
from isodiff.errors import UserError
from isodiff.evaluate.config import register_schemas, to_evaluate_config

register_schemas()
log = logging.getLogger("isodiff.evaluate")


@hydra.main(config_path=str(CONF), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> dict:
    try:
        config = to_evaluate_config(cfg)
        if config.run is not None:  # in isodiff.config: a launcher pickles main by reference
            check_run_folder(config.run)
        else:  # its folder found by its files' sha256, or made (loads torch: config valid)
            from isodiff.evaluate.released import prepare

            config.run = str(prepare(config))
    except UserError as err:
        _stop(err, USAGE)
    # Only a valid config loads torch and the models (isodiff.evaluate.measure): a typo's error
    # comes in about a second.
    from isodiff.evaluate import parallel
    from isodiff.evaluate.measure import EvaluationFailed, evaluate_run, set_cpu_threads

    set_cpu_threads(config.eval.cpu_threads)
    ranks, device = parallel.join()  # a launcher's processes share the work (one writer)
    try:
        if device is None:  # a launcher's processes get their device from it
            check_device(config.device)
        return evaluate_run(config, ranks, device)
    except (UserError, EvaluationFailed) as err:
        _stop(err, 1 if isinstance(err, EvaluationFailed) else USAGE)


def _stop(err: Exception, code: int) -> NoReturn:
    """One line and `code`; under a multirun the launcher evaluates the other runs, then
    reports this one."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    fail(err, code=code)


def command() -> None:
    """The `isodiff-evaluate` console command."""
    hydra_main(main)


if __name__ == "__main__":
    command()
