"""Flow layers: Pyro ``TransformModule`` subclasses with lower-case constructors."""

from .affine import (
    ElementwiseAffine,
    FixedTriangularAffine,
    TriangularAffine,
    elementwise_affine,
    triangular_affine,
)
from .autoregressive import IAF, MAF, iaf, maf
from .base import FlowTransform
from .conditional import ConditionalFlowTransform
from .conditional_autoregressive import (
    ConditionalIAF,
    ConditionalMAF,
    ConditionalRealNVP,
    conditional_iaf,
    conditional_maf,
    conditional_realnvp,
)
from .conditional_planar_radial import (
    ConditionalPlanar,
    ConditionalRadial,
    conditional_planar,
    conditional_radial,
)
from .coupling import RealNVP, realnvp
from .permute import Permute, permute
from .planar import Planar, planar
from .radial import Radial, radial
from .spline import NSF, ConditionalNSF, conditional_nsf, nsf
from .tabak import Tabak, dequantize, tabak

__all__ = [
    "FlowTransform", "ElementwiseAffine", "elementwise_affine", "TriangularAffine",
    "triangular_affine", "FixedTriangularAffine", "Planar", "planar", "Radial", "radial", "IAF",
    "iaf", "MAF", "maf", "RealNVP", "realnvp", "Permute", "permute", "Tabak", "tabak",
    "dequantize",
    "ConditionalFlowTransform", "ConditionalIAF", "conditional_iaf", "ConditionalMAF",
    "conditional_maf", "ConditionalRealNVP", "conditional_realnvp", "ConditionalPlanar",
    "conditional_planar", "ConditionalRadial", "conditional_radial", "NSF", "nsf",
    "ConditionalNSF", "conditional_nsf",
]
