"""Run one job under the run-directory contract: validate, skip if done, record the outcome."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from isodiff.cli import Interrupted, command_line, interruptible
from isodiff.config import Stage, TrainConfig, to_train_config
from isodiff.errors import ConfigError, UserError
from isodiff.model import paper_assets
from isodiff.runs import distributed
from isodiff.runs.files import announce_holder, atomic_write_text, exclusive
from isodiff.runs.identity import identity_difference, provenance, require_inside
from isodiff.runs.status import (
    DONE,
    FAILED,
    RUNNING,
    UNREADABLE,
    WEIGHTS_CHANGED,
    is_done,
    job_state,
    read_status,
    weights_record,
    write_status,
)

log = logging.getLogger(__name__)
# A job stopped by SIGINT/SIGTERM: not done (every reader treats a state other than done as
# not done), resumed from its newest checkpoint by the same command.
INTERRUPTED = "interrupted"
# Tiers whose bases take long to train from scratch: a fine-tune of the tier's base is what a
# new user most likely meant
LONG_TIERS = ("quick", "paper")


def remove_empty(run_dir: Path, run_root: Path) -> None:
    """The folders Hydra made for a job that never ran, up to run_root itself: each is
    kept once it holds anything."""
    folder, stop = run_dir.resolve(), run_root.resolve()
    while folder == stop or stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): kept
        folder = folder.parent


def _holder(run_dir: Path) -> str:
    if not (status := read_status(run_dir)):
        return " (a job that has not written its status.json yet)"
    return f" (status.json: {status.get('state')}, pid {status.get('pid')} on {status.get('host')})"


def first_line(cfg: TrainConfig, run_dir: Path, done: bool) -> tuple[int, str]:
    """The command's first line (its level and text): the run folder and what the job does,
    a warning when it trains a base from scratch at a tier of LONG_TIERS."""
    if done:
        return logging.INFO, f"train {run_dir}: done already, checking its weights"
    loop = cfg.train
    length = f"{loop.epochs:g} epochs" if loop.epochs is not None else f"{loop.steps} steps"
    if cfg.init_from is None and cfg.stage != Stage.finetune and cfg.tier.name in LONG_TIERS:
        return logging.WARNING, (
            f"train {run_dir}: a base from scratch, {length} at tier {cfg.tier.name}; to "
            "fine-tune the tier's base for these data instead, add stage=finetune (e.g. "
            "python -m isodiff.train stage=finetune lambda_iso=0.1)"
        )
    source = f"from {cfg.init_from}" if cfg.init_from else "from scratch"
    return logging.INFO, f"train {run_dir}: {length} {source} at tier {cfg.tier.name}"


def require_same_job(run_dir: Path, cfg: DictConfig) -> None:
    """A folder is its identity: ConfigError naming the keys when run_dir records a job of
    another config (never skipped as done, nor resumed from its checkpoints)."""
    if differ := identity_difference(run_dir, cfg):
        raise ConfigError(
            f"name={run_dir.name!r}: {run_dir} holds a job with other "
            + ", ".join(
                f"{k} (recorded {old!r}, asked {new!r})" for k, (old, new) in differ.items()
            )
            + ": nothing is run; choose another name= or remove that folder"
        )


def run_job(cfg: DictConfig, run_dir: Path, work: Callable[[TrainConfig, Path], dict]) -> dict:
    """Validate cfg, then run `work` in run_dir unless it is already done.

    The job holds run_dir/.lock while it decides and works: a second process given the same
    job (two sweeps on one runs folder) waits, then finds it done. status.json is written
    `running` before the work and `done` (with the work's summary and the sha256 of final/)
    or `failed` (with error and traceback) after; an invalid config, or a base (init_from)
    that is missing or not done, writes nothing.
    """
    run_root = Path(str(cfg.get("run_root", run_dir.parent)))
    holder, announced = functools.partial(_holder, run_dir), False
    try:
        require_inside(run_dir, run_root)
        typed = to_train_config(cfg)
        done = is_done(run_dir)
        if distributed.rank() == 0:  # at once: the imports below take seconds
            log.log(*first_line(typed, run_dir, done))
            announced = announce_holder(run_dir / ".lock", f"job {run_dir.name}", holder)
        if not done:
            # torch and diffusers load here, once the config is valid
            from isodiff.model.data import check_data
            from isodiff.model.unet import require_objective, resolve_checkpoint

            # a preset's assets as prepared (named, with the command that fetches them)
            paper_assets.require(typed.assets.required, typed.assets.root)
            if typed.init_from:  # its base exists and is done
                resolve_checkpoint(typed.init_from)
                require_objective(typed.init_from, typed.diffusion.objective)
            check_data(typed.data)  # folder, attribute file, memory: before the job's folder
    except UserError:
        remove_empty(run_dir, run_root)
        raise
    if distributed.rank() != 0:  # rank 0 alone keeps the run folder's books (and its lock)
        require_same_job(run_dir, cfg)  # every rank stops where rank 0 does
        if is_done(run_dir):
            return read_status(run_dir)
        with interruptible():
            return work(typed, run_dir)
    with (
        interruptible(),
        exclusive(run_dir / ".lock", f"job {run_dir.name}", holder, announced=announced),
    ):
        return _run_locked(cfg, typed, run_dir, work)


def _run_locked(
    cfg: DictConfig, typed: TrainConfig, run_dir: Path, work: Callable[[TrainConfig, Path], dict]
) -> dict:
    require_same_job(run_dir, cfg)
    state, problem = job_state(run_dir, full=True)  # a skip relies on the weights' bits
    status = read_status(run_dir) or {}
    if state == DONE:
        log.info("%s is done already: skipped", run_dir)
        return status
    if state == UNREADABLE:
        log.warning("%s: the job runs again (from its newest checkpoint that loads)", problem)
    if state == WEIGHTS_CHANGED:
        log.warning(
            "%s: %s: the job trains again (from its newest checkpoint that loads), and "
            "its metrics are computed again",
            run_dir,
            problem,
        )
    resolved = OmegaConf.to_yaml(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    atomic_write_text(run_dir / "config.yaml", resolved)
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    attempt = status.get("attempts", 0) + 1
    # the attempt's first line, in train.log alone (the terminal had the command's)
    file_log.handle(
        log.makeRecord(
            log.name,
            logging.INFO,
            __file__,
            0,
            "train %s: attempt %d, pid %d on %s: %s",
            (run_dir, attempt, os.getpid(), socket.gethostname(), command_line()),
            None,
        )
    )
    # the job's log (the loop's lines: resume, each logged window) in train.log, whatever
    # level the command's logging left the root logger at (Python's default: WARNING)
    isodiff_log = logging.getLogger("isodiff")
    level = isodiff_log.level
    isodiff_log.setLevel(min(isodiff_log.getEffectiveLevel(), logging.INFO))
    logging.getLogger().addHandler(file_log)
    try:  # from `running` to `done`: a signal anywhere between leaves `interrupted`
        write_status(
            run_dir,
            RUNNING,
            host=socket.gethostname(),
            pid=os.getpid(),
            attempts=attempt,
            weights=None,
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            git=provenance()["git"],
        )
        summary = work(typed, run_dir)
        write_status(run_dir, DONE, **summary, weights=weights_record(run_dir))
        log.info(
            "train %s: done, %d steps, final loss %.4g; measure it: "
            "python -m isodiff.evaluate run=%s eval=%s",
            run_dir,
            summary["step"],
            summary["final_loss"],
            run_dir,
            typed.tier.eval,
        )
    except SystemExit:
        raise  # submitit's preemption/timeout requeue: the job stays `running` and resumes
    except Interrupted as err:
        write_status(run_dir, INTERRUPTED, error=err.message)  # cleared by the rerun
        err.message = (
            f"{err.message}: {run_dir} is marked {INTERRUPTED}; the same command "
            f"resumes it from its newest checkpoint: {command_line()}"
        )
        raise
    except BaseException as err:
        # The traceback goes to train.log alone; the command prints one line (cli.hydra_main)
        file_log.handle(
            log.makeRecord(log.name, logging.ERROR, __file__, 0, "job failed", (), sys.exc_info())
        )
        write_status(
            run_dir, FAILED, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()
        )
        # an exception type that refuses attributes keeps its traceback on the terminal
        with contextlib.suppress(AttributeError):
            err.logged_to = run_dir / "train.log"  # type: ignore[attr-defined]
        raise
    finally:
        logging.getLogger().removeHandler(file_log)
        isodiff_log.setLevel(level)
        file_log.close()
    return read_status(run_dir)
