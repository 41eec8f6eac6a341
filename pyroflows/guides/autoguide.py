"""Autoguides whose posterior is a normalizing flow over the model's unconstrained latent
vector: :class:`AutoFlowGuide` and its family shorthands, its posterior
:class:`FlowPosterior`, its parameters in Pyro's param store and its step sizes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroModule
from pyro.optim.clipped_adam import ClippedAdam
from pyro.params.param_store import param_with_module_name
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform, biject_to

from .. import _legacy, _private, flows
from .._memo import Memoized
from ..distributions import StudentTBase
from ..transforms import ElementwiseAffine, TriangularAffine
from ..transforms.affine import FixedTriangularAffine
from . import best as _best
from . import landing
from . import laplace as _laplace

__all__ = ["AutoFlowGuide", "AutoPlanar", "AutoRadial", "AutoIAF", "FlowPosterior",
           "default_lr", "optim_args", "recommended_optimizer", "HeldClippedAdam",
           "sync_param_store"]

#: :func:`recommended_optimizer`'s default: the step sizes fall this many times over the run.
RECOMMENDED_DECAY = 50.0

#: Up to this latent size the affine layer is full rank by default and the Laplace start is
#: tried; above it, the D^2 parameters and the Hessian cost more than they help.
FULL_RANK_MAX_DIM = 256

#: The guide's modules whose parameters enter Pyro's param store.
_PARAM_MODULES = ("flow", "affine", "base")
#: The accepted values of ``AutoFlowGuide(base=...)``.
BASES = ("normal", "studentt")

_CUSTOM = flows.Family()


def _family_of(flow: str | Callable | None) -> flows.Family:
    """The family record of a guide's flow: its name's, or the defaults for a custom flow."""
    return flows.FAMILIES.get(flow, _CUSTOM) if isinstance(flow, str) else _CUSTOM


def _hide_from_prototype(msg: dict) -> bool:
    """Record only latent sample sites, and leave enumerated discrete sites to TraceEnum_ELBO."""
    if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
        return True
    infer = msg.get("infer") or {}
    return infer.get("enumerate") is not None and msg["fn"].support.is_discrete


class FlowPosterior(dist.TransformedDistribution):
    r"""The posterior of an :class:`AutoFlowGuide`: :math:`N(0, I)` pushed through the flow
    layers and the affine layer, with :meth:`log_prob_detached` for sticking the landing.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows as pf
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = FlowPosterior(base, [pf.transforms.ElementwiseAffine(2, scale=2.0)])
        >>> z = q.rsample((5,))
        >>> torch.allclose(q.log_prob_detached(z), q.log_prob(z))
        True
    """

    #: whether the ELBO's gradient sticks the landing here (set by the guide; :meth:`score_parts`)
    stick_the_landing: bool = False

    def expand(self, batch_shape, _instance=None) -> FlowPosterior:
        new = super().expand(batch_shape, _instance)
        new.stick_the_landing = self.stick_the_landing  # plates expand the site's distribution
        return new

    # An unbatched draw goes through the layers as a batch of one (Planar makes (D,) into
    # (1, D)) and is remembered, so that scoring it still hits the layers' caches. A draw with
    # autograd keeps its IAF layers' linearizations for its sticking-the-landing term
    # (landing.rsample_keeping).
    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        return landing.rsample_keeping(self, lambda: self._rsample(sample_shape))

    def _rsample(self, sample_shape: torch.Size | tuple) -> Tensor:
        if len(sample_shape) or len(self.batch_shape):
            return super().rsample(sample_shape)
        batched = super().rsample((1,))
        value = batched[0]
        self._unbatched = (value, value._version, batched)
        return value

    def linearizations(self, value: Tensor) -> list:
        """The IAF layers' linearizations kept by the draw ``value`` of :meth:`rsample` through
        this posterior's flow (empty for any other tensor)."""
        return landing.kept_linearizations(self, value)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        last = getattr(self, "_unbatched", None)
        if last is not None and value is last[0] and value._version == last[1]:
            return super().log_prob(last[2])[0]
        if value.dim() == 1:
            return super().log_prob(value.unsqueeze(0))[0]
        return super().log_prob(value)

    def score_parts(self, value: Tensor, *args: Any, **kwargs: Any) -> ScoreParts:
        r"""Pyro's parts of the ELBO's surrogate at a draw ``value``: with
        :attr:`stick_the_landing` (the guide's, the family's default), where ``value`` carries
        gradients, the entropy term is :math:`\log q_{\bar\phi}(z_\phi)`, the parameters
        detached (:mod:`pyroflows.guides.landing`): the sticking-the-landing gradient under
        any ELBO that reads it, ``Trace_ELBO`` included, with the same loss value. Else (no
        gradients, a ``torch.jit`` trace, or inside :class:`~pyroflows.guides.FlowELBO`, which
        makes the choice itself) Pyro's parts."""
        if not landing.sticks(self, value):
            return super().score_parts(value, *args, **kwargs)
        log_prob = self.log_prob(value)
        entropy = landing.path_entropy(self, value)
        if entropy is None:
            entropy = self.log_prob_detached(value)
        return ScoreParts(log_prob, 0, entropy)

    def log_prob_detached(self, value: Tensor) -> Tensor:
        r""":math:`\log q_{\bar\phi}(z)` with the transforms' parameters :math:`\bar\phi` cut
        from the graph, by the inverse of every layer (:func:`landing.log_prob_detached`)."""
        return landing.log_prob_detached(self.base_dist, self.transforms, value)


class AutoFlowGuide(Memoized, AutoContinuous):
    r"""A normalizing-flow guide over all latent sites of a Pyro model.

    As :class:`~pyro.infer.autoguide.AutoContinuous`, it maps every latent site to the real line
    with ``biject_to(site.support)`` and packs them into one vector :math:`u \in \mathbb{R}^D`;
    its posterior over :math:`u` is

    .. math:: u = \mu + L\, f_K \circ \dots \circ f_1(\varepsilon),
              \qquad \varepsilon \sim N(0, I_D),

    .. math:: \log q(u) = \log N(\varepsilon; 0, I) - \sum_k \log|\det J_{f_k}|
              - \textstyle\sum_i \log L_{ii},

    with flow layers :math:`f_k` and a learnable affine layer :math:`(\mu, L)` last,
    :math:`L` diagonal or lower triangular (``full_rank``). It starts at a Gaussian where the
    model's mass is: with ``laplace_init``, the Laplace approximation :math:`N(m, C C^T)`
    (:mod:`pyroflows.guides.laplace`) as a fixed last layer :math:`u = m + C v` under
    :math:`(\mu, L) = (0, I)`, where its ELBO beats the plain start's (:attr:`laplace_info`);
    else :math:`N(\text{init\_loc}, \mathrm{init\_scale}^2 I)`. The flow is built at the first
    call, on the device and in the dtype of the latent values, as a submodule; the param
    store's entries are its own tensors (:func:`sync_param_store`). Train with
    :class:`~pyroflows.guides.FlowELBO` (it skips a step with a non-finite loss or gradient; a
    plain ``Trace_ELBO``'s SVI applies it) and the recommended optimizer
    (:func:`recommended_optimizer`: the family's step sizes, decayed; :func:`optim_args`,
    :meth:`param_groups`). The latent vector's size is fixed at set-up: a call whose model
    arguments give a latent site another shape (more data rows for a per-row latent) raises a
    :class:`ValueError` naming the site and both shapes (the model runs once per new shape of
    the tensor arguments or new int argument to find out; other changes go unseen).

    Arguments:
        model: a Pyro model with continuous latent sites (discrete ones enumerated).
        flow: a family name of :data:`pyroflows.flows.FAMILIES`, or a callable
            ``dim -> Transform`` (a :class:`~torch.nn.Module` if it has parameters).
        num_layers: flow layers, default the family's ``num_layers``.
        hidden_dims: conditioner hidden sizes for the network families, default the family's
            ``hidden_dims`` rule (IAF, MAF, RealNVP: two layers of
            :math:`\max(64, \mathrm{round}(16\sqrt{D}))` units,
            :func:`pyroflows.flows.families.guide_hidden_dims`).
        init_loc_fn: per-site initialization; default the prior median.
        init_scale: the plain start's scale, default the family's ``init_scale``.
        full_rank: a lower-triangular :math:`L`; default when :math:`D \le`
            :data:`FULL_RANK_MAX_DIM` (diagonal fits funnels better: ``benchmarks/results/vi.md``).
        num_quantile_samples: draws behind :meth:`median` and :meth:`quantiles`.
        laplace_init: try the Laplace start first.
        stick_the_landing: sticking-the-landing gradients for this guide, default the
            family's: under ``Trace_ELBO`` through :meth:`FlowPosterior.score_parts`, under
            :class:`~pyroflows.guides.FlowELBO` its default.
        base: the distribution of :math:`\varepsilon`: ``"normal"``, :math:`N(0, I_D)`, or
            ``"studentt"``, independent Student t coordinates of unit variance whose degrees of
            freedom :math:`\nu_d > 2` are learned, one per coordinate, starting at 5
            (:class:`~pyroflows.distributions.StudentTBase`, submodule ``base``): tails that
            fall as :math:`|u|^{-\nu-1}`, which the affine and autoregressive-affine layers
            keep, for posteriors whose PSIS :math:`\hat k` a Gaussian base leaves above 0.7
            with the moments right (the VI report's verdict ``"tails too light"``; tail-adaptive
            flows: Jaini et al. 2020, Laszkiewicz et al. 2022; for VI, Liang et al. 2022). The
            start is then the Student t version of the Gaussian start, not the identity of it.
        flow_kwargs: passed to :func:`pyroflows.flows.build`.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> import pyroflows as pf
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(0.0, scale), obs=torch.tensor(0.5))
        >>> pyro.clear_param_store()
        >>> guide = pf.guides.AutoPlanar(model, num_layers=4)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> losses = [svi.step() for _ in range(5)]
        >>> guide.median()["scale"].shape
        torch.Size([])
        >>> guide.sample_posterior(num_samples=100)["scale"].shape
        torch.Size([100])
    """

    def __init__(
        self,
        model: Callable,
        flow: str | Callable[[int], Transform] = "iaf",
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        init_loc_fn: Callable = init_to_median,
        init_scale: float | None = None,
        full_rank: bool | None = None,
        num_quantile_samples: int = 10000,
        laplace_init: bool = True,
        stick_the_landing: bool | None = None,
        base: str = "normal",
        **flow_kwargs: Any,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        if isinstance(flow, str):
            if flow not in flows.FAMILIES:
                raise ValueError(
                    f"unknown flow {flow!r}: choose one of {sorted(flows.FAMILIES)} or pass a "
                    "callable dim -> Transform"
                )
            if num_layers is None:
                num_layers = flows.FAMILIES[flow].num_layers
        elif not callable(flow):
            raise TypeError(f"flow must be a family name or a callable dim -> Transform, got "
                            f"{type(flow).__name__}")
        family = _family_of(flow)
        if init_scale is None:
            init_scale = family.init_scale
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        if num_layers is not None and int(num_layers) < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        # self.model runs init_loc_fn at every unobserved site; the Laplace search conditions
        # every latent site, so it runs the model itself (a tuple: not a submodule)
        self._raw_model = (model,)
        self._flow_spec: str | Callable[[int], Transform] | None = flow
        self.flow_name = flow if isinstance(flow, str) else getattr(flow, "__name__", "custom")
        self.num_layers = num_layers
        self.hidden_dims = tuple(hidden_dims) if hidden_dims is not None else None
        self._init_scale = float(init_scale)
        self.full_rank = full_rank
        self.num_quantile_samples = int(num_quantile_samples)
        self._flow_kwargs = dict(flow_kwargs)
        self.laplace_init = bool(laplace_init)
        self.base_family = base
        if stick_the_landing is None:
            stick_the_landing = family.stick_the_landing
        self.stick_the_landing = bool(stick_the_landing)
        #: what the Laplace start found (``None`` before set-up): ``used``, ``reason``,
        #: ``search_start``, ``attempts`` and, after a search, the two ELBO estimates.
        self.laplace_info: dict | None = None
        self._plain_transforms: list[Transform] = []  # parameter-free, non-Module layers
        #: the start, the best state by the running ELBO estimate (:mod:`.best`), set at set-up
        self._best: _best.BestState | None = None
        #: what the last :meth:`keep_best` found: ``kept`` and the ``elbo`` of every state
        self.best_info: dict | None = None
        _private.register_load_state_dict_pre_hook(self, _laplace.match_laplace_layer)
        self.register_load_state_dict_post_hook(_restart_best)

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_raw_model"] = None  # as Pyro drops ``_model``: models are not pickled
        state["_best"] = None  # copies of the parameters; a loaded guide starts where it is
        return state

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self._data_keys = {_data_key(args, kwargs)}
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"{type(self).__name__}: latent site {name!r} is discrete ({support}). Flow "
                    "guides are continuous: enumerate it (infer={'enumerate': 'parallel'} or "
                    "pyro.infer.config_enumerate, then TraceEnum_ELBO), or block it from the "
                    "guide with poutine.block(model, hide=[...])."
                )
            try:
                shape = biject_to(support).inv(site["value"]).shape
            except NotImplementedError:
                raise ValueError(
                    f"{type(self).__name__}: latent site {name!r} has support {support}, which "
                    "has no bijection to real space; reparameterize it."
                ) from None
            self._unconstrained_shapes[name] = shape
            self._cond_indep_stacks[name] = site["cond_indep_stack"]
        self.latent_dim = sum(math.prod(s) for s in self._unconstrained_shapes.values())
        if self.latent_dim == 0:
            raise ValueError(
                f"{type(self).__name__}: the model has no continuous latent sample sites (every "
                "sample site is observed, a subsample, or an enumerated discrete site), so there "
                "is nothing for a guide to fit; use an empty guide."
            )
        self._build_flow(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        self._ready(args, kwargs)
        return super().forward(*args, **kwargs)

    def _ready(self, args: tuple, kwargs: dict) -> None:
        """Set up at the first call; after, for model arguments of new shapes (:func:`_data_key`),
        run the model once and raise if a latent site's shape changed: the flow is sized to the
        set-up's latent vector, and a new set-up would drop what it learnt."""
        if self.prototype_trace is None:
            return self._setup_prototype(*args, **kwargs)
        known, model = self.__dict__.setdefault("_data_keys", set()), (self._raw_model or [None])[0]
        if not (args or kwargs) or model is None or (key := _data_key(args, kwargs)) in known:
            return None  # (an unpickled guide has no model to ask)
        with torch.no_grad():
            trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            new = trace.nodes.get(name, {}).get("value")
            if new is not None and new.shape != site["value"].shape:
                raise ValueError(
                    f"{type(self).__name__}: latent site {name!r} has shape {tuple(new.shape)} "
                    f"for these model arguments but {tuple(site['value'].shape)} where the guide "
                    "was set up (the data size changed?); a flow guide's latent vector has a "
                    "fixed size: build a new guide for data of this size.")
        return known.add(key)

    def _build_flow(self, args: tuple, kwargs: dict) -> None:
        loc = self._init_loc().detach()
        dim = self.latent_dim
        spec = self._flow_spec
        if callable(spec):
            flow = spec(dim)
            if not isinstance(flow, Transform):
                raise TypeError(f"the flow callable must return a torch Transform, got "
                                f"{type(flow).__name__}")
        elif self.num_layers == 0:
            flow = None
        else:
            hidden_dims = self.hidden_dims
            rule = flows.FAMILIES[spec].hidden_dims
            if hidden_dims is None and rule is not None:
                hidden_dims = tuple(rule(dim))
            flow = flows.build(spec, dim, num_layers=self.num_layers, hidden_dims=hidden_dims,
                               affine=False, **self._flow_kwargs)
        if isinstance(flow, nn.Module):
            self.flow = flow.to(device=loc.device, dtype=loc.dtype)
            if isinstance(spec, str):  # in the latents' dtype: the identity to its rounding
                _start_at_identity(self.flow)
        else:
            self.flow = None
            if flow is not None:
                self._plain_transforms = list(flow.parts) if isinstance(
                    flow, ComposeTransform) else [flow]
        full_rank = dim <= FULL_RANK_MAX_DIM if self.full_rank is None else self.full_rank
        layer = TriangularAffine if full_rank else ElementwiseAffine
        affine = layer(dim, scale=self._init_scale).to(loc.device, loc.dtype)
        with torch.no_grad():
            affine.loc.copy_(loc)  # after the cast, so float64 inits keep full precision
            affine.log_scale.fill_(math.log(self._init_scale))
        start = _stored_laplace(self, dim)
        if start is not None:  # a saved guide's store: its start, not a new search's
            self.laplace_info = _laplace.laplace_record(True, "restored from the param store")
        elif self.laplace_init:
            start = self._laplace_start(loc, args, kwargs)
        else:
            self.laplace_info = _laplace.laplace_record(False, "laplace_init=False")
        if start is not None:
            # whitened coordinates: the fixed layer maps them to the Laplace Gaussian, the
            # learnable affine layer starts at the identity on top of it
            self.laplace = FixedTriangularAffine(*start).to(loc.device, loc.dtype)
            affine = layer(dim).to(loc.device, loc.dtype)
        self.affine = affine
        if self.base_family == "studentt":
            self.base = StudentTBase(dim).to(loc.device, loc.dtype)
        self._flow_spec = None  # built; a lambda here would stop the guide from pickling
        sync_param_store(self, _PARAM_MODULES, at_setup=True)
        store_laplace(self)
        self._best = _best.BestState(self.named_parameters())

    def _laplace_start(self, loc: Tensor, args: tuple, kwargs: dict
                       ) -> tuple[Tensor, Tensor] | None:
        """The Laplace approximation ``(mode, chol(H^-1))`` to start from, or ``None``; sets
        :attr:`laplace_info`."""
        if loc.numel() > FULL_RANK_MAX_DIM:
            self.laplace_info = _laplace.laplace_record(
                False, f"the latent size {loc.numel()} is above FULL_RANK_MAX_DIM: its "
                "Hessian would cost more than it helps")
            return None
        density = _laplace.LogDensity(self._raw_model[0], self._unpack_latent, args, kwargs)
        start, self.laplace_info = _laplace.laplace_approximation(
            density, loc, self._init_scale, lambda: self._prior_draw(args, kwargs))
        return start

    @torch.no_grad()
    def _prior_draw(self, args: tuple, kwargs: dict) -> Tensor:
        """One draw of the model's prior (its latent sites unconditioned) as an unconstrained
        latent vector (D,), in the guide's layout."""
        trace = poutine.block(poutine.trace(self._raw_model[0]).get_trace)(*args, **kwargs)
        parts = []
        for site, _, _, shape, _ in self._latent_layout():
            value = trace.nodes[site["name"]]["value"]
            parts.append(biject_to(site["fn"].support).inv(value).reshape(math.prod(shape)))
        return torch.cat(parts)

    def _unpack_latent(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
        """``(site, unconstrained value)`` of every latent site as views into ``latent``
        (..., D), as :meth:`AutoContinuous._unpack_latent` yields them, from the memoized
        layout."""
        if latent.shape[-1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__}: a latent vector of size {self.latent_dim} "
                             f"was expected, got shape {tuple(latent.shape)}")
        batch_shape = tuple(latent.shape[:-1])
        for site, start, stop, shape, event_dim in self._latent_layout():
            # broadcast (shape) with (batch_shape + (1,) * event_dim), as Pyro does
            lead = batch_shape + (1,) * event_dim
            width = max(len(shape), len(lead))
            full = []
            for a, b in zip((1,) * (width - len(shape)) + shape,
                            (1,) * (width - len(lead)) + lead, strict=True):
                if a != b and a != 1 and b != 1:
                    raise ValueError(f"{type(self).__name__}: site {site['name']!r} of shape "
                                     f"{shape} does not fit a latent batch {batch_shape}")
                full.append(a if b == 1 else b)
            yield site, latent[..., start:stop].view(full)

    def _latent_layout(self) -> list[tuple[dict, int, int, tuple, int]]:
        """``(site, start, stop, unconstrained shape, event dim)`` of every latent site, kept
        while the prototype trace is the same object."""
        return self.memo("latent_layout", self.prototype_trace, self._make_latent_layout)

    def _make_latent_layout(self) -> list[tuple[dict, int, int, tuple, int]]:
        layout, pos = [], 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = tuple(self._unconstrained_shapes[name])
            size = math.prod(shape)
            event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
            layout.append((site, pos, pos + size, shape, event_dim))
            pos += size
        return layout

    @property
    def _subsampled_latents(self) -> bool:
        """Whether a latent site sits in a subsampled plate."""
        return any(frame.vectorized and frame.full_size is not None
                   and frame.full_size != frame.size
                   for stack in self._cond_indep_stacks.values() for frame in stack)

    def get_base_dist(self) -> dist.TorchDistribution:
        learned = self._modules.get("base")
        if learned is not None:  # a new distribution of the current degrees of freedom
            return learned()
        # kept between calls (distributions are not changed in place); the key follows .to()
        loc = self._modules["affine"].loc
        return self.memo("base_dist", (loc.shape, loc.dtype, loc.device),
                         lambda: dist.Normal(torch.zeros_like(loc.detach()),
                                             torch.ones_like(loc.detach())).to_event(1))

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowPosterior:
        """The guide's :class:`FlowPosterior` over the unconstrained latent vector."""
        if self.prototype_trace is None:  # (forward checked the arguments)
            self._setup_prototype(*args, **kwargs)
        return self._posterior(*self._posterior_parts())

    def _posterior_parts(self) -> tuple[dist.TorchDistribution, list[Transform]]:
        """The posterior's base distribution and transforms; inside the guide's active Pyro
        context, with the param statements PyroModule's attribute access would make."""
        registered = (bool(self._pyro_context.active)
                      and sync_param_store(self, _PARAM_MODULES, register=True))
        return self.get_base_dist(), self._transforms(registered)

    def _posterior(self, base: dist.TorchDistribution, transforms: list) -> FlowPosterior:
        posterior = FlowPosterior(base, transforms)
        posterior.stick_the_landing = self.stick_the_landing
        return posterior

    def _transforms(self, registered: bool = False) -> list[Transform]:
        if registered:  # the param statements are made
            flow, affine = self._modules.get("flow"), self._modules["affine"]
        else:
            flow = self.flow  # in a Pyro context this registers the parameters (pyro.module)
            affine = self.affine  # the same
        laplace = self._modules.get("laplace")
        if not self._plain_transforms and (flow is None or isinstance(flow, flows.FlowStack)):
            return [self._posterior_stack(flow, affine, laplace)]
        parts: list[Transform] = []
        if isinstance(flow, flows.FlowStack):
            parts.append(flow)  # one transform: its fused kernels and one stack-level cache
        elif isinstance(flow, ComposeTransform):
            parts.extend(flow.parts)
        elif flow is not None:
            parts.append(flow)
        parts.extend(self._plain_transforms)
        parts.append(affine)
        if laplace is not None:
            parts.append(laplace)
        return parts

    def _posterior_stack(self, flow: flows.FlowStack | None, affine: nn.Module,
                         laplace: nn.Module | None) -> flows.FlowStack:
        """The flow, affine and Laplace layers as one :class:`~pyroflows.flows.FlowStack` (one
        validation, cache and log-det sum per call), kept while the modules are the same; not
        a submodule, so ``state_dict`` is unchanged."""
        fused = True if flow is None else flow.fused

        def make() -> flows.FlowStack:
            parts = [*(flow.parts if flow is not None else []), affine]
            if laplace is not None:
                parts.append(laplace)
            stack = flows.FlowStack(parts,
                                    compile=getattr(flow, "compile_backend", None) or False)
            stack.fused = fused
            return stack

        return self.memo("posterior_stack", (flow, affine, laplace, fused), make)

    def param_groups(self, lr: float | None = None, flow_lr: float | None = None) -> list[dict]:
        """Parameter groups for a ``torch.optim`` optimizer: the affine layer (and a learned
        base's degrees of freedom) at ``lr``, the flow layers at ``flow_lr``, by default
        :func:`default_lr`. Call the guide first."""
        if self.prototype_trace is None:
            raise RuntimeError("call the guide once (with the model's arguments) first")
        default, default_flow = default_lr(self)
        learned = self._modules.get("base")
        groups = [{"params": [*self._modules["affine"].parameters(),
                              *(learned.parameters() if learned is not None else ())],
                   "lr": default if lr is None else lr}]
        flow = self._modules.get("flow")
        if flow is not None:
            groups.append({"params": list(flow.parameters()),
                           "lr": default_flow if flow_lr is None else flow_lr})
        return groups

    def _best_state(self) -> _best.BestState:
        """The guide's :class:`~pyroflows.guides.best.BestState`, started from the current
        parameters where it has none (an unpickled guide)."""
        if self._best is None:
            self._best = _best.BestState(self.named_parameters())
        return self._best

    def record_loss(self, loss: float | Tensor) -> None:
        """Record one training step's loss (:math:`-\\widehat{\\mathrm{ELBO}}`) for the
        running estimate behind :meth:`keep_best` (:mod:`pyroflows.guides.best`).
        :class:`~pyroflows.guides.FlowELBO` records every finite, untempered step itself; with
        another ELBO, call ``guide.record_loss(svi.step(...))``. Before set-up it does nothing.
        """
        if self.prototype_trace is None:
            return
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        self._best_state().record(value, self.named_parameters())

    def keep_best(self, *args: Any, num_draws: int = _best.BEST_DRAWS,
                  **kwargs: Any) -> dict[str, Any]:
        r"""After training: keep the best of the guide's start, its best state by the running
        ELBO estimate (where steps were recorded) and its current state, by the ELBO estimate
        :math:`\frac1S \sum_s \log p(x, u_s) - \log q(u_s)` of each on the same ``num_draws``
        base draws :math:`\varepsilon_s` (a fixed seed; the global random state is kept).
        The model runs with ``args`` and ``kwargs``, the model's arguments, vectorized over
        the draws where it broadcasts. A state whose draws give a non-finite density scores
        :math:`-\infty`, so a diverged fit falls back to its last good state. The state is
        copied into the parameters in place (optimizers and the param store keep their
        tensors; Adam's moments are not reset). Returns and sets :attr:`best_info`:
        ``kept`` (``"start"``, ``"best tracked"`` or ``"last"``), ``elbo`` (each state's
        estimate), ``steps`` (recorded steps) and ``num_draws``.

        The rule is :mod:`pyroflows.guides.best`'s: the running estimate only nominates a
        candidate, the common-draws estimate decides, and the start is always a candidate.

        Example:
            >>> import pyro, pyro.distributions as dist, pyroflows as pf
            >>> def model():
            ...     pyro.sample("z", dist.Normal(1.0, 2.0))
            >>> guide = pf.guides.AutoIAF(model, hidden_dims=(8,))
            >>> elbo = pf.guides.FlowELBO(num_particles=4, vectorize_particles=True)
            >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
            >>> losses = [svi.step() for _ in range(60)]
            >>> guide.keep_best()["kept"] in ("start", "best tracked", "last")
            True
        """
        self._ready(args, kwargs)
        if int(num_draws) < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        if self._raw_model is None:
            raise ValueError(
                f"{type(self).__name__}.keep_best scores states under the model, which an "
                "unpickled guide no longer has (pickling drops it, as it drops a Pyro "
                "autoguide's): build the guide for the model again and load this one's "
                "state_dict into it")
        tracker = self._best_state()
        loc = self._modules["affine"].loc
        density = _laplace.LogDensity(self._raw_model[0], self._unpack_latent, args, kwargs)
        candidates = [("start", tracker.start), ("best tracked", tracker.best),
                      ("last", _best.snapshot(self.named_parameters()))]
        cuda = [loc.device.index or 0] if loc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), \
                pyro.validation_enabled(False):
            kept, scores = _best.choose(candidates, self.named_parameters,
                                        lambda: self._log_weights_on(int(num_draws), density))
        self.best_info = {"kept": kept, "elbo": scores, "steps": tracker.steps,
                          "num_draws": int(num_draws)}
        return self.best_info

    def _log_weights_on(self, num_draws: int, density: _laplace.LogDensity) -> Tensor | None:
        """The log weights :math:`\\log p(x, u_s) - \\log q(u_s)` of the current parameters
        on ``num_draws`` base draws made from seed 0 (the same underlying random numbers for
        every state: common random numbers, also for a learned base); ``None`` where a draw
        or its density is not finite."""
        base = self.get_base_dist()
        torch.manual_seed(0)  # (inside keep_best's fork_rng: the global state is kept)
        eps = base.sample((num_draws,))
        transform = ComposeTransform(self._transforms())
        latent = transform(eps)
        log_q = base.log_prob(eps) - transform.log_abs_det_jacobian(eps, latent)
        log_p = density.values(latent)
        if not bool(torch.isfinite(latent).all() & torch.isfinite(log_q).all()
                    & torch.isfinite(log_p).all()):
            return None
        return log_p - log_q

    @torch.no_grad()
    def _draw_latent(self, num_samples: int, seed: int | None = None) -> Tensor:
        """``num_samples`` unconstrained latent draws, shape (num_samples, D)."""
        loc = self._modules["affine"].loc
        gen = None
        if seed is not None:
            gen = torch.Generator(device=loc.device).manual_seed(seed)
        x = torch.randn(num_samples, self.latent_dim, generator=gen, device=loc.device,
                        dtype=loc.dtype)
        for t in self._transforms():
            x = t(x)
        return x

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        """Split draws of shape (n, D) into constrained site values of shape (n, *site)."""
        n = latent.shape[0]
        out = {}
        for site, start, stop, shape, _ in self._latent_layout():
            value = latent[:, start:stop].reshape(n, *shape)
            out[site["name"]] = biject_to(site["fn"].support)(value)
        return out

    def sample_posterior(self, *args: Any, num_samples: int = 1000,
                         **kwargs: Any) -> dict[str, Tensor]:
        """``num_samples`` posterior draws of every latent site on its constrained scale, each
        ``(num_samples, *site_shape)``; the model's arguments are needed only before set-up."""
        self._ready(args, kwargs)
        return self._constrain(self._draw_latent(int(num_samples)))

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any,
                  **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site, each ``(len(quantiles), *site_shape)``:
        of ``num_quantile_samples`` unconstrained draws (a fixed seed), mapped by ``biject_to``
        (marginal quantiles for elementwise supports, valid points for joint ones)."""
        self._ready(args, kwargs)
        draws = self._draw_latent(self.num_quantile_samples, seed=0)
        q = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device).reshape(-1)
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError(f"quantiles must lie in [0, 1], got {q.tolist()}")
        return self._constrain(_quantiles(draws, q))

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior median of every latent site (as :meth:`quantiles`)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}


def _restart_best(guide: AutoFlowGuide, incompatible: Any) -> None:
    """Load-state-dict post-hook: the loaded state is the guide's new start (and the param
    store's copy of its Laplace layer, :func:`store_laplace`, the loaded one)."""
    if guide.prototype_trace is not None:
        guide._best = _best.BestState(guide.named_parameters())
        store_laplace(guide)


def _store_in_use(guide: PyroModule) -> bool:
    """Whether ``guide``'s parameters live in Pyro's global param store under its name."""
    return not pyro.settings.get("module_local_params") and bool(guide._pyro_context.used)


def _laplace_names(guide: PyroModule) -> tuple[str, str]:
    prefix = guide._pyro_get_fullname("laplace")
    return param_with_module_name(prefix, "loc"), param_with_module_name(prefix, "scale_tril")


def store_laplace(guide: AutoFlowGuide) -> None:
    """Put copies of the guide's fixed Laplace layer (``loc``, ``scale_tril``; none: remove
    them) into the param store beside its parameters, so a store saved with
    ``pyro.get_param_store().save`` rebuilds the same guide (:func:`_stored_laplace`): the
    learned layers mean something only on top of it. Copies, never registered by a ``param``
    statement, so no optimizer sees them."""
    if not _store_in_use(guide):
        return
    store, layer = pyro.get_param_store(), guide._modules.get("laplace")
    for name, value in zip(_laplace_names(guide), ("loc", "scale_tril"), strict=True):
        if name in store:
            del store[name]
        if layer is not None:
            store[name] = getattr(layer, value).detach().clone()


def _stored_laplace(guide: AutoFlowGuide, dim: int) -> tuple[Tensor, Tensor] | None:
    """The Laplace start ``(mode, chol)`` the param store holds for this guide, beside its
    learned affine layer, for a latent vector of size ``dim`` (a saved store, loaded); else
    ``None`` (a store without one: the guide searches as a new one does)."""
    if not _store_in_use(guide):
        return None
    store = pyro.get_param_store()
    affine = param_with_module_name(guide._pyro_get_fullname("affine"), "")
    loc, scale_tril = _laplace_names(guide)
    if loc not in store or scale_tril not in store or not any(
            name.startswith(affine) for name in store.keys()):
        return None
    start = (store[loc].detach().clone(), store[scale_tril].detach().clone())
    if start[0].shape != (dim,) or start[1].shape != (dim, dim):
        return None  # another guide's: the shapes say so
    return start


def _start_at_identity(flow: nn.Module) -> None:
    """Make every layer of a family's stack that can be made the identity (``reset_to_identity``:
    planar, radial) the identity, so the flow leaves the guide's start as it is; the network
    families (IAF, MAF, RealNVP) start at the identity by their zero output layers."""
    for module in flow.modules():
        reset = getattr(module, "reset_to_identity", None)
        if callable(reset):
            reset()


def _data_key(args: tuple, kwargs: dict) -> tuple:
    """What sets a model's plate sizes, at a cheap look: its tensors' shapes and its ints."""
    def one(a: Any) -> Any:
        return a.shape if isinstance(a, Tensor) else a if type(a) is int else None
    return (*map(one, args), *((name, one(a)) for name, a in kwargs.items()))


def _quantiles(draws: Tensor, q: Tensor) -> Tensor:
    """Columnwise quantiles of ``draws`` (n, D) with linear interpolation (numpy's default);
    ``torch.quantile`` refuses inputs of more than 2**24 elements."""
    ordered = draws.sort(dim=0).values
    pos = q * (draws.shape[0] - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=draws.shape[0] - 1)
    frac = (pos - lo.to(pos.dtype)).unsqueeze(-1)
    return ordered[lo] + frac * (ordered[hi] - ordered[lo])


class AutoPlanar(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` planar layers (seed eq. 28-29).

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> guide = pf.guides.AutoPlanar(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
        >>> guide()["z"].shape
        torch.Size([])
    """

    def __init__(self, model: Callable, num_layers: int = 16, **kwargs: Any) -> None:
        super().__init__(model, flow="planar", num_layers=num_layers, **kwargs)


class AutoRadial(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` radial layers.

    Example:
        >>> import pyroflows as pf
        >>> guide = pf.guides.AutoRadial(model=lambda: None, num_layers=4)
        >>> guide.flow_name, guide.num_layers
        ('radial', 4)
    """

    def __init__(self, model: Callable, num_layers: int = 16, **kwargs: Any) -> None:
        super().__init__(model, flow="radial", num_layers=num_layers, **kwargs)


class AutoIAF(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` inverse autoregressive layers (permuted
    between layers): one parallel pass samples and scores. Pass ``full_rank=False`` for
    funnel-like posteriors.

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> guide = pf.guides.AutoIAF(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)),
        ...                           hidden_dims=(8,))
        >>> guide()["z"].shape
        torch.Size([])
    """

    def __init__(self, model: Callable, num_layers: int = 4,
                 hidden_dims: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(model, flow="iaf", num_layers=num_layers, hidden_dims=hidden_dims,
                         **kwargs)


def sync_param_store(owner: PyroModule, names: Sequence[str], at_setup: bool = False,
                     register: bool = False) -> bool:
    """Make the param store's entries for the parameters of ``owner``'s submodules ``names``
    the modules' own tensors, which ``pyro.module`` does not after ``torch.load`` or a store's
    ``set_state`` (at set-up, first convert old layouts and copy matching entries in). With
    ``register``, in ``owner``'s active Pyro context, also make ``pyro.module``'s statements
    in the same walk; returns whether it did (not for module-local parameters or a
    ``PyroModule`` submodule)."""
    if pyro.settings.get("module_local_params") or not owner._pyro_context.used:
        return False  # no global param store in use, or no Pyro name known yet
    register = register and bool(owner._pyro_context.active) and not any(
        isinstance(owner._modules.get(name), PyroModule) for name in names)
    store = pyro.get_param_store()
    for name in names:
        module = owner._modules.get(name)
        if module is None:
            continue
        prefix = owner._pyro_get_fullname(name)
        if at_setup:
            if isinstance(module, flows.FlowStack):
                _legacy.stack_per_layer_entries(store, prefix, module)
            _legacy.pack_separate_entries_in_store(store, prefix, module)
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                if register and module.training:  # what pyro.module says of it
                    warnings.warn(f"{pname} was not registered in the param store "
                                  "because requires_grad=False. You can silence this "
                                  "warning by calling my_module.train(False)", stacklevel=3)
                continue
            full = param_with_module_name(prefix, pname)
            if full in store:
                old = store[full]
                if old is not p:
                    if at_setup and old.shape == p.shape:
                        with torch.no_grad():
                            p.copy_(old.detach())
                    del store[full]
                    store[full] = p
            else:
                store[full] = p
            if register:
                pyro.param(full, p)
    return register


#: Up to this latent size the affine layer on a Laplace start steps at the family's ``lr``;
#: above it at ``lr * AFFINE_LR_DIM / D`` (:func:`default_lr`).
AFFINE_LR_DIM = 10


def default_lr(flow: str | AutoFlowGuide | None = None) -> tuple[float, float]:
    r"""The Adam step sizes ``(lr, flow_lr)`` of a flow guide, from the family's ``lr`` (a name,
    or a guide's ``flow_name``; see :class:`~pyroflows.flows.Family`): ``lr`` for the affine
    layer and any parameter not a flow layer's, ``flow_lr`` for the flow layers.

    For a set-up guide on the Laplace start of a latent vector of size
    :math:`D >` :data:`AFFINE_LR_DIM`, the affine layer's ``lr`` is the family's times
    ``AFFINE_LR_DIM / D``. That layer starts at the identity on top of an approximation that
    is often near the optimum, where Adam still moves each of its :math:`D(D+1)/2` entries by
    about ``lr`` a step whatever the gradient's size (sticking the landing's gradient falls to
    rounding there, and Adam divides it by its own scale), so the KL those moves cost grows as
    :math:`D^2 \mathrm{lr}^2`: on Gaussian posteriors of :math:`D = 50` and 100 the family's
    0.05 took an exact start to a KL of 0.02-0.5 nats in 300 decayed steps, ``0.5 / D`` kept it
    below 0.001 (``benchmarks/results/vi-gaussians.md``). A plain start, far from the
    optimum, keeps the family's ``lr``.

    Example:
        >>> default_lr("planar"), default_lr("iaf")
        ((0.05, 0.01), (0.05, 0.003))
    """
    name = flow.flow_name if isinstance(flow, AutoFlowGuide) else flow
    lr, flow_lr = _family_of(name).lr
    if isinstance(flow, AutoFlowGuide) and flow._modules.get("laplace") is not None:
        lr = lr * min(1.0, AFFINE_LR_DIM / flow.latent_dim)
    return lr, flow_lr


def optim_args(flow: str | AutoFlowGuide | None = None, lr: float | None = None,
               flow_lr: float | None = None, **kwargs: Any) -> Callable[[str], dict]:
    """Per-parameter arguments for a :mod:`pyro.optim` optimizer: ``lr`` for the affine layer
    (and any other guide's parameters), ``flow_lr`` for the flow layers, both by default
    :func:`default_lr` of ``flow``; ``kwargs`` go to the optimizer (e.g. ``ClippedAdam``'s
    ``lrd=0.02 ** (1 / num_steps)``, the 50-fold decay ``benchmarks/vi.py`` measures).

    Example:
        >>> import pyro
        >>> optimizer = pyro.optim.Adam(optim_args("iaf"))
        >>> optim_args("iaf")("AutoIAF.flow.0.conditioner.flat_parameters")["lr"]
        0.003
        >>> optim_args("iaf")("AutoIAF.affine.packed")["lr"]
        0.05
    """
    def args(name: str) -> dict:  # (at the first step: the guide is set up by then)
        default, default_flow = default_lr(flow)
        if ".flow." in f".{name}":
            return {"lr": default_flow if flow_lr is None else flow_lr, **kwargs}
        return {"lr": default if lr is None else lr, **kwargs}

    return args


class HeldClippedAdam(ClippedAdam):
    """Pyro's :class:`~pyro.optim.clipped_adam.ClippedAdam` whose step sizes stay at their
    start for each parameter group's first ``hold`` steps and then fall by the factor ``lrd`` a
    step (``hold=0``: ``ClippedAdam`` itself). The count left is the group's ``"hold"``, so it
    travels with the optimizer's ``state_dict``."""

    def __init__(self, params: Any, hold: int = 0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("hold", int(hold))

    def step(self, closure: Callable | None = None) -> Any:
        # .get: a state_dict of a plain ClippedAdam, loaded into this one, has no count
        held = [group for group in self.param_groups if group.get("hold", 0) > 0]
        lrds = [group["lrd"] for group in held]
        for group in held:
            group["hold"] -= 1
            group["lrd"] = 1.0
        try:
            return super().step(closure)
        finally:
            for group, lrd in zip(held, lrds, strict=True):
                group["lrd"] = lrd


def recommended_optimizer(guide: str | AutoGuide, num_steps: int, lr: float | None = None,
                          flow_lr: float | None = None, decay: float = RECOMMENDED_DECAY,
                          clip_norm: float = 10.0, hold_steps: int = 0) -> pyro.optim.PyroOptim:
    r"""The recommended optimizer of a flow guide trained for ``num_steps`` SVI steps: Pyro's
    :class:`~pyro.optim.ClippedAdam` at the family's per-layer step sizes (:func:`optim_args`:
    ``lr`` for the affine layer and any other guide parameter, ``flow_lr`` for the flow
    layers, by default :func:`default_lr`), each falling exponentially by the factor
    ``decay`` over the run,

    .. math:: \eta_t = \eta_0\, \mathrm{decay}^{-t / \mathrm{num\_steps}},

    (``lrd`` :math:`= \mathrm{decay}^{-1/\mathrm{num\_steps}}`, applied at every step, so
    nothing else is to be called in the loop), and every gradient entry clipped to
    :math:`[-\mathrm{clip\_norm}, \mathrm{clip\_norm}]`. This is the recipe
    ``benchmarks/vi.py`` measures (50-fold decay, the default): a step size held constant to
    the last step leaves the last state scattered by Adam's noise (``benchmarks/results/
    vi-plain.md``). Annealing for multimodal posteriors is the ELBO's part
    (:class:`~pyroflows.guides.FlowELBO`'s ``anneal_steps``); with it, pass the same number as
    ``hold_steps``: the step sizes then stay at their start while the energy is tempered and
    fall by ``decay`` over the remaining steps,

    .. math:: \eta_t = \eta_0\, \mathrm{decay}^{-\max(0,\, t - h) / (\mathrm{num\_steps} - h)},

    (:class:`HeldClippedAdam`): a decay from the first step leaves too little step to settle
    once the tempering ends (measured: ``benchmarks/results/vi-schedules.md``).

    Arguments:
        guide: a flow guide (or a family name, for its step sizes; another guide's
            parameters, such as ``AutoNormal``'s, all get ``lr``).
        num_steps: the number of ``svi.step`` calls the decay is spread over (>= 1).
        lr, flow_lr: the initial step sizes (``None``: the family's).
        decay: the total factor by which the step sizes fall (>= 1; 1: constant).
        clip_norm: the bound on each gradient entry (> 0).
        hold_steps: steps at the initial step sizes before the decay starts (0 <= hold_steps <
            num_steps; FlowELBO's ``anneal_steps``, where it anneals).

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> from pyro.infer import SVI
        >>> def model():
        ...     pyro.sample("z", dist.Normal(1.0, 2.0))
        >>> pyro.clear_param_store()
        >>> guide = pf.guides.AutoIAF(model, hidden_dims=(8,))
        >>> optimizer = pf.guides.recommended_optimizer(guide, num_steps=200)
        >>> svi = SVI(model, guide, optimizer, pf.guides.FlowELBO(num_particles=4))
        >>> losses = [svi.step() for _ in range(200)]
        >>> optimizer.pt_optim_args("AutoIAF.affine.packed")["lr"]     # the first step's
        0.05
        >>> affine = optimizer.optim_objs[guide.affine.packed]
        >>> round(affine.param_groups[0]["lr"], 6)                     # after 200 steps: 50x less
        0.001
    """
    if int(num_steps) != num_steps or int(num_steps) < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 1):
        raise ValueError(f"decay must be a finite float >= 1 (the total factor by which the "
                         f"step sizes fall), got {decay!r}")
    if not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive float, got {clip_norm!r}")
    for name, value in (("lr", lr), ("flow_lr", flow_lr)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive float, got {value!r}")
    if int(hold_steps) != hold_steps or not 0 <= int(hold_steps) < int(num_steps):
        raise ValueError(f"hold_steps must be an integer in [0, num_steps), got {hold_steps!r}")
    lrd = float(decay) ** (-1.0 / (int(num_steps) - int(hold_steps)))
    return pyro.optim.PyroOptim(HeldClippedAdam, optim_args(
        guide, lr=lr, flow_lr=flow_lr, lrd=lrd, clip_norm=float(clip_norm),
        hold=int(hold_steps)))
