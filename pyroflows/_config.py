"""Library-wide switches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["enable_validation", "is_validation_enabled", "validation"]

_VALIDATE = True


def enable_validation(flag: bool = True) -> None:
    """Turn input validation (finite values, event sizes) on or off.

    Validation is on by default. The finiteness check costs one reduction per layer call (and a
    host-device sync on CUDA); switch it off in a tuned training loop once the data is known good.
    Event-size checks are always on: they cost nothing.
    """
    global _VALIDATE
    _VALIDATE = bool(flag)


def is_validation_enabled() -> bool:
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
