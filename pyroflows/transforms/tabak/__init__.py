"""The Tabak transform: the 1-D map of seed eq. 25 (``map``), the fitted transform
(``transform``) and its fit by dual ascent of the log-likelihood (``fit``)."""

from __future__ import annotations

from .fit import SELECTIONS, dequantize
from .map import local_ascent, map_1d, map_1d_inverse
from .transform import NotFittedError, Tabak, gaussianize, tabak

__all__ = [
    "Tabak", "tabak", "gaussianize", "dequantize", "NotFittedError", "SELECTIONS",
    "map_1d", "map_1d_inverse", "local_ascent",
]
