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

    and the inverse :math:`z_b = (y_b - \mu(y_a))\, e^{-s(y_a)}` is one pass too;
    :math:`s` is soft-clamped to :math:`(-b, b)`. It is :class:`~pyroflows.transforms.IAF`'s
    core with a two-level order whose first level is the identity; where each half is one
    contiguous range and :math:`D \ge` ``compact_min_dim``, the network runs on :math:`z_a`
    only (:meth:`compact_weights`). A new layer is the identity.

    References:
        Dinh et al., "Density estimation using Real NVP", ICLR 2017,
        https://arxiv.org/abs/1605.08803

    Arguments:
        dim: the event size D (at least 2).
        hidden_dims: the conditioner's hidden widths, default ``(max(64, 4D),) * 2``.
        mask: boolean (D,), ``True`` on :math:`a`; default: the first ``D // 2`` coordinates.
        log_scale_bound: the bound :math:`b` on :math:`|s|`.
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.realnvp(4, hidden_dims=(16,), mask=[True, False, True, False])
        >>> with torch.no_grad():  # move the output layer off its identity start
        ...     _ = t.conditioner.layer_parameters(-1)[0].normal_()
        >>> z = torch.randn(3, 4); y = t(z)
        >>> torch.equal(y[:, [0, 2]], z[:, [0, 2]]), torch.allclose(t.inv(y.clone()), z, atol=1e-5)
        (True, True)
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] | None = None,
                 mask: Sequence[bool] | Tensor | None = None, log_scale_bound: float = 5.0,
                 activation: Callable[[], nn.Module] = nn.ReLU, residual: bool = False) -> None:
        mask_t = self.checked_mask(dim, mask)
        super().__init__(dim, hidden_dims=hidden_dims, order=(~mask_t).long(),
                         log_scale_bound=log_scale_bound, activation=activation,
                         residual=residual, zero_first=True)
        self.register_buffer("mask", mask_t)
        self._halves = _contiguous_halves(mask_t)
        self.register_load_state_dict_post_hook(RealNVP._mask_loaded)

    #: the smallest D for which the compact conditioner runs: it saves (D/2) H_1 + D H_L
    #: multiply-adds per sample for a few small kernels per layer (measured choice)
    compact_min_dim: int = 32

    def _mask_loaded(self, *_: object) -> None:
        """After ``load_state_dict`` (which may bring another mask): the halves of that mask.
        (A plain attribute, not worked out at each call: ``torch.compile`` traces it.)"""
        self._halves = _contiguous_halves(self.mask)

    @property
    def coupling_halves(self) -> tuple[slice, slice] | None:
        """``(conditioning, transformed)`` ranges where each half is one contiguous range,
        ``D >= compact_min_dim`` and the conditioner has no hooks (which only its ``forward``
        runs): then the conditioner runs compact (:meth:`compact_weights`); else ``None``."""
        net = self._modules["conditioner"]  # as self.conditioner, without __getattr__'s call
        if (self._halves is None or self.dim < self.compact_min_dim
                or net._forward_hooks or net._forward_pre_hooks or net._backward_hooks
                or net._backward_pre_hooks):
            return None
        return self._halves

    def compact_weights(self, weights: Sequence[Tensor], biases: Sequence[Tensor]
                        ) -> tuple[list[Tensor], list[Tensor]]:
        r"""The blocks of the conditioner's masked weights that can be nonzero: the first
        layer's columns of :math:`a` and the output rows of :math:`(\mu_b, \tilde s_b)`; the
        network on :math:`z_a` with them gives exactly the nonzero outputs."""
        cond, trans = self._halves
        dim = self.dim
        weights, biases = list(weights), list(biases)
        weights[0] = weights[0][:, cond]
        shift_rows, log_scale_rows = trans, slice(trans.start + dim, trans.stop + dim)
        weights[-1] = torch.cat([weights[-1][shift_rows], weights[-1][log_scale_rows]])
        biases[-1] = torch.cat([biases[-1][shift_rows], biases[-1][log_scale_rows]])
        return weights, biases

    def _compact_map(self, u: Tensor, parallel: bool) -> tuple[Tensor, Tensor]:
        # the fused kernel's coupling branch's operations in its order: the same numbers
        cond, trans = self._halves
        net = self.conditioner
        weights, biases = self.compact_weights(*net.differentiable_masked_weights())
        context = self.context
        if context is None:
            row_bias = None
            shape = u.shape
            u = u.reshape(-1, self.dim)  # matrix products on a matrix, as the fused kernel
        else:  # a conditioned layer: V c joins the first layer's bias, broadcast against u
            row_bias = net.context_bias(context)
            shape = torch.broadcast_shapes(u.shape[:-1], row_bias.shape[:-1]) + (self.dim,)
            u = u.expand(shape)
        u_cond = u[..., cond]
        shift, raw_log_scale = net.apply_layers(u_cond, weights, biases,
                                                row_bias).chunk(2, dim=-1)
        b = self.log_scale_bound
        log_scale = torch.tanh(raw_log_scale * (1.0 / b)) * b
        u_trans = u[..., trans]
        if parallel:
            v_trans = torch.addcmul(shift, log_scale.exp(), u_trans)
        else:
            v_trans = (u_trans - shift) * torch.exp(-log_scale)
        halves = (u_cond, v_trans) if cond.start == 0 else (v_trans, u_cond)
        return torch.cat(halves, dim=-1).reshape(shape), log_scale.sum(-1).reshape(shape[:-1])

    def _parallel(self, u: Tensor) -> tuple[Tensor, Tensor]:
        if self.coupling_halves is None:
            return super()._parallel(u)
        return self._compact_map(u, parallel=True)

    def _sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.coupling_halves is None:
            return super()._sequential(v)
        return self._compact_map(v, parallel=False)

    @classmethod
    def checked_mask(cls, dim: int, mask: Sequence[bool] | Tensor | None) -> Tensor:
        """The boolean (D,) coupling mask ``mask`` (default :meth:`default_mask`), or a
        :class:`ValueError` where it does not split D >= 2 coordinates into two halves."""
        if int(dim) < 2:
            raise ValueError(f"RealNVP: dim must be at least 2 (a coupling splits it), got {dim}")
        if mask is None:
            mask_t = cls.default_mask(int(dim))
        else:
            mask_t = torch.as_tensor(mask).detach().to("cpu").flatten().bool()
        if mask_t.numel() != int(dim) or bool(mask_t.all()) or not bool(mask_t.any()):
            raise ValueError(f"RealNVP: mask must have {dim} entries with at least one True "
                             f"(conditioning) and one False (transformed), got {mask!r}")
        return mask_t

    @staticmethod
    def default_mask(dim: int) -> Tensor:
        """The default coupling mask: the first ``D // 2`` coordinates condition the rest."""
        return torch.arange(int(dim)) < int(dim) // 2

    # forward: the parallel map; inverse: the "sequential" one, a single pass here
    forward_is_parallel = True
    log_det_sign = 1.0


def _contiguous_halves(mask: Tensor) -> tuple[slice, slice] | None:
    """``(conditioning, transformed)`` slices where ``mask`` is ``True`` on one contiguous range
    and ``False`` on the other; else ``None``."""
    dim, count = mask.numel(), int(mask.sum())
    if bool(mask[:count].all()):
        return slice(0, count), slice(count, dim)
    if bool(mask[dim - count:].all()):
        return slice(dim - count, dim), slice(0, dim - count)
    return None


def realnvp(dim: int, hidden_dims: Sequence[int] | None = None,
            mask: Sequence[bool] | Tensor | None = None, **kwargs) -> RealNVP:
    """Build a :class:`RealNVP` affine coupling layer (identity at initialization)."""
    return RealNVP(dim, hidden_dims=hidden_dims, mask=mask, **kwargs)
