"""Conditioner networks for the flow layers."""

from .made import MADE, MaskedLinear, default_hidden_dims

__all__ = ["MADE", "MaskedLinear", "default_hidden_dims"]
