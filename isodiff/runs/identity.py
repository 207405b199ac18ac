"""A job's identity: its config's signature, its folder's name, its provenance."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from isodiff.errors import ConfigError
from isodiff.runs.files import RunFileError, sha256
from isodiff.runs.status import MANIFEST, is_done

log = logging.getLogger(__name__)


PACKAGES = (
    "isodiff",
    "torch",
    "diffusers",
    "accelerate",
    "clean-fid",
    "lpips",
    "numpy",
    "scipy",
    "scikit-learn",
)


NON_IDENTITY_KEYS = (
    "run_root",
    "name",
    "name_keys",
    "experiment",
    "tier",
    "train.progress",
    "train.log_with",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.cpu_threads",
    "train.grid_samples",
    "train.grid_steps",
    "train.heldout_every",
    "train.heldout_n",
    "diffusion.clip_sample",
    "data.num_workers",
    "data.attributes",
    "data.attribute_names",
    "cluster",
    "hydra",
    "assets",
)
# Keys left out of a job folder's name: those that do not change what it computes, and the
# paths, which enter its signature by identity instead (conf/train.yaml reads this list
# through the `folder_name_excludes` resolver, so the two cannot drift apart).
FOLDER_NAME_EXCLUDES = (
    *(k for k in NON_IDENTITY_KEYS if k not in ("name", "hydra", "assets")),
    "init_from",
    "latent.autoencoder",
    "assets.root",
    "hydra/launcher",
)


def config_hash(cfg: DictConfig | dict, exclude: tuple[str, ...] = NON_IDENTITY_KEYS) -> str:
    """Short stable hash of what a job computes (dora-style signature)."""
    container = (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig)
        else copy.deepcopy(cfg)
    )
    for key in exclude:
        *parents, leaf = key.split(".")
        node = container
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


_NUMBER = re.compile(r"=(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?=,|$)")


_PAIR = re.compile(r",(?=[+~]?[A-Za-z_][\w.]*=)")  # a comma that starts the next key=value


_SIGNED = re.compile(r"-[0-9a-f]{8}$")  # a job folder's name ends in its signature


NAME_LENGTH = 120


def _tree_digest(folder: Path) -> str:
    files = tuple(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    )
    return _cached_digest(str(folder), files)


@functools.lru_cache(maxsize=64)
def _cached_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of a folder's files (cached while their sizes and mtimes hold)."""
    hashes = {name: sha256(Path(folder) / name) for name, _, _ in files}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def base_identity(init_from: str) -> str:
    """What a fine-tune's signature holds of its base, never a path (a moved runs/ or
    checkout reruns nothing): an isodiff run by its signature (the end of its folder name,
    whether it has run yet or not), a checkpoint folder by the sha256 of its files, a hub
    id as itself."""
    path = Path(init_from).expanduser()
    is_run = (path / "status.json").is_file() or (path / "config.yaml").is_file()
    if _SIGNED.search(path.name) and (is_run or not path.exists()):
        return "run:" + signature(path)
    if path.is_dir():
        return "checkpoint:" + _tree_digest(path)
    return init_from


def folder_identity(root: str) -> str:
    """What a signature holds of a data folder: a prepared asset (isodiff.model.paper_assets) by
    its manifest's files, so the same images are the same job wherever the assets live;
    any other folder by its path."""
    manifest = Path(root).expanduser() / MANIFEST
    try:
        stat = manifest.stat()
    except OSError:
        return root
    return _manifest_identity(str(manifest), stat.st_size, stat.st_mtime_ns) or root


@functools.lru_cache(maxsize=16)
def _manifest_identity(path: str, size: int, mtime_ns: int) -> str | None:
    """The digest of a manifest's file list (cached while its size and mtime hold: LSUN
    bedroom's lists 3M files and every compose of a job reads it)."""
    try:
        files = json.loads(Path(path).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "manifest:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _readable(value: Any) -> str:
    if isinstance(value, DictConfig):  # a config group: its name (data.name, model.name)
        value = value.get("name")
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def job_name(override_dirname: str, *, _root_: DictConfig) -> str:
    """Readable, stable folder name of a job: `key=value` pairs, then its signature (the
    hash of what it computes, with its base by identity, never by path).

    The pairs are the config's `name_keys` (the sweep passes the keys its spec varies, so
    tier-wide settings stay in config.yaml) or else the command line's overrides; pairs
    are never cut, and those past NAME_LENGTH characters are left to the hash. A job whose
    signature already has a folder gets that folder's name (existing_folder).
    Registered as the `job_name` resolver; conf/train.yaml uses it for `name`.
    """
    if keys := _root_.get("name_keys"):
        pairs = [f"{k}={_readable(OmegaConf.select(_root_, k))}" for k in keys]
    else:  # numbers in one spelling: a multirun writes 1.0e-4 as 0.0001, a single run keeps it
        pairs = (
            _PAIR.split(
                _NUMBER.sub(lambda m: "=" + format(float(m.group(1)), "g"), override_dirname)
            )
            if override_dirname
            else []
        )
    kept = []
    for pair in pairs:
        if len(",".join([*kept, pair])) > NAME_LENGTH:
            break
        kept.append(pair)
    readable = re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", ",".join(kept)) or "default"
    signed = config_hash(identity(_root_))
    return existing_folder(_root_, signed) or f"{readable}-{signed}"


def existing_folder(cfg: DictConfig, signed: str) -> str | None:
    """The name of the folder that already holds the job of this signature under its
    experiment's folder (any name, with a status.json), so that one computation has one
    folder whatever its command line named it (`lambda_iso=0` or no override, a sweep's
    name_keys). Of several: the done ones first, then the oldest status.json, then by name."""
    parent = Path(str(cfg.run_root)).expanduser() / str(cfg.tier.name) / str(cfg.experiment)
    found = [p for p in parent.glob(f"*-{signed}") if (p / "status.json").is_file()]
    if not found:
        return None
    found.sort(key=lambda p: (not is_done(p), (p / "status.json").stat().st_mtime_ns, p.name))
    if len(found) > 1:
        _log_duplicates(str(parent), tuple(p.name for p in found))
    return found[0].name


@functools.lru_cache(maxsize=64)
def _log_duplicates(parent: str, names: tuple[str, ...]) -> None:
    """Once per process: a job's name resolves several times while it runs."""
    log.warning(
        "%s holds %d folders of one job (%s): using %s",
        parent,
        len(names),
        ", ".join(names),
        names[0],
    )


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """What a job computes, as its signature hashes it (config_hash then drops
    NON_IDENTITY_KEYS): its base and data folder by identity, never by path."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "name")]), resolve=True
        )
    cfg = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("hydra", "name")}
    if cfg.get("init_from"):
        cfg["init_from"] = base_identity(str(cfg["init_from"]))
    if (cfg.get("data") or {}).get("root"):
        cfg["data"]["root"] = folder_identity(str(cfg["data"]["root"]))
    for key in ("effective_batch", "epochs"):  # unset: the signature is what it was before
        if cfg.get("train", {}).get(key, 0) is None:
            del cfg["train"][key]
    # A U-Net job without LoRA has the signature it had before model.arch and train.lora
    model, loop = cfg.get("model") or {}, cfg.get("train") or {}
    if isinstance(model, dict) and model.get("arch", "unet") == "unet":
        model.pop("arch", None)
        model.pop("dit", None)
    if isinstance(model, dict) and model.get("h_block") is None:  # h where it always was
        model.pop("h_block", None)
    diffusion = cfg.get("diffusion") or {}
    if isinstance(diffusion, dict) and diffusion.get("objective", "ddpm") == "ddpm":
        diffusion.pop("objective", None)  # DDPM's signature is what it was before flow
    if isinstance(loop, dict) and not (loop.get("lora") or {}).get("rank"):
        loop.pop("lora", None)
    latent = cfg.pop("latent", None) or {}
    if latent.get("autoencoder"):  # a pixel model's signature is what it was before latents
        cfg["latent"] = {**latent, "autoencoder": base_identity(str(latent["autoencoder"]))}
    return cfg


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}."""
    if isinstance(node, dict) and node:
        return {
            k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()
        }
    return {prefix.removesuffix("."): node}


def identity_difference(run_dir: Path, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """The identity keys (not NON_IDENTITY_KEYS) whose values in run_dir's recorded
    config.yaml differ from cfg's: {key: (recorded, asked)}; {} when the folder's signature
    is cfg's (a folder named by job_name) or it records no config yet."""
    asked = identity(cfg)
    recorded_path = run_dir / "config.yaml"
    if signature(run_dir) == config_hash(asked) or not recorded_path.is_file():
        return {}
    try:  # hand-edited and broken: which job the folder holds is unknown
        recorded = OmegaConf.to_container(OmegaConf.load(recorded_path))
        problem = None if isinstance(recorded, dict) else f"a YAML {type(recorded).__name__}"
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problem = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    if problem:
        raise RunFileError(
            f"{recorded_path} is unreadable ({problem}): the job it records is "
            "unknown; restore it or remove the folder"
        )
    recorded, asked = _flat(identity(recorded)), _flat(asked)
    ignored = tuple(f"{key}." for key in NON_IDENTITY_KEYS)
    return {
        key: (recorded.get(key), asked.get(key))
        for key in sorted({*recorded, *asked})
        if recorded.get(key) != asked.get(key) and not f"{key}.".startswith(ignored)
    }


def folder_part(key: str, value: Any) -> str:
    """A user value that names one folder of a job's path (experiment=, name=, the tier's
    name), checked before Hydra makes the folder: a separator, `..`, an empty or
    unprintable value would write outside run_root or into a folder above the job's.
    Registered as the `folder` resolver; conf/train.yaml builds hydra's run dirs with it."""
    text = str(value)
    if not text or text in (".", "..") or "/" in text or os.sep in text or not text.isprintable():
        raise ConfigError(
            f"{key}={text!r} is invalid: it names one folder under run_root: "
            "use a non-empty value of printable characters without '/' and "
            "other than '.' or '..'"
        )
    return text


def require_inside(run_dir: Path, run_root: str | os.PathLike) -> None:
    """ConfigError unless run_dir lies strictly inside run_root (both made absolute; `..`
    resolved as written, symlinks kept: a runs/ whose tier folder links elsewhere is fine)."""
    root, job = (Path(os.path.abspath(Path(p).expanduser())) for p in (run_root, run_dir))
    if root not in job.parents:
        raise ConfigError(
            f"the job folder {run_dir} is not inside run_root={run_root}: "
            "check name=, experiment= and tier= (one folder name each)"
        )


def signature(run_dir: str | os.PathLike) -> str:
    """A job's signature: the end of its folder name."""
    return Path(run_dir).name.rsplit("-", 1)[-1]


def provenance() -> dict[str, Any]:
    """What produced a result without changing it: package versions and the git commit of
    the checkout (dirty: uncommitted changes to tracked or unignored files)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    here = Path(__file__).resolve().parents[2]  # the checkout that holds isodiff/
    git = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        git = {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout, or no commit yet
    return {"packages": versions, "git": git}
