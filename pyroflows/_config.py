"""Library-wide switches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["enable_validation", "is_validation_enabled", "validation"]

_VALIDATE = True


def enable_validation(flag: bool = True) -> None:
    """Turn the check that inputs are finite on (the default) or off. It costs one reduction
    per layer call (and a host-device sync on CUDA); event sizes are always checked."""
    global _VALIDATE
    _VALIDATE = bool(flag)


def is_validation_enabled() -> bool:
    """Whether :func:`enable_validation` is on."""
    return _VALIDATE


@contextlib.contextmanager
def validation(flag: bool) -> Iterator[None]:
    """Context manager form of :func:`enable_validation`."""
    old = _VALIDATE
    enable_validation(flag)
    try:
        yield
    finally:
        enable_validation(old)
