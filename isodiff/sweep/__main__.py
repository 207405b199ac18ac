"""`python -m isodiff.sweep`."""

from isodiff.sweep.command import command

command()
