"""Flow guides for SVI: autoguides whose posterior is a normalizing flow over the latent vector."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import sum_rightmost
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape, warn_if_nan
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform, biject_to
from torch.distributions.transforms import IndependentTransform

from . import _legacy, _private, flows
from .transforms import ElementwiseAffine, FlowTransform, TriangularAffine
from .transforms.affine import FixedTriangularAffine

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
    "FULL_RANK_MAX_DIM",
    "LAPLACE_MAX_ITER",
    "LAPLACE_ELBO_DRAWS",
    "STL_JACOBIAN_MAX_DIM",
    "STL_JACOBIAN_MAX_ROWS",
    "STL_BATCHED_BACKWARD_MIN_ROWS",
]

#: Up to this latent size the guide's last layer is full rank (:class:`TriangularAffine`) unless
#: ``full_rank`` says otherwise; above it, its D^2 parameters cost more than they help.
FULL_RANK_MAX_DIM = 256

#: L-BFGS iterations of the MAP search behind ``laplace_init`` (latent sizes up to
#: :data:`FULL_RANK_MAX_DIM`).
LAPLACE_MAX_ITER = 500
#: Draws behind the ELBO comparison that decides whether the Laplace start is kept (one
#: vectorized run of the model for all of them where it broadcasts over leading dims).
LAPLACE_ELBO_DRAWS = 64

#: Up to this latent size, sticking-the-landing gradients of a flow guide's direct draw (see
#: :class:`FlowELBO`) take :math:`\nabla_z \log q` from the Jacobian of the draw (one batched
#: backward pass over D copies of the particles, a D x D solve per particle) instead of running
#: the flow's inverse (D sequential passes per IAF layer, a root solve per planar layer); above
#: it, or beyond :data:`STL_JACOBIAN_MAX_ROWS` particles x D rows (memory), the inverse. The
#: traced path (``direct=False``, handlers around the step, latents in subsampled plates) takes
#: the Jacobian as well, from the flow stack's cache of the draw. Measured
#: (default AutoIAF, 32 particles, one thread, ms a step, Jacobian / inverse): D = 32: 25 / 58,
#: 64: 106 / 191, 128: 676 / 1040, 256: 1750 / 2467.
STL_JACOBIAN_MAX_DIM = 256
#: The most rows (particles x D) the Jacobian's batched pass may take (activations in memory).
STL_JACOBIAN_MAX_ROWS = 32768
#: From this many rows (particles x (D + 1)) on, the Jacobian behind sticking the landing runs
#: the flow forward once over the particles and its backward batched over the D + 1 output
#: cotangents (``is_grads_batched``) instead of a pass over D + 1 copies of the particles
#: (the copies' forward passes are all alike); below it the batched backward's fixed cost
#: wins. Measured (default AutoIAF, one thread, ms per Jacobian, copies / batched): D = 25:
#: 8 particles 6.1 / 6.8, 16: 8.5 / 7.6, 32: 14-19 / 9, 64: 32 / 18; D = 10: 32 particles
#: 3.4 / 3.4, 128: 10.9 / 7.1. Layers whose backward does not run batched (planar's, wide
#: MADEs with block plans) fall back to the copies.
STL_BATCHED_BACKWARD_MIN_ROWS = 400

def _family(flow) -> flows.Family:
    """The family record of a guide's flow: its name's, or the defaults for a custom flow."""
    return flows.FAMILIES.get(flow, _CUSTOM) if isinstance(flow, str) else _CUSTOM


_CUSTOM = flows.Family()


class FlowPosterior(dist.TransformedDistribution):
    r"""The posterior of an :class:`AutoFlowGuide`: :math:`N(0, I)` pushed through the flow
    layers and the final elementwise affine layer.

    It is a :class:`pyro.distributions.TransformedDistribution`; its only addition is
    :meth:`log_prob_detached`, the density with the transforms' parameters detached, which
    :class:`FlowELBO` uses for sticking-the-landing gradients.
    """

    #: whether FlowELBO's default uses sticking-the-landing gradients here (set by the guide)
    stick_the_landing: bool = False

    def expand(self, batch_shape, _instance=None) -> FlowPosterior:
        new = super().expand(batch_shape, _instance)
        new.stick_the_landing = self.stick_the_landing  # plates expand the site's distribution
        return new

    # Unbatched draws (no sample or batch shape) go through the layers as a batch of one:
    # pyroflows' Planar currently turns an input of shape (D,) into (1, D). The draw is
    # returned unbatched and remembered, so that scoring it still hits the layers' caches.
    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        if len(sample_shape) or len(self.batch_shape):
            return super().rsample(sample_shape)
        batched = super().rsample((1,))
        value = batched[0]
        self._unbatched = (value, value._version, batched)
        return value

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

    def log_prob_detached(self, value: Tensor) -> Tensor:
        r""":math:`\log q_{\bar\phi}(z)` with :math:`\bar\phi` the transforms' parameters cut
        from the graph: differentiable in ``value`` only. Runs the inverse of every layer (for
        IAF, its D sequential passes)."""
        y = value
        log_det = torch.zeros((), dtype=value.dtype, device=value.device)
        layers = []
        for t in self.transforms:  # a FlowStack's layers one by one: each is frozen alone
            layers.extend(t.parts if isinstance(t, flows.FlowStack) else [t])
        for t in reversed(layers):
            if not isinstance(t, FlowTransform):
                raise TypeError(
                    "sticking-the-landing gradients need pyroflows transforms (FlowTransform "
                    f"subclasses) in the guide's flow; got {type(t).__name__}"
                )
            frozen = {name: p.detach() for name, p in t.named_parameters()}
            x, ld = torch.func.functional_call(_Inverse(t), _prefixed(frozen), (y,), strict=False)
            log_det = log_det + ld
            y = x
        return self.base_dist.log_prob(y) - log_det


class _Inverse(nn.Module):
    """Calls a layer's (or a stack's) ``inverse_and_log_det`` (bypassing its cache), or with
    ``inverse=False`` its ``forward_and_log_det``, for ``functional_call``."""

    def __init__(self, t: FlowTransform | flows.FlowStack, inverse: bool = True) -> None:
        super().__init__()
        self.t = t
        self.inverse = inverse

    def forward(self, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.inverse:
            return self.t.inverse_and_log_det(value)
        return self.t.forward_and_log_det(value)


def _prefixed(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"t.{k}": v for k, v in params.items()}


def _hide_from_prototype(msg: dict) -> bool:
    """Record only latent sample sites, and leave enumerated discrete sites to TraceEnum_ELBO."""
    if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
        return True
    infer = msg.get("infer") or {}
    return infer.get("enumerate") is not None and msg["fn"].support.is_discrete


class AutoFlowGuide(AutoContinuous):
    r"""A normalizing-flow guide over all latent sites of a Pyro model.

    Like :class:`~pyro.infer.autoguide.AutoContinuous` it maps every latent site to the real line
    with ``biject_to(site.support)`` and packs the results into one vector
    :math:`u \in \mathbb{R}^D`. Its posterior over that vector is

    .. math:: u = \mu + L\, f_K \circ \dots \circ f_1(\varepsilon),
              \qquad \varepsilon \sim N(0, I_D),

    .. math:: \log q(u) = \log N(\varepsilon; 0, I) - \sum_k \log|\det J_{f_k}|
              - \textstyle\sum_i \log L_{ii},

    with :math:`f_1 \dots f_K` the flow layers and a learnable affine layer :math:`(\mu, L)`
    last. :math:`L` is diagonal (:class:`~pyroflows.transforms.ElementwiseAffine`) or, with
    ``full_rank``, lower triangular (:class:`TriangularAffine`): then the linear correlations
    are learnt as fast as by :class:`~pyro.infer.autoguide.AutoMultivariateNormal`, while the
    flow layers, whose networks start at the identity, learn the rest.

    Start. The guide starts as a Gaussian where the model's mass is, not at :math:`N(0, I)`
    where Pyro's ``AutoIAFNormal`` and ``AutoNormalizingFlow`` start, so the flow only has to
    learn the shape:

    - with ``laplace_init`` (default), at the Laplace approximation :math:`N(m, C C^T)`: the
      mode :math:`m` of :math:`\log p(x, T(u)) + \log|\det J_T(u)|` found by L-BFGS from
      ``init_loc_fn``'s location, and :math:`C = \mathrm{chol}(H^{-1})` with :math:`H` the
      Hessian of the negative log density there. It enters as a fixed last layer
      :math:`u = m + C v`, and :math:`(\mu, L)` starts at :math:`(0, I)` in these whitened
      coordinates, so every step size acts on the posterior's own scale (a regression on
      predictors of size 100, like kidiq, needs this: posterior sds from 0.15 to 15 with
      correlations of -0.99 between intercept and slope). The Laplace start is kept only when
      the MAP search ends finite, :math:`H` is positive definite and the Gaussian's ELBO (on
      :data:`LAPLACE_ELBO_DRAWS` draws) beats the plain start's: a funnel's mode sits at the
      edge of an unbounded density and is a useless centre. :attr:`laplace_info` says what
      happened. Latent sizes above :data:`FULL_RANK_MAX_DIM` skip it. The search costs a few
      hundred model evaluations and a Hessian (D backward passes) when the guide is built.
    - else at :math:`N(\text{init\_loc}, \mathrm{init\_scale}^2 I)`: :math:`\mu` from
      ``init_loc_fn``, :math:`L = \mathrm{init\_scale}\, I`, ``init_scale`` by family from
      the family's ``init_scale`` (:class:`~pyroflows.flows.Family`; IAF guides start wide, at 1).

    Sampling is one forward pass through the layers; the guide scores its own samples from the
    layers' cache, so an IAF guide never runs its D-pass inverse during SVI.

    The flow is built when the guide first sees the model (its latent size is known then), on
    the device and in the dtype of the model's latent values, and is a submodule: ``.to()``,
    ``.double()``, ``state_dict`` and ``torch.save`` cover it. After :meth:`to` the model's data
    must be on the same device, as for every autoguide.
    A ``state_dict`` holds the fixed Laplace layer (``laplace.loc``, ``laplace.scale_tril``)
    when the guide has one; loading it into a built guide whose start went the other way adds
    or drops that layer, so the loaded guide is the saved one. Planar and radial flows keep
    their layers' parameters stacked (keys ``flow.{i}.stacked.u`` and so on, see
    :func:`pyroflows.flows.build`); per-layer keys (``flow.{i}.u``) of earlier versions load.

    Training: any SVI loop works. The documented recipe, which ``benchmarks/vi.py`` measures
    (and the step sizes a user who just swaps ``AutoNormal`` for a flow guide should start
    from): Adam with the affine layer at a large step and the flow layers at a smaller one,
    the family's ``lr`` (:class:`~pyroflows.flows.Family`), through
    ``pyro.optim.Adam(pf.guides.optim_args(guide))`` or
    ``torch.optim.Adam(guide.param_groups())``, decayed 50-fold over the run; several
    vectorized particles; and :class:`FlowELBO`, which uses sticking-the-landing gradients for
    IAF guides (``stick_the_landing``, default: the family's ``stick_the_landing``) and, on
    multimodal posteriors, anneals (``anneal_steps``).

    Parameters and the param store: the guide's modules hold its parameters. On every call the
    param store's entries for them are made to be these very tensors, so SVI optimizes exactly
    what the guide uses, even after ``torch.load`` or a second guide of the same class. Matching
    param store entries (for example from ``pyro.get_param_store().load``) are copied in once,
    when the flow is built, as Pyro's own autoguides do; call ``pyro.clear_param_store()`` before
    fitting a new guide.

    :meth:`median`, :meth:`quantiles`: no closed form exists for a flow, so they are computed
    from ``num_quantile_samples`` draws (with a fixed seed, so repeated calls agree) in the
    unconstrained space and mapped through ``biject_to``; for sites whose support transform acts
    elementwise (positive, interval, real) these are the exact marginal quantiles up to Monte
    Carlo error, for ordered, simplex and other joint supports they are valid points of the
    support.

    Arguments:
        model: a Pyro model whose latent sites are continuous (discrete sites must be
            enumerated, e.g. with ``config_enumerate``, and are left to ``TraceEnum_ELBO``).
        flow: ``"planar"``, ``"radial"``, ``"iaf"``, ``"maf"``, ``"realnvp"`` (any family of
            :data:`pyroflows.flows.FAMILIES`), or a callable ``dim -> Transform`` building a
            custom stack (a :class:`~torch.nn.Module` if it has parameters).
        num_layers: flow layers, default the family's ``num_layers``.
        hidden_dims: conditioner hidden sizes for the network families.
        init_loc_fn: per-site initialization (see :mod:`pyro.infer.autoguide.initialization`);
            default the prior median.
        init_scale: initial scale (diagonal of :math:`L`) in the unconstrained space, for the
            plain start; default the family's ``init_scale`` (custom flows: 0.1).
        full_rank: a lower-triangular :math:`L` (True) or a diagonal one (False); default
            full rank when the latent size is at most :data:`FULL_RANK_MAX_DIM`. A trade-off,
            measured for :class:`AutoIAF` (see there): diagonal fits funnels better, full rank
            the rest.
        num_quantile_samples: draws behind :meth:`median` and :meth:`quantiles`.
        laplace_init: try the Laplace start first (see above); ``False``: the plain start.
        stick_the_landing: whether :class:`FlowELBO` (by default) uses the path-derivative
            gradient for this guide; default the family's ``stick_the_landing``.
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
        **flow_kwargs: Any,
    ) -> None:
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
        family = _family(flow)
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
        if stick_the_landing is None:
            stick_the_landing = family.stick_the_landing
        self.stick_the_landing = bool(stick_the_landing)
        #: what the Laplace start found (``None`` before set-up or without ``laplace_init``):
        #: ``used``, ``reason`` and the two ELBO estimates.
        self.laplace_info: dict | None = None
        self._plain_transforms: list[Transform] = []  # parameter-free, non-Module layers
        self._register_load_state_dict_pre_hook(_match_laplace_layer, with_module=True)

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_raw_model"] = None  # as Pyro drops ``_model``: models are not pickled
        state.pop("_cached_posterior_stack", None)  # rebuilt on use (its key holds object ids)
        state.pop("_cached_base_dist", None)
        state.pop("_cached_latent_layout", None)
        return state

    def _unpack_latent(self, latent: Tensor):
        """``(site, unconstrained value)`` of every latent site, views into ``latent`` (shape
        ``(..., latent_dim)``), as :meth:`AutoContinuous._unpack_latent` yields them, with each
        site's slice and shapes worked out once per prototype trace instead of on every step
        (its ``torch.broadcast_shapes`` was most of its cost)."""
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
        """``(site, start, stop, unconstrained shape, event dim)`` of every latent site."""
        cached = self.__dict__.get("_cached_latent_layout")
        if cached is None or cached[0] is not self.prototype_trace:
            layout, pos = [], 0
            for name, site in self.prototype_trace.iter_stochastic_nodes():
                shape = tuple(self._unconstrained_shapes[name])
                size = math.prod(shape)
                event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
                layout.append((site, pos, pos + size, shape, event_dim))
                pos += size
            cached = (self.prototype_trace, layout)
            self.__dict__["_cached_latent_layout"] = cached
        return cached[1]

    # ---- set-up -------------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        AutoGuide._setup_prototype(self, *args, **kwargs)
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

    def _build_flow(self, args: tuple = (), kwargs: dict | None = None) -> None:
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
            flow = flows.build(spec, dim, num_layers=self.num_layers, hidden_dims=self.hidden_dims,
                               affine=False, **self._flow_kwargs)
        if isinstance(flow, nn.Module):
            self.flow = flow.to(device=loc.device, dtype=loc.dtype)
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
        if self.laplace_init:
            # the search runs the model (a plate draws its subsample indices): leave the
            # global random state as it was, so seeded runs do not depend on laplace_init
            cuda = [loc.device.index or 0] if loc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                laplace = self._laplace(loc, args, kwargs or {})
            if laplace is not None:
                # whitened coordinates: the fixed layer maps them to the Laplace Gaussian,
                # the learnable affine layer starts at the identity on top of it
                self.laplace = FixedTriangularAffine(*laplace)
                affine = layer(dim).to(loc.device, loc.dtype)
        self.affine = affine
        self._flow_spec = None  # built; a lambda here would stop the guide from pickling
        self._sync_param_store(at_setup=True)

    def _sync_param_store(self, at_setup: bool = False, register: bool = False) -> bool:
        """Make the param store's entries for the flow and affine parameters be exactly the
        modules' tensors (copying matching entries in once, at set-up). With ``register``,
        inside the guide's active Pyro context, also make each parameter's ``pyro.param``
        statement (what the ``pyro.module`` statement of PyroModule's ``self.flow`` /
        ``self.affine`` does) in the same walk of the modules, instead of a second walk per
        module on every step; returns whether it did (not with module-local parameters,
        whose statements only the attribute access makes)."""
        if pyro.settings.get("module_local_params") or not self._pyro_context.used:
            return False  # no global param store in use, or no Pyro name known yet
        # a PyroModule part makes its own statements when its attributes are read
        register = register and bool(self._pyro_context.active) and not any(
            isinstance(self._modules.get(attr), PyroModule) for attr in ("flow", "affine"))
        store = pyro.get_param_store()
        for attr in ("flow", "affine"):
            module = self._modules.get(attr)
            if module is None:
                continue
            prefix = self._pyro_get_fullname(attr)
            if at_setup and isinstance(module, flows.FlowStack):
                _legacy.stack_per_layer_entries(store, prefix, module)
            if at_setup:
                _legacy.pack_separate_entries_in_store(store, prefix, module)
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    if register and module.training:  # what pyro.module says of it
                        warnings.warn(f"{pname} was not registered in the param store "
                                      "because requires_grad=False. You can silence this "
                                      "warning by calling my_module.train(False)", stacklevel=2)
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

    # ---- the posterior ------------------------------------------------------------------------
    def _transforms(self, registered: bool = False) -> list[Transform]:
        if registered:  # the param statements are made (_sync_param_store(register=True))
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
        """The flow layers, the affine layer and the Laplace layer as one
        :class:`~pyroflows.flows.FlowStack`, handed to Pyro as the posterior's only transform:
        one input validation, one cache and one log-det sum per call instead of one per layer
        (each transform of a ``TransformedDistribution`` costs Python work on every
        ``rsample``/``log_prob``). Built once and kept while the guide's modules are the same
        objects; it owns nothing (not a submodule), so ``state_dict`` is unchanged."""
        fused = True if flow is None else flow.fused
        key = (id(flow), id(affine), id(laplace), fused)
        cached = self.__dict__.get("_cached_posterior_stack")
        if cached is not None and cached[0] == key:
            return cached[1]
        parts = [*(flow.parts if flow is not None else []), affine]
        if laplace is not None:
            parts.append(laplace)
        stack = flows.FlowStack(parts, compile=getattr(flow, "compile_backend", None) or False)
        stack.fused = fused
        # the key's ids stay valid: the stack holds the modules, so they are not collected
        self.__dict__["_cached_posterior_stack"] = (key, stack)
        return stack

    # ---- Laplace initialization -------------------------------------------------------------
    def _log_density(self, u: Tensor, args: tuple, kwargs: dict) -> Tensor:
        r""":math:`\log p(x, T(u)) + \log|\det J_T(u)|` for one unconstrained vector ``u``."""
        return self._log_density_and_trace(u, args, kwargs)[0]

    def _log_density_and_trace(self, u: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, Trace]:
        """:meth:`_log_density` and the model's trace behind it."""
        values, log_det = {}, u.new_zeros(())
        for site, unconstrained in self._unpack_latent(u):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
            values[site["name"]] = value
        model = poutine.condition(self._raw_model[0], data=values)
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        return trace.log_prob_sum() + log_det, trace

    def _batched_log_density(self, u: Tensor, plate_dim: int, args: tuple,
                             kwargs: dict) -> Tensor | None:
        r""":meth:`_log_density` of the S rows of ``u`` (S, D) in one run of the model, inside
        a plate of size S at ``plate_dim`` (left of every plate of the model): shape (S,), or
        ``None`` where a site's value or log density does not come out with the draws in its
        leading dim (a model that does not broadcast over them)."""
        num_draws, nesting = u.shape[0], -plate_dim
        latent = u.reshape((num_draws,) + (1,) * (nesting - 1) + u.shape[-1:])
        values, log_det = {}, u.new_zeros(num_draws)
        for site, unconstrained in self._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            ld = transform.log_abs_det_jacobian(unconstrained, value)
            if ld.dim() == 0 or ld.shape[0] != num_draws:
                return None
            log_det = log_det + ld.reshape(num_draws, -1).sum(-1)
            values[site["name"]] = value
        model = poutine.condition(self._raw_model[0], data=values)
        with poutine.block(), pyro.plate("_pyroflows_laplace_draws", num_draws, dim=plate_dim):
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        trace.compute_log_prob(site_filter=_not_subsample)
        total = log_det
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):  # (those add zero)
                continue
            log_prob = site["log_prob"]
            # batch dims are the plates' (and this plate's) only: else the model has its own
            # batch dims left of the draws, which the loop sums over and this would misread
            if log_prob.dim() != nesting or log_prob.shape[0] != num_draws:
                return None
            total = total + log_prob.reshape(num_draws, -1).sum(-1)
        return total

    def _laplace(self, loc: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
        """The Laplace approximation ``(mode, chol(H^-1))`` of the unconstrained posterior, or
        ``None`` where it is unusable or its ELBO is below the plain start's."""
        info: dict[str, Any] = {"used": False}
        self.laplace_info = info
        if loc.numel() > FULL_RANK_MAX_DIM:
            info["reason"] = (f"the latent size {loc.numel()} is above FULL_RANK_MAX_DIM: its "
                              "Hessian would cost more than it helps")
            return None

        def objective(u: Tensor) -> Tensor:
            return -self._log_density(u, args, kwargs)

        with torch.enable_grad(), pyro.validation_enabled(False):
            u = loc.clone().requires_grad_(True)
            optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=LAPLACE_MAX_ITER,
                                          history_size=20, line_search_fn="strong_wolfe",
                                          tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure() -> Tensor:
                optimizer.zero_grad()
                value = objective(u)
                value.backward()
                return value

            try:
                optimizer.step(closure)
                mode = u.detach()
                hessian = torch.autograd.functional.hessian(objective, mode)
            except Exception as e:  # noqa: BLE001 - e.g. a model that rejects far-off values
                info["reason"] = f"the MAP search failed: {type(e).__name__}: {str(e)[:200]}"
                return None
        if not (bool(torch.isfinite(mode).all()) and bool(torch.isfinite(hessian).all())):
            info["reason"] = "the MAP search ran off to infinity"
            return None
        chol_h, failed = torch.linalg.cholesky_ex(0.5 * (hessian + hessian.T))
        if bool(failed):
            info["reason"] = "the Hessian at the mode is not positive definite"
            return None
        scale_tril = torch.linalg.cholesky(torch.cholesky_inverse(chol_h))
        # The guard for modes at the edge of an unbounded or singular density (Neal's funnel
        # has its mode at x0 = -40.5 with scales e^-20; centered eight schools has none): keep
        # the Laplace Gaussian only if its ELBO beats the plain start's, on common draws.
        gen = torch.Generator(device=loc.device).manual_seed(0)
        eps = torch.randn(LAPLACE_ELBO_DRAWS, loc.numel(), generator=gen, device=loc.device,
                          dtype=loc.dtype)
        plain = torch.diag(torch.full_like(loc, self._init_scale))
        with torch.no_grad(), pyro.validation_enabled(False):
            # one memo for both: a model the vectorized run cannot take (it does not broadcast,
            # mixes the draws or subsamples) is not tried a second time
            memo: dict[str, bool] = {}
            elbo_plain = self._gaussian_elbo(loc, plain, eps, args, kwargs, memo)
            elbo_laplace = self._gaussian_elbo(mode, scale_tril, eps, args, kwargs, memo)
        info.update(elbo_plain=elbo_plain, elbo_laplace=elbo_laplace)
        if not elbo_laplace > elbo_plain:
            info["reason"] = (f"its ELBO estimate ({elbo_laplace:.4g}) is below the plain "
                              f"start's ({elbo_plain:.4g})")
            return None
        info.update(used=True, reason="ok")
        return mode, scale_tril

    def _gaussian_elbo(self, loc: Tensor, scale_tril: Tensor, eps: Tensor, args: tuple,
                       kwargs: dict, memo: dict[str, bool] | None = None) -> float:
        r"""The ELBO of :math:`N(\mu, L L^T)` over the unconstrained vector from the draws
        :math:`\mu + L \varepsilon`; :math:`-\infty` where the model rejects a draw. ``memo``
        (shared by calls on the same model and arguments) keeps that the vectorized run of
        :meth:`_batched_gaussian_elbo` left the answer to the loop, so later calls go to the
        loop directly (the attempt costs two plain runs and a batched one)."""
        entropy = (0.5 * eps.shape[-1] * math.log(2 * math.pi * math.e)
                   + float(scale_tril.diagonal().log().sum()))
        memo = {} if memo is None else memo
        if memo.get("vectorized", True):
            batched = self._batched_gaussian_elbo(loc, scale_tril, eps, args, kwargs)
            if batched is not None:
                return batched + entropy
            memo["vectorized"] = False
        total = 0.0
        for e in eps:
            try:
                value = float(self._log_density(loc + scale_tril @ e, args, kwargs))
            except Exception:  # noqa: BLE001 - a draw the model rejects
                return -math.inf
            if not math.isfinite(value):
                return -math.inf
            total += value
        return total / eps.shape[0] + entropy

    def _batched_gaussian_elbo(self, loc: Tensor, scale_tril: Tensor, eps: Tensor,
                               args: tuple, kwargs: dict) -> float | None:
        r"""The mean of :math:`\log p(x, T(u)) + \log|\det J_T(u)|` over the draws
        :math:`u = \mu + L \varepsilon` of :meth:`_gaussian_elbo` from one vectorized run of
        the model (the loop runs it once per draw: most of the set-up's time where the MAP
        search converges fast), or ``None`` where the loop must decide: a model that does not
        run on a batch of draws, or whose batched log densities at the first and last draw
        differ from its plain ones (a model that does not broadcast over leading dims can run
        and still mix the draws), or subsampled plates (whose draws the loop redraws per
        draw). :math:`-\infty` where the model rejects or gives a non-finite density at a
        draw, as in the loop."""
        draws = loc + eps @ scale_tril.T
        try:
            first, trace = self._log_density_and_trace(draws[0], args, kwargs)
        except Exception:  # noqa: BLE001 - a draw the model rejects: the loop's answer
            return -math.inf
        if not bool(torch.isfinite(first)):
            return -math.inf
        frames = [frame for site in trace.nodes.values() if site["type"] == "sample"
                  for frame in site["cond_indep_stack"] if frame.vectorized]
        if any(frame.full_size is not None and frame.full_size != frame.size
               for frame in frames):
            return None
        # the draws' plate goes left of every batch dim of the plain run: the plates' and a
        # site's own unplated ones (an observation ``obs=y`` outside any plate, whose dims
        # Pyro sums; a plate right of them would meet them and send the model to the loop)
        unplated = max((max(len(site["fn"].batch_shape),
                             site["value"].dim() - len(site["fn"].event_shape))
                        for site in trace.nodes.values()
                        if site["type"] == "sample" and not site_is_subsample(site)), default=0)
        plate_dim = min(min((frame.dim for frame in frames if frame.dim is not None),
                            default=0), -unplated) - 1
        try:
            values = self._batched_log_density(draws, plate_dim, args, kwargs)
            last = self._log_density(draws[-1], args, kwargs)
        except Exception:  # noqa: BLE001 - the model does not broadcast: the loop decides
            return None
        if values is None:
            return None
        tol = math.sqrt(torch.finfo(values.dtype).eps)
        plain = torch.stack([first, last])
        if not torch.allclose(values[[0, -1]], plain, rtol=tol, atol=tol):
            return None
        if not bool(torch.isfinite(values).all()):
            return -math.inf
        return float(values.sum()) / eps.shape[0]

    def get_base_dist(self) -> dist.TorchDistribution:
        # kept between calls (building it was 1-2% of an SVI step): distributions are not
        # changed in place, and the key follows .to() and dtype changes of the guide
        loc = self._modules["affine"].loc
        key = (loc.shape, loc.dtype, loc.device)
        cached = self.__dict__.get("_cached_base_dist")
        if cached is None or cached[0] != key:
            zeros = torch.zeros_like(loc.detach())
            cached = (key, dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            self.__dict__["_cached_base_dist"] = cached
        return cached[1]

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowPosterior:
        """The guide's distribution over the unconstrained latent vector, a
        :class:`FlowPosterior` ``TransformedDistribution(N(0, I), [flow..., affine])``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        registered = bool(self._pyro_context.active) and self._sync_param_store(register=True)
        return self._posterior(self.get_base_dist(), self._transforms(registered))

    def _posterior(self, base: dist.TorchDistribution, transforms: list) -> FlowPosterior:
        posterior = FlowPosterior(base, transforms)
        posterior.stick_the_landing = self.stick_the_landing
        return posterior

    @property
    def _subsampled_latents(self) -> bool:
        """Whether a latent site sits in a subsampled plate (then :class:`FlowELBO` traces the
        guide as usual: its plates draw the subsample the model must reuse)."""
        return any(frame.vectorized and frame.full_size is not None
                   and frame.full_size != frame.size
                   for stack in self._cond_indep_stacks.values() for frame in stack)

    def _direct_draw(self, shape: tuple, stick_the_landing: bool):
        r"""One draw of the guide, as :meth:`forward` under Pyro's tracing would make it but
        without the effect handlers, for :class:`FlowELBO`'s direct path: the latent of batch
        ``shape`` (Pyro's particle plate), the constrained value of every site, their log
        densities. Returns ``(trace, log_q, entropy, jacobian)``: a trace holding the latent
        and the site values (to replay the model against), :math:`\log q(u)` of shape
        ``shape``, :math:`\log q_{\bar\phi}(u)` for sticking the landing (else ``None``) and
        :math:`-\sum \log|\det J_T|`, the summed log density of the ``Delta`` sites (``None``
        where every site is unconstrained: no kernels for a sum of zeros)."""
        with self._pyro_context:  # as __call__: the parameters register under their names
            registered = self._sync_param_store(register=True)
            base, transforms = self.get_base_dist(), self._transforms(registered)
            stack = transforms[0] if len(transforms) == 1 else None
            posterior, eps = None, None
            if len(shape) and isinstance(stack, flows.FlowStack) and stack.all_flow_transforms:
                # what the posterior's rsample + log_prob compute, without building the
                # distribution and its per-call checks: the same base draw, one run of the
                # stack with its log-det
                eps = base.rsample(shape)
                # a fresh draw of N(0, I): no input checks, no cache lookup
                latent, log_det = stack.run(eps, inverse=False, validate=False)
                log_q = eps.square().sum(-1).mul(-0.5).sub(
                    0.5 * eps.shape[-1] * math.log(2 * math.pi)) - log_det
            else:
                posterior = self._posterior(base, transforms)
                latent = posterior.rsample(shape)
                log_q = posterior.log_prob(latent)
            entropy = None
            if (stick_the_landing and eps is not None
                    and self.latent_dim <= STL_JACOBIAN_MAX_DIM
                    and eps.numel() <= STL_JACOBIAN_MAX_ROWS):  # numel = particles x D rows
                entropy = _path_log_density(stack, eps, latent, log_q)
            elif stick_the_landing:
                posterior = posterior or self._posterior(base, transforms)
                entropy = posterior.log_prob_detached(latent)
            trace = Trace()
            trace.add_node(f"_{self._pyro_name}_latent", name=f"_{self._pyro_name}_latent",
                           type="sample", fn=posterior, value=latent, is_observed=False,
                           infer={"is_auxiliary": True, "flow_latent": True})
            jacobian = None
            for site, unconstrained in self._unpack_latent(latent):
                name = site["name"]
                transform = biject_to(site["fn"].support)
                value = transform(unconstrained)
                if not _is_identity(transform):  # (an identity adds zeros: skip its kernels)
                    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                    log_density = sum_rightmost(
                        log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
                    log_density = log_density.sum()
                    jacobian = log_density if jacobian is None else jacobian + log_density
                trace.add_node(name, name=name, type="sample", fn=None, value=value,
                               is_observed=False, infer={})
        return trace, log_q, entropy, jacobian

    def param_groups(self, lr: float | None = None, flow_lr: float | None = None) -> list[dict]:
        """Parameter groups for a ``torch.optim`` optimizer: the affine layer (``loc``, scale)
        at ``lr``, the flow layers at ``flow_lr``, by default :func:`default_lr` of the guide's
        family. Call the guide once first, so that its parameters exist."""
        if self.prototype_trace is None:
            raise RuntimeError("call the guide once (with the model's arguments) first")
        default, default_flow = default_lr(self)
        groups = [{"params": list(self._modules["affine"].parameters()),
                   "lr": default if lr is None else lr}]
        flow = self._modules.get("flow")
        if flow is not None:
            groups.append({"params": list(flow.parameters()),
                           "lr": default_flow if flow_lr is None else flow_lr})
        return groups

    # ---- draws, median, quantiles ---------------------------------------------------------------
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
        """``num_samples`` posterior draws of every latent site on its constrained scale,
        each of shape ``(num_samples, *site_shape)``. ``*args, **kwargs`` are the model's,
        needed only if the guide has not run yet."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self._constrain(self._draw_latent(int(num_samples)))

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any,
                  **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site, each of shape ``(len(quantiles),
        *site_shape)``, from ``num_quantile_samples`` draws (see the class notes)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        draws = self._draw_latent(self.num_quantile_samples, seed=0)
        q = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device).reshape(-1)
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError(f"quantiles must lie in [0, 1], got {q.tolist()}")
        return self._constrain(_quantiles(draws, q))

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior median of every latent site (sample-based, see the class notes)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}




def _match_laplace_layer(guide: AutoFlowGuide, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: give the guide the fixed Laplace layer exactly when the
    ``state_dict`` has one, so a guide whose Laplace start was kept loads into a fresh guide
    where it was rejected (another seed, another data set) and vice versa. The learnt affine
    layer's values mean something only together with that layer, so taking the saved one is
    what reproduces the saved posterior."""
    affine = guide._modules.get("affine")
    if affine is None:  # not set up yet: the usual missing-key errors say so
        return
    loc, scale_tril = f"{prefix}laplace.loc", f"{prefix}laplace.scale_tril"
    has = guide._modules.get("laplace") is not None
    if loc in state_dict and scale_tril in state_dict and not has:
        guide.laplace = FixedTriangularAffine(state_dict[loc], state_dict[scale_tril]).to(
            device=affine.loc.device, dtype=affine.loc.dtype)
        guide.laplace_info = {"used": True, "reason": "loaded from a state_dict"}
    elif has and loc not in state_dict and (f"{prefix}affine.packed" in state_dict
                                            or f"{prefix}affine.loc" in state_dict):
        del guide._modules["laplace"]
        guide.laplace_info = {"used": False, "reason": "loaded from a state_dict without it"}


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
    """:class:`AutoFlowGuide` with ``num_layers`` planar layers (seed eq. 28-29) and the final
    affine layer.

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> guide = pf.guides.AutoPlanar(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
        >>> guide()["z"].shape
        torch.Size([])
    """

    def __init__(self, model: Callable, num_layers: int = 16, **kwargs: Any) -> None:
        super().__init__(model, flow="planar", num_layers=num_layers, **kwargs)


class AutoRadial(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` radial layers and the final affine layer."""

    def __init__(self, model: Callable, num_layers: int = 16, **kwargs: Any) -> None:
        super().__init__(model, flow="radial", num_layers=num_layers, **kwargs)


class AutoIAF(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` inverse autoregressive layers (permuted
    between layers) and the final affine layer: one parallel pass samples and scores.

    Full-rank or diagonal affine layer (``full_rank``; default full rank up to
    :data:`FULL_RANK_MAX_DIM` latents). No choice won everywhere in ``benchmarks/vi.py``
    (1000 steps x 32 particles, the documented recipe, 2-3 seeds per target; table "AutoIAF:
    full-rank or diagonal" in ``benchmarks/results/vi.md``), KL in nats, full rank vs diagonal:

    - Rezende U1 (two modes, annealed): mean of 6 seeds 0.139 vs 0.170;
    - eight schools noncentered 0.016-0.024 vs 0.026-0.054, centered 0.10-0.14 vs 0.13-0.19
      (better at every seed);
    - funnel10: 0.07-0.24 vs 0.05-0.15, where the diagonal layer is better at every seed (a
      funnel has no fixed linear correlation for the full-rank layer to learn; why its extra
      parameters then cost KL was not isolated). Pass ``full_rank=False`` for funnel-like
      posteriors;
    - Laplace-started regressions (one seed): German credit KL 0.017 both, but PSIS k-hat
      kidiq 0.56 vs 0.41, arK 0.49 vs 0.34 (moment errors equal).

    Putting the off-diagonal entries at the flow layers' step size lands in between (funnel
    better, U1 and eight schools worse), and a smaller step for the whole affine layer (1e-2)
    did not help U1 on average and hurt both eight schools; neither is the default. Single
    runs on U1 vary by 0.1-0.3 nats with the seed, whichever the layer (an earlier table's
    0.695 was one such stream).
    """

    def __init__(self, model: Callable, num_layers: int = 4,
                 hidden_dims: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(model, flow="iaf", num_layers=num_layers, hidden_dims=hidden_dims,
                         **kwargs)


def default_lr(flow: str | AutoFlowGuide | None = None) -> tuple[float, float]:
    """The documented Adam step sizes ``(lr, flow_lr)`` of a flow guide: ``lr`` for the affine
    layer (and any parameter that is not a flow layer's), ``flow_lr`` for the flow layers, from
    the ``lr`` of the family (a name, or a guide's ``flow_name``; see
    :class:`~pyroflows.flows.Family`); custom flows get the network families' ``flow_lr``.

    Example:
        >>> default_lr("planar"), default_lr("iaf")
        ((0.05, 0.01), (0.05, 0.003))
    """
    name = flow.flow_name if isinstance(flow, AutoFlowGuide) else flow
    return _family(name).lr


def optim_args(flow: str | AutoFlowGuide | None = None, lr: float | None = None,
               flow_lr: float | None = None, **kwargs: Any) -> Callable[[str], dict]:
    """Per-parameter arguments for a :mod:`pyro.optim` optimizer: ``lr`` for the affine layer of
    a flow guide (and any parameter that is not a flow layer's), ``flow_lr`` for the flow layers;
    both default to :func:`default_lr` of ``flow`` (a family name or the guide; any other
    guide, such as ``AutoNormal``, has no flow layers and gets ``lr`` everywhere).

    The affine layer is a Gaussian and tolerates a large step; the flow layers' networks start
    at the identity and are safer with a small one. Decay both over the run, e.g. with
    ``pyro.optim.ClippedAdam(optim_args(guide, lrd=0.02 ** (1 / num_steps)))`` (50-fold, the
    schedule ``benchmarks/vi.py`` measures); ``kwargs`` are passed to the optimizer.

    Example:
        >>> import pyro
        >>> optimizer = pyro.optim.Adam(optim_args("iaf"))
        >>> optim_args("iaf")("AutoIAF.flow.0.conditioner.flat_parameters")["lr"]
        0.003
        >>> optim_args("iaf")("AutoIAF.affine.packed")["lr"]
        0.05
    """
    default, default_flow = default_lr(flow)
    lr = default if lr is None else lr
    flow_lr = default_flow if flow_lr is None else flow_lr

    def args(name: str) -> dict:
        in_flow = ".flow." in f".{name}"
        return {"lr": flow_lr if in_flow else lr, **kwargs}

    return args


class FlowELBO(Trace_ELBO):
    r""":class:`~pyro.infer.Trace_ELBO` with two options that help flow guides, and a
    faster way to run them.

    - ``stick_the_landing``: the path-derivative gradient of Roeder et al. (2017). The guide's
      :math:`\log q_\phi(z)` enters the surrogate loss as :math:`\log q_{\bar\phi}(z_\phi)`, with
      the parameters :math:`\bar\phi` detached and only the sample's path
      :math:`z_\phi = T_\phi(\varepsilon)` differentiated. This drops the score term
      :math:`\nabla_\phi \log q_\phi(z)`, whose expectation is zero, so the gradient stays
      unbiased and its variance vanishes as :math:`q \to p`. It costs one inverse pass of the
      flow per step (planar: a 1-D root solve per layer; IAF: D sequential passes), except on
      the direct path below with at most :data:`STL_JACOBIAN_MAX_DIM` latent dimensions,
      where :math:`\nabla_z \log q` comes from the draw's Jacobian (one batched pass over D
      copies of the particles and a D x D solve per particle; 2-3x faster at D = 25, 1.4x at
      D = 256). Only the latent site of a pyroflows guide is affected; other guide sites use
      the usual estimator.
      ``None`` (default): each flow guide's own ``stick_the_landing`` decides (by family,
      the family's ``stick_the_landing``: on for IAF guides); ``True``: every flow guide (an
      error without one); ``False``: none.
    - ``anneal_steps``: over the first ``T`` calls of :meth:`loss_and_grads` (one per
      ``svi.step()``) the guide fits the tempered density of the *unconstrained* latent vector,

      .. math:: p_\beta(u) \propto \bigl[p(x, T(u))\, |\det J_T(u)|\bigr]^{\beta},
                \qquad \beta_t = \beta_0 + (1 - \beta_0)\, t / T,

      with :math:`T` the ``biject_to`` map of the latent sites, and :math:`\beta = 1`
      afterwards. The loss is :math:`-E_q[\beta \log p(x, T(u)) + \beta \log|\det J_T(u)|
      - \log q(u)]`: the model's log joint and the Jacobian terms of the guide's ``Delta``
      sites are both scaled by :math:`\beta`. Tempering the log joint alone would leave
      :math:`p(x, T(u))^\beta |\det J_T(u)|`, which is improper for heavy-tailed positive
      sites (a HalfCauchy scale :math:`\tau = e^u` gives :math:`e^{u(1-\beta)}` as
      :math:`u \to \infty`). :math:`p_\beta` is wider than :math:`p` and lets a flow spread
      over several modes before the full energy pulls it in (Rezende & Mohamed 2015). While
      annealing, ``svi.step()`` returns the tempered loss; :meth:`loss` always uses
      :math:`\beta = 1`. With a guide other than an autoguide (no ``Delta`` sites) only the
      log joint is tempered.

    - ``direct`` (default ``True``): with a pyroflows guide (:class:`AutoFlowGuide`) that is
      set up, the guide is not traced through Pyro's effect handlers. Each step draws the
      latent vector :math:`u` directly (one ``FlowStack.forward_and_log_det`` call for the
      draw and its log-det), maps it to every site with ``biject_to``, replays the model against
      those values as :class:`~pyro.infer.Trace_ELBO` does and forms the same loss and
      surrogate, :math:`\log p(x, T(u)) + \log|\det J_T(u)| - \log q(u)` (with the
      ``stick_the_landing`` and ``anneal_steps`` terms above). The estimator, the random
      draws and the parameters the optimizer sees are those of the traced path (tested
      against it step by step); only Pyro's per-site work for the guide's sites is skipped,
      about a fifth of a small model's step (item 3 of benchmarks/results/speed-cpu.md).
      The guide is traced as usual where that work matters: when the step runs under
      another effect handler (``poutine.scale``, ``pyro.plate``, ... around ``svi.step``),
      when a latent site sits in a subsampled plate, when the guide has forward hooks, in a
      subclass that overrides ``_get_trace``, and for :meth:`loss` (evaluation).
      ``direct=False`` always traces the guide.

    A training step whose loss is not finite (a guide whose draws have run to where the
    model's density over- or underflows; its gradients would turn every parameter into NaN)
    raises a :class:`ValueError` that names the model sites with a non-finite log density and
    the size of the guide's draws, before any parameter moves; the step's gradients are
    dropped, so the caller may lower the step size and go on.

    References:
        Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference", NeurIPS 2017.

    Arguments:
        stick_the_landing: use the path-derivative estimator for the flow guide's site:
            ``None`` as the guide says, or ``True`` / ``False`` for every flow guide.
        anneal_steps: the number of steps over which :math:`\beta` rises to 1 (0: none).
        anneal_start: :math:`\beta_0`.
        direct: draw a pyroflows guide without tracing it where the result is the same
            (above).
        kwargs: passed to :class:`~pyro.infer.Trace_ELBO` (``num_particles``,
            ``vectorize_particles``, ``max_plate_nesting``, ...).

    Example:
        >>> elbo = FlowELBO(num_particles=8, vectorize_particles=True, anneal_steps=1000)
        >>> elbo.beta
        0.05
    """

    def __init__(self, stick_the_landing: bool | None = None, anneal_steps: int = 0,
                 anneal_start: float = 0.05, direct: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct = bool(direct)
        if not 0 < anneal_start <= 1:
            raise ValueError(f"anneal_start must lie in (0, 1], got {anneal_start}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        self.stick_the_landing = None if stick_the_landing is None else bool(stick_the_landing)
        self.anneal_steps = int(anneal_steps)
        self.anneal_start = float(anneal_start)
        self.step_count = 0
        self._training = False
        self._traces: list = []  # this step's (model, guide) traces, to explain a failure

    @property
    def beta(self) -> float:
        """The current inverse temperature :math:`\\beta_t` of the training loss."""
        if self.step_count >= self.anneal_steps:
            return 1.0
        return self.anneal_start + (1 - self.anneal_start) * self.step_count / self.anneal_steps

    def _get_trace(self, model, guide, args, kwargs):
        beta = self.beta if self._training else 1.0
        if beta < 1.0:
            model = poutine.scale(model, scale=beta)
            guide = _TemperJacobians(beta)(guide)
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self.stick_the_landing is not False and self._training:
            _stick_the_landing(guide_trace, force=self.stick_the_landing is True)
        if self._training:
            self._traces.append((model_trace, guide_trace))
        return model_trace, guide_trace

    def _train(self, method, model, guide, args, kwargs):
        self._training = True
        self._traces = []
        try:
            loss = method(model, guide, *args, **kwargs)
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            if not math.isfinite(value):
                if method.__name__.endswith("loss_and_grads"):
                    _drop_gradients(self._traces)  # the backward pass already ran
                    if isinstance(guide, nn.Module):  # the direct path traces no params
                        for p in guide.parameters():
                            p.grad = None
                raise ValueError(_divergence_message(value, self.step_count, self._traces))
        finally:
            self._training = False
            self._traces = []
        self.step_count += 1
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The (tempered, while annealing) loss; backpropagates the surrogate loss."""
        if self._direct(model, guide, args, kwargs):
            return self._train(self._direct_loss_and_grads, model, guide, args, kwargs)
        return self._train(super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The (tempered, while annealing) loss as a differentiable tensor, for torch
        optimizers; each call counts as one annealing step."""
        if self._direct(model, guide, args, kwargs):
            return self._train(self._direct_differentiable_loss, model, guide, args, kwargs)
        return self._train(super().differentiable_loss, model, guide, args, kwargs)

    # ---- the direct path: a flow guide drawn without Pyro's effect handlers --------------
    def _direct(self, model, guide, args, kwargs) -> bool:
        """Whether this step can draw the guide directly (see the class docstring): a set-up
        :class:`AutoFlowGuide` called by nothing but ``SVI``'s parameter capture, with no
        latent site in a subsampled plate and no module hooks, and this class's own traces."""
        if not (self.direct and isinstance(guide, AutoFlowGuide)
                and guide.prototype_trace is not None
                and type(self)._get_trace is FlowELBO._get_trace
                and not guide._subsampled_latents
                and not (guide._forward_hooks or guide._forward_pre_hooks
                         or _private.global_module_hooks())):
            return False
        # outside SVI.step nothing may be active; inside it only its param-only trace
        if not _private.only_param_capture_active():
            return False
        if (self.vectorize_particles and self.num_particles > 1
                and self.max_plate_nesting == float("inf")):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return True

    def _direct_particles(self, model, guide, args, kwargs):
        """``(loss, surrogate loss)`` of each run, already divided by ``num_particles``,
        as :class:`~pyro.infer.Trace_ELBO` would compute them from the traces of the guide
        and of the model replayed against it."""
        beta = self.beta if self._training else 1.0
        stl = self._training and (self.stick_the_landing is True or (
            self.stick_the_landing is None and guide.stick_the_landing))
        vectorized = self.vectorize_particles and self.num_particles > 1
        runs = 1 if vectorized else self.num_particles
        # the latent's shape under Pyro's particle plate (at dim -max_plate_nesting)
        shape = (self.num_particles,) + (1,) * (self.max_plate_nesting - 1) if vectorized else ()
        validate = is_validation_enabled()
        for _ in range(runs):
            guide_trace, log_q, entropy, jacobian = guide._direct_draw(shape, stl)
            scored = _ReplayAndScore(guide_trace, self.max_plate_nesting, validate)
            with (self._particle_plate() if vectorized else contextlib.nullcontext()), \
                    (poutine.scale(scale=beta) if beta < 1.0 else contextlib.nullcontext()):
                scored.run(model, args, kwargs)
            model_trace = scored.trace
            if validate:
                _check_direct_match(model_trace, guide_trace)
            if self._training:
                self._traces.append((model_trace, guide_trace))
            model_log_prob = scored.log_prob_sum
            # the guide's log density: the latent's and its Delta sites' (-log|det J_T|,
            # tempered as _TemperJacobians does; None where every site is unconstrained)
            guide_log_prob = log_q.sum()
            surrogate_guide = guide_log_prob if entropy is None else entropy.sum()
            if jacobian is not None:
                guide_log_prob = guide_log_prob + beta * jacobian
                surrogate_guide = surrogate_guide + beta * jacobian
            loss = -(torch_item(model_log_prob) - torch_item(guide_log_prob))
            surrogate = -(model_log_prob - surrogate_guide)
            yield loss / self.num_particles, surrogate / self.num_particles

    def _particle_plate(self) -> pyro.plate:
        """Trace_ELBO's vectorized-particle plate, made once (it subsamples nothing, so one
        instance serves every step)."""
        key = (self.num_particles, self.max_plate_nesting)
        cached = self.__dict__.get("_cached_particle_plate")
        if cached is None or cached[0] != key:
            cached = (key, pyro.plate("num_particles_vectorized", self.num_particles,
                                      dim=-self.max_plate_nesting))
            self.__dict__["_cached_particle_plate"] = cached
        return cached[1]

    def _direct_loss_and_grads(self, model, guide, *args, **kwargs):
        loss = 0.0
        for loss_particle, surrogate in self._direct_particles(model, guide, args, kwargs):
            loss += loss_particle
            if getattr(surrogate, "requires_grad", False):
                surrogate.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def _direct_differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate_loss = 0.0, 0.0
        for loss_particle, surrogate in self._direct_particles(model, guide, args, kwargs):
            loss += loss_particle
            surrogate_loss = surrogate_loss + surrogate
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - torch_item(surrogate_loss))


def _path_log_density(stack: flows.FlowStack, eps: Tensor, z: Tensor, log_q: Tensor) -> Tensor:
    r""":math:`\log q_{\bar\phi}(z)` for sticking the landing, from the draw
    :math:`z = T_\phi(\varepsilon)` itself instead of the inverse: its value is ``log_q`` and its
    gradient in :math:`z` is

    .. math:: \nabla_z \log q_{\bar\phi}(z) = J^{-\top} \nabla_\varepsilon
              \bigl[\log N(\varepsilon; 0, I) - \log|\det J(\varepsilon)|\bigr],
              \qquad J = \partial T / \partial \varepsilon,

    so the result is ``log_q`` (detached) plus :math:`(z - \bar z) \cdot \nabla_z`, whose
    gradient reaches the parameters through the path :math:`z_\phi` only. :math:`J` comes from
    D + 1 pullbacks (one forward pass and a backward batched over the D + 1 cotangents, or
    for small batches and layers whose backward does not batch, one pass over D + 1 copies of
    the batch; see :data:`STL_BATCHED_BACKWARD_MIN_ROWS`) and is solved per draw (a D x D
    system); the parameters take no gradient from any of it. For small D this replaces the
    inverse's D sequential passes per IAF layer (or a root solve per planar layer) by a few
    batched calls."""
    d = eps.shape[-1]
    e = eps.detach().reshape(-1, d)
    n = e.shape[0]
    # D + 1 pullbacks of the draws: pullback i < D of output i (row i of J), the last one of
    # -log|det J|; the parameters are detached copies, so no parameter gradient is computed
    # (the banks, SharedModules, swap and restore cleanly)
    frozen = _prefixed({name: p.detach() for name, p in stack.named_parameters()})
    eye = torch.eye(d + 1, d, dtype=e.dtype, device=e.device)  # last row zero
    pick_y = eye.unsqueeze(1).expand(d + 1, n, d)
    pick_ld = torch.zeros(d + 1, n, dtype=e.dtype, device=e.device)
    pick_ld[d] = -1.0
    pulled = None
    # a stack whose backward refused to run batched once refuses every time (its layers'
    # in-place operations): it goes straight to the copies instead of paying a forward pass
    # and a failed backward per step (planar, D = 10, 64 particles: 7.3 against 5.0 ms)
    if n * (d + 1) >= STL_BATCHED_BACKWARD_MIN_ROWS and stack not in _NO_BATCHED_BACKWARD:
        pulled = _batched_pullbacks(stack, frozen, e, pick_y, pick_ld)
        if pulled is None:
            _NO_BATCHED_BACKWARD.add(stack)
    if pulled is None:  # one pass over D + 1 copies of the draws
        copies = e.expand(d + 1, n, d).reshape((d + 1) * n, d).clone().requires_grad_(True)
        with torch.enable_grad():
            y, log_det = torch.func.functional_call(_Inverse(stack, inverse=False), frozen,
                                                    (copies,))
            (pulled,) = torch.autograd.grad((y, log_det), copies,
                                            grad_outputs=(pick_y.reshape((d + 1) * n, d),
                                                          pick_ld.reshape(-1)))
        pulled = pulled.reshape(d + 1, n, d)
    rows, h = pulled[:d], pulled[d] - e  # h: grad of log N(eps) - log|det J| at eps
    jac = rows.transpose(0, 1)  # jac[b, i, j] = dz_i / d eps_j
    grad_z = torch.linalg.solve(jac.transpose(-1, -2), h.unsqueeze(-1)).squeeze(-1)
    grad_z = grad_z.reshape(z.shape)
    return log_q.detach() + ((z - z.detach()) * grad_z).sum(-1)


#: Stacks whose backward refused to run batched (see :func:`_path_log_density`), held weakly
#: and outside the stack: a copy, a pickle or a newly built stack is tried afresh.
_NO_BATCHED_BACKWARD: weakref.WeakSet = weakref.WeakSet()


def _batched_pullbacks(stack: flows.FlowStack, frozen: dict[str, Tensor], e: Tensor,
                       pick_y: Tensor, pick_ld: Tensor) -> Tensor | None:
    """The D + 1 pullbacks of :func:`_path_log_density` from one forward pass over the draws
    ``e`` (n, D) and one backward pass batched over the D + 1 output cotangents (``pick_y``
    (D + 1, n, D), ``pick_ld`` (D + 1, n)): the copies' forward passes are all the same, so
    only the backward needs them. ``None`` where a layer's backward does not run batched
    (``vmap`` refuses in-place and ``out=`` operations; the caller then runs the copies)."""
    x = e.clone().requires_grad_(True)
    with torch.enable_grad():
        y, log_det = torch.func.functional_call(_Inverse(stack, inverse=False), frozen, (x,))
        try:
            (pulled,) = torch.autograd.grad((y, log_det), x, grad_outputs=(pick_y, pick_ld),
                                            is_grads_batched=True)
        except RuntimeError:
            return None
    return pulled


class _ReplayAndScore(Messenger):
    """The model's half of :class:`FlowELBO`'s direct path: what
    ``poutine.trace(poutine.replay(model, guide_trace))`` records, in one handler instead of
    two. A latent site takes the guide's value as
    :class:`~pyro.poutine.replay_messenger.ReplayMessenger` gives it; every site is recorded in
    :attr:`trace` as :class:`~pyro.poutine.trace_messenger.TraceMessenger` records it (a
    repeated site name is the same error). :meth:`run` then scores the trace with Pyro's own
    ``compute_log_prob`` and ``log_prob_sum`` (subsample sites left out, as Trace_ELBO's
    pruned trace does) and, under validation, checks each site's shape."""

    def __init__(self, guide_trace: Trace, max_plate_nesting: float, validate: bool) -> None:
        super().__init__()
        self.guide_nodes = guide_trace.nodes
        self.max_plate_nesting = max_plate_nesting
        self.validate = validate
        self.trace = Trace(graph_type="flat")
        self.log_prob_sum: Tensor | float = 0.0

    def run(self, model: Callable, args: tuple, kwargs: dict) -> None:
        """Run ``model`` under this handler (a ``ValueError`` or ``RuntimeError`` from it gets
        the shapes of the sites so far appended, as ``poutine.trace`` appends them), then
        score its sites."""
        try:
            with self:
                model(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{e}\n{self.trace.format_shapes()}").with_traceback(
                e.__traceback__) from e
        self.trace.compute_log_prob(site_filter=_not_subsample)
        if self.validate:
            for name, site in self.trace.nodes.items():
                if site["type"] == "sample" and _not_subsample(name, site):
                    check_site_shape(site, self.max_plate_nesting)
        self.log_prob_sum = self.trace.log_prob_sum(site_filter=_not_subsample)

    def _pyro_sample(self, msg: dict) -> None:
        guide_site = self.guide_nodes.get(msg["name"])
        if guide_site is None or msg["is_observed"]:
            return
        if guide_site["type"] != "sample" or guide_site["is_observed"]:
            raise RuntimeError(f"site {msg['name']} must be sampled in trace")
        msg["done"] = True
        msg["value"] = guide_site["value"]
        msg["infer"] = guide_site["infer"]

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["infer"].get("_do_not_trace"):
            self.trace.add_node(msg["name"], **msg)

    def _pyro_post_param(self, msg: dict) -> None:
        self.trace.add_node(msg["name"], **msg)


def _not_subsample(name: str, site: dict) -> bool:
    return not site_is_subsample(site)


def _is_identity(transform: Transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _check_direct_match(model_trace, guide_trace) -> None:
    """The checks of :func:`pyro.util.check_model_guide_match` that can fail on the direct
    path: the model's latent sites are exactly the guide's (a model that changed its sites
    since the guide was set up)."""
    guide_vars = {name for name, site in guide_trace.nodes.items()
                  if not site["infer"].get("is_auxiliary")}
    model_vars = {name for name, site in model_trace.nodes.items()
                  if site["type"] == "sample" and not site["is_observed"]
                  and not site_is_subsample(site)}
    if model_vars - guide_vars:
        warnings.warn(f"Found vars in model but not guide: {model_vars - guide_vars}",
                      stacklevel=4)
    if guide_vars - model_vars:
        warnings.warn("Found non-auxiliary vars in guide but not model, consider marking "
                      f"these infer={{'is_auxiliary': True}}:\n{guide_vars - model_vars}",
                      stacklevel=4)


def _drop_gradients(traces: list) -> None:
    """Set to ``None`` the (non-finite) gradients a failed step left on the parameters of its
    traces, so that catching the error and stepping on starts clean."""
    for model_trace, guide_trace in traces:
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] != "param":
                    continue
                value = site["value"]
                ref = getattr(value, "unconstrained", None)  # Pyro: a weakref to the leaf
                leaf = ref() if ref is not None else value
                if isinstance(leaf, Tensor):
                    leaf.grad = None


def _divergence_message(loss: float, step: int, traces: list) -> str:
    """Why the loss of a step is not finite: the model sites with a non-finite log density
    and the size of the flow guide's draws."""
    sites: dict[str, list[int]] = {}
    largest = 0.0
    for model_trace, guide_trace in traces:
        for name, site in model_trace.nodes.items():
            log_prob = site.get("log_prob")
            if site["type"] == "sample" and isinstance(log_prob, Tensor):
                bad = int((~torch.isfinite(log_prob.detach())).sum())
                if bad:
                    counts = sites.setdefault(name, [0, 0])
                    counts[0] += bad
                    counts[1] += log_prob.numel()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and (isinstance(site["fn"], FlowPosterior)
                                             or site["infer"].get("flow_latent")):
                value = site["value"].detach()
                largest = max(largest, float(value.abs().nan_to_num(math.inf).max()))
    where = (", ".join(f"{name!r} ({bad} of its {n} log-density entries)"
                       for name, (bad, n) in sites.items())
             if sites else "no model site (the guide's own log density, then)")
    return (
        f"FlowELBO: the loss is not finite ({loss}) at step {step + 1}. The model's log density "
        f"is non-finite at {where}; the largest unconstrained draw of the flow guide is "
        f"{largest:.3g}. The guide has diverged (its draws reach where the model's density "
        "over- or underflows). Its parameters are still those from before this step, and the "
        "step's gradients were dropped: lower the step sizes (optim_args(guide, lr=...,"
        " flow_lr=...) or param_groups(...)), use fewer flow layers, or start from a "
        "narrower init_scale."
    )


class _TemperJacobians(Messenger):
    """Scales the guide's ``Delta`` sample sites (an autoguide's constrained values, whose log
    density is the ``biject_to`` Jacobian term :math:`-\\log|\\det J_T(u)|`) by ``beta``,
    leaving the auxiliary latent site alone."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if (msg["type"] == "sample" and not msg["is_observed"]
                and not (msg.get("infer") or {}).get("is_auxiliary")
                and isinstance(msg["fn"], dist.Delta)):
            msg["scale"] = msg["scale"] * self.beta


def _path_entropy(posterior: FlowPosterior, value: Tensor) -> Tensor | None:
    """The sticking-the-landing term of a traced draw ``value`` of ``posterior`` from the draw's
    Jacobian (:func:`_path_log_density`), as the direct path takes it: when the posterior is
    one :class:`~pyroflows.flows.FlowStack` of pyroflows layers whose cache still holds this
    draw's base point (it does right after ``rsample``: the stack remembers ``(eps, z,
    log_det)`` while its parameters are unchanged) and within :data:`STL_JACOBIAN_MAX_DIM` and
    :data:`STL_JACOBIAN_MAX_ROWS`; ``None`` otherwise (the caller runs the inverse)."""
    transforms = posterior.transforms
    if len(transforms) != 1 or not isinstance(transforms[0], flows.FlowStack):
        return None
    stack = transforms[0]
    if not stack.all_flow_transforms:
        return None
    z = value
    last = getattr(posterior, "_unbatched", None)  # an unbatched draw went through as (1, D)
    if last is not None and value is last[0] and value._version == last[1]:
        z = last[2]
    hit = stack.lookup(y=z)
    if (hit is None or z.shape[-1] > STL_JACOBIAN_MAX_DIM
            or hit.x.numel() > STL_JACOBIAN_MAX_ROWS or hit.x.requires_grad):
        return None
    log_q = posterior.base_dist.log_prob(hit.x) - hit.log_det
    entropy = _path_log_density(stack, hit.x, z, log_q)
    return entropy[0] if z is not value else entropy


def _stick_the_landing(guide_trace, force: bool) -> None:
    found = False
    for site in guide_trace.nodes.values():
        if site["type"] != "sample" or not isinstance(site["fn"], FlowPosterior):
            continue
        found = True
        if not (force or site["fn"].stick_the_landing):
            continue
        entropy = _path_entropy(site["fn"], site["value"])
        if entropy is None:
            entropy = site["fn"].log_prob_detached(site["value"])
        parts = ScoreParts(site["score_parts"].log_prob, 0, entropy)
        scaled = parts.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"] = site["score_parts"]._replace(entropy_term=scaled.entropy_term)
    if force and not found:
        raise ValueError("FlowELBO(stick_the_landing=True) needs a pyroflows flow guide "
                         "(AutoFlowGuide and its subclasses)")
