"""How every Hydra entry point reports a user's mistake: one line, exit 2.

Hydra prints its own composition errors over several lines (or a stack) and exits 1;
`hydra_main` has Hydra raise them instead (HYDRA_FULL_ERROR) and turns them, and every
UserError of isodiff, into one line naming the key, the allowed values and the fix.
A user who sets HYDRA_FULL_ERROR=1 gets Hydra's full traceback, as Hydra documents.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from isodiff.config import CONF, closest, tier_config, unknown_key
from isodiff.errors import UserError

USAGE = 2
FAILED = 1  # a job or evaluation that ran and failed (recorded in its folder)
_command: list[str] = []  # the command line as typed, for "resume with the same command"
_full_error: list[bool] = [False]  # HYDRA_FULL_ERROR=1 as the user set it: tracebacks shown


def command_line() -> str:
    """The running command as a user would retype it: `python -m isodiff.train args` (or
    the console command's name), with the arguments as they were given."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None else ""  # -m isodiff.train
    program = f"python -m {name}" if name else Path(sys.argv[0]).name
    return " ".join([program, *map(shlex.quote, _command or sys.argv[1:])])


class Interrupted(BaseException):
    """SIGINT or SIGTERM received while a job works (outside a launcher that handles them).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        self.message = f"interrupted by {self.name}"
        super().__init__(self.message)

    @property
    def code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise Interrupted, so the job can mark itself resumable.
    A signal that someone else already handles keeps its handler: submitit's SIGTERM under
    SLURM (its SIGUSR2 requeue is never touched), a test runner's, a parent's SIG_IGN."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    owner = os.getpid()

    def raise_interrupted(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child (a DataLoader worker): ends as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    defaults = {
        signal.SIGINT: (signal.default_int_handler, signal.SIG_DFL),
        signal.SIGTERM: (signal.SIG_DFL,),
    }
    previous = {}
    for signum, ours_to_replace in defaults.items():
        if signal.getsignal(signum) in ours_to_replace:
            previous[signum] = signal.signal(signum, raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(err: BaseException, command: str = "python -m isodiff.train") -> str:
    """A Hydra or OmegaConf error as one line: the key, what is wrong, the fix (`command
    --cfg job` lists the keys)."""
    inner: BaseException | None = err
    while inner is not None:  # a resolver's error (folder_part), as OmegaConf chains it
        if isinstance(inner, UserError):
            return str(inner)
        inner = inner.__cause__ or inner.__context__
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, value = err.missing_cfg_file.rpartition("/")
        near = closest(value, err.options or [])
        hint = f"did you mean {group}={near}? " if near else ""
        options = ", ".join(err.options or [])
        return (
            f"{group}={value}: no such option; {hint}choose one of: {options} "
            f"(the files of conf/{group}/)"
        )
    if isinstance(err, OverrideParseException):
        return (
            f"{str(err).splitlines()[0]}: a value that holds '=', ',' or spaces (a job "
            "folder, say) must be quoted, e.g. \"run='runs/quick/mnist/a=1,b=2-abc'\""
        )
    key = getattr(cause, "full_key", None)
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if key and re.search(r"not in '|not in struct", first):
        parent = getattr(cause, "parent_node", None)
        return unknown_key(key, parent.keys() if parent is not None else (), command)
    if key and (bad := re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)):
        value, options = bad[1], bad[2].split(", ")
        near = closest(value, options)
        hint = f"did you mean {key}={near}? " if near else ""
        return f"{key}={value}: no such option; {hint}choose one of: {bad[2]}"
    return f"{key}: {first}" if key else first


def fail(err: BaseException | str, code: int = USAGE) -> NoReturn:
    """The end of a command on a user's mistake (exit 2) or a recorded failure: its line
    on stderr."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


# Keys whose values are paths; job folders hold '=' and ',', which Hydra's grammar reserves.
PATH_KEYS = ("run", "init_from", "data.root", "refs_dir", "run_root")


def _existing(value: str) -> list[str] | None:
    """value split at commas into paths that exist, longest first (None: no such split)."""
    parts = value.split(",")
    for cut in range(len(parts), 0, -1):
        head = ",".join(parts[:cut])
        if Path(head).expanduser().exists():
            rest = _existing(",".join(parts[cut:])) if cut < len(parts) else []
            if rest is not None:
                return [head, *rest]
    return None


def quote_paths(args: list[str]) -> list[str]:
    """Overrides with unquoted paths of PATH_KEYS quoted for Hydra: `run=<job folder>`, as
    printed or pasted, works (a comma list of existing folders is a sweep over them)."""
    quoted = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if (
            eq
            and key.lstrip("+~") in PATH_KEYS
            and re.search(r"[=, ]", value)
            and not value.startswith(("'", '"', "["))
            and "'" not in value
            # a run= that is no such list is one path: evaluate says it is missing, and why
            and (paths := _existing(value) or ([value] if key == "run" else None))
        ):
            arg = f"{key}=" + ",".join(f"'{path}'" for path in paths)
        quoted.append(arg)
    return quoted


def _module_of(main: Callable[[], Any]) -> str:
    """The `python -m` name of the command whose main this is."""
    module = main.__module__
    if module == "__main__":  # `python -m isodiff.analysis.toy` runs that module as __main__
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else module
    return module.removesuffix(".__main__").removesuffix(".command")


def hydra_main(main: Callable[[], Any]) -> None:
    """Run a @hydra.main function; user errors end in one line on stderr and exit 2, a job's
    failure (its traceback in the job's train.log) in one line and exit 1, an interrupted
    job in one line saying how to resume, exit 130 (SIGINT) or 143 (SIGTERM)."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(command_help(main))
        return
    _command[:] = sys.argv[1:]
    sys.argv[1:] = quote_paths(sys.argv[1:])
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _full_error[0] = full
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises; this function reports
    try:
        main()
    except UserError as err:
        if full:
            raise
        fail(err)
    except (HydraException, OmegaConfBaseException) as err:
        if full:
            raise
        fail(one_line(err, f"python -m {_module_of(main)}"))
    except Interrupted as err:
        fail(err.message, code=err.code)
    except KeyboardInterrupt:  # Ctrl-C outside a job's work (composing, waiting for a lock)
        fail("interrupted by SIGINT", code=128 + signal.SIGINT)
    except Exception as err:
        if (line := job_failure(err)) is None:
            raise  # not a job's recorded failure: a bug of isodiff, with its traceback
        fail(line, code=FAILED)


def command_help(main: Callable[[], Any]) -> str:
    """--help of a Hydra command: its module's docstring (what it does, examples, where the
    keys are), then the config groups its conf/<name>.yaml composes, with their options.
    Hydra's own --help composes every group of conf/ to print the whole config (150 lines,
    seconds); `--cfg job` prints that config."""
    doc = (sys.modules[main.__module__].__doc__ or "").strip()
    primary = CONF / f"{_module_of(main).rpartition('.')[2]}.yaml"  # isodiff.train: train
    defaults = OmegaConf.to_container(OmegaConf.load(primary)).get("defaults", [])
    groups = [
        (name.removeprefix("optional "), default)
        for entry in defaults
        if isinstance(entry, dict)
        for name, default in entry.items()
        if not name.startswith(("override ", "hydra/"))
    ]
    if not groups:
        return doc
    lines = [
        f"  {name}: {', '.join(sorted(p.stem for p in (CONF / name).glob('*.yaml')))}"
        # recipe's default names its choice by other groups': ${tier}_${stage} -> <tier>_<stage>
        f" (default: {str(default or 'none').replace('${', '<').replace('}', '>')})"
        for name, default in groups
    ]
    return "\n".join([doc, "", "Config groups (group=option, the files of conf/<group>/):", *lines])


def job_failure(err: BaseException) -> str | None:
    """The one line of a job's failure that jobs.run_job recorded (status.json, train.log);
    None for any other error, or when the user asked for tracebacks (HYDRA_FULL_ERROR=1)."""
    if _full_error[0] or not (log := getattr(err, "logged_to", None)):
        return None
    return f"{type(err).__name__}: {err} (the job failed; its traceback is in {log})"


# ---- the commands that are not Hydra's: `[name ...] [key=value ...] [--flag]`


@dataclass
class Options:
    """A command line as the non-Hydra commands read it: its own keys' values, the names
    (specs), its flags, and the `key=value` overrides it passes on to training."""

    values: dict[str, str]
    names: list[str]
    flags: set[str]
    overrides: list[str]


def parse_options(
    argv: list[str],
    keys: tuple[str, ...],
    flags: tuple[str, ...] = (),
    overrides: bool = False,
    names: bool = True,
) -> Options:
    """The one parser of `key=value` options: UserError naming an unknown key or flag (or a
    name, where the command takes none); other keys pass on as training overrides where
    the command takes them."""
    values: dict[str, str] = {}
    got = Options(values, [], set(), [])
    known = ", ".join([*(f"{k}=" for k in keys), *flags, "--help"])

    def unknown(word: str, choices: tuple[str, ...], shown: str) -> UserError:
        near = closest(word, choices)
        hint = f"did you mean {near}{'=' if shown.endswith('=') else ''}? " if near else ""
        return UserError(f"unknown option {shown}: {hint}the options are {known}")

    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg.startswith("-"):
            if arg not in flags:
                raise unknown(arg, (*flags, "--help"), arg)
            got.flags.add(arg)
        elif not eq:
            if not names:
                raise UserError(f"{arg}: this command takes only {known}")
            got.names.append(arg)
        elif key in keys:
            values[key] = value
        elif overrides:
            got.overrides.append(arg)
        else:
            raise unknown(key, keys, f"{key}=")
    return got


def run(doc: str, argv: list[str], work: Callable[[list[str]], int]) -> int:
    """`--help` prints doc; a UserError prints its line alone and returns 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    try:
        return work(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# ---- the analysis commands: `[key=value ...] [spec ...]`

ANALYSIS_KEYS = ("tier", "run_root", "out")


@dataclass
class Args:
    """The analysis commands' options: tier, run_root and out as they default them."""

    tier: str
    run_root: Path
    out: Path
    names: list[str] | None


def parse(argv: list[str]) -> Args:
    """An analysis command's options and spec names; UserError naming the bad key or tier,
    or a tier without runs."""
    got = parse_options(argv, ANALYSIS_KEYS)
    args = Args(
        got.values.get("tier", "quick"),
        Path(got.values.get("run_root", "runs")),
        Path(got.values.get("out", "results")),
        got.names or None,
    )
    tier_config(args.tier)  # an unknown tier is a typo
    if not any((args.run_root / args.tier).rglob("status.json")):
        raise UserError(
            f"tier={args.tier}: no runs under {args.run_root / args.tier}; run "
            f"`make reproduce` (or isodiff.sweep <spec> tier={args.tier}) first, "
            "or pass run_root=<folder that holds the runs>"
        )
    return args


def analysis(doc: str, argv: list[str], work: Callable[[Args], int]) -> int:
    """An analysis command: `--help`, its options, one line and exit 2 on a mistake."""
    return run(doc, argv, lambda argv: work(parse(argv)))
