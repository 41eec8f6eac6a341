"""Density estimation: fit a normalizing flow to a data matrix (or, given a context, a
conditional density p(y | x)), then score, sample, save, load.

``estimator`` is the user API, ``pipeline`` the model it fits (preconditioning stages, flow,
refined base), ``training`` the epoch loop, ``streaming`` fits on streamed data
(``ArrayDataset``), ``distill`` the IAF student of a fitted model, ``persistence`` the
files.
"""

from __future__ import annotations

from .estimator import PRECONDITIONERS, REFINERS, DensityEstimator
from .persistence import known_callables, register_callable
from .streaming import ArrayDataset

__all__ = ["DensityEstimator", "PRECONDITIONERS", "REFINERS", "known_callables",
           "register_callable", "ArrayDataset"]
