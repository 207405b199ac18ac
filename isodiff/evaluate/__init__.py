"""Evaluation: `python -m isodiff.evaluate` (command), measuring one run (measure), data-
parallel chunks (parallel), metric networks' weights (networks) and the metrics themselves
(metrics/)."""
