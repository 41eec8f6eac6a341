"""Learnable affine layers: the loc/scale end of a flow stack (elementwise or lower triangular)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FlowTransform

__all__ = [
    "ElementwiseAffine", "elementwise_affine", "TriangularAffine", "triangular_affine",
    "tril_affine_solve",
]


class ElementwiseAffine(FlowTransform):
    r"""Elementwise affine map :math:`y = \mu + e^{s} \odot x`, with
    :math:`\log|\det J| = \sum_i s_i`.

    Placed last in a guide's flow, it starts the posterior as the mean-field Gaussian
    :math:`N(\mu, \mathrm{diag}(e^{2s}))` instead of :math:`N(0, I)`.

    Arguments:
        dim: the event size D.
        loc: initial :math:`\mu` (a tensor of shape (D,) or a float), default 0.
        scale: initial :math:`e^{s}` (a tensor of shape (D,) or a positive float), default 1.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.ElementwiseAffine(2, loc=torch.tensor([1.0, -1.0]), scale=0.5)
        >>> t(torch.zeros(1, 2)).tolist()
        [[1.0, -1.0]]
    """

    def __init__(self, dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0) -> None:
        super().__init__(dim)
        loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if not bool((scale_t > 0).all()):
            raise ValueError(f"ElementwiseAffine: scale must be positive, got {scale}")
        self.loc = nn.Parameter(loc_t.detach().clone().expand(dim).contiguous())
        self.log_scale = nn.Parameter(scale_t.detach().log().expand(dim).contiguous())

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.addcmul(self.loc, self.log_scale.exp(), x)
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (y - self.loc) * torch.exp(-self.log_scale)
        return x, self.log_scale.sum().expand(y.shape[:-1])


def elementwise_affine(dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0):
    """Build an :class:`ElementwiseAffine` layer (identity by default)."""
    return ElementwiseAffine(dim, loc=loc, scale=scale)


class TriangularAffine(FlowTransform):
    r"""Full-rank affine map :math:`y = \mu + L x` with :math:`L` lower triangular,
    :math:`L_{ii} = e^{s_i} > 0`, and :math:`\log|\det J| = \sum_i s_i`.

    The last layer of a full-rank flow guide: it starts at :math:`L = \mathrm{diag}(e^{s})` (the
    mean-field Gaussian of :class:`~pyroflows.transforms.ElementwiseAffine`), and its strictly
    lower part learns the posterior's linear correlations directly, which flow layers whose
    networks start at the identity learn only slowly. With ``precondition="whiten"`` it is also
    the base-side layer of a :class:`~pyroflows.density.DensityEstimator`, started at the
    Cholesky factor of the data's covariance (:meth:`set_scale_tril_`).

    Arguments:
        dim: the event size D.
        loc: initial :math:`\mu` (a tensor of shape (D,) or a float), default 0.
        scale: initial diagonal :math:`e^{s}` (a positive float or tensor of shape (D,)).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import TriangularAffine
        >>> t = TriangularAffine(2, loc=1.0, scale=2.0)
        >>> t(torch.ones(1, 2)).tolist()
        [[3.0, 3.0]]
    """

    def __init__(self, dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0) -> None:
        super().__init__(dim)
        loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if not bool((scale_t > 0).all()):
            raise ValueError(f"TriangularAffine: scale must be positive, got {scale}")
        self.loc = nn.Parameter(loc_t.detach().clone().expand(dim).contiguous())
        self.log_scale = nn.Parameter(scale_t.detach().log().expand(dim).contiguous())
        self.lower = nn.Parameter(torch.zeros(dim, dim))  # only the strictly lower part is used

    @property
    def scale_tril(self) -> Tensor:
        """:math:`L`, lower triangular with positive diagonal."""
        return torch.tril(self.lower, diagonal=-1) + torch.diag_embed(self.log_scale.exp())

    @torch.no_grad()
    def set_scale_tril_(self, tril: Tensor) -> None:
        """Set :math:`L` in place from a lower-triangular matrix with a positive diagonal."""
        if tril.shape != (self.dim, self.dim) or not bool((tril.diagonal() > 0).all()):
            raise ValueError(f"TriangularAffine: expected a ({self.dim}, {self.dim}) lower "
                             f"triangular matrix with a positive diagonal, got {tuple(tril.shape)}")
        self.lower.copy_(torch.tril(tril, -1).to(self.lower))
        self.log_scale.copy_(tril.diagonal().log().to(self.log_scale))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.loc + x @ self.scale_tril.T
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return tril_affine_solve(self.loc, self.scale_tril, y), self.log_scale.sum().expand(
            y.shape[:-1])


def triangular_affine(dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0):
    """Build a :class:`TriangularAffine` layer (identity by default)."""
    return TriangularAffine(dim, loc=loc, scale=scale)


def tril_affine_solve(loc: Tensor, scale_tril: Tensor, y: Tensor) -> Tensor:
    r""":math:`x = L^{-1}(y - \mu)` for every row of ``y`` (shape (..., D), including a single
    (D,) point) by one triangular solve of :math:`x L^\top = y - \mu`."""
    return torch.linalg.solve_triangular(scale_tril.T, (y - loc).unsqueeze(-2), upper=True,
                                         left=False).squeeze(-2)
