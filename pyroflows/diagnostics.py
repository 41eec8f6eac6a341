"""Did the variational fit work? PSIS k-hat, importance weights and ArviZ data for any Pyro guide.

Every function here takes a Pyro ``model``, any ``guide`` for it (an autoguide such as
:class:`~pyro.infer.autoguide.AutoNormal`, an :class:`~pyro.infer.autoguide.AutoContinuous`
subclass like the flow guides in :mod:`pyroflows.guides`, or a hand-written guide function) and
the model's arguments. Draws from the guide are taken in one vectorized pass: model and guide run
inside a ``pyro.plate`` of size ``num_samples`` placed left of every plate the model uses, falling
back to chunks when memory runs out. Everything runs under :func:`torch.no_grad` on the guide's
device; results come back as numpy (in :class:`arviz.InferenceData`) or Python floats.

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

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

__all__ = [
    "KHAT_GOOD",
    "KHAT_USABLE",
    "khat_verdict",
    "log_importance_weights",
    "psis",
    "psis_khat",
    "to_inference_data",
    "importance_resample",
    "ConvergenceCheck",
    "elbo_convergence",
    "elbo_trace_ylim",
    "VIReport",
    "vi_report",
]

KHAT_GOOD = 0.5
"""Below this Pareto :math:`\\hat k` the guide is good."""
KHAT_USABLE = 0.7
"""Up to this :math:`\\hat k` PSIS-corrected estimates are usable; above it, do not trust them."""

_SAMPLE_PLATE = "_pyroflows_num_samples"


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


# ---------------------------------------------------------------------------------------------
# Vectorized draws from the guide, scored by model and guide


@dataclass
class _Site:
    name: str
    kind: str  # "latent", "deterministic" or "observed"
    frames: dict[int, str]  # plate dim (negative) -> plate name
    event_dim: int
    observed: Tensor | None = None  # the data, for observed sites


@dataclass
class _Draws:
    """``num_samples`` guide draws: log weights, log joint and site values, on the guide's device.
    Values are aligned as ``(num_samples, *[one entry per plate dim], *event_shape)``."""

    log_weights: Tensor
    log_joint: Tensor
    values: dict[str, Tensor]
    sites: dict[str, _Site]
    max_plate_nesting: int
    chunk_size: int


def _vectorize(fn: Callable, num_samples: int, max_plate_nesting: int) -> Callable:
    def vectorized(*args, **kwargs):
        with pyro.plate(_SAMPLE_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def _guess_max_plate_nesting(model: Callable, guide: Callable, args, kwargs) -> int:
    """Run guide and model once, unvectorized (this also sets up an autoguide's prototype), and
    read the deepest plate dim either uses."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return -min(dims) if dims else 0


def _per_draw_sum(log_prob: Tensor | float, name: str, num_samples: int, mpn: int) -> Tensor:
    """Sum a site's log density over everything but the sample-plate dim."""
    log_prob = torch.as_tensor(log_prob)
    sample_dim = log_prob.dim() - (mpn + 1)
    if sample_dim < 0:  # the site does not vary across draws
        return log_prob.sum().expand(num_samples)
    if sample_dim > 0:
        raise ValueError(
            f"site {name!r} has log-density shape {tuple(log_prob.shape)}, more batch dims than "
            f"max_plate_nesting={mpn} allows; pass a larger max_plate_nesting"
        )
    if log_prob.dim() > 1:
        log_prob = log_prob.sum(tuple(range(1, log_prob.dim())))
    return log_prob.expand(num_samples)


def _deterministic_event_dim(value: Tensor, event_dim: int, num_samples: int, mpn: int) -> int:
    """``pyro.deterministic`` makes every dim an event dim unless told otherwise; guess which of
    the leading dims are the sample and plate dims."""
    if event_dim < value.dim():  # the user stated event_dim
        return event_dim
    if value.dim() >= mpn + 1:  # computed from plate-aligned latents: (S, *plates, *event)
        return value.dim() - (mpn + 1)
    if value.dim() > 0 and value.shape[0] == num_samples > 1:  # e.g. a sum over a plate
        return value.dim() - 1 - mpn  # negative: pad plate dims right of the sample dim
    return value.dim()


def _align(value: Tensor, event_dim: int, num_samples: int, mpn: int, name: str) -> Tensor:
    """Reshape a site value to ``(num_samples, *[mpn plate dims], *event_shape)``."""
    if event_dim < 0:  # a leading sample dim with the plate dims reduced away
        value = value.reshape(value.shape[:1] + (1,) * (-event_dim) + value.shape[1:])
        event_dim = value.dim() - (mpn + 1)
    batch_ndim = value.dim() - event_dim
    if batch_ndim > mpn + 1:
        raise ValueError(
            f"site {name!r} has value shape {tuple(value.shape)} with more batch dims than "
            f"max_plate_nesting={mpn} allows; pass a larger max_plate_nesting"
        )
    value = value.reshape((1,) * (mpn + 1 - batch_ndim) + tuple(value.shape))
    if value.shape[0] not in (1, num_samples):
        raise ValueError(f"site {name!r}: cannot find the sample dim in shape {tuple(value.shape)}")
    return value.expand((num_samples,) + tuple(value.shape[1:]))


def _is_point_mass(fn: Any) -> bool:
    while not isinstance(fn, dist.Delta) and hasattr(fn, "base_dist"):  # Independent, masks
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _trace_chunk(model, guide, args, kwargs, num_samples: int, mpn: int, keep_values: bool):
    guide_trace = poutine.trace(_vectorize(guide, num_samples, mpn)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(
        poutine.replay(_vectorize(model, num_samples, mpn), trace=guide_trace)
    ).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
    if guide_sites and all(_is_point_mass(site["fn"]) for site in guide_sites):
        raise ValueError(
            "the guide is a point mass (e.g. AutoDelta): it has no density, so importance "
            "weights, the ELBO and k-hat are undefined for it"
        )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()

    log_q = 0.0
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            log_q = log_q + _per_draw_sum(site["log_prob"], name, num_samples, mpn)
    log_p = 0.0
    log_prior_uncovered = 0.0
    sites: dict[str, _Site] = {}
    values: dict[str, Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        lp = _per_draw_sum(site["log_prob"], name, num_samples, mpn)
        log_p = log_p + lp
        deterministic = bool(site["infer"].get("_deterministic", False))
        latent = not site["is_observed"]
        if latent and name not in guide_trace.nodes:
            # Drawn by the model from its prior conditional: that density is part of q.
            log_prior_uncovered = log_prior_uncovered + lp
        if not keep_values:
            continue
        frames = {
            f.dim: f.name
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != _SAMPLE_PLATE and f.dim is not None
        }
        kind = "deterministic" if deterministic else ("latent" if latent else "observed")
        event_dim = site["fn"].event_dim
        value = site["value"]
        if kind == "observed":
            sites[name] = _Site(name, kind, frames, event_dim, observed=value)
            continue
        if kind == "deterministic":
            event_dim = _deterministic_event_dim(value, event_dim, num_samples, mpn)
            try:
                values[name] = _align(value, event_dim, num_samples, mpn, name)
            except ValueError:  # no sample dim where guessed: a constant, the same every draw
                event_dim = value.dim()
                values[name] = _align(value, event_dim, num_samples, mpn, name)
        else:
            values[name] = _align(value, event_dim, num_samples, mpn, name)
        sites[name] = _Site(name, kind, frames, max(event_dim, 0))
    if not torch.is_tensor(log_p):
        raise ValueError("the model has no sample sites")
    log_weights = log_p - log_q - log_prior_uncovered
    return log_weights, log_p, values, sites


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or (
        "can't allocate memory" in message
    )


def _in_chunks(run: Callable[[int, int], Any], total: int, chunk: int) -> tuple[list, int]:
    """``run(start, n)`` over ``range(total)`` in pieces of at most ``chunk``; a piece that runs
    out of memory is retried in halves. Returns the results and the piece size that worked."""
    parts, start = [], 0
    while start < total:
        n = min(chunk, total - start)
        try:
            parts.append(run(start, n))
        except RuntimeError as error:
            if not _is_out_of_memory(error) or n == 1:
                raise
            chunk = max(1, n // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += n
    return parts, chunk


def _draw(
    model, guide, args, kwargs, num_samples: int, max_plate_nesting: int | None,
    chunk_size: int | None, keep_values: bool,
) -> _Draws:
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    mpn = (
        _guess_max_plate_nesting(model, guide, args, kwargs)
        if max_plate_nesting is None else int(max_plate_nesting)
    )
    chunk = num_samples if chunk_size is None else max(1, min(int(chunk_size), num_samples))
    parts, chunk = _in_chunks(
        lambda start, n: _trace_chunk(model, guide, args, kwargs, n, mpn, keep_values),
        num_samples, chunk,
    )
    log_weights = torch.cat([p[0] for p in parts])
    log_joint = torch.cat([p[1] for p in parts])
    values = {name: torch.cat([p[2][name] for p in parts]) for name in parts[0][2]}
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError(
            "log importance weights contain NaN or +inf: the guide puts mass where its own "
            "density or the model's is not finite"
        )
    return _Draws(log_weights, log_joint, values, parts[0][3], mpn, chunk)


def log_importance_weights(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
    max_plate_nesting: int | None = None, chunk_size: int | None = None, **kwargs: Any,
) -> Tensor:
    """Log importance weights :math:`\\log p(x, z_s) - \\log q(z_s)` of ``num_samples`` guide
    draws :math:`z_s \\sim q`, in one vectorized pass.

    Arguments:
        model: the Pyro model; ``*args`` and ``**kwargs`` are passed to it and to the guide.
        guide: any Pyro guide for ``model``.
        num_samples: the number S of guide draws.
        max_plate_nesting: how many plate dims model and guide use; guessed from one
            unvectorized run when None.
        chunk_size: draws per vectorized pass (default all S; halved automatically when memory
            runs out).

    Returns:
        A tensor of shape ``(S,)`` on the guide's device.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import log_importance_weights
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():  # the exact posterior, so every weight is log p(x) = 0
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> log_importance_weights(model, guide, num_samples=5).abs().max().item() < 1e-6
        True
    """
    with torch.no_grad():
        draws = _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                      keep_values=False)
    return draws.log_weights


# ---------------------------------------------------------------------------------------------
# Pareto smoothing


def psis(log_weights: Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed importance sampling of one set of log weights (ArviZ's
    :func:`arviz.psislw`, with independent draws: ``reff = 1``).

    Weights that are uniform to working precision (an exact guide) have a bounded tail:
    :math:`\\hat k = -\\infty` is returned for them, where a Pareto fit to rounding noise would
    be meaningless.

    Arguments:
        log_weights: shape ``(S,)``.

    Returns:
        The smoothed log weights, normalized (``logsumexp == 0``), as float64 numpy of shape
        ``(S,)``, and the Pareto :math:`\\hat k`.

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


def psis_khat(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 2000,
    max_plate_nesting: int | None = None, chunk_size: int | None = None, **kwargs: Any,
) -> float:
    """Pareto :math:`\\hat k` of the importance weights :math:`p(x, z) / q(z)`, :math:`z \\sim q`
    (Yao et al. 2018): < 0.5 good, 0.5 to 0.7 usable, > 0.7 do not trust the guide
    (see :func:`khat_verdict`). Estimates are noisy below a few thousand draws.

    Arguments:
        model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size: as for
            :func:`log_importance_weights`.

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
    log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size, **kwargs,
    )
    return psis(log_weights)[1]


# ---------------------------------------------------------------------------------------------
# ArviZ conversion


def _guide_name(guide: Callable) -> str:
    """A function guide's own name, else the guide's class (``AutoNormal``)."""
    if inspect.isfunction(guide) or inspect.ismethod(guide):
        return guide.__name__
    return type(guide).__name__


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _draw_dims(site: _Site, value: Tensor, mpn: int) -> tuple[Tensor, list[str]]:
    """``value`` aligned as ``(S, *plates, *event)`` -> ``(S, *kept)`` and ArviZ dim names for
    the kept dims: a plate's dim carries the plate's name (Pyro keeps plate and site names
    apart), other dims are ``{site}_dim_{k}`` as ArviZ names them; size-1 batch dims outside
    the site's plates (the model's broadcasting) are dropped."""
    keep, dims, k = [0], [], 0
    for j in range(1, mpn + 1):
        plate = site.frames.get(j - (mpn + 1))
        if plate is not None:
            keep.append(j)
            dims.append(plate)
        elif value.shape[j] != 1:
            keep.append(j)
            dims.append(f"{site.name}_dim_{k}")
            k += 1
    for j in range(mpn + 1, value.dim()):
        keep.append(j)
        dims.append(f"{site.name}_dim_{k}")
        k += 1
    return value.reshape([value.shape[j] for j in keep]), dims


def _data_dims(site: _Site, value: Tensor) -> list[str]:
    """ArviZ dim names for observed data, kept in the shape the user gave."""
    batch_ndim = max(value.dim() - site.event_dim, 0)
    dims, k = [], 0
    for i in range(value.dim()):
        plate = site.frames.get(i - batch_ndim) if i < batch_ndim else None
        if plate is None:
            plate = f"{site.name}_dim_{k}"
            k += 1
        dims.append(plate)
    return dims


def _posterior_predictive(
    model: Callable, draws: _Draws, index: Tensor | None, args, kwargs,
) -> dict[str, Tensor]:
    """Simulate every observed site once per draw: the model with its data removed, its latent
    sites fixed to the draws (or to the draws at ``index``)."""
    latents = {n: v for n, v in draws.values.items() if draws.sites[n].kind == "latent"}
    if index is not None:
        latents = {n: v.index_select(0, index.to(v.device)) for n, v in latents.items()}
    total = draws.log_weights.shape[0] if index is None else index.shape[0]
    observed = [n for n, s in draws.sites.items() if s.kind == "observed"]
    mpn = draws.max_plate_nesting

    def simulate(start: int, n: int) -> dict[str, Tensor]:
        data = {name: v[start:start + n] for name, v in latents.items()}
        predictive = poutine.condition(poutine.uncondition(model), data=data)
        trace = poutine.trace(_vectorize(predictive, n, mpn)).get_trace(*args, **kwargs)
        return {
            name: _align(trace.nodes[name]["value"], trace.nodes[name]["fn"].event_dim, n, mpn,
                         name)
            for name in observed
        }

    parts, _ = _in_chunks(simulate, total, draws.chunk_size)
    return {name: torch.cat([p[name] for p in parts]) for name in observed}


def _inference_data(
    model: Callable, draws: _Draws, index: Tensor | None,
    posterior_predictive: bool, args, kwargs, attrs: dict,
) -> az.InferenceData:
    mpn = draws.max_plate_nesting
    posterior, dims = {}, {}
    for name, value in draws.values.items():
        if index is not None:
            value = value.index_select(0, index.to(value.device))
        value, dims[name] = _draw_dims(draws.sites[name], value, mpn)
        posterior[name] = _to_numpy(value)[None]
    observed, observed_dims = {}, {}
    for name, site in draws.sites.items():
        if site.kind == "observed":
            observed[name] = _to_numpy(site.observed)
            observed_dims[name] = _data_dims(site, site.observed)
    lp = draws.log_joint if index is None else draws.log_joint[index.to(draws.log_joint.device)]
    sample_stats = {"lp": _to_numpy(lp)[None]}
    if index is None:
        sample_stats["log_weight"] = _to_numpy(draws.log_weights)[None]

    def dataset(data, dims, default_dims=None, extra_attrs=None):
        return az.dict_to_dataset(
            data, library=pyro, dims=dims, default_dims=default_dims,
            attrs={**attrs, **(extra_attrs or {})},
        )

    groups = {
        "posterior": dataset(posterior, dims),
        "sample_stats": dataset(sample_stats, {}),
    }
    if observed:
        groups["observed_data"] = dataset(observed, observed_dims, default_dims=[])
    if posterior_predictive and observed:
        simulated = _posterior_predictive(model, draws, index, args, kwargs)
        predictive, predictive_dims = {}, {}
        for name, value in simulated.items():
            data = observed[name]
            if value[0].numel() == data.size:  # one simulated data set per draw, as observed
                value = value.reshape((value.shape[0],) + data.shape)
                predictive_dims[name] = observed_dims[name]
            else:
                value, predictive_dims[name] = _draw_dims(draws.sites[name], value, mpn)
            predictive[name] = _to_numpy(value)[None]
        groups["posterior_predictive"] = dataset(predictive, predictive_dims)
    return az.InferenceData(**groups)


def to_inference_data(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
    posterior_predictive: bool = False, max_plate_nesting: int | None = None,
    chunk_size: int | None = None, **kwargs: Any,
) -> az.InferenceData:
    """Draws from ``guide`` as an :class:`arviz.InferenceData`, ready for
    :func:`arviz.summary`, :func:`arviz.plot_posterior`, :func:`arviz.plot_pair`.

    Groups:
        ``posterior``: every latent site (and ``pyro.deterministic`` site) of the model on its
        constrained scale, dims ``(chain=1, draw=num_samples, ...)``; dims of a plate carry the
        plate's name, other dims are ``{site}_dim_{k}``; size-1 dims that only align a site
        with the plates are dropped. ``observed_data``: the data of every observed site, in the
        shape given. ``posterior_predictive`` (when asked): one simulated data set per draw,
        shaped like the data. ``sample_stats``: ``lp`` (log joint :math:`\\log p(x, z)`) and
        ``log_weight`` (:math:`\\log p(x, z) - \\log q(z)`).

    Arguments:
        model: the Pyro model; ``*args`` and ``**kwargs`` are passed to it and to the guide.
        guide: any Pyro guide for ``model``.
        num_samples: draws from the guide.
        posterior_predictive: also simulate the observed sites once per draw.
        max_plate_nesting, chunk_size: as for :func:`log_importance_weights`.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.diagnostics import to_inference_data
        >>> def model(y):
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(0.0, scale), obs=y)
        >>> idata = to_inference_data(model, AutoNormal(model), torch.randn(5), num_samples=100,
        ...                           posterior_predictive=True)
        >>> idata.posterior_predictive["y"].dims
        ('chain', 'draw', 'data')
    """
    with torch.no_grad():
        draws = _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                      keep_values=True)
        attrs = {"guide": _guide_name(guide), "num_samples": num_samples}
        return _inference_data(model, draws, None, posterior_predictive, args, kwargs,
                               attrs)


def _systematic_resample(weights: np.ndarray, num_draws: int) -> np.ndarray:
    """Indices drawn with probabilities ``weights`` by systematic resampling: index s appears
    ``floor(M w_s)`` or ``ceil(M w_s)`` times, the lowest-variance unbiased scheme."""
    uniform = float(torch.rand((), dtype=torch.float64))
    positions = (uniform + np.arange(num_draws)) / num_draws
    cumulative = np.cumsum(weights)
    cumulative[-1] = 1.0
    index = np.searchsorted(cumulative, positions, side="right")
    # Shuffle: in sorted order the duplicates would look like a badly mixing chain to ArviZ.
    return index[torch.randperm(num_draws).numpy()]


def importance_resample(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 4000,
    num_draws: int | None = None, posterior_predictive: bool = False,
    max_plate_nesting: int | None = None, chunk_size: int | None = None, **kwargs: Any,
) -> az.InferenceData:
    """PSIS-corrected posterior draws: ``num_samples`` proposals :math:`z_s \\sim q`, weighted by
    their Pareto-smoothed importance weights :math:`\\tilde w_s \\propto p(x, z_s)/q(z_s)`, then
    ``num_draws`` of them resampled (systematic resampling) with probabilities
    :math:`\\tilde w_s`. Expectations under the result correct a good-but-imperfect guide
    towards the posterior; with :math:`\\hat k > 0.7` (a warning says so) they cannot be trusted.

    The result has the layout of :func:`to_inference_data` (``sample_stats`` holds ``lp``), and
    its ``posterior`` attrs carry ``pareto_k``, ``ess`` (the importance-sampling effective sample
    size of the proposals) and ``num_proposals``. Resampled draws repeat proposals: draws beyond
    about ``ess`` carry little new information.

    Arguments:
        model, guide, args, kwargs, max_plate_nesting, chunk_size: as for
            :func:`to_inference_data`.
        num_samples: proposals drawn from the guide.
        num_draws: posterior draws returned (default ``num_samples // 4``).
        posterior_predictive: also simulate the observed sites once per returned draw.

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
        draws = _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                      keep_values=True)
        smoothed, khat = psis(draws.log_weights)
        weights = np.exp(smoothed)
        ess = float(1.0 / np.square(weights).sum())
        if khat > KHAT_USABLE:
            warnings.warn(
                f"Pareto k-hat = {khat:.2f} > {KHAT_USABLE}: the guide misses posterior mass "
                "that importance resampling cannot recover; do not trust these draws",
                stacklevel=2,
            )
        index = torch.as_tensor(_systematic_resample(weights, num_draws))
        attrs = {
            "guide": _guide_name(guide), "num_samples": num_draws,
            "num_proposals": num_samples, "pareto_k": khat, "ess": ess,
        }
        return _inference_data(model, draws, index, posterior_predictive, args, kwargs,
                               attrs)


# ---------------------------------------------------------------------------------------------
# ELBO trace and the report


@dataclass
class ConvergenceCheck:
    """The ELBO-trace check of :func:`elbo_convergence`."""

    verdict: str  # "converged", "still rising", "falling" or "too short"
    difference: float  # mean of the last window minus mean of the window before
    standard_error: float
    window: int

    def __str__(self) -> str:
        if self.verdict == "too short":
            return "too short to judge"
        return (f"{self.verdict} (last {self.window} - previous {self.window}: "
                f"{self.difference:+.3g} ± {self.standard_error:.2g})")


def elbo_convergence(
    elbo_trace: Sequence[float] | np.ndarray | Tensor, window: float = 0.1, tol: float = 0.01,
) -> ConvergenceCheck:
    """Has the ELBO stopped rising? Compares the mean :math:`\\bar a` of the last ``window``
    fraction of the trace with the mean :math:`\\bar b` of the same number of steps before it:

    .. math:: d = \\bar a - \\bar b, \\qquad
              \\mathrm{se} = \\sqrt{s_a^2 / m + s_b^2 / m},

    with :math:`s^2` the sample variances and :math:`m` the window length (at least 5 steps).
    Verdict: ``"still rising"`` if :math:`d > \\max(2\\,\\mathrm{se}, \\mathrm{tol})`,
    ``"falling"`` if :math:`d < -\\max(2\\,\\mathrm{se}, \\mathrm{tol})` (an unstable optimizer),
    else ``"converged"``; ``"too short"`` below 20 steps. The standard error treats the steps as
    independent, which SVI's noisy estimates nearly are.

    Arguments:
        elbo_trace: ELBO values in step order (Pyro's ``svi.step`` returns the loss: pass its
            negative).
        window: the fraction of the trace in each window.
        tol: rises smaller than this many nats count as converged.

    Example:
        >>> import numpy as np
        >>> from pyroflows.diagnostics import elbo_convergence
        >>> steps = np.arange(1000)
        >>> elbo_convergence(-100 * np.exp(-steps / 50)).verdict
        'converged'
        >>> elbo_convergence(-100 * np.exp(-steps / 2000)).verdict
        'still rising'
    """
    trace = np.asarray(
        elbo_trace.detach().cpu() if torch.is_tensor(elbo_trace) else elbo_trace, dtype=np.float64
    ).reshape(-1)
    m = max(5, int(round(window * trace.size)))
    if trace.size < max(20, 2 * m):
        return ConvergenceCheck("too short", math.nan, math.nan, m)
    last, previous = trace[-m:], trace[-2 * m:-m]
    difference = float(last.mean() - previous.mean())
    se = float(math.sqrt(last.var(ddof=1) / m + previous.var(ddof=1) / m))
    threshold = max(2.0 * se, tol)
    if not math.isfinite(difference):
        verdict = "falling"  # non-finite ELBO values: the optimizer went astray
    elif difference > threshold:
        verdict = "still rising"
    elif difference < -threshold:
        verdict = "falling"
    else:
        verdict = "converged"
    return ConvergenceCheck(verdict, difference, se, m)


def elbo_trace_ylim(
    elbo_trace: Sequence[float] | np.ndarray, quantile: float = 5.0,
) -> tuple[float, float] | None:
    r"""y-limits that keep an ELBO trace readable when its first steps are far below the rest,
    or ``None`` when the full range is fine.

    With :math:`q` the ``quantile``-th percentile of the finite values and :math:`M` their
    maximum, the trace is clipped when its minimum lies below :math:`q - 5 (M - q)` (the early
    steps would squeeze the rest into a sixth of the axis, or less); the limits are then
    :math:`(q - (M - q)/2,\ M + (M - q)/20)`, so the last 95% of the steps fill the axis and
    the early transient leaves it at the bottom.

    Example:
        >>> import numpy as np
        >>> trace = -10.0 + 0.1 * np.random.default_rng(0).standard_normal(1000)
        >>> trace[:20] = -1e6  # the first steps of a badly started fit
        >>> lo, hi = elbo_trace_ylim(trace)
        >>> bool(-11 < lo < -10 < hi < -9)
        True
        >>> elbo_trace_ylim(-10 - np.exp(-np.arange(1000) / 200)) is None
        True
    """
    trace = np.asarray(elbo_trace, dtype=np.float64).reshape(-1)
    finite = trace[np.isfinite(trace)]
    if finite.size < 2:
        return None
    low, top = float(np.percentile(finite, quantile)), float(finite.max())
    span = top - low
    if not span > 0 or finite.min() >= low - 5 * span:
        return None
    return low - 0.5 * span, top + 0.05 * span


@dataclass
class VIReport:
    """Diagnostics of one guide, made by :func:`vi_report`. Prints as a compact table;
    :meth:`to_dict` gives the numbers, :meth:`plot` draws them."""

    num_samples: int
    elbo: float  # mean log weight
    elbo_se: float  # its Monte Carlo standard error
    log_evidence: float  # importance-sampling estimate log mean w
    khat: float
    ess: float  # (sum w)^2 / sum w^2 of the smoothed weights
    guide: str = ""
    convergence: ConvergenceCheck | None = None
    log_weights: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    elbo_trace: np.ndarray | None = field(default=None, repr=False)

    @property
    def khat_verdict(self) -> str:
        return khat_verdict(self.khat)

    @property
    def ess_fraction(self) -> float:
        return self.ess / self.num_samples

    def to_dict(self) -> dict[str, Any]:
        """The numbers, as plain Python values (for benchmark tables)."""
        c = self.convergence
        return {
            "guide": self.guide,
            "num_samples": self.num_samples,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "log_evidence": self.log_evidence,
            "khat": self.khat,
            "khat_verdict": self.khat_verdict,
            "ess": self.ess,
            "ess_fraction": self.ess_fraction,
            "convergence": None if c is None else c.verdict,
            "elbo_trace_difference": None if c is None else c.difference,
            "elbo_trace_se": None if c is None else c.standard_error,
        }

    def __str__(self) -> str:
        rows = [
            ("ELBO", f"{self.elbo:.4g} ± {self.elbo_se:.2g}"),
            ("log evidence (IS)", f"{self.log_evidence:.4g}"),
            ("PSIS k-hat", f"{self.khat:.2f}  {self.khat_verdict}  (< 0.5 good, 0.5-0.7 "
                           "usable, > 0.7 do not trust)"),
            ("IS ESS", f"{self.ess:.0f} / {self.num_samples} ({100 * self.ess_fraction:.1f}%)"),
        ]
        if self.convergence is not None:
            rows.append(("ELBO trace", str(self.convergence)))
        title = f"VI diagnostics{f' for {self.guide}' if self.guide else ''}"
        width = max(len(r[0]) for r in rows)
        return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the table
        printer.text(str(self))

    def plot(self, fig=None):
        """Draw the ELBO trace (with the two windows of the convergence check), the log-weight
        histogram and :math:`\\hat k` against its thresholds. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        if fig is None:
            fig = plt.figure(figsize=(12, 3.2))
        ax_trace, ax_weights, ax_khat = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 2, 1]})
        if self.elbo_trace is not None and len(self.elbo_trace):
            steps = np.arange(len(self.elbo_trace))
            ax_trace.plot(steps, self.elbo_trace, lw=0.8, color="C0")
            limits = elbo_trace_ylim(self.elbo_trace)
            if limits is not None:
                ax_trace.set_ylim(*limits)
            c = self.convergence
            if c is not None and c.verdict != "too short":
                n = len(self.elbo_trace)
                for lo, hi, color in ((n - 2 * c.window, n - c.window, "C1"),
                                      (n - c.window, n, "C2")):
                    ax_trace.axvspan(lo, hi, color=color, alpha=0.2)
                    ax_trace.hlines(np.mean(self.elbo_trace[lo:hi]), lo, hi, color=color)
                ax_trace.set_title(f"ELBO trace: {c.verdict}")
            else:
                ax_trace.set_title("ELBO trace")
            if limits is not None:
                ax_trace.set_title(ax_trace.get_title() + " (early steps below the axis)")
            ax_trace.set_xlabel("step")
            ax_trace.set_ylabel("ELBO")
        else:
            ax_trace.text(0.5, 0.5, "no ELBO trace given", ha="center", va="center")
            ax_trace.set_axis_off()
        lw = self.log_weights[np.isfinite(self.log_weights)]
        ax_weights.hist(lw - lw.max(), bins=50, color="C0")
        ax_weights.set_xlabel("log w - max log w")
        ax_weights.set_title(f"importance weights, ESS {100 * self.ess_fraction:.1f}%")
        bands = ((-0.5, KHAT_GOOD, "tab:green"), (KHAT_GOOD, KHAT_USABLE, "tab:orange"),
                 (KHAT_USABLE, 1.5, "tab:red"))
        for lo, hi, color in bands:
            ax_khat.axhspan(lo, hi, color=color, alpha=0.25)
        shown = min(max(self.khat, -0.5), 1.5) if math.isfinite(self.khat) else (
            -0.5 if self.khat < 0 else 1.5)
        ax_khat.plot([0], [shown], "ko")
        ax_khat.set_xlim(-1, 1)
        ax_khat.set_ylim(-0.5, 1.5)
        ax_khat.set_xticks([])
        ax_khat.set_title(f"k-hat {self.khat:.2f}: {self.khat_verdict}")
        fig.tight_layout()
        return fig


def vi_report(
    model: Callable, guide: Callable, *args: Any, elbo_trace: Sequence[float] | None = None,
    num_samples: int = 2000, max_plate_nesting: int | None = None,
    chunk_size: int | None = None, **kwargs: Any,
) -> VIReport:
    """Is this guide trustworthy? One set of ``num_samples`` guide draws gives the ELBO
    :math:`\\frac1S\\sum_s \\log w_s` with its standard error, the importance-sampling log
    evidence :math:`\\log \\frac1S \\sum_s w_s`, the PSIS :math:`\\hat k` with its verdict and the
    importance-sampling effective sample size :math:`(\\sum_s \\tilde w_s)^2 / \\sum_s \\tilde
    w_s^2` of the smoothed weights; with ``elbo_trace`` also :func:`elbo_convergence`.

    Arguments:
        model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size: as for
            :func:`log_importance_weights`.
        elbo_trace: ELBO values recorded during training (the negated SVI losses).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import vi_report
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.1, 0.9))
        >>> report = vi_report(model, guide, elbo_trace=[-1.0] * 50)
        >>> report.khat_verdict, report.convergence.verdict
        ('good', 'converged')
        >>> sorted(report.to_dict())[:4]
        ['convergence', 'elbo', 'elbo_se', 'elbo_trace_difference']
    """
    log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size, **kwargs,
    )
    smoothed, khat = psis(log_weights)
    lw = log_weights.detach().to("cpu", torch.float64).numpy()
    trace = None
    if elbo_trace is not None:
        trace = np.asarray(
            elbo_trace.detach().cpu() if torch.is_tensor(elbo_trace) else elbo_trace,
            dtype=np.float64,
        ).reshape(-1)
    with np.errstate(invalid="ignore"):  # -inf weights give a -inf ELBO, honestly
        elbo = float(lw.mean())
        elbo_se = float(lw.std(ddof=1) / math.sqrt(lw.size)) if lw.size > 1 else math.nan
    log_evidence = float(np.logaddexp.reduce(lw) - math.log(lw.size))
    return VIReport(
        num_samples=num_samples, elbo=elbo, elbo_se=elbo_se, log_evidence=log_evidence,
        khat=khat, ess=float(1.0 / np.square(np.exp(smoothed)).sum()),
        guide=_guide_name(guide),
        convergence=None if trace is None else elbo_convergence(trace),
        log_weights=lw, elbo_trace=trace,
    )
