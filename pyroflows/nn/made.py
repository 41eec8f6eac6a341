"""MADE: the masked autoregressive MLP that conditions IAF, MAF and RealNVP layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import whole_number
from .._fast.made import blockable
from .._memo import Memoized

__all__ = ["MADE", "default_hidden_dims", "save_mask_as_bool", "load_mask"]


def save_mask_as_bool(module: Memoized, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a module with a 0/1 floating ``mask`` buffer (kept floating for
    the products): the entry is saved as a bool tensor, an eighth of float64's bytes, one
    tensor however many keys a shared bank appears under; :func:`load_mask` reads it back."""
    key = prefix + "mask"
    mask = module._buffers.get("mask")
    if mask is None or key not in state_dict or not mask.is_floating_point():
        return
    stamp = (id(mask), mask._version, mask.data_ptr(), mask.device, mask.dtype)
    state_dict[key] = module.memo("mask_as_bool", stamp, lambda: mask.detach() != 0)


def load_mask(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Before loading: a ``mask`` entry in another dtype than the module's buffer (bool, as
    :func:`save_mask_as_bool` saves it, or the floating masks of older state dicts) converted to
    the buffer's dtype, so ``load_state_dict(assign=True)`` keeps a floating mask too."""
    key = prefix + "mask"
    value, mask = state_dict.get(key), module._buffers.get("mask")
    if isinstance(value, Tensor) and mask is not None and value.dtype != mask.dtype:
        state_dict[key] = value.to(mask.dtype)


def default_hidden_dims(features: int) -> tuple[int, ...]:
    """The conditioner widths used when none are given: two layers of ``max(64, 4 D)`` units."""
    width = max(64, 4 * int(features))
    return (width, width)


class MADE(Memoized, nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    An MLP :math:`\mathbb{R}^D \to \mathbb{R}^{P \times D}` whose weight matrices are masked,
    :math:`h_{k+1} = a\bigl((W_k \odot M_k) h_k + b_k\bigr)`, so that output :math:`(p, i)`
    depends only on inputs :math:`j` ranked strictly before :math:`i`:

    .. math:: \frac{\partial\, \mathrm{out}_{p,i}}{\partial x_j} = 0
              \quad \text{unless} \quad \mathrm{order}_j < \mathrm{order}_i .

    Input :math:`j` has degree :math:`1 + \text{rank of } \mathrm{order}_j` (ties share one,
    so a two-level order gives a coupling network), hidden units have degrees spread evenly over
    :math:`1, \dots, L - 1`; a unit sees units of degree :math:`\le` its own below it, an output
    hidden units of degree :math:`<` its own. The output is ``P`` contiguous blocks of ``D``.

    With ``context_dim`` C, a context :math:`c` of shape (..., C) enters the first hidden layer
    as an unmasked input (Kingma et al., 2016; Pyro's ``ConditionalAutoRegressiveNN``),
    :math:`h_1 = a\bigl((W_1 \odot M_1) x + V c + b_1\bigr)`, a per-row bias
    :math:`b_1 + V c` (:meth:`context_bias` gives :math:`V c`); the order constrains :math:`x`
    only. Its batch dims broadcast against the input's. The hidden degrees then spread over
    :math:`0, \dots, L - 1`: units of degree 0 see the context alone, so the outputs of the
    features ranked first depend on :math:`c` too (without them those are constants, as in a
    MADE whose context joins only units that also see inputs), unless ``zero_first`` fixes
    those outputs at 0. ``V`` is the parameter
    ``context_weight`` (H_1, C); a network without a context has no such entry, so its state
    dicts are as before.

    All weights and biases live in one parameter ``flat_parameters`` (layout ``_sizes``: each
    layer's weight, then its bias; ``_shapes``: the weights' shapes) with one buffer ``mask``
    of its size and dtype, multiplied once per call, saved in state dicts as bool
    (:func:`save_mask_as_bool`); :meth:`layer_parameters` gives a layer's views.

    References:
        Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015,
        https://arxiv.org/abs/1502.03509

    Arguments:
        features: the input size D.
        hidden_dims: the hidden layer widths (may be empty: a masked linear map).
        num_params: P, the number of outputs per feature.
        order: the rank of each input, shape (D,), default ``0, ..., D-1``. Ties are allowed.
        activation: the hidden activation, a module class (default ``nn.ReLU``).
        residual: residual hidden layers :math:`h \leftarrow h + W\,a(h) + b` (equal widths).
        zero_first: the outputs of the features ranked first are exactly 0, not a constant.
        context_dim: C, the size of a context entering the first hidden layer (needs one hidden
            layer at least); default ``None``: no context.

    Example:
        >>> import torch
        >>> from pyroflows.nn import MADE
        >>> net = MADE(3, hidden_dims=(16, 16), num_params=2)
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> (out := net(x)).shape
        torch.Size([5, 6])
        >>> torch.autograd.grad(out[:, 1].sum(), x)[0][:, 1:].abs().max().item()  # no x_2, x_3
        0.0
    """

    def __init__(self, features: int, hidden_dims: Sequence[int] = (64, 64), num_params: int = 2,
                 order: Sequence[int] | Tensor | None = None,
                 activation: Callable[[], nn.Module] = nn.ReLU, residual: bool = False,
                 zero_first: bool = False, context_dim: int | None = None) -> None:
        super().__init__()
        features = whole_number(features, "MADE: features", 1)
        hidden_dims = tuple(whole_number(h, "MADE: each hidden width", 1) for h in hidden_dims)
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"MADE: residual=True needs equal hidden widths, got {hidden_dims}")
        if context_dim is not None:
            context_dim = whole_number(context_dim, "MADE: context_dim", 1)
            if not hidden_dims:
                raise ValueError("MADE: a context enters the first hidden layer; give at least "
                                 "one hidden width")
        self.features = features
        self.hidden_dims = hidden_dims
        self.num_params = int(num_params)
        self.residual = bool(residual)

        in_degrees = _input_degrees(features, order)
        self.num_levels = int(in_degrees.max())
        if context_dim is not None and not zero_first:
            self._lowest_degree = 0
        self.register_buffer("degrees", in_degrees)

        # (weight mask, bias mask) of every layer, hidden layers first, then the output head
        masks = []
        below = in_degrees
        for width in hidden_dims:
            hidden = _hidden_degrees(width, self.num_levels, self._lowest_degree)
            masks.append((hidden[:, None] >= below[None, :], torch.ones(width, dtype=torch.bool)))
            below = hidden
        out_degrees = in_degrees.repeat(self.num_params)
        head_bias = (out_degrees > 1) if zero_first else torch.ones_like(out_degrees).bool()
        masks.append(((out_degrees[:, None] > below[None, :]) & head_bias[:, None], head_bias))

        self._shapes = [tuple(w.shape) for w, _ in masks]
        # whether the fused kernels may skip masked-out blocks of a layer (pyroflows._fast.made)
        self._blockable = blockable(self._shapes)
        self._sizes = [n for w, b in masks for n in (w.numel(), b.numel())]
        dtype = torch.get_default_dtype()
        self.register_buffer("mask", torch.cat([m.flatten() for pair in masks for m in pair])
                             .to(dtype))
        self.flat_parameters = nn.Parameter(torch.empty(sum(self._sizes), dtype=dtype))
        if context_dim is not None:
            self.context_dim = context_dim
            self.context_weight = nn.Parameter(torch.empty(hidden_dims[0], context_dim,
                                                           dtype=dtype))
        self.activation = activation()
        self.reset_parameters()
        self.register_state_dict_post_hook(save_mask_as_bool)

    #: C, the size of the context entering the first hidden layer (``None``: no context)
    context_dim: int | None = None
    #: the lowest hidden degree: 0 (units that see the context alone) with a context, else 1
    _lowest_degree: int = 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # the number of levels fixes the hidden degrees and the passes, which the buffers do not
        # carry: a state with another one would load silently into an inconsistent network
        degrees = state_dict.get(prefix + "degrees")
        if isinstance(degrees, Tensor) and degrees.numel():
            levels = int(degrees.max())
            if levels != self.num_levels:
                error_msgs.append(
                    f"{type(self).__name__}: the state's input order has {levels} levels, this "
                    f"network's {self.num_levels}; build the network with the same order (ties "
                    "included) before loading")
        load_mask(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def layer_parameters(self, index: int) -> tuple[Tensor, Tensor]:
        """Unmasked views ``(weight, bias)`` of layer ``index`` (``-1``: the output head)."""
        pieces = self.flat_parameters.split(self._sizes)
        index = range(len(self._shapes))[index]
        return pieces[2 * index].view(self._shapes[index]), pieces[2 * index + 1]

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization for the hidden layers (the first over the input and
        the context together, :math:`[x, c]`), zeros for the output head: a new network's
        output is 0 whatever the context."""
        context_dim = self.context_dim or 0
        with torch.no_grad():
            for k, shape in enumerate(self._shapes):
                weight, bias = self.layer_parameters(k)
                if k == len(self._shapes) - 1:
                    weight.zero_()
                    bias.zero_()
                else:
                    bound = 1.0 / math.sqrt(shape[1] + (context_dim if k == 0 else 0))
                    weight.uniform_(-bound, bound)
                    bias.uniform_(-bound, bound)
                    if k == 0 and context_dim:
                        self.context_weight.uniform_(-bound, bound)
            self.flat_parameters.mul_(self.mask)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The outputs (..., P D) for inputs ``x`` (..., D) and, where the network has one, the
        context (..., C), whose batch dims broadcast against ``x``'s."""
        return self.apply_layers(x, *self.differentiable_masked_weights(),
                                 row_bias=self.context_bias(context))

    def context_bias(self, context: Tensor | None) -> Tensor | None:
        r""":math:`V c`, shape (..., H_1): the context's part of the first hidden layer's
        per-row bias (``None`` for a network without a context, which takes none)."""
        if self.context_dim is None:
            if context is not None:
                raise ValueError(f"{type(self).__name__}: this network takes no context "
                                 "(built without context_dim)")
            return None
        if context is None:
            raise ValueError(f"{type(self).__name__}: this network needs a context of shape "
                             f"(..., {self.context_dim})")
        return F.linear(context, self.context_weight)

    def differentiable_masked_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        r""":math:`(W_k \odot M_k, b_k \odot m_k)` of every layer, views into one product."""
        pieces = (self.flat_parameters * self.mask).split(self._sizes)
        weights = [w.view(shape) for w, shape in zip(pieces[0::2], self._shapes, strict=True)]
        return weights, list(pieces[1::2])

    def apply_layers(self, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                     row_bias: Tensor | None = None) -> Tensor:
        """The network with the given masked weights (or sub-blocks of them, as a coupling
        layer passes) and a per-row bias ``row_bias`` (..., H_1) added to the first layer's
        (broadcast against ``x``'s batch dims): :meth:`forward` is ``apply_layers(x,
        *differentiable_masked_weights(), row_bias=context_bias(context))``."""
        act = self.activation
        num_hidden = len(self._shapes) - 1
        h = F.linear(x, weights[0], biases[0])
        if row_bias is not None:
            h = h + row_bias
        if num_hidden == 0:
            return h
        if self.residual:
            for k in range(1, num_hidden):
                h = h + F.linear(act(h), weights[k], biases[k])
            return F.linear(act(h), weights[-1], biases[-1])
        h = act(h)
        for k in range(1, num_hidden):
            h = act(F.linear(h, weights[k], biases[k]))
        return F.linear(h, weights[-1], biases[-1])

    def hidden_degrees(self) -> list[Tensor]:
        """The degrees of every hidden layer's units, non-decreasing along each layer."""
        return [_hidden_degrees(width, self.num_levels, self._lowest_degree)
                for width in self.hidden_dims]

    def extra_repr(self) -> str:
        context = "" if self.context_dim is None else f", context_dim={self.context_dim}"
        return (f"features={self.features}, hidden_dims={self.hidden_dims}, "
                f"num_params={self.num_params}, residual={self.residual}{context}")


def _input_degrees(features: int, order: Sequence[int] | Tensor | None) -> Tensor:
    if order is None:
        return torch.arange(1, features + 1)
    order_t = torch.as_tensor(order).detach().to("cpu").flatten()
    if order_t.numel() != features or order_t.is_floating_point():
        raise ValueError(f"MADE: order must hold {features} integer ranks, got {order!r}")
    # dense ranks: levels 1, ..., L with ties kept
    return torch.unique(order_t, return_inverse=True)[1].long() + 1


def _hidden_degrees(width: int, num_levels: int, lowest: int = 1) -> Tensor:
    # spread evenly over lowest..L-1; degree L would connect to no output, so it is never used
    if lowest == 0:
        return torch.arange(width) * num_levels // width
    top = max(1, num_levels - 1)
    return torch.arange(width) * top // width + 1
