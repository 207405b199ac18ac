"""Sweeps: `python -m isodiff.sweep` (command), experiment specs (specs), their compiled plans
(plan) and the tier's base models (bases)."""
