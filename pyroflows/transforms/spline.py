r"""Neural spline flows (Durkan et al., 2019): monotone rational-quadratic splines whose knots
are the output of a MADE, autoregressive like MAF, plain and conditional (seed eq. 27)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fast import broadcast_batch, traced
from .._fast.made import sequential_levels
from ..nn.made import MADE, default_hidden_dims
from .autoregressive import AutoregressiveCore
from .conditional import ConditionalMADELayer, Conditioned

__all__ = ["rational_quadratic_spline", "NSF", "nsf", "ConditionalNSF", "ConditionedNSF",
           "conditional_nsf"]

#: the smallest bin width and height (a share of the interval) and knot derivative (nflows'
#: defaults): no bin and no slope collapses to 0
MIN_BIN, MIN_DERIVATIVE = 1e-3, 1e-3
# softplus(0 + _UNIT_SHIFT) + MIN_DERIVATIVE = 1: a zero network output is the identity
_UNIT_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _bins(raw: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """The K bins' left ends and sizes, (..., K, D) each, of the partition of
    ``[-bound, bound]`` whose shares are ``softmax(raw)`` over the bins (dim -2 of ``raw``),
    each at least ``MIN_BIN`` of it."""
    k = raw.shape[-2]
    sizes = (2 * bound) * (MIN_BIN + (1 - MIN_BIN * k) * torch.softmax(raw, dim=-2))
    return torch.cumsum(sizes, dim=-2) - sizes - bound, sizes


def rational_quadratic_spline(x: Tensor, raw_widths: Tensor, raw_heights: Tensor,
                              raw_derivatives: Tensor, bound: float, inverse: bool = False
                              ) -> tuple[Tensor, Tensor]:
    r"""The monotone rational-quadratic spline of Gregory & Delbourgo (1982) as Durkan et al.
    (2019) use it, elementwise: on :math:`[-B, B]`, K bins with knots
    :math:`(x^k, y^k)` and derivatives :math:`\delta^k` there; in bin :math:`k`, with
    :math:`\xi = (x - x^k) / w^k`, :math:`s^k = h^k / w^k`,

    .. math:: y = y^k + \frac{h^k \bigl[s^k \xi^2 + \delta^k \xi (1 - \xi)\bigr]}
              {s^k + (\delta^{k+1} + \delta^k - 2 s^k)\, \xi (1 - \xi)}, \qquad
              \frac{dy}{dx} = \frac{(s^k)^2 \bigl[\delta^{k+1} \xi^2 + 2 s^k \xi (1 - \xi)
              + \delta^k (1 - \xi)^2\bigr]}{\bigl[s^k + (\delta^{k+1} + \delta^k - 2 s^k)\,
              \xi (1 - \xi)\bigr]^2};

    outside :math:`[-B, B]` the identity (the end derivatives are 1, so the map is
    :math:`C^1`). The inverse solves the quadratic :math:`a\xi^2 + b\xi + c = 0` for its
    root in :math:`[0, 1]`, :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})` where
    :math:`b \ge 0`, else the same root as :math:`(\sqrt{b^2 - 4ac} - b) / 2a` (no
    cancellation either way).

    Arguments:
        x: the inputs (..., D) (``inverse``: the outputs y).
        raw_widths, raw_heights: (..., K, D), unnormalized: a softmax over the K bins gives
            their shares of the interval.
        raw_derivatives: (..., K - 1, D), the interior knots' derivatives through
            :math:`\mathrm{softplus}(\cdot + c) + 10^{-3}` (:math:`c`: zero gives 1).
        bound: B.
        inverse: map y to x.

    Returns:
        ``(image, log|dy/dx|)``, both (..., D): the forward derivative in either direction.
    """
    (xk, widths), (yk, heights) = _bins(raw_widths, bound), _bins(raw_heights, bound)
    derivatives = F.pad(F.softplus(raw_derivatives + _UNIT_SHIFT) + MIN_DERIVATIVE,
                        (0, 0, 1, 1), value=1.0)
    inside = (x >= -bound) & (x <= bound)
    x_in = x.clamp(-bound, bound)
    # each point's bin: how many interior knots lie at or below it (the last bin's right end
    # is the bound up to rounding); then one gather of the bin's left knot (x, y), width,
    # height and end derivatives, from the six tables stacked at dim -3 (stacking them last
    # interleaves, several times slower)
    search = yk if inverse else xk
    k = (x_in.unsqueeze(-2) >= search[..., 1:, :]).sum(-2, keepdim=True)
    table = torch.stack([xk, yk, widths, heights, derivatives[..., :-1, :],
                         derivatives[..., 1:, :]], dim=-3)
    batch = k.shape[:-2]
    table = table.expand(*batch, *table.shape[-3:])
    index = k.unsqueeze(-3).expand(*batch, 6, *k.shape[-2:])
    x0, y0, w, h, d0, d1 = table.gather(-2, index).squeeze(-2).unbind(-2)
    s = h / w
    bend = d1 + d0 - 2 * s
    if inverse:
        dy = x_in - y0
        a = h * (s - d0) + dy * bend
        b = h * d0 - dy * bend
        c = -s * dy
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        # the root in [0, 1], by whichever of its two forms adds terms of one sign
        # (2c / (-b - root) cancels when b < 0); a > h s > 0 where b < 0, and elsewhere a,
        # possibly 0, is kept out of the unused branch so that its gradient stays finite
        negative = b < 0
        a = torch.where(negative, a, torch.ones_like(a))
        xi = torch.where(negative, (root - b) / (2 * a), 2 * c / (-b - root)).clamp(0, 1)
    else:
        xi = (x_in - x0) / w
    cross = xi * (1 - xi)
    denom = s + bend * cross
    slope = s * s * (d1 * xi * xi + 2 * s * cross + d0 * (1 - xi) ** 2) / (denom * denom)
    image = x0 + xi * w if inverse else y0 + h * (s * xi * xi + d0 * cross) / denom
    return torch.where(inside, image, x), torch.where(inside, slope.log(), 0.0)


class SplineAutoregressiveCore(AutoregressiveCore):
    r"""An autoregressive map :math:`u \mapsto v`, :math:`v_i = g(u_i; \theta_i(u_{<i}))`
    with :math:`g` :func:`rational_quadratic_spline` and :math:`\theta` one
    :class:`~pyroflows.nn.MADE` pass (3K - 1 outputs per coordinate): ``u -> v`` one pass,
    ``v -> u`` one pass per level of the order, each solving that level's coordinates.
    ``forward_is_parallel`` says which way is the forward map, ``log_det_sign`` turns
    :math:`\sum_i \log g'` into the forward log-det. A zero network output is the identity,
    so a new layer is."""

    forward_is_parallel: bool = False
    log_det_sign: float = -1.0

    def __init__(self, dim: int, hidden_dims: Sequence[int] | None = None, bins: int = 8,
                 bound: float = 5.0, order: Sequence[int] | Tensor | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU, residual: bool = False) -> None:
        super().__init__(dim)
        setup_spline(self, dim, hidden_dims, bins, bound, order, activation, residual)

    def spline_parameters(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The raw (widths, heights, derivatives) of every coordinate, (..., K, D) twice and
        (..., K - 1, D), from one conditioner pass (given a conditioned layer's context)."""
        context = self.context
        out = self.conditioner(u) if context is None else self.conditioner(u, context)
        out = out.unflatten(-1, (-1, self.dim))  # the MADE's blocks of D: (..., 3K - 1, D)
        return out.split((self.bins, self.bins, self.bins - 1), dim=-2)

    def _parallel(self, u: Tensor) -> tuple[Tensor, Tensor]:
        v, log_det = rational_quadratic_spline(u, *self.spline_parameters(u), self.bound)
        return v, log_det.sum(-1)

    def _sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        # pass k solves the coordinates of level k, whose splines depend on the levels below
        # it only, all exact by then: one network pass per level, one spline per coordinate
        if not torch.is_grad_enabled() and self._fusable() and not traced():
            return self._sequential_no_grad(v)  # (fused = False: a full pass a level)
        context = self.context
        if context is not None:  # v's batch dims broadcast against the contexts'
            v = v.expand(*broadcast_batch(v.shape[:-1], context.shape[:-1]), self.dim)
        u, log_det = v, torch.zeros_like(v)
        for columns in self._levels(v.device):
            params = [p.index_select(-1, columns) for p in self.spline_parameters(u)]
            solved, slope = rational_quadratic_spline(v.index_select(-1, columns), *params,
                                                      self.bound, inverse=True)
            u = u.index_copy(-1, columns, solved)
            log_det = log_det.index_copy(-1, columns, slope)
        return u, log_det.sum(-1)

    def _sequential_no_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        # the same levels, computing at each only the hidden units and outputs it needs
        bins, bound = self.bins, self.bound

        def solve(v_level: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
            params = out.unflatten(-1, (3 * bins - 1, -1)).split((bins, bins, bins - 1), -2)
            return rational_quadratic_spline(v_level, *params, bound, inverse=True)

        u, log_det = sequential_levels(self, v, 3 * bins - 1, solve)
        return u, log_det.sum(-1)

    def _levels(self, device: torch.device) -> list[Tensor]:
        """The coordinates of each level of the conditioner's order, lowest first, from its
        ``degrees`` buffer (which a loaded state may change: the memo's key follows it)."""
        net = self.conditioner
        degrees = net.degrees

        def levels() -> list[Tensor]:
            ranks = degrees.tolist()
            return [torch.tensor([i for i, d in enumerate(ranks) if d == level], device=device)
                    for level in sorted(set(ranks))]

        key = (degrees._version, degrees.data_ptr(), degrees.device, device)
        return net.memo("spline_levels", key, levels)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bins={self.bins}, bound={self.bound}"


def setup_spline(layer: nn.Module, dim: int, hidden_dims: Sequence[int] | None, bins: int,
                 bound: float, order: Sequence[int] | Tensor | None,
                 activation: Callable[[], nn.Module], residual: bool,
                 context_dim: int | None = None) -> None:
    """Give ``layer`` what :class:`SplineAutoregressiveCore` reads: its MADE ``conditioner``
    (3K - 1 outputs per coordinate; a context input of size ``context_dim`` where given),
    ``bins`` and ``bound``."""
    if hidden_dims is None:
        hidden_dims = default_hidden_dims(dim)
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    if not bound > 0 or not math.isfinite(bound):
        raise ValueError(f"bound must be positive and finite, got {bound}")
    layer.bins, layer.bound = int(bins), float(bound)
    layer.conditioner = MADE(dim, hidden_dims, num_params=3 * layer.bins - 1, order=order,
                             activation=activation, residual=residual, context_dim=context_dim)


class NSF(SplineAutoregressiveCore):
    r"""Autoregressive neural spline flow (Durkan et al., 2019), in MAF's direction: the
    inverse (the ``log_prob`` direction) is one :class:`~pyroflows.nn.MADE` pass over the
    data :math:`y`,

    .. math:: z_i = g\bigl(y_i; \theta_i(y_{<i})\bigr), \qquad
              \log\left|\det \frac{\partial y}{\partial z}\right|
              = -\sum_i \log g'\bigl(y_i; \theta_i(y_{<i})\bigr),

    with :math:`g` a monotone rational-quadratic spline of K bins on :math:`[-B, B]` and the
    identity outside (:func:`rational_quadratic_spline`), sampling D sequential levels (each
    an analytic spline inverse; without autograd each hidden unit is computed once, about one
    network pass in all: :attr:`fused`). Where an affine layer (:class:`~pyroflows.transforms.MAF`)
    moves and scales each conditional, a spline bends it: thin, curved or multimodal
    conditionals in fewer layers. Put the data inside :math:`[-B, B]` (the density estimator
    standardizes it first); outside, the layer is the identity.

    References:
        Durkan et al., "Neural Spline Flows", NeurIPS 2019, https://arxiv.org/abs/1906.04032

    Arguments:
        dim: the event size D.
        hidden_dims: the MADE hidden widths, default ``(max(64, 4D),) * 2``.
        bins: K, the number of bins.
        bound: B, the half-width of the interval the spline bends.
        order: the autoregressive rank of each coordinate, shape (D,), default ``0..D-1``.
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers of the MADE.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.nsf(2, hidden_dims=(16,), bins=4)
        >>> with torch.no_grad():  # move the output layer off its identity start
        ...     _ = t.conditioner.layer_parameters(-1)[0].normal_()
        >>> z = torch.randn(5, 2); y = t(z)
        >>> torch.allclose(t.inv(y.clone()), z, atol=1e-5)
        True
    """

    forward_is_parallel = False
    log_det_sign = -1.0


def nsf(dim: int, hidden_dims: Sequence[int] | None = None, bins: int = 8, **kwargs) -> NSF:
    """Build an :class:`NSF` layer (the identity at initialization)."""
    return NSF(dim, hidden_dims=hidden_dims, bins=bins, **kwargs)


class ConditionedNSF(Conditioned, NSF):
    """:class:`NSF`'s map for one batch of contexts (made by :meth:`ConditionalNSF.condition`)."""


class ConditionalNSF(ConditionalMADELayer):
    r"""Conditional neural spline flow: :class:`NSF` whose splines' knots are the output of a
    MADE of :math:`(y_{<i}, c)`, the context entering the first hidden layer as in
    :class:`~pyroflows.transforms.ConditionalMAF` (Durkan et al. 2019's conditional density
    estimators; ``sbi``'s ``"nsf"``):

    .. math:: z_i = g\bigl(y_i; \theta_i(y_{<i}, c)\bigr).

    ``condition(c)`` (c of shape (..., C), broadcast against the input's batch dims) returns a
    :class:`ConditionedNSF`: ``log_prob`` one pass, sampling D passes. A new layer is the
    identity for every context.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims, bins, bound, order, activation, residual: as :class:`NSF`'s.

    Example:
        >>> import torch, pyroflows as pf
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> layer = pf.transforms.conditional_nsf(2, context_dim=3, hidden_dims=(16,))
        >>> base = Independent(Normal(torch.zeros(2), 1.0), 1)
        >>> q = TransformedDistribution(base, [layer.condition(torch.randn(5, 3))])
        >>> q.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    conditioned_type = ConditionedNSF
    conditioned_settings = ("bins", "bound", "fused")

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 bins: int = 8, bound: float = 5.0, order: Sequence[int] | Tensor | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU, residual: bool = False) -> None:
        super().__init__(dim, context_dim)
        setup_spline(self, self.dim, hidden_dims, bins, bound, order, activation, residual,
                     self.context_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"


def conditional_nsf(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                    bins: int = 8, **kwargs) -> ConditionalNSF:
    """Build a :class:`ConditionalNSF` layer (the identity at initialization)."""
    return ConditionalNSF(dim, context_dim, hidden_dims=hidden_dims, bins=bins, **kwargs)
