"""MADE: the masked autoregressive MLP that conditions IAF, MAF and RealNVP layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MADE", "MaskedLinear", "default_hidden_dims"]


def default_hidden_dims(features: int) -> tuple[int, ...]:
    """The conditioner width used when none is given: two layers of ``max(64, 4 D)`` units."""
    width = max(64, 4 * int(features))
    return (width, width)


class MaskedLinear(nn.Linear):
    r"""A linear layer :math:`y = (W \odot M) x + b \odot m` with a fixed binary mask.

    The masks are registered buffers (they follow ``.to()`` and live in the ``state_dict``).
    ``bias_mask`` (optional) zeroes chosen outputs completely, weights and bias.

    Arguments:
        mask: the weight mask, shape (out_features, in_features), entries 0 or 1.
        bias_mask: an optional bias mask, shape (out_features,).
    """

    def __init__(self, mask: Tensor, bias_mask: Tensor | None = None) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features)
        dtype = self.weight.dtype
        if bias_mask is not None:
            mask = mask & bias_mask.bool()[:, None]
            self.register_buffer("bias_mask", bias_mask.to(dtype))
        else:
            self.bias_mask = None
        self.register_buffer("mask", mask.to(dtype))
        with torch.no_grad():
            self.weight.mul_(self.mask)
            if self.bias_mask is not None:
                self.bias.mul_(self.bias_mask)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if self.bias_mask is None else self.bias * self.bias_mask
        return F.linear(x, self.weight * self.mask, bias)


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    An MLP :math:`\mathbb{R}^D \to \mathbb{R}^{P \times D}` whose weight matrices are masked so
    that output :math:`(p, i)` depends only on inputs :math:`j` ranked strictly before
    :math:`i`:

    .. math:: \frac{\partial\, \mathrm{out}_{p,i}}{\partial x_j} = 0
              \quad \text{unless} \quad \mathrm{order}_j < \mathrm{order}_i .

    Each input gets the degree :math:`d_j = 1 + \text{rank of } \mathrm{order}_j` (equal orders
    share a degree, so a two-level order gives a coupling network); hidden units get degrees
    spread evenly over :math:`1, \dots, L - 1` (:math:`L` the number of levels), and a unit of
    degree :math:`d` sees units of degree :math:`\le d` below it, an output of degree :math:`d`
    sees hidden units of degree :math:`< d`. Hidden widths smaller than :math:`D` are allowed
    (some degrees are then skipped, which only removes dependencies).

    The output is laid out as ``P`` contiguous blocks of ``D`` (e.g. shift, then log-scale),
    so ``out.chunk(P, -1)`` splits it into views without a copy.

    References:
        Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015,
        https://arxiv.org/abs/1502.03509

    Arguments:
        features: the input size D.
        hidden_dims: the hidden layer widths (may be empty: a masked linear map).
        num_params: P, the number of outputs per feature.
        order: the rank of each input, shape (D,), default ``0, ..., D-1``. Ties are allowed.
        activation: the hidden activation, a module class (default ``nn.ReLU``).
        residual: join consecutive hidden layers by residual connections
            :math:`h \leftarrow h + W\,a(h)`; needs all hidden widths equal.
        zero_first: force every output of the features ranked first to exactly 0 (weights and
            bias), instead of a learnable constant.

    Example:
        >>> import torch
        >>> from pyroflows.nn import MADE
        >>> net = MADE(3, hidden_dims=(16, 16), num_params=2)
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> out = net(x)
        >>> out.shape
        torch.Size([5, 6])
        >>> torch.autograd.grad(out[:, 1].sum(), x)[0][:, 1:].abs().max().item()  # no x_2, x_3
        0.0
    """

    def __init__(
        self,
        features: int,
        hidden_dims: Sequence[int] = (64, 64),
        num_params: int = 2,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        residual: bool = False,
        zero_first: bool = False,
    ) -> None:
        super().__init__()
        features = int(features)
        if features < 1:
            raise ValueError(f"MADE: features must be a positive integer, got {features}")
        hidden_dims = tuple(int(h) for h in hidden_dims)
        if any(h < 1 for h in hidden_dims):
            raise ValueError(f"MADE: hidden widths must be positive, got {hidden_dims}")
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"MADE: residual=True needs equal hidden widths, got {hidden_dims}")
        self.features = features
        self.hidden_dims = hidden_dims
        self.num_params = int(num_params)
        self.residual = bool(residual)

        in_degrees = _input_degrees(features, order)
        num_levels = int(in_degrees.max())
        self.register_buffer("degrees", in_degrees)
        self.num_levels = num_levels

        degrees = [in_degrees]
        layers = []
        for width in hidden_dims:
            hidden = _hidden_degrees(width, num_levels)
            layers.append(MaskedLinear(hidden[:, None] >= degrees[-1][None, :]))
            degrees.append(hidden)
        self.hidden = nn.ModuleList(layers)
        out_degrees = in_degrees.repeat(self.num_params)
        bias_mask = (out_degrees > 1) if zero_first else None
        self.head = MaskedLinear(out_degrees[:, None] > degrees[-1][None, :], bias_mask)
        self.activation = activation()
        self.reset_head()

    def reset_head(self) -> None:
        """Zero the output layer, so the network starts at the constant 0 (identity flows)."""
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        act = self.activation
        h = x
        if self.residual and len(self.hidden) > 0:
            h = self.hidden[0](h)
            for layer in self.hidden[1:]:
                h = h + layer(act(h))
            return self.head(act(h))
        for layer in self.hidden:
            h = act(layer(h))
        return self.head(h)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, hidden_dims={self.hidden_dims}, "
            f"num_params={self.num_params}, residual={self.residual}"
        )


def _input_degrees(features: int, order: Sequence[int] | Tensor | None) -> Tensor:
    if order is None:
        return torch.arange(1, features + 1)
    order_t = torch.as_tensor(order).detach().to("cpu").flatten()
    if order_t.numel() != features or order_t.is_floating_point():
        raise ValueError(f"MADE: order must hold {features} integer ranks, got {order!r}")
    # dense ranks: levels 1, ..., L with ties kept
    return torch.unique(order_t, return_inverse=True)[1].long() + 1


def _hidden_degrees(width: int, num_levels: int) -> Tensor:
    # spread evenly over 1..L-1; degree L would connect to no output, so it is never used
    top = max(1, num_levels - 1)
    return torch.arange(width) * top // width + 1
