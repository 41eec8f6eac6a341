"""Planar flow (Rezende & Mohamed 2015) with an exact, vectorized inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fast import keeps_map, planar_chain, run_steps, stacked_rows, traced
from .base import FlowTransform

__all__ = ["Planar", "planar", "planar_constraint", "planar_forward_step", "planar_inverse_step",
           "planar_score_step"]


class Planar(FlowTransform):
    r"""Planar flow, seed eq. 28-29:

    .. math:: y = z + \hat u \tanh(w^\top z + b), \qquad
              \log|\det J| = \log\bigl(1 + \tanh'(w^\top z + b)\, w^\top \hat u\bigr),

    with :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` and
    :math:`m(a) = -1 + \mathrm{softplus}(a)`, so :math:`w^\top \hat u > -1` and the map is
    invertible for every value of the raw parameters ``u``, ``w``, ``b``.

    The slack :math:`\delta = 1 + w^\top \hat u = \mathrm{softplus}(w^\top u)` is computed
    as that softplus (:func:`planar_constraint`; at least the dtype's smallest normal number),
    never as a difference, and with :math:`t = \tanh(w^\top z + b)` the log-det as the sum
    of non-negative terms :math:`\log\bigl(t^2 + (1 - t^2)\,\delta\bigr)`: so
    :math:`w^\top \hat u > -1` holds in every precision, also where :math:`w^\top u \ll 0`
    puts :math:`w^\top \hat u` within rounding of -1.

    Inverse: :math:`a = w^\top z + b` solves :math:`a + (\delta - 1) \tanh a = w^\top y + b`
    (strictly increasing, slope :math:`t^2 + (1 - t^2)\,\delta > 0`), by safeguarded Newton
    steps to float precision; then :math:`z = y - \hat u \tanh a`. Parameter names and
    initialization are :class:`pyro.distributions.transforms.Planar`'s.

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

    def reset_to_identity(self) -> None:
        r"""Make the layer the identity map, keeping its direction ``w``: ``b = 0`` and
        :math:`u = w \log(e - 1) / \|w\|^2`, so :math:`w^\top u = \log(e - 1)`,
        :math:`\delta = \mathrm{softplus}(\log(e - 1)) = 1` and :math:`\hat u = u +
        (\delta - 1 - w^\top u)\, w / \|w\|^2 = 0` (to the dtype's rounding). The flow guides
        start their planar layers here, so the flow leaves their start untouched; ``u`` still
        gets a gradient (:math:`\partial y / \partial \hat u = \tanh(w^\top z + b)`).

        Example:
            >>> import torch, pyroflows as pf
            >>> t = pf.transforms.planar(4)
            >>> t.reset_to_identity()
            >>> z = torch.randn(6, 4, dtype=torch.float64)
            >>> torch.allclose(t.double()(z), z, atol=1e-12)
            True
        """
        with torch.no_grad():
            w = self.w.detach()
            self.u.copy_(w * (math.log(math.e - 1) / (w * w).sum().clamp_min(
                torch.finfo(w.dtype).tiny)))
            self.bias.zero_()

    def constrained(self) -> tuple[Tensor, Tensor]:
        """:math:`\\hat u` and the slack :math:`\\delta = 1 + w^\\top \\hat u > 0`
        (:func:`planar_constraint`): what the map uses."""
        return planar_constraint(self.w, self.u)

    def u_hat(self) -> Tensor:
        """The constrained direction :math:`\\hat u` with :math:`w^\\top \\hat u > -1`."""
        return self.constrained()[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat, slack = self.constrained()
        # the bias squeezed to shape (): keeps (D,) inputs unbatched
        return planar_forward_step(x, self.w, u_hat, self.bias.squeeze(-1), slack)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        u_hat, slack = self.constrained()
        return planar_inverse_step(y, self.w, u_hat, self.bias.squeeze(-1), slack)

    def fused_kind(self, inverse: bool) -> str | None:
        """``"planar"``, unless a subclass redefines the map."""
        return "planar" if keeps_map(type(self), Planar, _MAP) else None

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), Planar, _MAP)

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`planar_score_step` of this layer (:meth:`FlowTransform.score_step`)."""
        u_hat, slack = self.constrained()
        return planar_score_step(x, g, self.w, u_hat, self.bias.squeeze(-1), slack)

    @staticmethod
    def run_fused(x: Tensor, layers: list[Planar], kinds: list, log_det: Tensor | None,
                  inverse: bool) -> tuple[Tensor, Tensor]:
        r"""Consecutive planar layers, :math:`\hat u` and :math:`\delta` constrained once for all:
        forward as one fused node (:func:`~pyroflows._fast.planar.planar_chain`), inverses
        one by one."""
        forward_order = layers[::-1] if inverse else layers
        w, u, bias = stacked_rows(forward_order, ("w", "u", "bias"), (False, False, True))
        u_hat, slack = planar_constraint(w, u)
        if not inverse:
            return planar_chain(x, w, u_hat, bias, slack, log_det)
        return run_steps(x, planar_inverse_step, (w, u_hat, bias, slack), log_det, reverse=True)


# the methods that define Planar's map: a subclass that redefines one runs its own
_MAP = ("forward_and_log_det", "inverse_and_log_det", "constrained")


def planar_forward_step(x: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor
                        ) -> tuple[Tensor, Tensor]:
    r"""One planar layer's map :math:`x + \hat u \tanh(w^\top x + b)` and log-det from ``w``,
    :math:`\hat u` (shape (D,), or (..., D): one set per row, broadcast against ``x``'s batch
    dims), ``bias`` and :math:`\delta = 1 + w^\top \hat u` (shape () or (...,))."""
    act = torch.tanh(_project(x, w) + bias)
    return x + act.unsqueeze(-1) * u_hat, _log_det(act, slack)


def planar_inverse_step(y: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor
                        ) -> tuple[Tensor, Tensor]:
    r"""One planar layer's inverse and log-det, arguments as :func:`planar_forward_step`'s."""
    a = _solve_monotone_tanh(_project(y, w) + bias, slack)
    act = torch.tanh(a)
    return y - act.unsqueeze(-1) * u_hat, _log_det(act, slack)


def planar_score_step(x: Tensor, g: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor,
                      slack: Tensor) -> tuple[Tensor, Tensor]:
    r"""One planar layer's output :math:`y` and :math:`J^{-\top}(g - \nabla_x \log\det J)`
    at ``x``, arguments as :func:`planar_forward_step`'s. With :math:`t = \tanh(w^\top x +
    b)`, :math:`q = 1 - t^2`, :math:`J = I + q\, \hat u w^\top` and :math:`\det J = d =
    t^2 + q \delta`: :math:`\nabla_x \log d = c\, w` with :math:`c = 2 t q (1 - \delta) / d`,
    and by Sherman-Morrison :math:`J^{-\top} v = v - (q\, \hat u^\top v / d)\, w`."""
    act = torch.tanh(_project(x, w) + bias)
    q = 1 - act * act
    det = torch.addcmul(act * act, q, slack)
    c = 2 * act * q * (1 - slack) / det
    v = g - c.unsqueeze(-1) * w
    g_in = v - (q * _project(v, u_hat) / det).unsqueeze(-1) * w
    return x + act.unsqueeze(-1) * u_hat, g_in


def _project(x: Tensor, w: Tensor) -> Tensor:
    # w^T x over the last dim: one matrix-vector product for one layer's w (D,), an
    # elementwise product and sum for one w per row (..., D)
    return x @ w if w.dim() == 1 else (x * w).sum(-1)


def planar_constraint(w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\hat u` of :class:`Planar` (Rezende & Mohamed 2015, appendix A) and the slack
    :math:`\delta = 1 + w^\top \hat u = \mathrm{softplus}(w^\top u)` (shape (...,), at least
    the dtype's smallest normal number) for ``w``, ``u`` of shape (..., D): one layer, or K
    layers stacked as (K, D). Where :math:`|w|^2` is below that number (``w = 0``: the map is
    the translation by :math:`u \tanh b`), :math:`\hat u = u` and :math:`\delta = 1 + w^\top
    u`, which the correction, singular there, would not give."""
    wu = (w * u).sum(-1, keepdim=True)
    tiny = torch.finfo(w.dtype).tiny
    w_sq = (w * w).sum(-1, keepdim=True)
    flat = w_sq < tiny
    slack = torch.where(flat, 1 + wu, F.softplus(wu)).clamp_min(tiny)
    u_hat = torch.where(flat, u, u + (slack - 1 - wu) * w / w_sq.clamp_min(tiny))
    return u_hat, slack.squeeze(-1)


def _log_det(act: Tensor, slack: Tensor) -> Tensor:
    # 1 + (1 - t^2) c with c = delta - 1 is t^2 + (1 - t^2) delta: non-negative terms, where
    # 1 + c (and log1p of a sum near -1) would cancel as c nears -1
    act_sq = act * act
    return torch.log(torch.addcmul(act_sq, 1 - act_sq, slack))


def _solve_monotone_tanh(s: Tensor, slack: Tensor, max_iter: int = 100) -> Tensor:
    """Solve ``a + (slack - 1) tanh(a) = s`` elementwise for ``slack > 0``: Newton steps from
    ``a = s``, bisection where one leaves the bracket ``[s - |c|, s + |c|]`` (``c = slack - 1``;
    it holds the root), under ``no_grad``; then one differentiable Newton step (the
    implicit-function gradient). The slope ``1 + c (1 - t^2)`` is taken as
    ``t^2 + (1 - t^2) slack``, which cannot cancel to 0 or below."""
    c = slack - 1
    with torch.no_grad():
        width = c.abs().expand_as(s)
        lo, hi = s - width, s + width
        a = s.clone()
        eps = torch.finfo(s.dtype).eps
        for _ in range(max_iter):
            t = torch.tanh(a)
            r = a + c * t - s
            t_sq = t * t
            d = torch.addcmul(t_sq, 1 - t_sq, slack)
            hi = torch.where(r > 0, a, hi)
            lo = torch.where(r < 0, a, lo)
            a_new = a - r / d
            outside = ~((a_new > lo) & (a_new < hi)) | ~torch.isfinite(a_new)
            a_new = torch.where(outside & (r != 0), 0.5 * (lo + hi), a_new)
            a_new = torch.where(r == 0, a, a_new)
            step = (a_new - a).abs()
            a = a_new
            if not traced() and bool((step <= 4 * eps * (1 + a.abs())).all()):
                break  # (under torch.func every step runs: no data-dependent exit)
    t = torch.tanh(a)
    t_sq = t * t
    return a - (a + c * t - s) / torch.addcmul(t_sq, 1 - t_sq, slack)


def planar(dim: int) -> Planar:
    """Build a :class:`Planar` layer of event size ``dim`` with Pyro's default initialization."""
    return Planar(dim)
