"""Flow layers: Pyro ``TransformModule`` subclasses with lower-case constructors."""

from .affine import ElementwiseAffine, elementwise_affine
from .base import FlowTransform
from .planar import Planar, planar
from .radial import Radial, radial

__all__ = [
    "FlowTransform",
    "ElementwiseAffine",
    "elementwise_affine",
    "Planar",
    "planar",
    "Radial",
    "radial",
]
