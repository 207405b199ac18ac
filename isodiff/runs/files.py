"""Run files written whole or not at all, read by shape, locked and hashed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from isodiff.errors import UserError

log = logging.getLogger(__name__)


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


def atomic_save(path: Path, save: Callable[[str], None]) -> None:
    """save(tmp) into a temp file beside `path`, then rename: readers never see half a file
    (and the folder's
    entry reaches the disk). The temp name keeps path's suffix,
    so savers that append one (numpy) leave it alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like a download
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text written whole or not at all: readers never see half a file."""
    atomic_save(Path(path), lambda tmp: Path(tmp).write_text(text))


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
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    return _kind(value) == kind


def field_problem(
    record: dict[str, Any], key: str, kind: str, required: bool = False, where: str = ""
) -> str | None:
    """What is wrong with record[key] for a reader that expects `kind` (object, list,
    string, int, number, boolean); null or absent is fine unless required."""
    value = record.get(key)
    if value is None:
        return f"{where}{key} is missing" if required else None
    return None if _is(value, kind) else f"{where}{key} is {_a(_kind(value))}, not {_a(kind)}"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def mapping_problem(value: Any, where: str, item: Callable[[str, Any], str | None]) -> str | None:
    """The first problem of an object's entries (item(name, entry)), or of the object."""
    if value is None:
        return f"{where} is missing"
    if not isinstance(value, dict):
        return f"{where} is {_a(_kind(value))}, not an object"
    return next((p for name, entry in value.items() if (p := item(name, entry))), None)


def _held(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _say_waiting(what: str, lock_path: Path, holder: Callable[[], str]) -> None:
    log.warning("%s: waiting for the process that holds %s%s", what, lock_path, holder())


def announce_holder(lock_path: Path, what: str, holder: Callable[[], str] = lambda: "") -> bool:
    """Say now, before a command's slow imports (tens of seconds on a loaded machine), that
    another process holds lock_path, which `exclusive` will wait for; True when it does.
    Never creates the lock file (the folder stays empty for a config found invalid later)."""
    if not lock_path.exists() or not _held(FileLock(str(lock_path))):
        return False
    _say_waiting(what, lock_path, holder)
    return True


@contextlib.contextmanager
def exclusive(
    lock_path: Path,
    what: str,
    holder: Callable[[], str] = lambda: "",
    announce_every: float = 60.0,
    announced: bool = False,
) -> Iterator[None]:
    """Hold an exclusive lock on lock_path (fcntl, released when the process dies); while
    another process holds it, wait, saying so every `announce_every` seconds (the first time
    at once, unless `announced` by announce_holder already)."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        while True:
            if not announced:
                _say_waiting(what, lock_path, holder)
            announced = False
            try:
                lock.acquire(timeout=announce_every)
                break
            except Timeout:
                continue
    try:
        yield
    finally:
        lock.release()


def up_to_date(derived: Path, source: Path) -> bool:
    """Whether `derived` (a page, a tracker's copy) was written after `source` last
    changed: re-deriving it then would only rewrite the same content, so an idempotent
    command (an evaluation with every metric up to date) leaves it as it is."""
    try:
        return derived.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path, skip: str = "") -> dict[str, str]:
    """sha256 of every file under folder, by path relative to it (skip: one left out)."""
    return {
        str(p.relative_to(folder)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) != skip
    }
