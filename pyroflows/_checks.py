"""Argument checks that every room shares."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["whole_number"]


def whole_number(value: Any, name: str, low: int = 0) -> int:
    """``value`` as an ``int``: a whole number of an integer type (Python's, NumPy's, an
    integer tensor's) of at least ``low``, else a ``ValueError`` (2.5 is not silently 2)."""
    try:
        whole = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}") from None
    if whole < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return whole
