"""pyroflows: normalizing flows for Pyro.

Submodules, loaded on first attribute access: ``transforms`` (flow layers), ``flows`` (stacks),
``distributions``, ``guides`` (SVI guides), ``density`` (density estimation), ``diagnostics``
(ArviZ, PSIS k-hat), ``datasets`` (toy data, the Rezende energies), ``testing`` (conformance).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._config import enable_validation, is_validation_enabled, validation

__version__ = "0.2.0"

_SUBMODULES = ("transforms", "flows", "distributions", "guides", "density", "diagnostics",
               "datasets", "testing")

__all__ = [*_SUBMODULES, "enable_validation", "is_validation_enabled", "validation", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyroflows' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
