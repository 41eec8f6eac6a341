r"""Conditional planar and radial layers (seed eq. 27-31): the parameters of a planar or radial
map are the output of a dense network of a context :math:`c`, one set per context row, with
the plain layers' invertibility constraints applied per row."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..nn.dense import DenseNetwork
from .base import FlowTransform
from .conditional import ConditionalFlowTransform, check_broadcast
from .planar import Planar, planar_constraint, planar_forward_step, planar_inverse_step
from .radial import Radial, radial_alpha, radial_forward, radial_inverse

__all__ = [
    "ConditionalPlanar", "conditional_planar", "ConditionedPlanar", "ConditionalRadial",
    "conditional_radial", "ConditionedRadial",
]


class _Hypernetwork(ConditionalFlowTransform):
    """A conditional layer whose raw parameters (``_names``, of sizes ``_sizes(dim)``, the
    plain layer ``_plain``'s) are one dense network's output, split in that order."""

    _plain: type[FlowTransform]
    _names: tuple[str, ...]
    _transform: type[FlowTransform]  # what condition returns, built from the raw parameters

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(dim, context_dim)
        hidden = (10 * self.dim, 10 * self.dim) if hidden_dims is None else tuple(hidden_dims)
        self._split = self._sizes(self.dim)
        self.network = DenseNetwork(self.context_dim, sum(self._split), hidden, activation)
        self.reset_parameters()

    @staticmethod
    def _sizes(dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """The network at :class:`torch.nn.Linear`'s initialization, except its output layer:
        zero weights and, as bias, a fresh draw of the plain layer's initialization; so every
        context starts at that plain layer, near the identity."""
        for layer in self.network.layers:
            layer.reset_parameters()
        plain = self._plain(self.dim)
        start = torch.cat([getattr(plain, name).detach().reshape(-1) for name in self._names])
        self.network.constant_output_(start)

    def layer_parameters(self, context: Tensor) -> dict[str, Tensor]:
        """The plain layer's raw parameters for ``context`` (shape (..., C)), by the plain
        layer's names, each with the context's batch dims in front of its plain shape."""
        raw = self.network(self.check_context(context))
        return dict(zip(self._names, raw.split(self._split, dim=-1), strict=True))

    def conditioned(self, context: Tensor) -> FlowTransform:
        raw = self.network(context)
        return self._transform(*raw.split(self._split, dim=-1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden_dims={self.network.hidden_dims}"


class _Conditioned(FlowTransform):
    """A layer holding one set of parameters per row of ``batch_shape``: its inputs' batch
    dims must broadcast with it (a :class:`ValueError` says when they do not). It holds the
    parameters computed when it was made: condition again after an optimizer step or a change
    of the context."""

    def __init__(self, dim: int, batch_shape: torch.Size) -> None:
        super().__init__(dim)
        self.batch_shape = batch_shape

    def _validate(self, value: Tensor, what: str) -> None:
        super()._validate(value, what)
        check_broadcast(type(self).__name__, what, value.shape[:-1], self.batch_shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_shape={tuple(self.batch_shape)}"


def _batch_shape(*params: Tensor) -> torch.Size:
    """The rows' shape: the parameters' batch dims (those of one network output, unless the
    caller built the transform from others: then broadcast)."""
    shapes = {p.shape[:-1] for p in params}
    return shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)


class ConditionedPlanar(_Conditioned):
    r"""The planar map of :class:`~pyroflows.transforms.Planar` with one set of raw parameters
    per row: ``u``, ``w`` of shape (..., D), ``bias`` of shape (..., 1); the constraint
    (:func:`~pyroflows.transforms.planar.planar_constraint`) is applied per row. Inputs of
    shape (..., D) broadcast against the rows. What :meth:`ConditionalPlanar.condition`
    returns."""

    def __init__(self, u: Tensor, w: Tensor, bias: Tensor) -> None:
        super().__init__(w.shape[-1], _batch_shape(u, w, bias))
        self.w = w
        self.bias = bias.squeeze(-1)
        self.u_hat, self.slack = planar_constraint(w, u)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return planar_forward_step(x, self.w, self.u_hat, self.bias, self.slack)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return planar_inverse_step(y, self.w, self.u_hat, self.bias, self.slack)


class ConditionedRadial(_Conditioned):
    r"""The radial map of :class:`~pyroflows.transforms.Radial` with one set of raw parameters
    per row: ``x0`` of shape (..., D), ``alpha_prime``, ``beta_prime`` of shape (..., 1); the
    constraint (:func:`~pyroflows.transforms.radial.radial_alpha`) is applied per row. Inputs
    of shape (..., D) broadcast against the rows. What :meth:`ConditionalRadial.condition`
    returns."""

    def __init__(self, x0: Tensor, alpha_prime: Tensor, beta_prime: Tensor) -> None:
        super().__init__(x0.shape[-1], _batch_shape(x0, alpha_prime, beta_prime))
        self.x0 = x0
        self.alpha, self.alpha_plus_beta = radial_alpha(alpha_prime, beta_prime)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return radial_forward(x, self.x0, self.alpha, self.alpha_plus_beta)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return radial_inverse(y, self.x0, self.alpha, self.alpha_plus_beta)


class ConditionalPlanar(_Hypernetwork):
    r"""Conditional planar flow (seed eq. 27-29): :class:`~pyroflows.transforms.Planar`'s map
    with its raw parameters the output of a dense network of the context :math:`c`,

    .. math:: (u, w, b) = \mathrm{NN}(c), \qquad
              y = z + \hat u \tanh(w^\top z + b), \qquad
              \log|\det J| = \log\bigl(1 + \tanh'(w^\top z + b)\, w^\top \hat u\bigr),

    one set per context row, with :class:`~pyroflows.transforms.Planar`'s constraint
    :math:`w^\top \hat u > -1` applied per row (so every row's map is invertible, whatever the
    network outputs) and its inverse (a monotone 1-D root solve per row), so the conditioned
    layer scores any point. ``condition(c)`` with ``c`` of shape (..., C) returns a
    :class:`ConditionedPlanar` (a new one per call, holding the parameters computed then)
    for inputs whose batch dims broadcast with ``c``'s: ``c`` (B, C) with ``z`` (B, D) or
    (S, B, D); ``c`` (C,) for every row.

    The network is a :class:`~pyroflows.nn.DenseNetwork` ``C -> hidden_dims -> 2D + 1``
    (``u``, ``w``, ``b`` in that order); by default two hidden layers of 10 D units, as
    Pyro's :func:`~pyro.distributions.transforms.conditional_planar`. It starts with a zero
    output layer whose bias is a draw of :class:`~pyroflows.transforms.Planar`'s
    initialization: every context then maps as that plain layer, near the identity, so an
    untrained amortized guide starts near its base distribution.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims: the network's hidden widths (default ``(10 D, 10 D)``).
        activation: the network's hidden activation, a module class (default ``nn.ReLU``).

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.transforms.conditional_planar(3, context_dim=2)
        >>> t = layer.condition(torch.randn(5, 2))
        >>> z = torch.randn(10, 5, 3)
        >>> t(z).shape, t.log_abs_det_jacobian(z, t(z)).shape
        (torch.Size([10, 5, 3]), torch.Size([10, 5]))
        >>> torch.allclose(t.inv(t(z).clone()), z, atol=1e-5)
        True
    """

    _plain = Planar
    _names = ("u", "w", "bias")
    _transform = ConditionedPlanar

    @staticmethod
    def _sizes(dim: int) -> tuple[int, ...]:
        return (dim, dim, 1)


class ConditionalRadial(_Hypernetwork):
    r"""Conditional radial flow (seed eq. 27, 30-31): :class:`~pyroflows.transforms.Radial`'s
    map with its raw parameters the output of a dense network of the context :math:`c`,

    .. math:: (z_0, \alpha', \beta') = \mathrm{NN}(c), \qquad
              y = z + \beta h(\alpha, r)(z - z_0), \quad r = \|z - z_0\|,\quad
              h = 1 / (\alpha + r),

    with :math:`\alpha = \mathrm{softplus}(\alpha')`, :math:`\alpha + \beta =
    \mathrm{softplus}(\beta')` per context row (so every row's map is invertible, whatever the
    network outputs) and :class:`~pyroflows.transforms.Radial`'s closed-form inverse per row.
    ``condition(c)`` with ``c`` of shape (..., C) returns a :class:`ConditionedRadial` (a new
    one per call, holding the parameters computed then) for inputs whose batch dims broadcast
    with ``c``'s: ``c`` (B, C) with ``z`` (B, D) or (S, B, D); ``c`` (C,) for every row.

    The network is a :class:`~pyroflows.nn.DenseNetwork` ``C -> hidden_dims -> D + 2``
    (:math:`z_0`, :math:`\alpha'`, :math:`\beta'` in that order); by default two hidden layers
    of 10 D units, as Pyro's :func:`~pyro.distributions.transforms.conditional_radial`. It
    starts with a zero output layer whose bias is a draw of
    :class:`~pyroflows.transforms.Radial`'s initialization: every context then maps as that
    plain layer, near the identity.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims: the network's hidden widths (default ``(10 D, 10 D)``).
        activation: the network's hidden activation, a module class (default ``nn.ReLU``).

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
    """Build a :class:`ConditionalPlanar` layer (``kwargs``: its ``activation``)."""
    return ConditionalPlanar(dim, context_dim, hidden_dims, **kwargs)


def conditional_radial(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                       **kwargs) -> ConditionalRadial:
    """Build a :class:`ConditionalRadial` layer (``kwargs``: its ``activation``)."""
    return ConditionalRadial(dim, context_dim, hidden_dims, **kwargs)
