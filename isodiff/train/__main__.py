"""`python -m isodiff.train`."""

from isodiff.train.command import command

command()
