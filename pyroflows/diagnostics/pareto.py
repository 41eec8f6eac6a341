"""Pareto-smoothed importance sampling of guide draws (Vehtari et al. 2024; references in
:mod:`pyroflows.diagnostics`): the smoothed weights, the k-hat of their tail and its verdict
(Yao et al. 2018), and posterior draws resampled by the smoothed weights."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import arviz as az
import numpy as np
import torch
from torch import Tensor

from .inference_data import inference_data
from .weights import draw, guide_name, log_importance_weights

__all__ = ["KHAT_GOOD", "KHAT_USABLE", "khat_verdict", "psis", "psis_khat", "importance_resample"]

KHAT_GOOD = 0.5
"""Below this Pareto :math:`\\hat k` the guide is good."""
KHAT_USABLE = 0.7
"""Up to this :math:`\\hat k` PSIS-corrected estimates are usable; above it, do not trust them."""


def khat_verdict(khat: float) -> str:
    """The verdict for a Pareto :math:`\\hat k`: ``"good"`` (< 0.5), ``"usable"`` (0.5 to 0.7),
    ``"do not trust"`` (> 0.7), or ``"unknown"`` for NaN.

    Example:
        >>> from pyroflows.diagnostics import khat_verdict
        >>> khat_verdict(0.2), khat_verdict(0.6), khat_verdict(1.3)
        ('good', 'usable', 'do not trust')
    """
    if math.isnan(khat):
        return "unknown"
    if khat < KHAT_GOOD:
        return "good"
    if khat <= KHAT_USABLE:
        return "usable"
    return "do not trust"


def psis(log_weights: Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed importance sampling of log weights of shape ``(S,)``: ArviZ's
    :func:`arviz.psislw` with independent draws (``reff = 1``). Returns the smoothed log weights,
    normalized (``logsumexp == 0``) as float64 numpy, and :math:`\\hat k`; weights uniform to
    working precision (an exact guide) get :math:`\\hat k = -\\infty`, not a fit to rounding noise.

    Example:
        >>> import numpy as np
        >>> from pyroflows.diagnostics import psis
        >>> rng = np.random.default_rng(0)
        >>> lw, k = psis(0.8 * rng.exponential(size=4000))  # Pareto weights, true k = 0.8
        >>> bool(abs(np.exp(lw).sum() - 1) < 1e-9), bool(0.5 < k < 1.1)
        (True, True)
    """
    if torch.is_tensor(log_weights):
        eps = torch.finfo(log_weights.dtype).eps
        lw = log_weights.detach().to("cpu", torch.float64).numpy()
    else:
        given = np.asarray(log_weights)
        eps = np.finfo(given.dtype if np.issubdtype(given.dtype, np.floating) else float).eps
        lw = given.astype(np.float64)
    if lw.ndim != 1 or lw.size < 2:
        raise ValueError(f"psis needs a 1-D array of at least 2 log weights, got {lw.shape}")
    finite = lw[np.isfinite(lw)]
    if finite.size == 0:
        raise ValueError("every log weight is -inf: no guide draw has positive model density")
    scale = max(1.0, float(np.abs(finite).max()))
    if finite.size == lw.size and np.ptp(finite) <= 1e3 * eps * scale:
        return np.full_like(lw, -math.log(lw.size)), -math.inf
    smoothed, khat = az.psislw(lw, reff=1.0)
    return np.asarray(smoothed, dtype=np.float64), float(khat)


def importance_ess(smoothed_log_weights: np.ndarray) -> float:
    """The importance ESS :math:`1 / \\sum_s \\tilde w_s^2` of normalized log weights."""
    return float(1.0 / np.square(np.exp(smoothed_log_weights)).sum())


def psis_khat(model: Callable, guide: Callable, *args: Any, num_samples: int = 2000,
              max_plate_nesting: int | None = None, chunk_size: int | None = None,
              **kwargs: Any) -> float:
    """Pareto :math:`\\hat k` of the importance weights :math:`p(x, z) / q(z)`, :math:`z \\sim q`
    (Yao et al. 2018; :func:`khat_verdict`), noisy below a few thousand draws.

    Arguments:
        model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size: as for
            :func:`~pyroflows.diagnostics.log_importance_weights`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import psis_khat
        >>> pyro.set_rng_seed(0)
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def narrow():  # misses the tails: true k = 1 - 0.3^2 = 0.91
        ...     pyro.sample("x", dist.Normal(0.0, 0.3))
        >>> def wide():  # bounded weights: k < 0
        ...     pyro.sample("x", dist.Normal(0.0, 1.3))
        >>> psis_khat(model, narrow, num_samples=4000) > 0.5, psis_khat(model, wide) < 0.5
        (True, True)
    """
    return psis(log_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size, **kwargs))[1]


def _systematic_resample(weights: np.ndarray, num_draws: int) -> np.ndarray:
    """Systematic resampling: index s appears ``floor(M w_s)`` or ``ceil(M w_s)`` times."""
    uniform = float(torch.rand((), dtype=torch.float64))
    positions = (uniform + np.arange(num_draws)) / num_draws
    cumulative = np.cumsum(weights)
    cumulative[-1] = 1.0
    index = np.searchsorted(cumulative, positions, side="right")
    # Shuffle: in sorted order the duplicates would look like a badly mixing chain to ArviZ.
    return index[torch.randperm(num_draws).numpy()]


def importance_resample(model: Callable, guide: Callable, *args: Any, num_samples: int = 4000,
                        num_draws: int | None = None, posterior_predictive: bool = False,
                        max_plate_nesting: int | None = None, chunk_size: int | None = None,
                        **kwargs: Any) -> az.InferenceData:
    """PSIS-corrected posterior draws: ``num_draws`` of ``num_samples`` proposals
    :math:`z_s \\sim q` resampled (systematically) with their Pareto-smoothed importance weights
    :math:`\\tilde w_s \\propto p(x, z_s)/q(z_s)`, which corrects a good-but-imperfect guide;
    above :math:`\\hat k = 0.7` a warning says not to trust them. In the layout of
    :func:`~pyroflows.diagnostics.to_inference_data` (``sample_stats`` holds ``lp``), with
    ``pareto_k``, ``ess`` (of the proposals: draws beyond it repeat them) and ``num_proposals``
    in the ``posterior`` attrs.

    Arguments:
        model, guide, args, kwargs, max_plate_nesting, chunk_size, posterior_predictive: as for
            :func:`~pyroflows.diagnostics.to_inference_data`.
        num_samples: proposals drawn from the guide.
        num_draws: posterior draws returned (default ``num_samples // 4``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import importance_resample
        >>> pyro.set_rng_seed(0)
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 1.0))
        >>> def guide():  # too narrow and off-centre
        ...     pyro.sample("x", dist.Normal(0.7, 0.8))
        >>> idata = importance_resample(model, guide, num_samples=8000)
        >>> x = idata.posterior["x"].values
        >>> bool(abs(x.mean() - 1.0) < 0.1 and abs(x.std() - 1.0) < 0.1)
        True
    """
    num_draws = max(1, num_samples // 4) if num_draws is None else int(num_draws)
    with torch.no_grad():
        draws = draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                     keep_values=True)
        smoothed, khat = psis(draws.log_weights)
        if khat > KHAT_USABLE:
            warnings.warn(f"Pareto k-hat = {khat:.2f} > {KHAT_USABLE}: the guide misses posterior "
                          "mass that importance resampling cannot recover; do not trust these "
                          "draws", stacklevel=2)
        index = torch.as_tensor(_systematic_resample(np.exp(smoothed), num_draws))
        attrs = {"guide": guide_name(guide), "num_samples": num_draws, "num_proposals": num_samples,
                 "pareto_k": khat, "ess": importance_ess(smoothed)}
        return inference_data(model, draws, index, posterior_predictive, args, kwargs, attrs)
