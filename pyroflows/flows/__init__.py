"""Flow stacks: the family records, the builder, the stack (plain and conditional), the
bank-row layers."""

from .build import build
from .conditional import ConditionalElementwiseAffine, ConditionalFlowStack
from .families import (
    FAMILIES,
    Family,
    fold_mask,
    fold_order,
    guide_hidden_dims,
    register_family,
)
from .stack import FlowStack

__all__ = [
    "build", "FlowStack", "ConditionalFlowStack", "ConditionalElementwiseAffine", "Family",
    "FAMILIES", "register_family", "fold_order", "fold_mask", "guide_hidden_dims",
]
