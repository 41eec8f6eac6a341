"""Did the variational fit work? PSIS k-hat, importance weights and ArviZ data for any Pyro guide.

Each function takes a Pyro ``model``, any ``guide`` for it and the model's arguments; model and
guide run once, under :func:`torch.no_grad`, inside a ``pyro.plate`` of ``num_samples`` draws
left of the model's plates (in chunks where memory runs out).

The importance log weight of a guide draw :math:`z \\sim q` is

.. math:: \\log w(z) = \\log p(x, z) - \\log q(z),

the full joint (every site, with its plate scale and mask) minus the guide's density, both on
the constrained scale. Its mean is the ELBO; :math:`\\log \\frac1S \\sum_s w_s` estimates
:math:`\\log p(x)`. Latent sites the guide does not sample are drawn from their prior
conditional and cancel out of :math:`w`. The Pareto :math:`\\hat k` of the upper tail of
:math:`w` (Yao et al. 2018) says how far to trust the guide: < 0.5 good, 0.5 to 0.7 usable
(PSIS-corrected estimates still reliable), > 0.7 do not trust (the guide misses posterior mass).

References:
    Yao, Vehtari, Simpson & Gelman, "Yes, but Did It Work?: Evaluating Variational Inference",
    ICML 2018. https://arxiv.org/abs/1802.02538

    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance Sampling", JMLR 25(72),
    2024. https://arxiv.org/abs/1507.02646
"""

from __future__ import annotations

from .inference_data import to_inference_data
from .pareto import KHAT_GOOD, KHAT_USABLE, importance_resample, khat_verdict, psis, psis_khat
from .report import (
    BULK_SPREAD_CLOSE,
    ConvergenceCheck,
    VIReport,
    approximation_verdict,
    elbo_convergence,
    elbo_trace_ylim,
    robust_spread,
    vi_report,
)
from .weights import log_importance_weights

__all__ = [
    "KHAT_GOOD", "KHAT_USABLE", "khat_verdict", "log_importance_weights", "psis", "psis_khat",
    "to_inference_data", "importance_resample", "ConvergenceCheck", "elbo_convergence",
    "elbo_trace_ylim", "VIReport", "vi_report", "BULK_SPREAD_CLOSE", "robust_spread",
    "approximation_verdict"]
