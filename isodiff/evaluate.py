"""`python -m isodiff.evaluate run=<run dir> eval=<smoke|quick|paper>`: evaluate a done run."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from isodiff.assets import MissingAssetError
from isodiff.config import ConfigError
from isodiff.evaluation import evaluate_run, register_schemas, to_evaluate_config

register_schemas()
log = logging.getLogger("isodiff.evaluate")


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> dict:
    try:
        return evaluate_run(to_evaluate_config(cfg))
    except (ConfigError, MissingAssetError) as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
