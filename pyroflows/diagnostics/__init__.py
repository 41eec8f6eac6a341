"""Did the variational fit work? PSIS k-hat, importance weights and ArviZ data for any Pyro guide.

Every function here takes a Pyro ``model``, any ``guide`` for it (an autoguide such as
:class:`~pyro.infer.autoguide.AutoNormal`, an :class:`~pyro.infer.autoguide.AutoContinuous`
subclass like the flow guides in :mod:`pyroflows.guides`, or a hand-written guide function) and
the model's arguments. Draws from the guide are taken in one vectorized pass: model and guide run
inside a ``pyro.plate`` of size ``num_samples`` placed left of every plate the model uses, falling
back to chunks when memory runs out. Everything runs under :func:`torch.no_grad` on the guide's
device; results come back as numpy (in :class:`arviz.InferenceData`) or Python floats.

Modules: ``weights`` (the vectorized draws and their log importance weights), ``pareto``
(Pareto-smoothed importance sampling: :math:`\\hat k`, its verdict, importance resampling),
``inference_data`` (ArviZ), ``report`` (:class:`VIReport`, all of it for one guide, and the ELBO
trace's convergence check).

The importance log weight of a guide draw :math:`z \\sim q` is

.. math:: \\log w(z) = \\log p(x, z) - \\log q(z),

the full joint log density (every latent and observed site, with its plate scale and mask) minus
the guide's log density at the same draw, both on the constrained scale (the Jacobian of an
autoguide's unconstrained-to-constrained map enters :math:`\\log q`). Its mean is the ELBO and
:math:`\\log \\frac1S \\sum_s w_s` estimates the log evidence :math:`\\log p(x)`. Latent sites that
the guide does not sample are drawn by the model from its prior conditional and so cancel out of
:math:`w`.

The Pareto :math:`\\hat k` of the upper tail of :math:`w` (Yao et al. 2018) says how far to trust
the guide: :math:`\\hat k < 0.5` good (importance-sampling estimates converge quickly, the guide
is close to the posterior); :math:`0.5 \\le \\hat k \\le 0.7` usable (PSIS-corrected estimates
are still reliable); :math:`\\hat k > 0.7` do not trust (the guide misses mass the posterior
has; neither the guide nor importance resampling of it gives reliable expectations).

References:
    Yao, Vehtari, Simpson & Gelman, "Yes, but Did It Work?: Evaluating Variational Inference",
    ICML 2018. https://arxiv.org/abs/1802.02538

    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance Sampling", JMLR 25(72),
    2024. https://arxiv.org/abs/1507.02646

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> import pyroflows as pf
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.3, -0.1, 0.8])
    >>> guide = AutoNormal(model)
    >>> idata = pf.diagnostics.to_inference_data(model, guide, y, num_samples=200)
    >>> idata.posterior["mu"].shape, idata.observed_data["y"].dims
    ((1, 200), ('data',))
    >>> report = pf.diagnostics.vi_report(model, guide, y, num_samples=500)
    >>> report.khat_verdict in ("good", "usable", "do not trust")
    True
"""

from __future__ import annotations

from .inference_data import to_inference_data
from .pareto import KHAT_GOOD, KHAT_USABLE, importance_resample, khat_verdict, psis, psis_khat
from .report import ConvergenceCheck, VIReport, elbo_convergence, elbo_trace_ylim, vi_report
from .weights import log_importance_weights

__all__ = [
    "KHAT_GOOD", "KHAT_USABLE", "khat_verdict", "log_importance_weights", "psis", "psis_khat",
    "to_inference_data", "importance_resample", "ConvergenceCheck", "elbo_convergence",
    "elbo_trace_ylim", "VIReport", "vi_report",
]
