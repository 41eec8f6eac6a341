"""Learnable elementwise affine layer: the loc/scale end of a flow stack."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import FlowTransform

__all__ = ["ElementwiseAffine", "elementwise_affine"]


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


