"""How every Hydra entry point reports a user's mistake: one line, exit 2.

Hydra prints its own composition errors over several lines (or a stack) and exits 1;
`hydra_main` has Hydra raise them instead (HYDRA_FULL_ERROR) and turns them, and every
UserError of isodiff, into one line naming the key, the allowed values and the fix.
A user who sets HYDRA_FULL_ERROR=1 gets Hydra's full traceback, as Hydra documents.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from isodiff.config import UserError

USAGE = 2


def one_line(err: BaseException) -> str:
    """A Hydra or OmegaConf error as one line: the key, what is wrong, the fix."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, value = err.missing_cfg_file.rpartition("/")
        options = ", ".join(err.options or [])
        return (f"{group}={value}: no such option; choose one of: {options} "
                f"(the files of conf/{group}/)")
    if isinstance(err, OverrideParseException):
        return (f"{str(err).splitlines()[0]}: a value that holds '=', ',' or spaces (a job "
                "folder, say) must be quoted, e.g. \"run='runs/quick/mnist/a=1,b=2-abc'\"")
    key = getattr(cause, "full_key", None)
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if key and re.search(r"not in '|not in struct", first):
        return (f"{key} is not a config key: check its spelling (python -m isodiff.train "
                "--cfg job lists every key)")
    return f"{key}: {first}" if key else first


def fail(err: UserError | str) -> NoReturn:
    """The end of a command on a user's mistake: its line on stderr, exit 2."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(USAGE)


def hydra_main(main: Callable[[], Any]) -> None:
    """Run a @hydra.main function; user errors end in one line on stderr and exit 2."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
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
        fail(one_line(err))
