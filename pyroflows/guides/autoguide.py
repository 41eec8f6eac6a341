"""Autoguides whose posterior is a normalizing flow over the model's unconstrained latent
vector: :class:`AutoFlowGuide` and its family shorthands."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import ComposeTransform, Transform, biject_to

from .. import flows
from .._memo import Memoized
from ..transforms import ElementwiseAffine, TriangularAffine
from ..transforms.affine import FixedTriangularAffine
from . import laplace as _laplace
from .params import sync_param_store
from .posterior import FlowPosterior

__all__ = ["AutoFlowGuide", "AutoPlanar", "AutoRadial", "AutoIAF", "family_of"]

#: Up to this latent size the guide's last layer is full rank (:class:`TriangularAffine`) unless
#: ``full_rank`` says otherwise, and the Laplace start is tried; above it, the D^2 parameters
#: and the Hessian cost more than they help.
FULL_RANK_MAX_DIM = 256

#: The guide's modules whose parameters enter Pyro's param store.
_PARAM_MODULES = ("flow", "affine")

_CUSTOM = flows.Family()


def family_of(flow: str | Callable | None) -> flows.Family:
    """The family record of a guide's flow: its name's, or the defaults for a custom flow."""
    return flows.FAMILIES.get(flow, _CUSTOM) if isinstance(flow, str) else _CUSTOM


def _hide_from_prototype(msg: dict) -> bool:
    """Record only latent sample sites, and leave enumerated discrete sites to TraceEnum_ELBO."""
    if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
        return True
    infer = msg.get("infer") or {}
    return infer.get("enumerate") is not None and msg["fn"].support.is_discrete


class AutoFlowGuide(Memoized, AutoContinuous):
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

    Start: a Gaussian where the model's mass is, not :math:`N(0, I)` as Pyro's
    ``AutoIAFNormal`` and ``AutoNormalizingFlow`` start, so the flow only learns the shape. With
    ``laplace_init`` the Laplace approximation :math:`N(m, C C^T)` of the unconstrained
    posterior (:mod:`pyroflows.guides.laplace`) enters as a fixed last layer :math:`u = m + C
    v`, and :math:`(\mu, L)` starts at :math:`(0, I)` in these whitened coordinates, so every
    step size acts on the posterior's own scale; it is kept only where it is usable and its
    ELBO beats the plain start's (:attr:`laplace_info` says what happened), and latent sizes
    above :data:`FULL_RANK_MAX_DIM` skip it. Otherwise the guide starts at
    :math:`N(\text{init\_loc}, \mathrm{init\_scale}^2 I)`.

    Sampling is one forward pass through the layers; the guide scores its own samples from the
    layers' cache, so an IAF guide never runs its D-pass inverse during SVI. The flow is built
    when the guide first sees the model, on the device and in the dtype of the model's latent
    values, and is a submodule: ``.to()``, ``state_dict`` and ``torch.save`` cover it, the
    fixed Laplace layer included. The param store's entries for the guide's parameters are
    the modules' own tensors (:mod:`pyroflows.guides.params`); train with the family's step
    sizes (:func:`~pyroflows.guides.optim_args`, :meth:`param_groups`) and
    :class:`~pyroflows.guides.FlowELBO`.

    :meth:`median`, :meth:`quantiles`: computed from ``num_quantile_samples`` draws (a fixed
    seed, so repeated calls agree) in the unconstrained space and mapped through
    ``biject_to``: the marginal quantiles up to Monte Carlo error for sites whose support
    transform acts elementwise, valid points of the support for ordered, simplex and other
    joint supports.

    Arguments:
        model: a Pyro model whose latent sites are continuous (discrete sites must be
            enumerated, e.g. with ``config_enumerate``, and are left to ``TraceEnum_ELBO``).
        flow: a family name of :data:`pyroflows.flows.FAMILIES` (``"planar"``, ``"radial"``,
            ``"iaf"``, ``"maf"``, ``"realnvp"``, ...), or a callable ``dim -> Transform``
            building a custom stack (a :class:`~torch.nn.Module` if it has parameters).
        num_layers: flow layers, default the family's ``num_layers``.
        hidden_dims: conditioner hidden sizes for the network families.
        init_loc_fn: per-site initialization (see :mod:`pyro.infer.autoguide.initialization`);
            default the prior median.
        init_scale: initial scale (diagonal of :math:`L`) in the unconstrained space, for the
            plain start; default the family's ``init_scale`` (custom flows: 0.1).
        full_rank: a lower-triangular :math:`L` (True) or a diagonal one (False); default
            full rank when the latent size is at most :data:`FULL_RANK_MAX_DIM`. Diagonal fits
            funnels better, full rank the rest (``benchmarks/results/vi.md``).
        num_quantile_samples: draws behind :meth:`median` and :meth:`quantiles`.
        laplace_init: try the Laplace start first (see above); ``False``: the plain start.
        stick_the_landing: whether :class:`~pyroflows.guides.FlowELBO` (by default) uses the
            path-derivative gradient for this guide; default the family's
            ``stick_the_landing``.
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
        family = family_of(flow)
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
        self._register_load_state_dict_pre_hook(_laplace.match_laplace_layer, with_module=True)

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_raw_model"] = None  # as Pyro drops ``_model``: models are not pickled
        return state

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
            start = self._laplace_start(loc, args, kwargs)
            if start is not None:
                # whitened coordinates: the fixed layer maps them to the Laplace Gaussian,
                # the learnable affine layer starts at the identity on top of it
                self.laplace = FixedTriangularAffine(*start)
                affine = layer(dim).to(loc.device, loc.dtype)
        self.affine = affine
        self._flow_spec = None  # built; a lambda here would stop the guide from pickling
        sync_param_store(self, _PARAM_MODULES, at_setup=True)

    def _laplace_start(self, loc: Tensor, args: tuple, kwargs: dict
                       ) -> tuple[Tensor, Tensor] | None:
        """The Laplace approximation ``(mode, chol(H^-1))`` to start from, or ``None``; sets
        :attr:`laplace_info`."""
        if loc.numel() > FULL_RANK_MAX_DIM:
            self.laplace_info = {
                "used": False, "reason": f"the latent size {loc.numel()} is above "
                "FULL_RANK_MAX_DIM: its Hessian would cost more than it helps"}
            return None
        density = _laplace.LogDensity(self._raw_model[0], self._unpack_latent, args, kwargs)
        start, self.laplace_info = _laplace.laplace_approximation(density, loc,
                                                                  self._init_scale)
        return start

    def _unpack_latent(self, latent: Tensor) -> Iterator[tuple[dict, Tensor]]:
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
        """``(site, start, stop, unconstrained shape, event dim)`` of every latent site, kept
        while the prototype trace is the same object (the memo holds it)."""
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

    # ---- the posterior ------------------------------------------------------------------------
    def get_base_dist(self) -> dist.TorchDistribution:
        # kept between calls: distributions are not changed in place, and the key follows
        # .to() and dtype changes of the guide
        loc = self._modules["affine"].loc
        return self.memo("base_dist", (loc.shape, loc.dtype, loc.device),
                         lambda: dist.Normal(torch.zeros_like(loc.detach()),
                                             torch.ones_like(loc.detach())).to_event(1))

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        return ComposeTransform(self._transforms())

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowPosterior:
        """The guide's distribution over the unconstrained latent vector, a
        :class:`FlowPosterior` ``TransformedDistribution(N(0, I), [flow..., affine])``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self._posterior(*self._posterior_parts())

    def _posterior_parts(self) -> tuple[dist.TorchDistribution, list[Transform]]:
        """The posterior's base distribution and transforms. Inside the guide's active Pyro
        context, the param statements of the guide's parameters are made on the way, as
        PyroModule's attribute access makes them."""
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
        """The flow layers, the affine layer and the Laplace layer as one
        :class:`~pyroflows.flows.FlowStack`, handed to Pyro as the posterior's only transform:
        one input validation, one cache and one log-det sum per call instead of one per layer.
        Kept while the guide's modules are the same objects (the memo's key holds them); it
        owns nothing (not a submodule), so ``state_dict`` is unchanged."""
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
        """Parameter groups for a ``torch.optim`` optimizer: the affine layer (``loc``, scale)
        at ``lr``, the flow layers at ``flow_lr``, by default the family's ``lr``
        (:func:`~pyroflows.guides.default_lr`). Call the guide once first, so that its
        parameters exist."""
        if self.prototype_trace is None:
            raise RuntimeError("call the guide once (with the model's arguments) first")
        default, default_flow = family_of(self.flow_name).lr
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
    """:class:`AutoFlowGuide` with ``num_layers`` radial layers and the final affine layer.

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> guide = pf.guides.AutoRadial(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
        >>> guide()["z"].shape
        torch.Size([])
    """

    def __init__(self, model: Callable, num_layers: int = 16, **kwargs: Any) -> None:
        super().__init__(model, flow="radial", num_layers=num_layers, **kwargs)


class AutoIAF(AutoFlowGuide):
    """:class:`AutoFlowGuide` with ``num_layers`` inverse autoregressive layers (permuted
    between layers) and the final affine layer: one parallel pass samples and scores.

    The affine layer is full rank up to :data:`FULL_RANK_MAX_DIM` latents (``full_rank``): no
    choice won everywhere in ``benchmarks/vi.py`` (table "AutoIAF: full-rank or diagonal" in
    ``benchmarks/results/vi.md``); pass ``full_rank=False`` for funnel-like posteriors.

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
