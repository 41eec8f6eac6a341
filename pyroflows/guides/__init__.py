"""Flow guides for SVI: autoguides whose posterior is a normalizing flow over the latent vector.

Modules: ``autoguide`` (:class:`AutoFlowGuide` and its family shorthands), ``posterior``
(:class:`FlowPosterior`), ``laplace`` (the Laplace start), ``params`` (the guide's parameters
in Pyro's param store), ``elbo`` (:class:`FlowELBO`), ``direct`` (FlowELBO's draw of a guide
without tracing it), ``landing`` (sticking the landing), ``optim`` (step sizes).
"""

from __future__ import annotations

from ..transforms import TriangularAffine
from .autoguide import AutoFlowGuide, AutoIAF, AutoPlanar, AutoRadial
from .elbo import FlowELBO
from .optim import default_lr, optim_args
from .posterior import FlowPosterior

__all__ = [
    "AutoFlowGuide",
    "AutoPlanar",
    "AutoRadial",
    "AutoIAF",
    "FlowPosterior",
    "TriangularAffine",
    "FlowELBO",
    "optim_args",
    "default_lr",
]
