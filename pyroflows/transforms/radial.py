"""Radial flow (Rezende & Mohamed 2015) with a closed-form inverse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowTransform

__all__ = ["Radial", "radial"]


class Radial(FlowTransform):
    r"""Radial flow, seed eq. 30-31:

    .. math:: y = z + \beta h(\alpha, r)(z - z_0), \quad r = \|z - z_0\|,\quad
              h = 1 / (\alpha + r),

    .. math:: \log|\det J| = (D - 1)\log(1 + \beta h) + \log(1 + \beta h - \beta r h^2),

    with :math:`\alpha = \mathrm{softplus}(\alpha')` and
    :math:`\beta = -\alpha + \mathrm{softplus}(\beta')`, so :math:`\alpha > 0`,
    :math:`\beta > -\alpha` and the map is invertible for every raw parameter value.

    Inverse in closed form: the radius :math:`R = \|y - z_0\| = r(\alpha + \beta + r)/(\alpha + r)`
    gives :math:`r^2 + (\alpha + \beta - R) r - \alpha R = 0`, whose non-negative root is taken in
    its cancellation-free form; then :math:`z = z_0 + (y - z_0)(\alpha + r)/(\alpha + \beta + r)`.

    Parameter names (``x0``, ``alpha_prime``, ``beta_prime``) and initialization match
    :class:`pyro.distributions.transforms.Radial`.

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

    def _alpha_beta(self) -> tuple[Tensor, Tensor, Tensor]:
        """alpha, beta and alpha + beta; the sum is taken as softplus(beta') directly, so it
        stays positive in float32 even when beta is within rounding of -alpha."""
        alpha = F.softplus(self.alpha_prime)
        alpha_plus_beta = F.softplus(self.beta_prime)
        return alpha, alpha_plus_beta - alpha, alpha_plus_beta

    def _log_det(self, r: Tensor, alpha: Tensor, alpha_plus_beta: Tensor) -> Tensor:
        # 1 + beta h = (alpha + beta + r) / (alpha + r) and
        # 1 + beta h - beta r h^2 = (alpha (alpha + beta) + 2 alpha r + r^2) / (alpha + r)^2:
        # sums of positive terms, free of the cancellation in log1p(beta h) near beta = -alpha.
        log_ar = torch.log(alpha + r)
        return (self.dim - 1) * (torch.log(alpha_plus_beta + r) - log_ar) + (
            torch.log(alpha * alpha_plus_beta + r * (2 * alpha + r)) - 2 * log_ar
        )

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta, alpha_plus_beta = self._alpha_beta()
        diff = x - self.x0
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        y = x + beta / (alpha + r) * diff
        return y, self._log_det(r, alpha, alpha_plus_beta).squeeze(-1)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        alpha, _, alpha_plus_beta = self._alpha_beta()
        diff = y - self.x0
        big_r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        b = alpha_plus_beta - big_r
        root = torch.sqrt(b * b + 4 * alpha * big_r)
        # r = (-b + root) / 2, written without cancellation for b >= 0 (where b + root > 0).
        r = torch.where(b >= 0, 2 * alpha * big_r / (b + root), (root - b) / 2)
        x = self.x0 + diff * ((alpha + r) / (alpha_plus_beta + r))
        return x, self._log_det(r, alpha, alpha_plus_beta).squeeze(-1)


def radial(dim: int) -> Radial:
    """Build a :class:`Radial` layer of event size ``dim`` with Pyro's default initialization."""
    return Radial(dim)
