"""Flow stacks: the family records, the builder, and the stack that runs them."""

from .build import build
from .families import FAMILIES, Family, fold_mask, fold_order, register_family
from .stack import FlowStack, planar_chain, radial_chain

__all__ = [
    "build", "FlowStack", "Family", "FAMILIES", "register_family", "fold_order", "fold_mask",
    "planar_chain", "radial_chain",
]
