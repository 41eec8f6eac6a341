"""Flow guides for SVI: autoguides whose posterior is a normalizing flow over the latent vector.

Modules: ``autoguide`` (:class:`AutoFlowGuide`, its shorthands, :class:`FlowPosterior`, the
param store, step sizes), ``laplace`` (the Laplace start), ``elbo`` (:class:`FlowELBO`),
``direct`` (FlowELBO's draw of a guide without tracing it), ``landing`` (sticking the landing).
"""

from __future__ import annotations

from ..transforms import TriangularAffine
from .autoguide import (
    AutoFlowGuide,
    AutoIAF,
    AutoPlanar,
    AutoRadial,
    FlowPosterior,
    default_lr,
    optim_args,
)
from .elbo import FlowELBO

__all__ = ["AutoFlowGuide", "AutoPlanar", "AutoRadial", "AutoIAF", "FlowPosterior",
           "TriangularAffine", "FlowELBO", "optim_args", "default_lr"]
