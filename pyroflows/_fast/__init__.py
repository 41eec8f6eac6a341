"""Speed code, each piece computing what a plain path computes (``tests/test_fast_paths.py``):
fused kernels with written-out backward passes, parameter banks, the dispatch of runs of layers."""

from .affine import Linearization, affine_chain, keeping_linearizations, sequential_no_grad
from .banks import BankRow, ParameterBank, RowView, stacked_rows
from .dispatch import broadcast_batch, keeps_map, row_view, run_parts, run_steps, traced
from .planar import planar_chain
from .radial import radial_chain

__all__ = [
    "affine_chain", "sequential_no_grad", "Linearization", "keeping_linearizations", "BankRow",
    "ParameterBank", "RowView", "stacked_rows",
    "broadcast_batch", "keeps_map", "row_view", "run_parts", "run_steps", "traced",
    "planar_chain", "radial_chain",
]
