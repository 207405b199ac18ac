"""A job's status: the only truth about it, and the weights it recorded.


<run_root>/<tier>/<experiment>/<job>/
    config.yaml     resolved training config
    status.json     {"state": running|done|failed, ...}; the only truth about a job
                    (done also records the sha256 of every file under final/)
    .lock           held by the process that trains the job
    train.log  metrics.csv  tb/
    checkpoints/step_XXXXXXXX/   resumable state (accelerate save_state)
    final/unet  final/unet_ema   diffusers save_pretrained (safetensors)
    metrics.json  eval/          written by isodiff.evaluate (under .metrics.json.lock)"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from isodiff.errors import ConfigError
from isodiff.runs.files import (
    RunFileError,
    _a,
    _is,
    _kind,
    atomic_write_json,
    field_problem,
    mapping_problem,
    read_json,
    sha256,
)

log = logging.getLogger(__name__)


RUNNING, DONE, FAILED = "running", "done", "failed"


UNREADABLE = "unreadable"  # status.json exists but does not parse: the job is not done


WEIGHTS_CHANGED = "weights changed"  # done, but final/ is not what it recorded: not done


# Keys that do not change what a job computes: excluded from its identity (data.attributes
# and data.attribute_names label the images for the metrics; training never reads them).
MANIFEST = "MANIFEST.json"  # a prepared asset's file list with sha256 (isodiff.model.paper_assets)


BASES_MANIFEST = "manifest.json"  # exported bases' sha256 and quality (isodiff.sweep.bases)


def _weights_entry(name: str, entry: Any) -> str | None:
    where = f"weights[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    return (
        field_problem(entry, "sha256", "string", True, f"{where}.")
        or field_problem(entry, "size", "int", True, f"{where}.")
        or field_problem(entry, "mtime_ns", "int", True, f"{where}.")
    )


def status_problem(status: dict[str, Any]) -> str | None:
    """status.json's shape as the job, the sweep and collect read it (None: fine)."""
    problem = (
        field_problem(status, "state", "string", required=True)
        or field_problem(status, "attempts", "int")
        or field_problem(status, "error", "string")
        or field_problem(status, "not_bitwise", "list")
    )
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
    r"\bdevice\b[^.;]*\b(?:not available|unavailable|not there|not found)",
    re.IGNORECASE,
)


def cause_of(failure: dict[str, Any]) -> str:
    """A failed entry's cause; one recorded before causes were (no `cause`) by its error."""
    if cause := failure.get("cause"):
        return cause
    error = str(failure.get("error", ""))
    return (
        "environment"
        if error.startswith(("MemoryError", "OutOfMemoryError"))
        or ENVIRONMENT_MESSAGE.search(error)
        else "run"
    )


def _metric_entry(name: str, entry: Any) -> str | None:
    where = f"metrics[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    problem = (
        field_problem(entry, "values", "object", True, f"{where}.")
        or field_problem(entry, "protocol", "object", False, f"{where}.")
        or field_problem(entry, "provenance", "object", False, f"{where}.")
        or field_problem(entry, "nonfinite", "list", False, f"{where}.")
        or field_problem(entry, "arrays", "string", False, f"{where}.")
    )
    return problem or next(
        (
            f"{where}.values[{k!r}] is {_a(_kind(v))}, not a finite number"
            for k, v in entry["values"].items()
            if not _is(v, "number")
        ),
        None,
    )


def _failure_entry(name: str, entry: Any) -> str | None:
    where = f"failed[{name!r}]"
    if not isinstance(entry, dict):
        return f"{where} is {_a(_kind(entry))}, not an object"
    if entry.get("cause", "run") not in CAUSES:
        return f"{where}.cause is {entry.get('cause')!r}, not one of {', '.join(CAUSES)}"
    return (
        field_problem(entry, "error", "string", True, f"{where}.")
        or field_problem(entry, "protocol", "object", False, f"{where}.")
        or field_problem(entry, "when", "string", False, f"{where}.")
    )


def metrics_problem(record: dict[str, Any]) -> str | None:
    """metrics.json's shape as evaluation, collect, tables and the sweep read it."""
    if "metrics" not in record:
        return "metrics is missing"
    return mapping_problem(record["metrics"], "metrics", _metric_entry) or (
        None
        if record.get("failed") is None
        else mapping_problem(record["failed"], "failed", _failure_entry)
    )


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
    return str((entry.get("provenance") or {}).get("evaluated", "")) >= str(
        failure.get("when", "~")
    )


def open_failures(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The failed attempts of metrics.json that no stored metric supersedes."""
    metrics = record.get("metrics") or {}
    return {
        name: failure
        for name, failure in (record.get("failed") or {}).items()
        if not superseded(failure, metrics.get(name))
    }


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
    status = {
        k: v for k, v in (read_status(run_dir) or {}).items() if k not in ("error", "traceback")
    }
    status.update(
        fields, state=state, updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    atomic_write_json(Path(run_dir) / "status.json", status)


def weights_record(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What status.json keeps of final/: each file's sha256, and its size and mtime (a
    cheap first check that the file is the one hashed)."""
    return files_record(Path(run_dir) / "final")


def files_record(folder: str | os.PathLike, prefix: str = "") -> dict[str, dict[str, Any]]:
    """sha256, size and mtime of every file under folder, by `prefix` + its path in it (a
    released model's record names its U-Net's files unet/<file>, as a run's final/unet/).
    Hidden files and folders (.cache/ of a hub download, .DS_Store) are no part of it."""
    folder = Path(folder)
    record = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder)
        if any(part.startswith(".") for part in name.parts):
            continue
        stat = path.stat()  # through a hub cache's symlink: the blob's
        record[f"{prefix}{name.as_posix()}"] = {
            "sha256": sha256(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
    return record


def weights_problem(
    run_dir: str | os.PathLike, status: dict[str, Any], full: bool = False
) -> str | None:
    """Why final/ is not the weights status.json recorded when the job ended (None: it is).
    full: every file is hashed (what a skip or an evaluation relies on: a same-size file
    with its mtime restored, by `cp -p` or `touch -r`, is caught); else only a file whose
    mtime changed is (listings stay cheap); one whose size changed never needs to be."""
    record = status.get("weights")
    if not record:
        return "status.json records no weights (the job ended before weights were recorded)"
    if status.get("released"):  # no weights in the folder: evaluation hashes the model's
        return None  # files against the record each time (released_problem)
    return files_problem(Path(run_dir) / "final", record, full, "final/", "the file the job wrote")


def files_problem(
    folder: Path, record: dict[str, Any], full: bool, label: str, what: str
) -> str | None:
    """Why the files under folder are not those of `record` (files_record; None: they
    are); label + name names a file in the message. full: every file hashed."""
    for name, want in record.items():
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{label}{name} is missing"
        if stat.st_size != want["size"] or (
            (full or stat.st_mtime_ns != want["mtime_ns"]) and sha256(path) != want["sha256"]
        ):
            return f"{label}{name} is not {what} (its sha256 differs)"
    return None


def weights_digest(status: dict[str, Any], subfolder: str) -> str:
    """One sha256 for the weights of final/<subfolder> as status.json records them."""
    files = {
        name: want["sha256"]
        for name, want in sorted(status["weights"].items())
        if name.startswith(f"{subfolder}/")
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def stale_metrics(record: dict[str, Any], status: dict[str, Any]) -> list[str]:
    """The metrics of metrics.json that measured other weights than those status.json
    records (entries without a weights_sha256, from older versions, are not checked)."""
    stale = []
    for name, entry in record.get("metrics", {}).items():
        protocol = entry.get("protocol", {})
        if "weights_sha256" in protocol:
            subfolder = str(protocol.get("weights", "")).removeprefix("final/")
            if not status.get("weights") or protocol["weights_sha256"] != weights_digest(
                status, subfolder
            ):
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


def _base_entry(name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"bases[{name!r}] is {_a(_kind(entry))}, not an object"
    where = f"bases[{name!r}]."
    problem = mapping_problem(
        entry.get("files"),
        f"{where}files",
        lambda file, digest: (
            None
            if isinstance(digest, str)
            else f"{where}files[{file!r}] is {_a(_kind(digest))}, not a sha256 string"
        ),
    )
    if problem or entry.get("diffusion") is None:  # manifests before 2026-12-07 lack it
        return problem
    return field_problem(entry, "diffusion", "object", where=where) or field_problem(
        entry["diffusion"], "objective", "string", True, f"{where}diffusion."
    )


def bases_manifest_problem(manifest: dict[str, Any]) -> str | None:
    """manifest.json's shape (isodiff.sweep.bases), as verify_base and `bases verify=` read it."""
    return (
        field_problem(manifest, "device", "string", required=True)
        or field_problem(manifest, "packages", "object", required=True)
        or field_problem(manifest["packages"], "torch", "string", True, "packages.")
        or mapping_problem(manifest.get("bases"), "bases", _base_entry)
    )


def base_entry(folder: Path) -> dict[str, Any] | None:
    """The entry of manifest.json (beside `folder`) that describes the exported base `folder`;
    None where no manifest lists it."""
    manifest = read_json(folder.parent / BASES_MANIFEST, {}, bases_manifest_problem)
    return (manifest.get("bases") or {}).get(folder.name)


def verify_base(folder: Path) -> None:
    """ConfigError naming the files, unless a base that isodiff.sweep.bases exported (listed in
    manifest.json beside it, as the shipped bases are) holds the files its manifest records;
    a folder no manifest lists passes; a manifest of the wrong shape is RunFileError (a
    base it may list is never taken unchecked). Always hashed: a base is ~8 MB at the quick
    tier."""
    manifest = folder.parent / BASES_MANIFEST
    entry = base_entry(folder)
    if entry is None:
        return
    differ = [
        name
        for name, digest in sorted(entry["files"].items())
        if not (folder / name).is_file() or sha256(folder / name) != digest
    ]
    if differ:
        raise ConfigError(
            f"{folder}: {', '.join(differ)} differ from their sha256 in "
            f"{manifest}: nothing is computed; restore them (git checkout -- "
            f"{folder}) or remake the bases (make bases)"
        )
