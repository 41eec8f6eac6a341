"""Density estimation: fit a normalizing flow to a data matrix, then score, sample, save, load.

``estimator`` is the user API, ``pipeline`` the model it fits (preconditioning stages, flow,
refined base), ``training`` the epoch loop, ``persistence`` the files.
"""

from __future__ import annotations

from .estimator import PRECONDITIONERS, REFINERS, DensityEstimator

# benchmarks/speed.py times the estimator's own training step through these two names.
from .training import training_state as _training_state  # noqa: F401
from .training import training_step as _training_step  # noqa: F401

__all__ = ["DensityEstimator", "PRECONDITIONERS", "REFINERS"]
