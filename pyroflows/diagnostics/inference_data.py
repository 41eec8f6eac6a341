"""Guide draws as an :class:`arviz.InferenceData`: posterior, observed data, posterior
predictive and sample stats, with dims named after the model's plates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import arviz as az
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.inspect import site_is_deterministic
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from torch import Tensor

from .weights import Draws, Site, align, draw, guide_name, in_chunks, vectorize

__all__ = ["to_inference_data"]


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _draw_dims(site: Site, value: Tensor, mpn: int) -> tuple[Tensor, list[str]]:
    """An aligned value ``(S, *plates, *event)`` without the size-1 dims outside the site's
    plates, and ArviZ names for its dims: the plate's name, else ``{site}_dim_{k}``."""
    keep, dims, k = [0], [], 0
    for j in range(1, value.dim()):
        plate = site.frames.get(j - (mpn + 1)) if j <= mpn else None
        if plate is None and j <= mpn and value.shape[j] == 1:
            continue  # the model's broadcasting
        if plate is None:
            plate, k = f"{site.name}_dim_{k}", k + 1
        keep.append(j)
        dims.append(plate)
    return value.reshape([value.shape[j] for j in keep]), dims


def _data_dims(site: Site, value: Tensor) -> list[str]:
    """ArviZ dim names for observed data, kept in the shape the user gave."""
    batch_ndim = max(value.dim() - site.event_dim, 0)
    dims, k = [], 0
    for i in range(value.dim()):
        plate = site.frames.get(i - batch_ndim) if i < batch_ndim else None
        if plate is None:
            plate, k = f"{site.name}_dim_{k}", k + 1
        dims.append(plate)
    return dims


class _Unconditioned(UnconditionMessenger):
    """``poutine.uncondition`` but for ``pyro.deterministic`` sites (observed ``Delta`` sites
    to Pyro): drawn from their ``Delta`` in the draws' plate, they gained its dims twice."""

    def _pyro_sample(self, msg: dict) -> None:
        if not site_is_deterministic(msg):
            super()._pyro_sample(msg)


def _simulate_observed(model: Callable, draws: Draws, index: Tensor | None,
                       args, kwargs) -> dict[str, Tensor]:
    """Every observed site simulated once per draw (at ``index``) by the model without its data."""
    latents = {n: v for n, v in draws.values.items() if draws.sites[n].kind == "latent"}
    if index is not None:
        latents = {n: v.index_select(0, index.to(v.device)) for n, v in latents.items()}
    total = draws.log_weights.shape[0] if index is None else index.shape[0]
    observed = [n for n, s in draws.sites.items() if s.kind == "observed"]
    mpn = draws.max_plate_nesting

    def simulate(start: int, n: int) -> dict[str, Tensor]:
        data = {name: v[start:start + n] for name, v in latents.items()}
        predictive = poutine.condition(_Unconditioned()(model), data=data)
        trace = poutine.trace(vectorize(predictive, n, mpn)).get_trace(*args, **kwargs)
        sites = {name: trace.nodes[name] for name in observed}
        return {name: align(site["value"], len(site["fn"].event_shape), n, mpn, name)
                for name, site in sites.items()}

    parts, _ = in_chunks(simulate, total, draws.chunk_size)
    return {name: torch.cat([p[name] for p in parts]) for name in observed}


def inference_data(model: Callable, draws: Draws, index: Tensor | None, posterior_predictive: bool,
                   args: tuple, kwargs: dict, attrs: dict) -> az.InferenceData:
    """``draws`` (at ``index``, repeats allowed) with the groups of :func:`to_inference_data`
    and ``attrs`` on each; ``log_weight`` only without ``index``."""
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

    def dataset(data, dims, default_dims=None):
        return az.dict_to_dataset(data, library=pyro, dims=dims, default_dims=default_dims,
                                  attrs=dict(attrs))

    groups = {"posterior": dataset(posterior, dims), "sample_stats": dataset(sample_stats, {})}
    if observed:
        groups["observed_data"] = dataset(observed, observed_dims, default_dims=[])
    if posterior_predictive and observed:
        predictive, predictive_dims = {}, {}
        for name, value in _simulate_observed(model, draws, index, args, kwargs).items():
            data = observed[name]
            if value[0].numel() == data.size:  # one simulated data set per draw, as observed
                value = value.reshape((value.shape[0],) + data.shape)
                predictive_dims[name] = observed_dims[name]
            else:
                value, predictive_dims[name] = _draw_dims(draws.sites[name], value, mpn)
            predictive[name] = _to_numpy(value)[None]
        groups["posterior_predictive"] = dataset(predictive, predictive_dims)
    return az.InferenceData(**groups)


def to_inference_data(model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
                      posterior_predictive: bool = False, max_plate_nesting: int | None = None,
                      chunk_size: int | None = None, **kwargs: Any) -> az.InferenceData:
    """Draws from ``guide`` as an :class:`arviz.InferenceData`, ready for
    :func:`arviz.summary`, :func:`arviz.plot_posterior`, :func:`arviz.plot_pair`.

    Groups: ``posterior``, every latent and ``pyro.deterministic`` site on its constrained
    scale, dims ``(chain=1, draw=num_samples, ...)``, a plate's dim named after the plate, other
    dims ``{site}_dim_{k}``, size-1 dims that only align a site with the plates dropped;
    ``observed_data``, the data as given; ``posterior_predictive`` (when asked), one simulated
    data set per draw shaped like the data; ``sample_stats``, ``lp`` (:math:`\\log p(x, z)`)
    and ``log_weight`` (:math:`\\log p(x, z) - \\log q(z)`).

    Arguments:
        model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size: as for
            :func:`~pyroflows.diagnostics.log_importance_weights`.
        posterior_predictive: also simulate the observed sites once per draw.

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
        draws = draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                     keep_values=True)
        attrs = {"guide": guide_name(guide), "num_samples": num_samples}
        return inference_data(model, draws, None, posterior_predictive, args, kwargs, attrs)
