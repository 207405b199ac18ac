"""Isometric Diffusion: the regulariser, models, data and evaluation."""
