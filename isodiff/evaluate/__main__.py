"""`python -m isodiff.evaluate`: isodiff-evaluate (one line when the suite is absent)."""

from isodiff.commands import Command

Command("isodiff.evaluate.command", "python -m isodiff.evaluate")()
