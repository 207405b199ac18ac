"""`python -m isodiff.train`: isodiff-train (one line when the suite is absent)."""

from isodiff.commands import Command

Command("isodiff.train.command", "python -m isodiff.train")()
