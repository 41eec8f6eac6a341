"""Affine coupling (RealNVP): the two-level case of the autoregressive core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .autoregressive import AffineAutoregressiveCore

__all__ = ["RealNVP", "realnvp"]


class RealNVP(AffineAutoregressiveCore):
    r"""Affine coupling layer (Dinh et al., 2017), seed eq. 35-36. With :math:`a` the masked
    (conditioning) coordinates and :math:`b` the others,

    .. math:: y_a = z_a, \qquad y_b = \mu(z_a) + e^{s(z_a)} \odot z_b, \qquad
              \log|\det J| = \sum_i s_i(z_a),

    and the inverse :math:`z_b = (y_b - \mu(y_a))\, e^{-s(y_a)}` is one pass too, because
    :math:`y_a = z_a`. :math:`s` is soft-clamped to :math:`(-b, b)` by :math:`b \tanh(\cdot/b)`.

    It is the autoregressive core of :class:`~pyroflows.transforms.IAF` with a two-level order
    (conditioning coordinates first) whose first level is fixed to the identity: the network is
    a :class:`~pyroflows.nn.MADE` that sees all D inputs but whose masks cut every path from
    :math:`b`, so there is no gather or scatter of the halves. The last layer starts at zero, so
    a new layer is the identity.

    References:
        Dinh et al., "Density estimation using Real NVP", ICLR 2017,
        https://arxiv.org/abs/1605.08803

    Arguments:
        dim: the event size D (at least 2).
        hidden_dims: the conditioner's hidden widths, default ``(max(64, 4D),) * 2``.
        mask: boolean, shape (D,): ``True`` marks the coordinates passed through unchanged
            (the conditioning half). Default: the first ``D // 2`` coordinates.
        log_scale_bound: the bound :math:`b` on :math:`|s|`.
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.realnvp(4, hidden_dims=(16,), mask=[True, False, True, False])
        >>> with torch.no_grad():  # move the output layer off its identity start
        ...     _ = t.conditioner.layer_parameters(-1)[0].normal_()
        >>> z = torch.randn(3, 4)
        >>> y = t(z)
        >>> torch.equal(y[:, [0, 2]], z[:, [0, 2]]), torch.allclose(t.inv(y.clone()), z, atol=1e-5)
        (True, True)
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] | None = None,
        mask: Sequence[bool] | Tensor | None = None,
        log_scale_bound: float = 5.0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        residual: bool = False,
    ) -> None:
        if int(dim) < 2:
            raise ValueError(f"RealNVP: dim must be at least 2 (a coupling splits it), got {dim}")
        if mask is None:
            mask_t = self.default_mask(int(dim))
        else:
            mask_t = torch.as_tensor(mask).detach().to("cpu").flatten().bool()
        if mask_t.numel() != int(dim) or bool(mask_t.all()) or not bool(mask_t.any()):
            raise ValueError(
                f"RealNVP: mask must have {dim} entries with at least one True (conditioning) "
                f"and one False (transformed), got {mask!r}"
            )
        super().__init__(
            dim, hidden_dims=hidden_dims, order=(~mask_t).long(),
            log_scale_bound=log_scale_bound, activation=activation, residual=residual,
            zero_first=True,
        )
        self.register_buffer("mask", mask_t)

    @staticmethod
    def default_mask(dim: int) -> Tensor:
        """The default coupling mask: the first ``D // 2`` coordinates condition the rest."""
        return torch.arange(int(dim)) < int(dim) // 2

    # forward: the parallel map u -> v; inverse: the "sequential" map, which is a single pass
    # here (see AffineAutoregressiveCore.num_passes); both fused
    forward_is_parallel = True
    log_det_sign = 1.0


def realnvp(
    dim: int,
    hidden_dims: Sequence[int] | None = None,
    mask: Sequence[bool] | Tensor | None = None,
    **kwargs,
) -> RealNVP:
    """Build a :class:`RealNVP` affine coupling layer (identity at initialization)."""
    return RealNVP(dim, hidden_dims=hidden_dims, mask=mask, **kwargs)
