r"""Conditional planar and radial layers (seed eq. 27-31): the parameters of K planar or radial
maps are the output of one dense network of a context :math:`c`, one set per context row, with
the plain layers' invertibility constraints applied per row."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import _legacy, _private
from .._fast import keeps_map, planar_chain, radial_chain, run_steps
from ..nn.dense import DenseNetwork
from .base import FlowTransform
from .conditional import ConditionalFlowTransform, check_broadcast
from .planar import (
    Planar,
    planar_constraint,
    planar_forward_step,
    planar_inverse_step,
    planar_score_step,
)
from .radial import Radial, radial_alpha, radial_forward, radial_inverse, radial_score_step

__all__ = [
    "ConditionalPlanar", "conditional_planar", "ConditionedPlanar", "ConditionalRadial",
    "conditional_radial", "ConditionedRadial",
]


class _Hypernetwork(ConditionalFlowTransform):
    """A conditional stack of ``num_layers`` = K maps of one plain layer ``_plain`` whose raw
    parameters (``_names``, of sizes ``_sizes(dim)`` each) are one dense network's output:
    layer 1's in that order, then layer 2's, and so on."""

    _plain: type[FlowTransform]
    _names: tuple[str, ...]
    _transform: type[FlowTransform]  # what condition returns, built from the raw parameters

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU, num_layers: int = 1) -> None:
        super().__init__(dim, context_dim)
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be a positive integer, "
                             f"got {num_layers!r}")
        self.num_layers = int(num_layers)
        hidden = (10 * self.dim, 10 * self.dim) if hidden_dims is None else tuple(hidden_dims)
        self._split = self._sizes(self.dim)
        self.network = DenseNetwork(self.context_dim, self.num_layers * sum(self._split),
                                    hidden, activation)
        self.reset_parameters()
        _private.register_load_state_dict_pre_hook(self, _legacy.per_layer_network_hint)

    @staticmethod
    def _sizes(dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """The network at :class:`torch.nn.Linear`'s initialization, except its output layer:
        zero weights and, as bias, a fresh draw of the plain layer's initialization per layer;
        so every context starts at those plain layers, near the identity."""
        for layer in self.network.layers:
            layer.reset_parameters()
        starts = []
        for _ in range(self.num_layers):
            plain = self._plain(self.dim)
            starts.extend(getattr(plain, name).detach().reshape(-1) for name in self._names)
        self.network.constant_output_(torch.cat(starts))

    def _raw(self, context: Tensor) -> tuple[Tensor, ...]:
        """The raw parameters of the K layers by ``_names``, each stacked (K, ..., size)."""
        raw = self.network(context)
        raw = raw.view(*raw.shape[:-1], self.num_layers, sum(self._split)).movedim(-2, 0)
        return raw.split(self._split, dim=-1)

    def layer_parameters(self, context: Tensor, layer: int = 0) -> dict[str, Tensor]:
        """The raw parameters of the plain layer ``layer`` (0 to K - 1) for ``context``
        (shape (..., C)), by the plain layer's names, each with the context's batch dims in
        front of its plain shape."""
        raw = self._raw(self.check_context(context))
        return {name: value[layer] for name, value in zip(self._names, raw, strict=True)}

    def conditioned(self, context: Tensor) -> FlowTransform:
        return self._transform(*self._raw(context))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_layers={self.num_layers}, "
                f"hidden_dims={self.network.hidden_dims}")


class _Conditioned(FlowTransform):
    """K maps, each holding one set of parameters per row of ``batch_shape``: its inputs'
    batch dims must broadcast with it (a :class:`ValueError` says when they do not). It holds
    the parameters computed when it was made: condition again after an optimizer step or a
    change of the context.

    A subclass gives the plain layer's one-layer steps (``_forward_step``, ``_inverse_step``
    of its :meth:`_params`, stacked (K, ...)) and the fused kernel of its forward maps
    (``_chain`` of its :meth:`_chain_args`); inside a flow stack a run of conditioned maps of
    one kind runs its forward maps as one call of the kernel (:func:`_run_fused`)."""

    _forward_step: Callable[..., tuple[Tensor, Tensor]]
    _inverse_step: Callable[..., tuple[Tensor, Tensor]]
    _score_step: Callable[..., tuple[Tensor, Tensor]]
    _chain: Callable[..., tuple[Tensor, Tensor]]

    def __init__(self, dim: int, num_layers: int, batch_shape: torch.Size) -> None:
        super().__init__(dim)
        self.num_layers, self.batch_shape = num_layers, batch_shape

    def _params(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _chain_args(self) -> tuple[Tensor, ...]:
        return self._params()

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return run_steps(x, type(self)._forward_step, self._params(), None)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return run_steps(y, type(self)._inverse_step, self._params(), None, reverse=True)

    def fused_kind(self, inverse: bool) -> str | None:
        """The class's name, unless a subclass redefines the map."""
        base = next(c for c in type(self).__mro__ if c.__dict__.get("_chain") is not None)
        return base.__name__ if keeps_map(type(self), base, _MAP) else None

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return self.fused_kind(False) is not None

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The plain layer's score step (:meth:`FlowTransform.score_step`) of each of the K
        maps in order, with its rows of parameters."""
        for row in zip(*(p.unbind(0) for p in self._params()), strict=True):
            x, g = type(self)._score_step(x, g, *row)
        return x, g

    def _validate(self, value: Tensor, what: str) -> None:
        super()._validate(value, what)
        check_broadcast(type(self).__name__, what, value.shape[:-1], self.batch_shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_layers={self.num_layers}, "
                f"batch_shape={tuple(self.batch_shape)}")


# the methods that define a conditioned map: a subclass that redefines one runs its own
_MAP = ("forward_and_log_det", "inverse_and_log_det", "_params", "_chain_args")


def _run_fused(x: Tensor, layers: list[_Conditioned], log_det: Tensor | None,
               inverse: bool) -> tuple[Tensor, Tensor]:
    """Consecutive conditioned maps of one kind: the forward maps as one call of the kind's
    kernel on their parameters stacked (one call per map where their shapes or kernels
    differ), the inverses one by one. ``layers`` in the order they run (:func:`run_parts`
    gives an inverse's last first)."""
    if inverse:
        for layer in layers:
            x, log_det = run_steps(x, type(layer)._inverse_step, layer._params(), log_det,
                                   reverse=True)
        return x, log_det
    args = [layer._chain_args() for layer in layers]
    chains = {type(layer)._chain for layer in layers}
    if len(layers) > 1 and len(chains) == 1 and len(
            {tuple(a.shape[1:] for a in row) for row in args}) == 1:
        args = [[torch.cat(column) for column in zip(*args, strict=True)]]
        layers = layers[:1]
    for layer, row in zip(layers, args, strict=True):
        x, log_det = type(layer)._chain(x, *row, log_det)
    return x, log_det


def _stacked(owner: str, *params: Tensor) -> tuple[int, torch.Size]:
    """The layers' number K and the rows' shape of parameters stacked (K, ..., size): the
    dims between (those of one network output, unless the caller built the transform from
    others: then broadcast)."""
    if any(p.dim() < 2 for p in params) or len({p.shape[0] for p in params}) != 1:
        raise ValueError(f"{owner}: the parameters must be stacked (K, ..., size) with one K, "
                         f"got shapes {[tuple(p.shape) for p in params]}")
    shapes = {p.shape[1:-1] for p in params}
    rows = shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)
    return params[0].shape[0], rows


class ConditionedPlanar(_Conditioned):
    r"""The maps of K :class:`~pyroflows.transforms.Planar` layers, applied in order, with one
    set of raw parameters per row: ``u``, ``w`` of shape (K, ..., D), ``bias`` of shape
    (K, ..., 1), layer k's in row k; the constraint
    (:func:`~pyroflows.transforms.planar.planar_constraint`) is applied per row. Inputs of
    shape (..., D) broadcast against the rows. What :meth:`ConditionalPlanar.condition`
    returns. The forward maps run as one fused node
    (:func:`~pyroflows._fast.planar.planar_chain`) inside a flow stack, with those of the
    conditioned planar maps next to it; the inverses one by one."""

    _forward_step = staticmethod(planar_forward_step)
    _inverse_step = staticmethod(planar_inverse_step)
    _score_step = staticmethod(planar_score_step)
    _chain = staticmethod(planar_chain)

    def __init__(self, u: Tensor, w: Tensor, bias: Tensor) -> None:
        super().__init__(w.shape[-1], *_stacked(type(self).__name__, u, w, bias))
        self.w = w
        self.bias = bias.squeeze(-1)
        self.u_hat, self.slack = planar_constraint(w, u)

    def _params(self) -> tuple[Tensor, ...]:
        return self.w, self.u_hat, self.bias, self.slack

    @staticmethod
    def run_fused(x: Tensor, layers: list[ConditionedPlanar], kinds: list,
                  log_det: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """Consecutive conditioned planar maps (:func:`_run_fused`)."""
        return _run_fused(x, layers, log_det, inverse)


class ConditionedRadial(_Conditioned):
    r"""The maps of K :class:`~pyroflows.transforms.Radial` layers, applied in order, with one
    set of raw parameters per row: ``x0`` of shape (K, ..., D), ``alpha_prime``,
    ``beta_prime`` of shape (K, ..., 1), layer k's in row k; the constraint
    (:func:`~pyroflows.transforms.radial.radial_alpha`) is applied per row, to all K layers at
    once. Inputs of shape (..., D) broadcast against the rows. What
    :meth:`ConditionalRadial.condition` returns. The forward maps run as one fused node
    (:func:`~pyroflows._fast.radial.radial_chain`) inside a flow stack, with those of the
    conditioned radial maps next to it; the inverses one by one."""

    _forward_step = staticmethod(radial_forward)
    _inverse_step = staticmethod(radial_inverse)
    _score_step = staticmethod(radial_score_step)
    _chain = staticmethod(radial_chain)

    def __init__(self, x0: Tensor, alpha_prime: Tensor, beta_prime: Tensor) -> None:
        super().__init__(x0.shape[-1], *_stacked(type(self).__name__, x0, alpha_prime,
                                                 beta_prime))
        self.x0 = x0
        self.alpha, self.alpha_plus_beta = radial_alpha(alpha_prime, beta_prime)

    def _params(self) -> tuple[Tensor, ...]:
        return self.x0, self.alpha, self.alpha_plus_beta

    def _chain_args(self) -> tuple[Tensor, ...]:
        return self.x0, self.alpha.squeeze(-1), self.alpha_plus_beta.squeeze(-1)

    @staticmethod
    def run_fused(x: Tensor, layers: list[ConditionedRadial], kinds: list,
                  log_det: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """Consecutive conditioned radial maps (:func:`_run_fused`)."""
        return _run_fused(x, layers, log_det, inverse)


class ConditionalPlanar(_Hypernetwork):
    r"""Conditional planar flow (seed eq. 27-29): :class:`~pyroflows.transforms.Planar`'s map,
    or K of them applied in order, with the raw parameters the output of one dense network of
    the context :math:`c`,

    .. math:: (u_1, w_1, b_1, \dots, u_K, w_K, b_K) = \mathrm{NN}(c), \qquad
              z_k = z_{k-1} + \hat u_k \tanh(w_k^\top z_{k-1} + b_k),

    .. math:: \log|\det J| = \sum_{k=1}^{K} \log\bigl(1 + \tanh'(w_k^\top z_{k-1} + b_k)\,
              w_k^\top \hat u_k\bigr),

    one set per context row, with :class:`~pyroflows.transforms.Planar`'s constraint
    :math:`w^\top \hat u > -1` applied per row (so every row's map is invertible, whatever the
    network outputs) and its inverse (a monotone 1-D root solve per row), so the conditioned
    layer scores any point. ``condition(c)`` with ``c`` of shape (..., C) returns a
    :class:`ConditionedPlanar` (a new one per call, holding the parameters computed then)
    for inputs whose batch dims broadcast with ``c``'s: ``c`` (B, C) with ``z`` (B, D) or
    (S, B, D); ``c`` (C,) for every row.

    The network is a :class:`~pyroflows.nn.DenseNetwork` ``C -> hidden_dims -> K (2D + 1)``
    (``u``, ``w``, ``b`` of layer 1, then of layer 2, ...); by default two hidden layers of
    10 D units, as Pyro's :func:`~pyro.distributions.transforms.conditional_planar`. With
    ``num_layers = 1`` (the default) it is one layer, as Pyro's; with K > 1 it is Rezende &
    Mohamed's design, one inference network whose output holds every layer's parameters: one
    network instead of K (K = 16, D = 8, C = 64: 33,712 network parameters instead of
    208,912), and the K forward maps run as one fused node. It starts with a
    zero output layer whose bias is a draw of :class:`~pyroflows.transforms.Planar`'s
    initialization per layer: every context then maps as those plain layers, near the
    identity, so an untrained amortized guide starts near its base distribution.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims: the network's hidden widths (default ``(10 D, 10 D)``).
        activation: the network's hidden activation, a module class (default ``nn.ReLU``).
        num_layers: K, the planar maps whose parameters the network outputs.

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.transforms.conditional_planar(3, context_dim=2)
        >>> t = layer.condition(torch.randn(5, 2))
        >>> z = torch.randn(10, 5, 3)
        >>> t(z).shape, t.log_abs_det_jacobian(z, t(z)).shape
        (torch.Size([10, 5, 3]), torch.Size([10, 5]))
        >>> torch.allclose(t.inv(t(z).clone()), z, atol=1e-5)
        True
        >>> stack = pf.transforms.conditional_planar(3, context_dim=2, num_layers=16)
        >>> stack.network.layers[-1].out_features  # 16 (u, w, b)
        112
    """

    _plain = Planar
    _names = ("u", "w", "bias")
    _transform = ConditionedPlanar

    @staticmethod
    def _sizes(dim: int) -> tuple[int, ...]:
        return (dim, dim, 1)


class ConditionalRadial(_Hypernetwork):
    r"""Conditional radial flow (seed eq. 27, 30-31): :class:`~pyroflows.transforms.Radial`'s
    map, or K of them applied in order, with the raw parameters the output of one dense
    network of the context :math:`c`,

    .. math:: (z_{0,1}, \alpha'_1, \beta'_1, \dots, z_{0,K}, \alpha'_K, \beta'_K)
              = \mathrm{NN}(c), \qquad
              z_k = z_{k-1} + \beta_k h(\alpha_k, r_k)(z_{k-1} - z_{0,k}), \quad
              r_k = \|z_{k-1} - z_{0,k}\|,\quad h = 1 / (\alpha + r),

    with :math:`\alpha = \mathrm{softplus}(\alpha')`, :math:`\alpha + \beta =
    \mathrm{softplus}(\beta')` per context row (so every row's map is invertible, whatever the
    network outputs) and :class:`~pyroflows.transforms.Radial`'s closed-form inverse per row.
    ``condition(c)`` with ``c`` of shape (..., C) returns a :class:`ConditionedRadial` (a new
    one per call, holding the parameters computed then) for inputs whose batch dims broadcast
    with ``c``'s: ``c`` (B, C) with ``z`` (B, D) or (S, B, D); ``c`` (C,) for every row.

    The network is a :class:`~pyroflows.nn.DenseNetwork` ``C -> hidden_dims -> K (D + 2)``
    (:math:`z_0`, :math:`\alpha'`, :math:`\beta'` of layer 1, then of layer 2, ...); by
    default two hidden layers of 10 D units, as Pyro's
    :func:`~pyro.distributions.transforms.conditional_radial`. With ``num_layers = 1`` (the
    default) it is one layer, as Pyro's; with K > 1 one inference network outputs every
    layer's parameters (Rezende & Mohamed's design, as :class:`ConditionalPlanar`'s). It
    starts with a zero output layer whose bias is a draw of
    :class:`~pyroflows.transforms.Radial`'s initialization per layer: every context then maps
    as those plain layers, near the identity.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims: the network's hidden widths (default ``(10 D, 10 D)``).
        activation: the network's hidden activation, a module class (default ``nn.ReLU``).
        num_layers: K, the radial maps whose parameters the network outputs.

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.transforms.conditional_radial(3, context_dim=2)
        >>> t = layer.condition(torch.randn(5, 2))
        >>> y = torch.randn(10, 5, 3)
        >>> torch.allclose(t(t.inv(y).clone()), y, atol=1e-5)
        True
    """

    _plain = Radial
    _names = ("x0", "alpha_prime", "beta_prime")
    _transform = ConditionedRadial

    @staticmethod
    def _sizes(dim: int) -> tuple[int, ...]:
        return (dim, 1, 1)


def conditional_planar(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                       **kwargs) -> ConditionalPlanar:
    """Build a :class:`ConditionalPlanar` layer (``kwargs``: its ``activation``,
    ``num_layers``)."""
    return ConditionalPlanar(dim, context_dim, hidden_dims, **kwargs)


def conditional_radial(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                       **kwargs) -> ConditionalRadial:
    """Build a :class:`ConditionalRadial` layer (``kwargs``: its ``activation``,
    ``num_layers``)."""
    return ConditionalRadial(dim, context_dim, hidden_dims, **kwargs)
