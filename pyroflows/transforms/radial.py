"""Radial flow (Rezende & Mohamed 2015) with a closed-form inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fast import keeps_map, radial_chain, run_steps, stacked_rows
from .._fast.radial import log_det_slope
from .base import FlowTransform

__all__ = ["Radial", "radial", "radial_alpha", "radial_forward", "radial_inverse",
           "radial_score_step"]


class Radial(FlowTransform):
    r"""Radial flow, seed eq. 30-31:

    .. math:: y = z + \beta h(\alpha, r)(z - z_0), \quad r = \|z - z_0\|,\quad
              h = 1 / (\alpha + r),

    .. math:: \log|\det J| = (D - 1)\log(1 + \beta h) + \log(1 + \beta h - \beta r h^2),

    with :math:`\alpha = \mathrm{softplus}(\alpha')` and
    :math:`\beta = -\alpha + \mathrm{softplus}(\beta')`, so :math:`\alpha > 0`,
    :math:`\beta > -\alpha` and the map is invertible for every raw parameter value.

    Inverse in closed form: :math:`R = \|y - z_0\| = r(\alpha + \beta + r)/(\alpha + r)` gives
    :math:`r^2 + (\alpha + \beta - R) r - \alpha R = 0` (its non-negative root), then
    :math:`z = z_0 + (y - z_0)(\alpha + r)/(\alpha + \beta + r)`. Parameter names and
    initialization are :class:`pyro.distributions.transforms.Radial`'s.

    References:
        Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Arguments:
        dim: the event size D.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.radial(3)
        >>> y = torch.randn(10, 3)
        >>> torch.allclose(t(t.inv(y).clone()), y, atol=1e-5)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.x0 = nn.Parameter(torch.empty(dim))
        self.alpha_prime = nn.Parameter(torch.empty(1))
        self.beta_prime = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            self.alpha_prime.uniform_(-stdv, stdv)
            self.beta_prime.uniform_(-stdv, stdv)
            self.x0.uniform_(-stdv, stdv)

    def reset_to_identity(self) -> None:
        r"""Make the layer the identity map, keeping its centre and :math:`\alpha`:
        :math:`\beta' = \alpha'`, so :math:`\alpha + \beta = \alpha` and :math:`\beta = 0`
        exactly. The flow guides start their radial layers here, so the flow leaves their
        start untouched; :math:`\beta'` still gets a gradient (:math:`\partial y / \partial
        \beta = h\,(z - z_0)`).

        Example:
            >>> import torch, pyroflows as pf
            >>> t = pf.transforms.radial(4)
            >>> t.reset_to_identity()
            >>> z = torch.randn(6, 4)
            >>> torch.equal(t(z), z)
            True
        """
        with torch.no_grad():
            self.beta_prime.copy_(self.alpha_prime)

    def _alpha_beta(self) -> tuple[Tensor, Tensor]:
        return radial_alpha(self.alpha_prime, self.beta_prime)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return radial_forward(x, self.x0, *self._alpha_beta())

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return radial_inverse(y, self.x0, *self._alpha_beta())

    def fused_kind(self, inverse: bool) -> str | None:
        """``"radial"``, unless a subclass redefines the map."""
        return "radial" if keeps_map(type(self), Radial, _MAP) else None

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), Radial, _MAP)

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`radial_score_step` of this layer (:meth:`FlowTransform.score_step`)."""
        return radial_score_step(x, g, self.x0, *self._alpha_beta())

    @staticmethod
    def run_fused(x: Tensor, layers: list[Radial], kinds: list, log_det: Tensor | None,
                  inverse: bool) -> tuple[Tensor, Tensor]:
        r"""Consecutive radial layers, :math:`\alpha` and :math:`\alpha + \beta` computed once
        for all from the stacked parameters (one gradient each, not K row scatters): forward
        as one fused node (:func:`~pyroflows._fast.radial.radial_chain`), inverses one by
        one."""
        forward_order = layers[::-1] if inverse else layers
        x0, alpha_prime, beta_prime = stacked_rows(
            forward_order, ("x0", "alpha_prime", "beta_prime"), (False, True, True))
        params = (x0, *radial_alpha(alpha_prime, beta_prime))
        if not inverse:
            return radial_chain(x, *params, log_det)
        return run_steps(x, radial_inverse, params, log_det, reverse=True)


# the methods that define Radial's map: a subclass that redefines one runs its own
_MAP = ("forward_and_log_det", "inverse_and_log_det", "_alpha_beta")


def radial_alpha(alpha_prime: Tensor, beta_prime: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\alpha = \mathrm{softplus}(\alpha')` and :math:`\alpha + \beta =
    \mathrm{softplus}(\beta')` (so the sum stays positive in float32), elementwise, each at
    least the square root of the dtype's smallest normal number: positive however far below
    0 the raw value is (where softplus underflows to 0 the map would divide by 0 at its
    centre), with :math:`\alpha(\alpha + \beta)` of the log-det a normal number and the
    centre's expansion :math:`(\alpha + \beta)/\alpha` finite for any sane :math:`\beta'`."""
    floor = torch.finfo(alpha_prime.dtype).tiny ** 0.5
    return F.softplus(alpha_prime).clamp_min(floor), F.softplus(beta_prime).clamp_min(floor)


def radial_forward(x: Tensor, x0: Tensor, alpha: Tensor, alpha_plus_beta: Tensor
                   ) -> tuple[Tensor, Tensor]:
    r"""One radial layer's map and log-det from its centre ``x0`` (D,), :math:`\alpha` and
    :math:`\alpha + \beta` (shape (1,) or ())."""
    diff = x - x0
    r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    y = x + (alpha_plus_beta - alpha) / (alpha + r) * diff
    return y, _log_det(r, alpha, alpha_plus_beta, x.shape[-1])


def radial_inverse(y: Tensor, x0: Tensor, alpha: Tensor, alpha_plus_beta: Tensor
                   ) -> tuple[Tensor, Tensor]:
    r"""One radial layer's inverse and log-det, arguments as :func:`radial_forward`'s."""
    diff = y - x0
    big_r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    b = alpha_plus_beta - big_r
    root = torch.sqrt(b * b + 4 * alpha * big_r)
    # r = (root - b) / 2 = 2 alpha R / (root + b): each branch a sum of positive terms, the
    # second for b >= 0. Both branches take |b| + root > 0 (the branch taken differentiates
    # |b| at b = 0), so the one not taken is finite too and its zero gradient cannot become
    # 0 * inf = NaN (with b + root, it is 0 / 0 once 4 alpha R underflows against b^2).
    positive = b >= 0
    total = torch.where(positive, b, -b) + root
    r = torch.where(positive, 2 * alpha * big_r / total, total / 2)
    x = x0 + diff * ((alpha + r) / (alpha_plus_beta + r))
    return x, _log_det(r, alpha, alpha_plus_beta, y.shape[-1])


def radial_score_step(x: Tensor, g: Tensor, x0: Tensor, alpha: Tensor, alpha_plus_beta: Tensor
                      ) -> tuple[Tensor, Tensor]:
    r"""One radial layer's output :math:`y` and :math:`J^{-\top}(g - \nabla_x \log\det J)`
    at ``x``, arguments as :func:`radial_forward`'s. With :math:`e = x - x_0`, :math:`r =
    \|e\|`, :math:`\hat e = e / r`, :math:`s = \alpha + \beta`: :math:`J` is symmetric, with
    eigenvalue :math:`a = (s + r) / (\alpha + r)` across :math:`\hat e` and :math:`a_e =
    (\alpha s + 2 \alpha r + r^2) / (\alpha + r)^2` along it, so :math:`J^{-\top} v = v / a +
    (\hat e^\top v)(1 / a_e - 1 / a)\, \hat e`; :math:`\log\det J = (D - 1) \log a + \log a_e`
    depends on :math:`r` alone, its gradient :math:`\ell'(r)\, \hat e` (zero at the centre,
    where :math:`\hat e` is taken as 0)."""
    diff = x - x0
    r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    unit = diff / r.clamp_min(torch.finfo(r.dtype).tiny)
    ar, sr = alpha + r, alpha_plus_beta + r
    along = alpha * alpha_plus_beta + r * (2 * alpha + r)
    v = g - log_det_slope(x.shape[-1], alpha, r, ar, sr, along) * unit
    across = sr / ar
    g_in = v / across + (v * unit).sum(-1, keepdim=True) * (ar * ar / along - 1 / across) * unit
    return x + (alpha_plus_beta - alpha) / ar * diff, g_in


def _log_det(r: Tensor, alpha: Tensor, alpha_plus_beta: Tensor, dim: int) -> Tensor:
    # 1 + beta h = (alpha + beta + r) / (alpha + r) and
    # 1 + beta h - beta r h^2 = (alpha (alpha + beta) + 2 alpha r + r^2) / (alpha + r)^2:
    # sums of positive terms, free of the cancellation in log1p(beta h) near beta = -alpha.
    log_ar = torch.log(alpha + r)
    return ((dim - 1) * (torch.log(alpha_plus_beta + r) - log_ar) + (
        torch.log(alpha * alpha_plus_beta + r * (2 * alpha + r)) - 2 * log_ar
    )).squeeze(-1)


def radial(dim: int) -> Radial:
    """Build a :class:`Radial` layer of event size ``dim`` with Pyro's default initialization."""
    return Radial(dim)
