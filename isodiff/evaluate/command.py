"""Evaluate a finished training run: its metrics (FID, PPL, RTL, L_iso ...) into metrics.json.

Examples:
  python -m isodiff.evaluate run=runs/quick/default/<job> eval=quick
  python -m isodiff.evaluate run=runs/quick/default/<job> eval=smoke metrics=[fid,ppl]
  python -m isodiff.evaluate run=<a job still training> wait=true   # then evaluates it

run= is a job folder of python -m isodiff.train (it holds status.json). It writes
<run>/metrics.json and <run>/eval/; a metric already stored with the same protocol is
skipped (force=true recomputes). A model isodiff did not train (a diffusers U-Net or
pipeline folder, a cached hub id), given its data, gets <run_root>/<tier>/released/<name>/:
  python -m isodiff.evaluate released=<model folder> data=folder data.root=<images> eval=quick

Keys: key=value sets one, group=option picks a file of conf/<group>/ (below).
  python -m isodiff.evaluate --cfg job  every key with its value (after your overrides)
  conf/evaluate.yaml                    the keys, commented
  conf/eval/<preset>.yaml               each metric's sample counts and steps (eval.<metric>.*)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from isodiff.cli import USAGE, fail, hydra_main
from isodiff.config import CONF, check_device, check_run_folder
from isodiff.errors import UserError
from isodiff.evaluate.config import register_schemas, to_evaluate_config
from isodiff.runs.running import check_job_ended

register_schemas()
log = logging.getLogger("isodiff.evaluate")


@hydra.main(config_path=str(CONF), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> dict:
    try:
        config = to_evaluate_config(cfg)
        if config.run is not None:  # in isodiff.config: a launcher pickles main by reference
            check_run_folder(config.run)
            check_job_ended(config.run, wait=config.wait)
        else:  # its folder found by its files' sha256, or made (loads torch: config valid)
            from isodiff.evaluate.released import prepare

            config.run = str(prepare(config))
    except UserError as err:
        _stop(err, USAGE)
    # Only a valid config loads torch and the models (isodiff.evaluate.measure): a typo's error
    # comes in about a second.
    from isodiff.evaluate import parallel
    from isodiff.evaluate.measure import EvaluationFailed, evaluate_run, set_cpu_threads
    from isodiff.runs.tracking import log_evaluation

    set_cpu_threads(config.eval.cpu_threads)
    ranks, device = parallel.join()  # a launcher's processes share the work (one writer)
    try:
        if device is None:  # a launcher's processes get their device from it
            check_device(config.device)
        record = evaluate_run(config, ranks, device)
        log_evaluation(Path(config.run), record)  # hparams + metrics in the run's TensorBoard
        return record
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
