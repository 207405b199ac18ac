"""Training: `python -m isodiff.train` (command), one job under the contract (job), the loop
(loop) and its loss (objective)."""
