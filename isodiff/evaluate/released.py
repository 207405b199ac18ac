"""Evaluate a model that isodiff did not train: `python -m isodiff.evaluate released=<model>
data=<its data> eval=<preset>` (issue 28, item 1).

<model> is a diffusers UNet2DModel folder (config.json + weights), a pipeline folder with a
unet/ subfolder, a hub id already in the local Hugging Face cache (never downloaded), or the
official isodiff release's UNet folder (a diffusers folder). The weights are read where they
are, never copied. The model is identified by the sha256 of its U-Net's files, never by its
path, and gets a folder like a run's:

    <run_root>/<tier>/released/<name>-<sha256 prefix>/
        status.json   done; weights = the U-Net files' record (unet/<file>: sha256, size,
                      mtime); released = {sha256, source (where it was last read: provenance
                      only), schedule (where the diffusion schedule came from)}
        config.yaml   experiment, name, released, data, diffusion, tier: what collect reads
        metrics.json  eval/  samples.png   as a run's (isodiff.evaluate.measure)

A folder moved or renamed is the same model: its files hash to the same digest, so the same
folder is found (by the digest, whatever its name) and every stored metric whose protocol
matches is kept. One changed weight is another digest, another folder. The diffusion
schedule is the scheduler config beside the U-Net (a pipeline's scheduler/, or
scheduler_config.json in the U-Net folder), else conf/diffusion/ddpm.yaml; the choice is
recorded in every metric's protocol (`schedule`), so a different schedule is measured again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from isodiff.config import CONF, BetaSchedule, DataConfig, DiffusionConfig
from isodiff.errors import ConfigError
from isodiff.runs.files import atomic_write_text
from isodiff.runs.status import (
    DONE,
    files_problem,
    files_record,
    read_status,
    weights_digest,
    write_status,
)

if TYPE_CHECKING:
    from isodiff.evaluate.config import EvaluateConfig

log = logging.getLogger(__name__)

EXPERIMENT = "released"  # the folder under <run_root>/<tier>/ of every released model
SUBFOLDER = "unet"  # the record's prefix and the protocol's `weights`, as a run's final/unet
DIGEST_CHARS = 12  # of the sha256 in the folder's name (the full one is in status.json)
# diffusers' scheduler config keys that isodiff's DiffusionConfig holds
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "clip_sample",
)


def locate(source: str) -> tuple[Path, Path]:
    """(the model's folder, its U-Net's folder) for released=<source>: a diffusers U-Net
    folder, a pipeline folder with unet/, or a hub id in the local cache (ConfigError)."""
    path = Path(source).expanduser()
    if not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        path = _cached_hub_snapshot(source)
    if not path.is_dir():
        raise ConfigError(
            f"released={source!r}: no such folder, nor a hub id in the local "
            "Hugging Face cache: pass a diffusers UNet2DModel folder (config."
            "json and its weights), a pipeline folder with unet/, or fetch a "
            "hub model first (huggingface-cli download <id>)"
        )
    if (path / "status.json").is_file() or (path / "final").is_dir():
        raise ConfigError(
            f"released={source!r} is an isodiff run folder: evaluate it with run={source}"
        )
    if not ((path / "config.json").is_file() or (path / SUBFOLDER / "config.json").is_file()):
        raise ConfigError(
            f"released={source!r} holds no diffusers U-Net: neither config.json "
            "nor unet/config.json is in it"
        )
    from isodiff.model.unet import resolve_checkpoint  # (torch: once the config is valid)

    folder, subfolder = resolve_checkpoint(str(path), ema=False)  # checks a shipped base
    root = Path(folder).resolve()
    return root, root / subfolder if subfolder else root


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub model, without any download."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # not cached (LocalEntryNotFoundError), or a bad id
        raise ConfigError(
            f"released={repo_id!r} is not a folder, nor a hub id in the local "
            f"Hugging Face cache ({type(err).__name__}); on a machine with "
            f"internet: huggingface-cli download {repo_id}"
        ) from err


def identity(unet_dir: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """(the record of the U-Net's files, their one sha256): weights_digest over the record,
    as a run's final/unet, so that measure and collect compare it the same way."""
    record = files_record(unet_dir, prefix=f"{SUBFOLDER}/")
    if not any(name.endswith((".safetensors", ".bin")) for name in record):
        raise ConfigError(f"{unet_dir}: no weights file (.safetensors or .bin) beside config.json")
    return record, weights_digest({"weights": record}, SUBFOLDER)


def schedule(root: Path, unet_dir: Path) -> tuple[DiffusionConfig, str]:
    """The diffusion schedule the model assumes, and where it comes from: its scheduler
    config (a pipeline's scheduler/, or one in the U-Net folder), else the suite's default
    (conf/diffusion/ddpm.yaml). ConfigError for one isodiff cannot sample (v-prediction,
    trained betas)."""
    for path in (
        root / "scheduler" / "scheduler_config.json",
        unet_dir / "scheduler_config.json",
        root / "scheduler_config.json",
    ):
        if path.is_file():
            config = json.loads(path.read_text())
            if config.get("trained_betas") is not None:
                raise ConfigError(
                    f"{path}: trained_betas are not supported (isodiff's "
                    "schedules: beta_schedule with beta_start, beta_end)"
                )
            given = {k: config[k] for k in SCHEDULE_KEYS if k in config}
            try:
                if "beta_schedule" in given:
                    given["beta_schedule"] = BetaSchedule(given["beta_schedule"])
                return DiffusionConfig(**given), str(path.relative_to(root))
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from err
    default = OmegaConf.merge(
        OmegaConf.structured(DiffusionConfig),
        OmegaConf.load(CONF / "diffusion" / "ddpm.yaml") or {},
    )
    return OmegaConf.to_object(default), "conf/diffusion/ddpm.yaml (no scheduler config)"


def _plain(config: Any) -> dict[str, Any]:
    """A config dataclass as YAML-safe values (enums as their strings)."""
    return {
        k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(config).items()
    }


def model_name(source: str, root: Path) -> str:
    """The folder name's readable part: the hub id's name or the model folder's (a hub
    snapshot folder is a commit hash)."""
    raw = source.rsplit("/", 1)[-1] if not Path(source).expanduser().exists() else root.name
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw).strip("._") or "model"


def find_folder(parent: Path, digest: str) -> Path | None:
    """The folder of the model with this digest under parent, whatever its name (a model
    first evaluated under another name, or from another path)."""
    for folder in sorted(parent.glob(f"*-{digest[:DIGEST_CHARS]}")):
        if ((read_status(folder) or {}).get("released") or {}).get("sha256") == digest:
            return folder
    return None


def prepare(cfg: EvaluateConfig) -> Path:
    """The released model's folder, made or found by its digest, with status.json and
    config.yaml; returns it (evaluate_run measures it as a run)."""
    assert cfg.released is not None and cfg.data is not None and cfg.released_tier is not None
    root, unet_dir = locate(cfg.released)
    record, digest = identity(unet_dir)
    diffusion, origin = schedule(root, unet_dir)
    parent = Path(cfg.run_root).expanduser() / cfg.released_tier / EXPERIMENT
    folder = find_folder(parent, digest)
    if folder is None:
        name = cfg.released_name or model_name(cfg.released, root)
        folder = parent / f"{name}-{digest[:DIGEST_CHARS]}"
        folder.mkdir(parents=True, exist_ok=True)
        log.info("released model %s: new folder %s", digest[:DIGEST_CHARS], folder)
    else:
        before = ((read_status(folder) or {}).get("released") or {}).get("source")
        if before and before != str(root):
            log.info(
                "released model %s: %s (was %s): the same files, its folder %s kept",
                digest[:DIGEST_CHARS],
                root,
                before,
                folder,
            )
    released = {"sha256": digest, "name": folder.name.rsplit("-", 1)[0], "schedule": origin}
    config = {
        "experiment": EXPERIMENT,
        "name": folder.name,
        "released": released,
        "data": _plain(cfg.data),
        "diffusion": _plain(diffusion),
        "tier": {"name": cfg.released_tier},
    }
    # Rewritten only when something changed: evaluating the same model where it lay
    # before leaves its folder as it was (a sweep run twice rewrites nothing)
    text = OmegaConf.to_yaml(config)
    if not (folder / "config.yaml").is_file() or (folder / "config.yaml").read_text() != text:
        atomic_write_text(folder / "config.yaml", text)
    # where the files were read this time (provenance, never identity), and their record
    # with this location's sizes and mtimes (the digest is the same by construction)
    fields = {
        "weights": record,
        "released": {**released, "source": str(root), "unet": os.path.relpath(unet_dir, root)},
    }
    status = read_status(folder) or {}
    if status.get("state") != DONE or any(status.get(k) != v for k, v in fields.items()):
        write_status(folder, DONE, **fields)
    return folder


def unet_folder(status: dict[str, Any]) -> Path:
    """Where a released model's U-Net files were read last (status.json)."""
    released = status["released"]
    return Path(released["source"]) / released.get("unet", ".")


def check_files(run_dir: Path, status: dict[str, Any]) -> Path:
    """The U-Net folder of a released model's run folder, every file hashed against the
    record (ConfigError when they are no longer the model the folder measures)."""
    unet_dir = unet_folder(status)
    record = {name.removeprefix(f"{SUBFOLDER}/"): want for name, want in status["weights"].items()}
    if problem := files_problem(
        unet_dir, record, True, f"{unet_dir}/", f"the file of the model {run_dir.name} measures"
    ):
        raise ConfigError(
            f"{run_dir}: {problem}: evaluate the model again with released=<its "
            "folder> (changed weights get their own folder)"
        )
    return unet_dir


def data_and_diffusion(run_dir: Path) -> tuple[DataConfig, DiffusionConfig]:
    """The data and diffusion configs a released model's folder records (config.yaml)."""
    config = OmegaConf.load(run_dir / "config.yaml")
    return (
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), config.data)),
        OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(DiffusionConfig), config.diffusion)
        ),
    )


def folder_of(source: str, tier_root: Path) -> Path | None:
    """The folder under <tier_root>/released/ of the model at `source` (hashed now), or None
    when it has none yet; ConfigError when the model is not there."""
    _, unet_dir = locate(source)
    return find_folder(tier_root / EXPERIMENT, identity(unet_dir)[1])
