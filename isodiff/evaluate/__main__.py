"""`python -m isodiff.evaluate`."""

from isodiff.evaluate.command import command

command()
