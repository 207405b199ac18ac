"""The run-directory contract: atomic files, status, identity of a job.

    <run_root>/<tier>/<experiment>/<job>/
        config.yaml     resolved training config
        status.json     {"state": running|done|failed, ...}; the only truth about a job
                        (done also records the sha256 of every file under final/)
        .lock           held by the process that trains the job
        train.log  metrics.csv  tb/
        checkpoints/step_XXXXXXXX/   resumable state (accelerate save_state)
        final/unet  final/unet_ema   diffusers save_pretrained (safetensors)
        metrics.json  eval/          written by isodiff.evaluate (under .metrics.json.lock)
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from isodiff.config import ConfigError, UserError

log = logging.getLogger(__name__)
RUNNING, DONE, FAILED = "running", "done", "failed"
UNREADABLE = "unreadable"  # status.json exists but does not parse: the job is not done
WEIGHTS_CHANGED = "weights changed"  # done, but final/ is not what it recorded: not done
PACKAGES = ("isodiff", "torch", "diffusers", "accelerate", "clean-fid", "lpips", "numpy", "scipy",
            "scikit-learn")

# Keys that do not change what a job computes: excluded from its identity (data.attributes
# and data.attribute_names label the images for the metrics; training never reads them).
MANIFEST = "MANIFEST.json"  # a prepared asset's file list with sha256 (isodiff.paper_assets)
BASES_MANIFEST = "manifest.json"  # exported bases' sha256 and quality (isodiff.bases)
NON_IDENTITY_KEYS = ("run_root", "name", "name_keys", "experiment", "tier", "train.progress",
                     "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.cpu_threads", "train.grid_samples", "train.grid_steps",
                     "train.heldout_every", "train.heldout_n", "diffusion.clip_sample",
                     "data.num_workers", "data.attributes", "data.attribute_names", "cluster",
                     "hydra", "assets")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its entries (a rename) reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """os.replace(src, dest) that a power loss cannot undo halfway: every file and folder
    under src reaches the disk before the rename (else dest can be complete by name and
    empty on disk), and the folder holding dest after it (else the rename can be lost)."""
    src, dest = Path(src), Path(dest)
    for path in [*src.rglob("*"), src] if src.is_dir() else [src]:
        _fsync(path)
    os.replace(src, dest)
    _fsync(dest.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same folder + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunFileError(UserError):
    """A run file that exists but does not parse, or parses to the wrong shape (a killed
    copy, a full disk, a hand edit): the problem of that run alone, which every reader
    reports and goes on; a command that needs the file stops with this one line."""


Shape = Callable[[dict[str, Any]], "str | None"]  # a file kind's check: what is wrong, or None


def read_json(path: str | os.PathLike, default: Any = None, shape: Shape | None = None) -> Any:
    """The JSON object in path; default when it does not exist; RunFileError (naming the
    file) when it exists but is not a JSON object, or when `shape` (the file kind's check,
    e.g. status_problem) finds a field of the wrong type: syntax alone is not a file that
    the code after can index."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(value, dict):
        raise RunFileError(f"{path} is unreadable (a JSON {_kind(value)}, not an object)")
    if shape is not None and (problem := shape(value)):
        raise RunFileError(f"{path} is unreadable (wrong shape: {problem})")
    return value


# --- shapes: what each file kind's readers index, checked once where it is read -------------

def _kind(value: Any) -> str:
    """A JSON value's type as a reader would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":  # finite: nan/inf are never stored as values (evaluation)
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    return _kind(value) == kind


def field_problem(record: dict[str, Any], key: str, kind: str, required: bool = False,
                  where: str = "") -> str | None:
    """What is wrong with record[key] for a reader that expects `kind` (object, list,
    string, int, number, boolean); null or absent is fine unless required."""
    value = record.get(key)
    if value is None:
        return f"{where}{key} is missing" if required else None
    return None if _is(value, kind) else f"{where}{key} is {_a(_kind(value))}, not {_a(kind)}"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def mapping_problem(value: Any, where: str, item: Callable[[str, Any], str | None]
                    ) -> str | None:
    """The first problem of an object's entries (item(name, entry)), or of the object."""
    if value is None:
        return f"{where} is missing"
    if not isinstance(value, dict):
        return f"{where} is {_a(_kind(value))}, not an object"
    return next((p for name, entry in value.items() if (p := item(name, entry))), None)


def _weights_entry(name: str, entry: Any) -> str | None:
    where = f"weights[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    return (field_problem(entry, "sha256", "string", True, f"{where}.")
            or field_problem(entry, "size", "int", True, f"{where}.")
            or field_problem(entry, "mtime_ns", "int", True, f"{where}."))


def status_problem(status: dict[str, Any]) -> str | None:
    """status.json's shape as the job, the sweep and collect read it (None: fine)."""
    problem = (field_problem(status, "state", "string", required=True)
               or field_problem(status, "attempts", "int")
               or field_problem(status, "error", "string")
               or field_problem(status, "not_bitwise", "list"))
    if problem:
        return problem
    if any(not isinstance(item, str) for item in status.get("not_bitwise") or []):
        return "not_bitwise holds a non-string"
    weights = status.get("weights")
    return None if weights is None else mapping_problem(weights, "weights", _weights_entry)


CAUSES = ("run", "environment")  # why a metric failed: its run, or the machine (device, memory)
# What a device or memory failure says (torch raises RuntimeError or AssertionError for
# them): such a failure is of the machine, not of the run's weights or config. Narrow on
# purpose: a device-side assert or tensors on two devices are bugs, and stay the run's.
ENVIRONMENT_MESSAGE = re.compile(
    r"out of memory|cannot allocate memory|no space left on device|NVIDIA driver|"
    r"no CUDA GPUs are available|not compiled with CUDA|CUDA driver|CUDA-capable device|"
    r"invalid device ordinal|no kernel image is available|"
    r"\bdevice\b[^.;]*\b(?:not available|unavailable|not there|not found)", re.IGNORECASE)


def cause_of(failure: dict[str, Any]) -> str:
    """A failed entry's cause; one recorded before causes were (no `cause`) by its error."""
    if cause := failure.get("cause"):
        return cause
    error = str(failure.get("error", ""))
    return "environment" if error.startswith(("MemoryError", "OutOfMemoryError")) \
        or ENVIRONMENT_MESSAGE.search(error) else "run"


def _metric_entry(name: str, entry: Any) -> str | None:
    where = f"metrics[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    problem = (field_problem(entry, "values", "object", True, f"{where}.")
               or field_problem(entry, "protocol", "object", False, f"{where}.")
               or field_problem(entry, "provenance", "object", False, f"{where}.")
               or field_problem(entry, "nonfinite", "list", False, f"{where}.")
               or field_problem(entry, "arrays", "string", False, f"{where}."))
    return problem or next((f"{where}.values[{k!r}] is {_a(_kind(v))}, not a finite number"
                            for k, v in entry["values"].items() if not _is(v, "number")), None)


def _failure_entry(name: str, entry: Any) -> str | None:
    where = f"failed[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    if entry.get("cause", "run") not in CAUSES:
        return f"{where}.cause is {entry.get('cause')!r}, not one of {', '.join(CAUSES)}"
    return (field_problem(entry, "error", "string", True, f"{where}.")
            or field_problem(entry, "protocol", "object", False, f"{where}.")
            or field_problem(entry, "when", "string", False, f"{where}."))


def metrics_problem(record: dict[str, Any]) -> str | None:
    """metrics.json's shape as evaluation, collect, tables and the sweep read it."""
    if "metrics" not in record:
        return "metrics is missing"
    return (mapping_problem(record["metrics"], "metrics", _metric_entry)
            or (None if record.get("failed") is None
                else mapping_problem(record["failed"], "failed", _failure_entry)))


def read_metrics(run_dir: str | os.PathLike, default: Any = None) -> Any:
    """metrics.json, checked by shape (RunFileError); default when there is none."""
    return read_json(Path(run_dir) / "metrics.json", default, metrics_problem)


def superseded(failure: dict[str, Any], entry: dict[str, Any] | None) -> bool:
    """Whether a stored metric (entry) of the same weights and protocol supersedes a failed
    attempt: a failure of the environment (device, memory) by any such metric, since it
    says nothing of the run; a failure of the run by one evaluated after it. A failure that
    records no protocol (the run could not be loaded) matches any."""
    if entry is None:
        return False
    stored = entry.get("protocol") or {}
    if any(stored.get(k) != v for k, v in (failure.get("protocol") or {}).items()):
        return False
    if cause_of(failure) == "environment":
        return True
    return str((entry.get("provenance") or {}).get("evaluated", "")) >= \
        str(failure.get("when", "~"))


def open_failures(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The failed attempts of metrics.json that no stored metric supersedes."""
    metrics = record.get("metrics") or {}
    return {name: failure for name, failure in (record.get("failed") or {}).items()
            if not superseded(failure, metrics.get(name))}


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """status.json; None when the job never started; state `unreadable` (with the error)
    when the file does not parse or has the wrong shape, so the job counts as not done and
    runs again (write_status then keeps none of its fields)."""
    try:
        return read_json(Path(run_dir) / "status.json", shape=status_problem)
    except RunFileError as err:
        return {"state": UNREADABLE, "error": str(err)}


def write_status(run_dir: str | os.PathLike, state: str, **fields: Any) -> None:
    """Replace status.json, keeping earlier fields that `fields` does not override."""
    status = {k: v for k, v in (read_status(run_dir) or {}).items()
              if k not in ("error", "traceback")}
    status.update(fields, state=state,
                  updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(Path(run_dir) / "status.json", status)


def weights_record(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What status.json keeps of final/: each file's sha256, and its size and mtime (a
    cheap first check that the file is the one hashed)."""
    final = Path(run_dir) / "final"
    record = {}
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        stat = path.stat()
        record[str(path.relative_to(final))] = {"sha256": sha256(path), "size": stat.st_size,
                                                "mtime_ns": stat.st_mtime_ns}
    return record


def weights_problem(run_dir: str | os.PathLike, status: dict[str, Any],
                    full: bool = False) -> str | None:
    """Why final/ is not the weights status.json recorded when the job ended (None: it is).
    full: every file is hashed (what a skip or an evaluation relies on: a same-size file
    with its mtime restored, by `cp -p` or `touch -r`, is caught); else only a file whose
    mtime changed is (listings stay cheap); one whose size changed never needs to be."""
    record = status.get("weights")
    if not record:
        return "status.json records no weights (the job ended before weights were recorded)"
    final = Path(run_dir) / "final"
    for name, want in record.items():
        path = final / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"final/{name} is missing"
        if stat.st_size != want["size"] or ((full or stat.st_mtime_ns != want["mtime_ns"])
                                            and sha256(path) != want["sha256"]):
            return f"final/{name} is not the file the job wrote (its sha256 differs)"
    return None


def weights_digest(status: dict[str, Any], subfolder: str) -> str:
    """One sha256 for the weights of final/<subfolder> as status.json records them."""
    files = {name: want["sha256"] for name, want in sorted(status["weights"].items())
             if name.startswith(f"{subfolder}/")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def stale_metrics(record: dict[str, Any], status: dict[str, Any]) -> list[str]:
    """The metrics of metrics.json that measured other weights than those status.json
    records (entries without a weights_sha256, from older versions, are not checked)."""
    stale = []
    for name, entry in record.get("metrics", {}).items():
        protocol = entry.get("protocol", {})
        if "weights_sha256" in protocol:
            subfolder = str(protocol.get("weights", "")).removeprefix("final/")
            if not status.get("weights") or \
                    protocol["weights_sha256"] != weights_digest(status, subfolder):
                stale.append(name)
    return stale


def job_state(run_dir: str | os.PathLike, full: bool = False) -> tuple[str, str | None]:
    """(state, problem): the status's state, except that a done job whose final/ weights
    are missing or changed is `weights changed` (not done: it trains again); full: every
    weights file is hashed (weights_problem)."""
    status = read_status(run_dir)
    if status is None:
        return "not run", None
    if status.get("state") == DONE and (problem := weights_problem(run_dir, status, full)):
        return WEIGHTS_CHANGED, problem
    return status.get("state", UNREADABLE), status.get("error")


def is_done(run_dir: str | os.PathLike) -> bool:
    """Done, with the weights it recorded."""
    return job_state(run_dir)[0] == DONE


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, holder: Callable[[], str] = lambda: "",
              announce_every: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on lock_path (fcntl, released when the process dies); while
    another process holds it, wait, saying so every `announce_every` seconds."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        while True:
            log.warning("%s: waiting for the process that holds %s%s", what, lock_path,
                        holder())
            try:
                lock.acquire(timeout=announce_every)
                break
            except Timeout:
                continue
    try:
        yield
    finally:
        lock.release()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path, skip: str = "") -> dict[str, str]:
    """sha256 of every file under folder, by path relative to it (skip: one left out)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and str(p.relative_to(folder)) != skip}


def _base_entry(name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"bases[{name!r}] is {_a(_kind(entry))}, not an object"
    return mapping_problem(entry.get("files"), f"bases[{name!r}].files",
                           lambda file, digest: None if isinstance(digest, str) else
                           f"bases[{name!r}].files[{file!r}] is {_a(_kind(digest))}, not a "
                           "sha256 string")


def bases_manifest_problem(manifest: dict[str, Any]) -> str | None:
    """manifest.json's shape (isodiff.bases), as verify_base and `bases verify=` read it."""
    return (field_problem(manifest, "device", "string", required=True)
            or field_problem(manifest, "packages", "object", required=True)
            or field_problem(manifest["packages"], "torch", "string", True, "packages.")
            or mapping_problem(manifest.get("bases"), "bases", _base_entry))


def verify_base(folder: Path) -> None:
    """ConfigError naming the files, unless a base that isodiff.bases exported (listed in
    manifest.json beside it, as the shipped bases are) holds the files its manifest records;
    a folder no manifest lists passes; a manifest of the wrong shape is RunFileError (a
    base it may list is never taken unchecked). Always hashed: a base is ~8 MB at the quick
    tier."""
    manifest = folder.parent / BASES_MANIFEST
    entry = (read_json(manifest, {}, bases_manifest_problem).get("bases") or {}).get(folder.name)
    if entry is None:
        return
    differ = [name for name, digest in sorted(entry["files"].items())
              if not (folder / name).is_file() or sha256(folder / name) != digest]
    if differ:
        raise ConfigError(f"{folder}: {', '.join(differ)} differ from their sha256 in "
                          f"{manifest}: nothing is computed; restore them (git checkout -- "
                          f"{folder}) or remake the bases (make bases)")


def config_hash(cfg: DictConfig | dict, exclude: tuple[str, ...] = NON_IDENTITY_KEYS) -> str:
    """Short stable hash of what a job computes (dora-style signature)."""
    container = (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                 else copy.deepcopy(cfg))
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
    files = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(folder.rglob("*")) if p.is_file())
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
    """What a signature holds of a data folder: a prepared asset (isodiff.paper_assets) by
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
    return "manifest:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()
                                        ).hexdigest()[:16]


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
    are never cut, and those past NAME_LENGTH characters are left to the hash.
    Registered as the `job_name` resolver; conf/train.yaml uses it for `name`.
    """
    if keys := _root_.get("name_keys"):
        pairs = [f"{k}={_readable(OmegaConf.select(_root_, k))}" for k in keys]
    else:  # numbers in one spelling: a multirun writes 1.0e-4 as 0.0001, a single run keeps it
        pairs = _PAIR.split(_NUMBER.sub(lambda m: "=" + format(float(m.group(1)), "g"),
                                        override_dirname)) if override_dirname else []
    kept = []
    for pair in pairs:
        if len(",".join([*kept, pair])) > NAME_LENGTH:
            break
        kept.append(pair)
    readable = re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", ",".join(kept)) or "default"
    return f"{readable}-{config_hash(identity(_root_))}"


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """What a job computes, as its signature hashes it (config_hash then drops
    NON_IDENTITY_KEYS): its base and data folder by identity, never by path."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(OmegaConf.masked_copy(
            cfg, [k for k in cfg if k not in ("hydra", "name")]), resolve=True)
    cfg = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("hydra", "name")}
    if cfg.get("init_from"):
        cfg["init_from"] = base_identity(str(cfg["init_from"]))
    if (cfg.get("data") or {}).get("root"):
        cfg["data"]["root"] = folder_identity(str(cfg["data"]["root"]))
    for key in ("effective_batch", "epochs"):  # unset: the signature is what it was before
        if cfg.get("train", {}).get(key, 0) is None:
            del cfg["train"][key]
    latent = cfg.pop("latent", None) or {}
    if latent.get("autoencoder"):  # a pixel model's signature is what it was before latents
        cfg["latent"] = {**latent, "autoencoder": base_identity(str(latent["autoencoder"]))}
    return cfg


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items()
                for k, v in _flat(value, f"{prefix}{key}.").items()}
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
        raise RunFileError(f"{recorded_path} is unreadable ({problem}): the job it records is "
                           "unknown; restore it or remove the folder")
    recorded, asked = _flat(identity(recorded)), _flat(asked)
    ignored = tuple(f"{key}." for key in NON_IDENTITY_KEYS)
    return {key: (recorded.get(key), asked.get(key)) for key in sorted({*recorded, *asked})
            if recorded.get(key) != asked.get(key) and not f"{key}.".startswith(ignored)}


def folder_part(key: str, value: Any) -> str:
    """A user value that names one folder of a job's path (experiment=, name=, the tier's
    name), checked before Hydra makes the folder: a separator, `..`, an empty or
    unprintable value would write outside run_root or into a folder above the job's.
    Registered as the `folder` resolver; conf/train.yaml builds hydra's run dirs with it."""
    text = str(value)
    if not text or text in (".", "..") or "/" in text or os.sep in text \
            or not text.isprintable():
        raise ConfigError(f"{key}={text!r} is invalid: it names one folder under run_root: "
                          "use a non-empty value of printable characters without '/' and "
                          "other than '.' or '..'")
    return text


def require_inside(run_dir: Path, run_root: str | os.PathLike) -> None:
    """ConfigError unless run_dir lies strictly inside run_root (both made absolute; `..`
    resolved as written, symlinks kept: a runs/ whose tier folder links elsewhere is fine)."""
    root, job = (Path(os.path.abspath(Path(p).expanduser())) for p in (run_root, run_dir))
    if root not in job.parents:
        raise ConfigError(f"the job folder {run_dir} is not inside run_root={run_root}: "
                          "check name=, experiment= and tier= (one folder name each)")


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
    here = Path(__file__).resolve().parents[1]
    git = None
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               check=True, capture_output=True, text=True).stdout.strip()
        git = {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout, or no commit yet
    return {"packages": versions, "git": git}
