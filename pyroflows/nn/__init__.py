"""Conditioner networks for the flow layers."""

from .dense import DenseNetwork
from .made import MADE, default_hidden_dims

__all__ = ["MADE", "default_hidden_dims", "DenseNetwork"]
