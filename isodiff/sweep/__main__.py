"""`python -m isodiff.sweep`: isodiff-sweep (one line when the suite is absent)."""

from isodiff.commands import Command

Command("isodiff.sweep.command", "python -m isodiff.sweep")()
