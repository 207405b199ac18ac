"""The command line of the analysis commands: `[key=value ...] [spec ...]`, `--help`.

One parser, so that tables, figures and the index agree on keys and on what is an error:
an unknown key, an unknown tier, or a tier without runs ends in one line and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from isodiff.config import UserError, tier_config

KEYS = ("tier", "run_root", "out")


class Args:
    """The parsed options: tier, run_root and out as the commands default them."""

    def __init__(self, options: dict[str, str], names: list[str]) -> None:
        self.tier = options.get("tier", "quick")
        self.run_root = Path(options.get("run_root", "runs"))
        self.out = Path(options.get("out", "results"))
        self.names = names or None


def parse(argv: list[str]) -> Args:
    """key=value options and spec names; UserError naming the bad key or tier."""
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if unknown := sorted(set(options) - set(KEYS)):
        raise UserError(f"unknown option {unknown[0]}=: the options are "
                        f"{', '.join(k + '=' for k in KEYS)}")
    args = Args(options, [a for a in argv if "=" not in a])
    tier_config(args.tier)  # an unknown tier is a typo
    if not any((args.run_root / args.tier).rglob("status.json")):
        raise UserError(f"tier={args.tier}: no runs under {args.run_root / args.tier}; run "
                        f"`make reproduce` (or isodiff.sweep <spec> tier={args.tier}) first, "
                        "or pass run_root=<folder that holds the runs>")
    return args


def run(doc: str, argv: list[str], work: Callable[[Args], int]) -> int:
    """`--help` prints doc; a UserError prints its line alone and returns 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    try:
        return work(parse(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
