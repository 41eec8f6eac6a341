"""Speed code: fused kernels with written-out backward passes, parameter banks, and the dispatch
of runs of layers to the kernels.

Each kernel computes what a plain path computes (``tests/test_fast_paths.py`` holds each
against it): :mod:`.made` the MADE network, :mod:`.affine` IAF/MAF/RealNVP layers,
:mod:`.planar` planar layers; :mod:`.banks` keeps the parameters of many layers in one tensor;
:mod:`.dispatch` groups layers into runs of one kernel. It imports torch (and the private
names of :mod:`pyroflows._private`) only; the layers are read through documented attributes.
"""

from .affine import affine_chain, sequential_no_grad
from .banks import BankRow, ParameterBank, RowView, stacked_rows
from .dispatch import keeps_map, run_parts, traced
from .planar import planar_chain

__all__ = [
    "affine_chain", "sequential_no_grad", "BankRow", "ParameterBank", "RowView", "stacked_rows",
    "keeps_map", "run_parts", "traced", "planar_chain",
]
