"""pyroflows: normalizing flows for Pyro.

Submodules, loaded on first attribute access: ``transforms`` (flow layers), ``flows`` (stacks),
``distributions``, ``guides`` (SVI guides), ``density`` (density estimation), ``diagnostics``
(ArviZ, PSIS k-hat), ``datasets`` (toy data, the Rezende energies), ``testing`` (conformance),
``nn`` (the masked conditioner, MADE).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._config import enable_validation, is_validation_enabled, validation

__version__ = "0.2.0"

_SUBMODULES = ("transforms", "flows", "distributions", "guides", "density", "diagnostics",
               "datasets", "testing", "nn")

# Names at the top level, loaded with their submodule on first access.
_NAMES = {"DensityEstimator": "density"}

__all__ = [*_SUBMODULES, *_NAMES, "enable_validation", "is_validation_enabled", "validation",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'pyroflows' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
