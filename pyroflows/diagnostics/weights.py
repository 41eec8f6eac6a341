"""Log importance weights of guide draws, from one vectorized run of guide and model.

The S draws are a ``pyro.plate`` of size S at dim ``-(max_plate_nesting + 1)``, left of every
plate of model and guide: a site's log density has shape ``(S, *plates)``, and its value is
aligned as ``(S, *[one entry per plate dim], *event_shape)``, size 1 where the site broadcasts.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.inspect import site_is_deterministic
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch import Tensor

from .. import _plates, _private

__all__ = ["log_importance_weights"]

_SAMPLE_PLATE = "_pyroflows_num_samples"


@dataclass
class Site:
    """A sample site of the model, as the ArviZ conversion names and shapes it."""

    name: str
    kind: str  # "latent", "deterministic" or "observed"
    frames: dict[int, str]  # plate dim (negative) -> plate name
    event_dim: int
    observed: Tensor | None = None  # the data, for observed sites


@dataclass
class Draws:
    """S guide draws: ``log_weights`` and ``log_joint`` of shape ``(S,)``, and the aligned
    ``values`` of the latent and deterministic sites."""

    log_weights: Tensor
    log_joint: Tensor
    values: dict[str, Tensor]
    sites: dict[str, Site]
    max_plate_nesting: int
    chunk_size: int  # the draws per vectorized pass that fitted in memory


def guide_name(guide: Callable) -> str:
    """A function guide's own name, else the guide's class (``AutoNormal``)."""
    if inspect.isfunction(guide) or inspect.ismethod(guide):
        return guide.__name__
    return type(guide).__name__


def vectorize(fn: Callable, num_samples: int, max_plate_nesting: int) -> Callable:
    """``fn`` run inside the plate of ``num_samples`` draws, left of its own plate dims."""

    def vectorized(*args, **kwargs):
        with pyro.plate(_SAMPLE_PLATE, num_samples, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def align(value: Tensor, event_dim: int, num_samples: int, mpn: int, name: str) -> Tensor:
    """A site value reshaped to ``(num_samples, *[mpn plate dims], *event_shape)``; a negative
    ``event_dim`` means a leading sample dim with ``-event_dim`` plate dims reduced away."""
    if event_dim < 0:
        value = value.reshape(value.shape[:1] + (1,) * (-event_dim) + value.shape[1:])
        event_dim = value.dim() - (mpn + 1)
    batch_ndim = value.dim() - event_dim
    if batch_ndim > mpn + 1:
        raise ValueError(f"site {name!r} has value shape {tuple(value.shape)} with more batch dims "
                         f"than max_plate_nesting={mpn} allows; pass a larger max_plate_nesting")
    value = value.reshape((1,) * (mpn + 1 - batch_ndim) + tuple(value.shape))
    if value.shape[0] not in (1, num_samples):
        raise ValueError(f"site {name!r}: cannot find the sample dim in shape {tuple(value.shape)}")
    return value.expand((num_samples,) + tuple(value.shape[1:]))


def _align_deterministic(value: Tensor, event_dim: int, num_samples: int, mpn: int,
                         name: str) -> tuple[Tensor, int]:
    """A ``pyro.deterministic`` value aligned, and the event dim used: where every dim is an
    event dim (Pyro's default), the sample and plate dims are guessed."""
    if event_dim < value.dim():  # the user stated event_dim
        pass
    elif value.dim() >= mpn + 1:  # computed from plate-aligned latents: (S, *plates, *event)
        event_dim = value.dim() - (mpn + 1)
    elif value.dim() > 0 and value.shape[0] == num_samples > 1:  # e.g. a sum over a plate
        event_dim = value.dim() - 1 - mpn  # negative: pad plate dims right of the sample dim
    try:
        return align(value, event_dim, num_samples, mpn, name), event_dim
    except ValueError:  # no sample dim where guessed: a constant, the same in every draw
        return align(value, value.dim(), num_samples, mpn, name), value.dim()


def _per_draw_sum(log_prob: Tensor | float, name: str, num_samples: int, mpn: int) -> Tensor:
    """A site's log density summed over everything but the sample-plate dim: shape ``(S,)``."""
    log_prob = torch.as_tensor(log_prob)
    sample_dim = log_prob.dim() - (mpn + 1)
    if sample_dim < 0:  # the site does not vary across draws
        return log_prob.sum().expand(num_samples)
    if sample_dim > 0:
        shape = tuple(log_prob.shape)
        raise ValueError(f"site {name!r} has log-density shape {shape}, more batch dims than "
                         f"max_plate_nesting={mpn} allows; pass a larger max_plate_nesting")
    if log_prob.dim() > 1:
        log_prob = log_prob.sum(tuple(range(1, log_prob.dim())))
    return log_prob.expand(num_samples)


def _is_point_mass(fn: Any) -> bool:
    while not isinstance(fn, dist.Delta) and hasattr(fn, "base_dist"):  # Independent, masks
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _enumerated(site: dict) -> bool:
    """Whether ``site`` is a discrete site that ``poutine.enum`` enumerated in parallel."""
    return site["infer"].get("_enumerate_dim") is not None


def _traces(model, guide, args, kwargs, num_samples: int, mpn: int
            ) -> tuple[Trace, Iterator[Trace], int, Trace]:
    """The model's traces replayed against the vectorized guide trace, with log densities,
    subsample sites pruned: the first, an iterator over all of them (made one at a time, so
    that only one is held), their number; and the guide trace. The model runs under
    ``poutine.enum``, so a site marked ``infer={"enumerate": "parallel"}`` that the guide does
    not sample holds its whole support, left of the draws' plate. One model trace, or where
    the model subsamples a plate and no latent site lies in it (enumerated ones aside), one
    per window of its rows (:func:`pyroflows._plates.windows`), the latent values of the
    first in every one: the mean of their log densities is that of every row."""
    guide_trace = poutine.trace(vectorize(guide, num_samples, mpn)).get_trace(*args, **kwargs)
    vectorized = poutine.enum(vectorize(model, num_samples, mpn),
                              first_available_dim=-(mpn + 2))
    model_trace = poutine.trace(poutine.replay(vectorized, trace=guide_trace)
                                ).get_trace(*args, **kwargs)
    latent = {name for name, site in model_trace.nodes.items() if site["type"] == "sample"
              and not site["is_observed"] and not site_is_subsample(site)
              and not _enumerated(site)}
    windows = _plates.windows(model_trace, latent)
    if windows is None:
        plates = ", ".join(_plates.describe(site) for site in _plates.subsampled(model_trace))
        warnings.warn(f"the model subsamples {plates} with latent sites inside (or more than "
                      f"{_plates.WHOLE_DATA_MAX_RUNS} windows of its rows, or several "
                      "subsampled plates): the log weights are those of one random subsample, "
                      "so the ELBO is an unbiased estimate, but k-hat and the weights' spread "
                      "describe that subsample's noise too", stacklevel=_user_level())
    guide_trace = prune_subsample_sites(guide_trace)
    guide_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
    if guide_sites and all(_is_point_mass(site["fn"]) for site in guide_sites):
        raise ValueError("the guide is a point mass (e.g. AutoDelta): it has no density, so "
                         "importance weights, the ELBO and k-hat are undefined for it")
    guide_trace.compute_log_prob()
    values = prune_subsample_sites(model_trace)
    for name in [name for name in values.nodes if name not in latent]:
        values.remove_node(name)

    def scored(trace: Trace) -> Trace:
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
        return trace

    def window_traces() -> Iterator[Trace]:
        for window in windows:
            yield scored(poutine.trace(window(poutine.replay(vectorized, trace=values))
                                       ).get_trace(*args, **kwargs))

    if not windows:
        first = scored(model_trace)
        return first, iter([first]), 1, guide_trace
    runs = window_traces()
    first = next(runs)
    return first, itertools.chain([first], runs), len(windows), guide_trace


def _user_level() -> int:
    """The ``stacklevel``, for a warning issued by this function's caller, of the frame that
    called into this package last (the user's line, past torch's decorators in between), so
    that the default filter shows the warning once per such line."""
    package = __name__.split(".")[0]
    frame, level, outermost = inspect.currentframe().f_back, 1, 1  # (1: the caller's frame)
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] == package:
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


def _log_weights(model_traces: Iterable[Trace], runs: int, guide_trace: Trace,
                 num_samples: int, mpn: int) -> tuple[Tensor, Tensor]:
    """Per draw, ``log p(x, z) - log q(z)`` and ``log p(x, z)``, ``log p`` the mean over the
    ``runs`` model traces, enumerated sites summed out. A latent site the guide does not
    sample is drawn by the model from its prior conditional: part of ``q``, it cancels."""
    log_q = sum(_per_draw_sum(site["log_prob"], name, num_samples, mpn)
                for name, site in guide_trace.nodes.items() if site["type"] == "sample")
    log_p = log_prior_uncovered = 0.0
    packed = False
    for model_trace in model_traces:
        enumerated = any(site["type"] == "sample" and _enumerated(site)
                         for site in model_trace.nodes.values())
        if enumerated:
            if not packed:  # (the guide's once, every window's own)
                guide_trace.pack_tensors()
                packed = True
            log_p = log_p + _summed_out(model_trace, guide_trace, num_samples, runs > 1)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or _enumerated(site):
                continue
            uncovered = not site["is_observed"] and name not in guide_trace.nodes
            if enumerated and not uncovered:  # (in the sum out)
                continue
            lp = _per_draw_sum(site["log_prob"], name, num_samples, mpn)
            if not enumerated:
                log_p = log_p + lp
            if uncovered:
                log_prior_uncovered = log_prior_uncovered + lp
    if not torch.is_tensor(log_p):
        raise ValueError("the model has no sample sites")
    return (log_p - log_prior_uncovered) / runs - log_q, log_p / runs


def _summed_out(model_trace: Trace, guide_trace: Trace, num_samples: int,
                windowed: bool) -> Tensor:
    r"""Per draw, ``log p(x, z)`` with the enumerated sites summed out, as ``TraceEnum_ELBO``
    does: the sites that depend on none summed as they are, the others contracted
    (``pyro.ops.contract.contract_to_tensor``) down to the draws' plate, then scaled
    (``windowed``: one of several windows of a subsampled plate's rows; ``guide_trace``
    packed)."""
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    try:
        costs, log_factors, sum_dims, scale = _private.enumerated_log_factors(model_trace,
                                                                               guide_trace)
    except ValueError as error:  # (sites of different scales depend on an enumerated one)
        if "scale" not in str(error):
            raise
        raise ValueError(
            "an enumerated site couples sites of a subsampled plate with sites outside it "
            + ("(a discrete site outside the plate: its sum over every row does not split "
               "into windows of rows)" if windowed else "(TraceEnum_ELBO refuses it too)")
            + ": score this model with its whole data (subsample_size=None)") from error
    symbol = model_trace.plate_to_symbol[_SAMPLE_PLATE]
    for name, site in model_trace.nodes.items():
        if (site["type"] == "sample" and not site["is_observed"] and not _enumerated(site)
                and name not in guide_trace.nodes
                and not sum_dims.isdisjoint(site["packed"]["log_prob"]._pyro_dims)):
            raise ValueError(f"site {name!r} is neither sampled by the guide nor enumerated, "
                             "and depends on an enumerated site: its log weight is undefined")
    total = sum(_packed_per_draw(term, symbol, num_samples)
                for terms in costs.values() for term in terms)
    if log_factors:
        term = contract_to_tensor(log_factors, sum_dims, target_ordinal=frozenset({symbol}))
        total = total + scale * _packed_per_draw(term, symbol, num_samples)
    return total


def _packed_per_draw(term: Tensor, symbol: str, num_samples: int) -> Tensor:
    """A packed log density (its dims named by ``term._pyro_dims``) summed over every dim but
    the draws' ``symbol``: shape ``(S,)``."""
    dims = getattr(term, "_pyro_dims", "")
    if symbol not in dims:
        return torch.as_tensor(term).sum().expand(num_samples)
    keep = dims.index(symbol)
    other = tuple(d for d in range(term.dim()) if d != keep)
    return (term.sum(other) if other else term).expand(num_samples)


def _enumeration_dependent(model: Callable, guide_trace: Trace, model_trace: Trace,
                           args: tuple, kwargs: dict, num_samples: int, mpn: int) -> set[str]:
    """The ``pyro.deterministic`` sites of ``model_trace`` whose values depend on an enumerated
    site (they hold its whole support, so no value per draw), found as those whose shape
    differs in a run without enumeration; a warning names them."""
    sites = model_trace.nodes.values()
    if not any(site["type"] == "sample" and _enumerated(site) for site in sites) or not any(
            site["type"] == "sample" and site_is_deterministic(site) for site in sites):
        return set()
    with torch.random.fork_rng(devices=[]):  # (its prior draws leave the draws' stream be)
        plain = poutine.block(poutine.trace(poutine.replay(
            vectorize(model, num_samples, mpn), trace=guide_trace)).get_trace)(*args, **kwargs)
    dependent = {name for name, site in model_trace.nodes.items()
                 if site["type"] == "sample" and site_is_deterministic(site)
                 and name in plain.nodes and plain.nodes[name]["value"].shape
                 != site["value"].shape}
    if dependent:
        warnings.warn(f"the deterministic sites {sorted(dependent)} depend on enumerated "
                      "discrete sites, which are summed out: they have no value per draw and "
                      "are left out (pyro.infer.infer_discrete draws the discrete sites)",
                      stacklevel=_user_level())
    return dependent


def _sites_and_values(model_trace: Trace, num_samples: int, mpn: int, skip: set[str]
                      ) -> tuple[dict[str, Site], dict[str, Tensor]]:
    """Every sample site of the model but the enumerated ones, and the aligned values of the
    unobserved ones."""
    sites: dict[str, Site] = {}
    values: dict[str, Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or _enumerated(site) or name in skip:  # (summed out)
            continue
        frames = {f.dim: f.name for f in site["cond_indep_stack"]
                  if f.vectorized and f.name != _SAMPLE_PLATE}
        event_dim, value = len(site["fn"].event_shape), site["value"]
        if site_is_deterministic(site):
            values[name], event_dim = _align_deterministic(value, event_dim, num_samples, mpn,
                                                           name)
            sites[name] = Site(name, "deterministic", frames, max(event_dim, 0))
        elif site["is_observed"]:
            sites[name] = Site(name, "observed", frames, event_dim, observed=value)
        else:
            values[name] = align(value, event_dim, num_samples, mpn, name)
            sites[name] = Site(name, "latent", frames, event_dim)
    return sites, values


def in_chunks(run: Callable[[int, int], Any], total: int, chunk: int) -> tuple[list, int]:
    """The results of ``run(start, n)`` over ``range(total)`` in pieces of at most ``chunk``
    (a piece that runs out of memory is retried in halves), and the piece size that worked."""
    parts, start = [], 0
    while start < total:
        n = min(chunk, total - start)
        try:
            parts.append(run(start, n))
        except RuntimeError as error:
            message = str(error).lower()
            out_of_memory = isinstance(error, torch.OutOfMemoryError) or any(
                words in message for words in ("out of memory", "can't allocate memory"))
            if not out_of_memory or n == 1:
                raise
            chunk = max(1, n // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += n
    return parts, chunk


def draw(model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
         max_plate_nesting: int | None, chunk_size: int | None, keep_values: bool) -> Draws:
    """``num_samples`` guide draws scored by the model, in vectorized passes of at most
    ``chunk_size`` draws; ``values`` and ``sites`` are kept only with ``keep_values``. Call
    under :func:`torch.no_grad`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    mpn = (_private.guess_max_plate_nesting(model, guide, args, kwargs)
           if max_plate_nesting is None else int(max_plate_nesting))

    skips: list[set[str]] = []  # (found on the first chunk, the same for every chunk)

    def run(start: int, n: int):
        first, model_traces, runs, guide_trace = _traces(model, guide, args, kwargs, n, mpn)
        log_weights, log_joint = _log_weights(model_traces, runs, guide_trace, n, mpn)
        if not keep_values:
            return log_weights, log_joint, {}, {}
        if not skips:
            skips.append(_enumeration_dependent(model, guide_trace, first, args, kwargs, n,
                                                mpn))
        sites, values = _sites_and_values(first, n, mpn, skips[0])
        return log_weights, log_joint, values, sites

    chunk = num_samples if chunk_size is None else max(1, min(int(chunk_size), num_samples))
    parts, chunk = in_chunks(run, num_samples, chunk)
    log_weights = torch.cat([p[0] for p in parts])
    if (torch.isnan(log_weights) | torch.isposinf(log_weights)).any():
        raise ValueError("log importance weights contain NaN or +inf: the guide puts mass where "
                         "its own density or the model's is not finite")
    values = {name: torch.cat([p[2][name] for p in parts]) for name in parts[0][2]}
    return Draws(log_weights, torch.cat([p[1] for p in parts]), values, parts[0][3], mpn, chunk)


def log_importance_weights(model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
                           max_plate_nesting: int | None = None, chunk_size: int | None = None,
                           **kwargs: Any) -> Tensor:
    """Log importance weights :math:`\\log p(x, z_s) - \\log q(z_s)` of ``num_samples`` guide
    draws :math:`z_s \\sim q`, in one vectorized pass; shape ``(S,)``, on the guide's device.

    Arguments:
        model: the Pyro model; ``*args`` and ``**kwargs`` are passed to it and to the guide.
        guide: any Pyro guide for ``model``.
        num_samples: the number S of guide draws.
        max_plate_nesting: the plate dims of model and guide (None: guessed from one run).
        chunk_size: draws per vectorized pass (default all; halved where memory runs out).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import log_importance_weights
        >>> def model():  # no data: the prior is the exact posterior, so every log w = log p(x) = 0
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> log_importance_weights(model, model, num_samples=5).abs().max().item() < 1e-6
        True
    """
    with torch.no_grad():
        return draw(model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size,
                    keep_values=False).log_weights
