"""Flow stacks: the family records, the builder, the stack, the bank-row layers."""

from .build import build
from .families import FAMILIES, Family, fold_mask, fold_order, register_family
from .stack import FlowStack

__all__ = [
    "build", "FlowStack", "Family", "FAMILIES", "register_family", "fold_order", "fold_mask",
]
