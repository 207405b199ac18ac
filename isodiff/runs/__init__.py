"""The run-directory contract: atomic files, job status, job identity, and the SLURM -> torch
process environment."""
