"""Flow guides for SVI: autoguides whose posterior is a normalizing flow over the latent vector.

Modules: ``autoguide`` (the guide, its posterior, param store and step sizes), ``laplace`` (its
start), ``elbo`` (:class:`FlowELBO`), ``direct`` (FlowELBO's untraced draw of a guide),
``landing`` (sticking the landing), ``amortized`` (:class:`AmortizedFlowGuide`, a VAE's
guide of a local latent).
"""

from __future__ import annotations

from ..transforms import TriangularAffine
from .amortized import AmortizedFlowGuide, AmortizedPosterior
from .autoguide import (
    AutoFlowGuide,
    AutoIAF,
    AutoPlanar,
    AutoRadial,
    FlowPosterior,
    HeldClippedAdam,
    default_lr,
    optim_args,
    recommended_optimizer,
)
from .elbo import FlowELBO

__all__ = ["AutoFlowGuide", "AutoPlanar", "AutoRadial", "AutoIAF", "FlowPosterior",
           "TriangularAffine", "FlowELBO", "optim_args", "default_lr",
           "recommended_optimizer", "HeldClippedAdam", "AmortizedFlowGuide",
           "AmortizedPosterior"]
