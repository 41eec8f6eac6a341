"""Planar flow (Rezende & Mohamed 2015) with an exact, vectorized inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.shared import SharedModule
from .base import FlowTransform

__all__ = [
    "Planar", "planar", "planar_u_hat", "PlanarParameters", "StackedPlanar", "planar_layers",
    "stacked_planar_parameters",
]


class Planar(FlowTransform):
    r"""Planar flow, seed eq. 28-29:

    .. math:: y = z + \hat u \tanh(w^\top z + b), \qquad
              \log|\det J| = \log\bigl(1 + \tanh'(w^\top z + b)\, w^\top \hat u\bigr),

    with :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` and
    :math:`m(a) = -1 + \mathrm{softplus}(a)`, so :math:`w^\top \hat u > -1` and the map is
    invertible for every value of the raw parameters ``u``, ``w``, ``b``.

    Inverse: with :math:`a = w^\top z + b` the map satisfies
    :math:`w^\top y + b = a + c \tanh a`, :math:`c = w^\top \hat u > -1`, a strictly increasing
    scalar equation. It is solved by Newton's method safeguarded with bisection on the bracket
    :math:`[s - |c|, s + |c|]`, vectorized over the batch, to float precision; then
    :math:`z = y - \hat u \tanh a`. So the flow scores points it did not sample.

    Parameter names and initialization match :class:`pyro.distributions.transforms.Planar`.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.planar(3)
        >>> z = torch.randn(10, 3)
        >>> torch.allclose(t.inv(t(z).clone()), z, atol=1e-5)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.bias = nn.Parameter(torch.empty(1))
        self.u = nn.Parameter(torch.empty(dim))
        self.w = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            self.w.uniform_(-stdv, stdv)
            self.u.uniform_(-stdv, stdv)
            self.bias.zero_()

    def u_hat(self) -> Tensor:
        """The constrained direction :math:`\\hat u` with :math:`w^\\top \\hat u > -1`."""
        return planar_u_hat(self.w, self.u)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        act = torch.tanh(x @ self.w + self.bias.squeeze(-1))  # keeps (D,) inputs unbatched
        y = x + act.unsqueeze(-1) * u_hat
        log_det = torch.log1p((1 - act.square()) * (self.w @ u_hat))
        return y, log_det

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        return planar_inverse_step(y, self.w, u_hat, self.bias.squeeze(-1), self.w @ u_hat)


def planar_inverse_step(
    y: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    r"""One planar layer's inverse (see :class:`Planar`) from its (D,) vectors ``w``,
    :math:`\hat u`, scalar ``bias`` and :math:`c = w^\top \hat u`: ``(x, log|det J|)``."""
    a = _solve_monotone_tanh(y @ w + bias, c)
    act = torch.tanh(a)
    return y - act.unsqueeze(-1) * u_hat, torch.log1p((1 - act.square()) * c)


def planar_u_hat(w: Tensor, u: Tensor) -> Tensor:
    r"""The constrained direction :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2`,
    :math:`m(a) = -1 + \mathrm{softplus}(a)`, so that :math:`w^\top \hat u > -1` (Rezende &
    Mohamed 2015, appendix A). ``w`` and ``u`` have shape (..., D): one layer, or K layers
    stacked as (K, D) at once (:func:`pyroflows.flows.planar_chain`)."""
    wu = (w * u).sum(-1, keepdim=True)
    w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (F.softplus(wu) - 1 - wu) * w / w_sq


def _solve_monotone_tanh(s: Tensor, c: Tensor, max_iter: int = 100) -> Tensor:
    """Solve ``a + c tanh(a) = s`` elementwise for ``c > -1`` (strictly increasing in ``a``).

    Newton steps from ``a = s``, kept inside the bracket ``[s - |c|, s + |c|]`` (which holds the
    root because ``|tanh| < 1``) and replaced by bisection whenever they leave it. Runs under
    ``no_grad``, then takes one Newton step with gradients on, so the result is differentiable
    with respect to ``s`` and ``c`` by the implicit function theorem.
    """
    with torch.no_grad():
        width = c.abs().expand_as(s)
        lo, hi = s - width, s + width
        a = s.clone()
        eps = torch.finfo(s.dtype).eps
        for _ in range(max_iter):
            t = torch.tanh(a)
            r = a + c * t - s
            d = 1 + c * (1 - t * t)
            hi = torch.where(r > 0, a, hi)
            lo = torch.where(r < 0, a, lo)
            a_new = a - r / d
            outside = ~((a_new > lo) & (a_new < hi)) | ~torch.isfinite(a_new)
            a_new = torch.where(outside & (r != 0), 0.5 * (lo + hi), a_new)
            a_new = torch.where(r == 0, a, a_new)
            step = (a_new - a).abs()
            a = a_new
            if bool((step <= 4 * eps * (1 + a.abs())).all()):
                break
    # One differentiable Newton step: exact at the root, gives the implicit-function gradient.
    t = torch.tanh(a)
    return a - (a + c * t - s) / (1 + c * (1 - t * t))


def planar(dim: int) -> Planar:
    """Build a :class:`Planar` layer of event size ``dim`` with Pyro's default initialization."""
    return Planar(dim)


class ParameterBank(SharedModule):
    """Base of the stacked parameters of ``num_layers`` layers of one family (rows of each
    tensor = layers): checks and keeps ``dim`` and ``num_layers``; subclasses make the tensors
    and ``reset_parameters(index=None)``."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        if int(dim) < 1 or int(num_layers) < 1:
            raise ValueError(f"{type(self).__name__}: dim and num_layers must be positive, got "
                             f"{dim!r}, {num_layers!r}")
        self.dim, self.num_layers = int(dim), int(num_layers)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_layers={self.num_layers}"


class PlanarParameters(ParameterBank):
    r"""The raw parameters of ``num_layers`` planar layers, stacked: ``u`` and ``w`` of shape
    (L, D), ``bias`` of shape (L,); row :math:`k` holds layer :math:`k`'s ``u``, ``w`` and
    ``bias`` of :class:`Planar`.

    Why: an optimizer that keeps one state per tensor (``pyro.optim`` makes one torch
    optimizer per tensor) and ``pyro.module``, which registers every tensor on every guide
    call, cost per tensor, not per number; three tensors for L layers instead of 3L made a
    32-layer planar guide's SVI step 3-4x faster (``benchmarks/speed.py``, item 4). The fused
    kernel (:func:`pyroflows.flows.planar_chain`) reads the stacked tensors directly. The
    layers themselves are :class:`StackedPlanar` views, built by :func:`planar_layers`.

    Initialization: layer by layer in the order of :class:`Planar` (``w``, then ``u``,
    uniform on :math:`\pm 1/\sqrt{D}`; ``bias`` 0), so under one seed the values are those of
    L :class:`Planar` layers built one after the other.

    Arguments:
        dim: the event size D.
        num_layers: the number of layers L.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__(dim, num_layers)
        self.bias = nn.Parameter(torch.empty(self.num_layers))
        self.u = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.w = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.reset_parameters()

    def reset_parameters(self, index: int | None = None) -> None:
        """Draw every layer's parameters afresh (or only layer ``index``'s)."""
        stdv = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            for k in range(self.num_layers) if index is None else [index]:
                self.w[k].uniform_(-stdv, stdv)
                self.u[k].uniform_(-stdv, stdv)
                self.bias[k].zero_()

class RowOf:
    """Class attribute of a :class:`StackedRow` layer: the parameter of the same name read from
    row ``index`` of the bank (a view, so gradients reach the bank); ``scalar``: a (K,) bank
    tensor read as shape (1,), as the one-layer classes store it."""

    def __init__(self, scalar: bool = False) -> None:
        self.scalar = scalar

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        bank, i = getattr(layer.stacked, self.name), layer.index
        return bank[i: i + 1] if self.scalar else bank[i]


class StackedRow:
    """Mixin of a layer that is row ``index`` of a bank of stacked parameters
    (:class:`PlanarParameters`, :class:`~pyroflows.transforms.radial.RadialParameters`): the
    bank is its submodule ``stacked``, shared with the other rows."""

    stacked: nn.Module
    index: int

    def _attach_row(self, stacked: nn.Module, index: int) -> None:
        FlowTransform.__init__(self, stacked.dim)  # type: ignore[arg-type]
        if not 0 <= int(index) < stacked.num_layers:
            raise ValueError(f"{type(self).__name__}: index {index} outside "
                             f"0..{stacked.num_layers - 1}")
        self.stacked = stacked
        self.index = int(index)

    def reset_parameters(self) -> None:
        self.stacked.reset_parameters(self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, index={self.index}"  # type: ignore[attr-defined]


class StackedPlanar(StackedRow, Planar):
    r"""Layer ``index`` of a :class:`PlanarParameters`: the map of :class:`Planar` with
    ``u``, ``w`` and ``bias`` read from row ``index`` of the stacked tensors (views, so
    gradients reach the stacked parameters).

    It behaves as a :class:`Planar` layer in every respect (forward, inverse, log-det, cache,
    conformance suite), alone or in a stack; its parameters (``parameters()``,
    ``state_dict()``, keys ``stacked.u``, ``stacked.w``, ``stacked.bias``) are the whole
    shared :class:`PlanarParameters`, submodule ``stacked`` of every layer of the stack, so
    ``.to()`` on one layer moves them for all, and a copy of one layer copies them all.

    Example:
        >>> import torch
        >>> from pyroflows.transforms.planar import planar_layers
        >>> layers = planar_layers(3, num_layers=4)
        >>> layers[1].w.shape, layers[1].stacked.w.shape
        (torch.Size([3]), torch.Size([4, 3]))
        >>> layers[1](torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, stacked: PlanarParameters, index: int) -> None:
        self._attach_row(stacked, index)  # Planar's own parameters are not made

    w = RowOf()
    u = RowOf()
    bias = RowOf(scalar=True)  # shape (1,), as Planar's


def planar_layers(dim: int, num_layers: int) -> list[StackedPlanar]:
    """``num_layers`` planar layers over one :class:`PlanarParameters` (what
    ``pyroflows.flows.build("planar", ...)`` stacks)."""
    stacked = PlanarParameters(dim, num_layers)
    return [StackedPlanar(stacked, k) for k in range(num_layers)]


def stacked_planar_parameters(layers: list[Planar]) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, u, bias)`` of consecutive planar layers as (K, D), (K, D), (K,) tensors: the
    stacked parameters themselves (or a slice of them) when the layers are rows
    ``i, i + 1, ...`` of one :class:`PlanarParameters`, else stacked from the layers."""
    return stacked_rows(layers, StackedPlanar, ("w", "u", "bias"), scalar=(False, False, True))


def _rows_of_one_bank(layers: list, row_type: type) -> tuple[nn.Module, int] | None:
    """``(bank, first index)`` when ``layers`` are rows ``i, i + 1, ...`` of one bank."""
    first = layers[0]
    if type(first) is not row_type:
        return None
    bank, start = first.stacked, first.index
    for k, layer in enumerate(layers):
        if type(layer) is not row_type or layer.stacked is not bank or layer.index != start + k:
            return None
    return bank, start


def stacked_rows(layers: list, row_type: type, names: tuple[str, ...],
                 scalar: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """The parameters ``names`` of consecutive layers as stacked (K, ...) tensors: the bank's
    tensors themselves (or a slice of rows) when the layers are rows ``i, i + 1, ...`` of one
    bank of ``row_type`` layers, else stacked from the layers (``scalar``: a parameter of shape
    (1,) per layer, concatenated to (K,))."""
    rows = _rows_of_one_bank(layers, row_type)
    if rows is not None:
        bank, start = rows
        tensors = tuple(getattr(bank, name) for name in names)
        if len(layers) == bank.num_layers:
            return tensors
        return tuple(t[start:start + len(layers)] for t in tensors)
    return tuple((torch.cat if one else torch.stack)([getattr(layer, name) for layer in layers])
                 for name, one in zip(names, scalar, strict=True))
