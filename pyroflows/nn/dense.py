"""A dense network: the hypernetwork of the conditional planar and radial layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseNetwork"]


class DenseNetwork(nn.Module):
    r"""A multilayer perceptron :math:`\mathbb{R}^{C} \to \mathbb{R}^{P}`,

    .. math:: h_0 = c, \qquad h_{k+1} = a(W_k h_k + b_k), \qquad
              \mathrm{out} = W_L h_L + b_L,

    with one hidden activation :math:`a` and a linear output layer (no activation), applied
    over any leading batch dims. Weights start at :class:`torch.nn.Linear`'s initialization;
    :meth:`constant_output_` makes the network start as a constant map.

    Arguments:
        in_features: the input size C.
        out_features: the output size P.
        hidden_dims: the widths of the hidden layers (empty: one linear layer).
        activation: the hidden activation, a module class (default ``nn.ReLU``).

    Example:
        >>> import torch
        >>> from pyroflows.nn import DenseNetwork
        >>> net = DenseNetwork(4, 7, hidden_dims=(16, 16))
        >>> net(torch.randn(5, 3, 4)).shape
        torch.Size([5, 3, 7])
    """

    def __init__(self, in_features: int, out_features: int, hidden_dims: Sequence[int] = (),
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden_dims), int(out_features)]
        if min(widths) < 1:
            raise ValueError(f"DenseNetwork: every width must be a positive integer, got "
                             f"in_features={in_features!r}, hidden_dims={tuple(hidden_dims)!r}, "
                             f"out_features={out_features!r}")
        self.in_features, self.out_features = widths[0], widths[-1]
        self.hidden_dims = tuple(widths[1:-1])
        self.layers = nn.ModuleList(nn.Linear(a, b)
                                    for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.activation = activation()

    def forward(self, x: Tensor) -> Tensor:
        """The output, shape ``(..., P)``, for ``x`` of shape ``(..., C)``."""
        *hidden, last = self.layers
        for layer in hidden:
            x = self.activation(F.linear(x, layer.weight, layer.bias))
        return F.linear(x, last.weight, last.bias)

    def constant_output_(self, value: Tensor) -> DenseNetwork:
        """Zero the output layer's weights and set its bias to ``value`` (shape (P,)): the
        network then outputs ``value`` for every input, while the hidden layers keep their
        random weights, so the output layer's gradient is non-zero from the first step (and the
        hidden layers' from the second). Returns ``self``."""
        last = self.layers[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(value)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"hidden_dims={self.hidden_dims}")
