"""Flow guides for SVI: autoguides whose posterior is a normalizing flow over the latent vector.

- :mod:`~pyroflows.guides.autoguide`: :class:`AutoFlowGuide` (set-up, posterior, median and
  quantiles) and its family shorthands :class:`AutoPlanar`, :class:`AutoRadial`,
  :class:`AutoIAF`;
- :mod:`~pyroflows.guides.posterior`: :class:`FlowPosterior`, the guide's distribution;
- :mod:`~pyroflows.guides.laplace`: the Laplace start (MAP search, Hessian, the ELBO check);
- :mod:`~pyroflows.guides.params`: the guide's parameters in Pyro's param store;
- :mod:`~pyroflows.guides.elbo`: :class:`FlowELBO` (sticking the landing, annealing);
- :mod:`~pyroflows.guides.direct`: FlowELBO's draw of a guide without tracing it;
- :mod:`~pyroflows.guides.landing`: sticking the landing's log density, by the flow's inverse
  or from the draw's Jacobian;
- :mod:`~pyroflows.guides.optim`: the documented step sizes.
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
