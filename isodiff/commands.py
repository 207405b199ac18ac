"""The `isodiff-*` console commands (pyproject's [project.scripts]).

A wheel installs every console script whatever extras are asked for, so the core wheel
(torch alone) has them too: each first checks that the experiment suite is installed and
otherwise says in one line how to install it, instead of a traceback. Nothing is imported
before that check (not torch: `isodiff/__init__.py` loads it on first use).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

USAGE = 2  # as isodiff.cli: an error the user fixes (cli needs hydra, which may be absent)
SUITE = "hydra"  # every command's first import from the `suite` extra (hydra-core)


class Command:
    """A console command: runs `module`'s command() once the suite is there."""

    def __init__(self, module: str, name: str | None = None) -> None:
        self.module = module
        self.name = name  # as the user typed it; the script's own name when None

    def __call__(self) -> None:
        if importlib.util.find_spec(SUITE) is None:
            sys.stderr.write(
                f"{self.name or os.path.basename(sys.argv[0])} needs the experiment suite, "
                "which is not installed: pip install 'isodiff[suite]'\n"
            )
            sys.exit(USAGE)
        importlib.import_module(self.module).command()


train = Command("isodiff.train.command")
evaluate = Command("isodiff.evaluate.command")
toy = Command("isodiff.analysis.toy")
sweep = Command("isodiff.sweep.command")
bases = Command("isodiff.sweep.bases")
tables = Command("isodiff.analysis.tables")
claims = Command("isodiff.analysis.claims")
figures = Command("isodiff.analysis.figures")
index = Command("isodiff.analysis.index")
collect = Command("isodiff.analysis.collect")
paper_assets = Command("isodiff.model.paper_assets")
