r"""The MADE network as autograd-free kernels, with the backward pass written out.

:func:`fused_forward` and :func:`fused_backward` compute what :meth:`pyroflows.nn.MADE.forward`
and autograd through it compute, for the ReLU and tanh networks without residual connections
(:func:`supports_fused`); the fused flow layers (:func:`pyroflows._fast.affine.affine_chain`) are
built on them. They read a network through its layout: ``_sizes`` and ``_shapes`` (the pieces
of ``flat_parameters``: every layer's weight, then its bias), ``mask``, ``hidden_dims``,
``num_levels``, ``degrees``, ``hidden_degrees()``, ``activation``, ``residual`` and, for the
block plans, ``_blockable`` and ``memo`` (:class:`pyroflows._memo.Memoized`).

Blocked products (on CPU): hidden degrees are non-decreasing along each hidden layer, so the
mask of a hidden-to-hidden layer is a staircase (row :math:`r` sees the units of degree
:math:`\le d_r` below it, a prefix of them) and about half of the dense product multiplies
zeros. A layer whose weight is at least ``_BLOCK_MIN_WIDTH`` wide on both sides is computed in
row blocks of about ``_BLOCK_SIZE`` units, each one product over the range of inputs its mask
uses (the forward pass and the weight gradient), and the input gradient in column blocks, each
over the range of rows that use it; at 256 x 256 the blocks cover 5/8 of the dense product. The
plan (:func:`block_plans`) is derived from the mask buffer (plain ranges, for whatever order
the mask holds), again whenever that buffer changes (a loaded state, a move), and a layer is
blocked only where its blocks skip at least ``1 - _BLOCK_MAX_FRACTION`` of the product.
Exactness: the blocks contain every nonzero weight (the masked weights outside them are exact
zeros), and the weight gradient is written as exact zeros outside the blocks and masked
afterwards; so the values are the dense masked network's sums of the same products, grouped
differently inside the matrix products: equal to rounding, not bit for bit. Other devices keep
the dense products. The thresholds are measured choices (``benchmarks/results/speed-cpu.md``,
"Measured choices").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "blockable", "supports_fused", "masked_weights", "split_weights", "split_rows",
    "hidden_degree_ranges", "block_plans", "fused_forward", "fused_backward",
]

# activations the written-out backward knows: relu (the default) and tanh
_FUSED_ACTIVATIONS = (nn.ReLU, nn.Tanh)

# A backward product of a layer with fewer inputs than this runs with its operands swapped and
# the result transposed: the same sums; a single-thread sgemm whose output has a side this thin
# is several times slower
_THIN = 16

# blocked products: both sides of a weight at least _BLOCK_MIN_WIDTH, blocks of about
# _BLOCK_SIZE rows (columns for the input gradient), covering at most _BLOCK_MAX_FRACTION of
# the dense products
_BLOCK_MIN_WIDTH = 256
_BLOCK_SIZE = 64
_BLOCK_MAX_FRACTION = 0.7


def blockable(shapes: Sequence[tuple[int, int]]) -> bool:
    """Whether a network with weights of these shapes has a layer wide enough to be blocked:
    only then does :func:`block_plans` derive plans (the cheapest check per call for the
    others)."""
    return any(min(shape) >= _BLOCK_MIN_WIDTH for shape in shapes)


def supports_fused(net: nn.Module) -> bool:
    """Whether :func:`fused_forward` / :func:`fused_backward` compute the network ``net``: a
    ReLU or tanh MLP without residual connections and without module hooks (which only a call
    of its ``forward`` runs)."""
    return (  # the activation from _modules (nn.Module.__getattr__ is a Python call); not
        # there when it is a plain function (an attribute): then the plain operations
        type(net._modules.get("activation")) in _FUSED_ACTIVATIONS
        and not net.residual
        and not (net._forward_hooks or net._forward_pre_hooks or net._backward_hooks
                 or net._backward_pre_hooks)
    )


def masked_weights(net: nn.Module, flat: Tensor | None = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
    r"""The masked weights and biases :math:`(W_k \odot M_k, b_k \odot m_k)` of every layer, as
    views into one product computed outside autograd (``flat`` defaults to the network's
    ``flat_parameters``). Computed afresh on every call, so never stale."""
    with torch.no_grad():
        product = (net.flat_parameters if flat is None else flat) * net.mask
    return split_weights(net, product)


def split_weights(net: nn.Module, product: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's weight and bias as views into ``product``, a tensor laid out as
    ``flat_parameters`` (already masked, or a gradient)."""
    pieces = torch.split_with_sizes(product, net._sizes)
    weights = [w.view(shape) for w, shape in zip(pieces[0::2], net._shapes, strict=True)]
    return weights, list(pieces[1::2])


def split_rows(net: nn.Module, stacked: Tensor, rows: Sequence[int] | None = None
               ) -> list[tuple[list[Tensor], list[Tensor]]]:
    """:func:`split_weights` for rows of ``stacked``, a contiguous (L, P) tensor whose rows are
    laid out as ``flat_parameters`` (a bank's product or gradient): ``[(weights, biases) of row
    k for k in rows]`` (default: every row), views with the strides of :func:`split_weights`'
    views. One split of the whole tensor, seen as one vector of L networks, instead of one per
    row; views of the weight matrices for the rows asked for only."""
    num_rows = stacked.shape[0]
    sizes, shapes = net._sizes, net._shapes
    count = len(sizes)
    pieces = stacked.view(-1).split_with_sizes(sizes * num_rows)
    return [([pieces[r * count + 2 * k].view(shape) for k, shape in enumerate(shapes)],
             list(pieces[r * count + 1:(r + 1) * count:2]))
            for r in (range(num_rows) if rows is None else rows)]


def hidden_degree_ranges(net: nn.Module) -> list[list[tuple[int, int]]]:
    """For every hidden layer, ``ranges[layer][d] = (start, stop)``: the units of degree ``d``
    (``1 <= d < num_levels``; index 0 unused) are rows ``start:stop``, since hidden degrees
    are non-decreasing along each layer."""
    ranges = []
    for degrees in net.hidden_degrees():
        degrees = degrees.tolist()
        width = len(degrees)
        ranges.append([(degrees.index(d) if d in degrees else 0,
                        width - degrees[::-1].index(d) if d in degrees else 0)
                       for d in range(net.num_levels + 1)])
    return ranges


class _Blocks(NamedTuple):
    """The block plan of one masked layer (``out = h W^T + b``, ``W`` of shape (rows, columns)):

    ``rows``: ``(r0, r1, c0, c1)`` for row blocks that partition the rows; the mask of rows
    ``r0:r1`` is zero outside columns ``c0:c1``, so ``out[:, r0:r1]`` needs ``h[:, c0:c1]`` only,
    and the weight gradient of those rows is zero outside these columns.
    ``cols``: ``(c0, c1, s0, s1)`` for column blocks that partition the columns; the mask of
    columns ``c0:c1`` is zero outside rows ``s0:s1``, so the input gradient of those columns
    needs the output gradient's columns ``s0:s1`` only.
    Empty ranges (``c0 == c1``, ``s0 == s1``) are allowed.
    """

    rows: tuple[tuple[int, int, int, int], ...]
    cols: tuple[tuple[int, int, int, int], ...]


def block_plans(net: nn.Module, weights: Sequence[Tensor]) -> Sequence[_Blocks | None]:
    """For every layer, the block plan the fused kernels use with these ``weights``, or
    ``None`` for a dense product: blocked where the layer's plan exists (see the module
    docstring), its weight has the layer's full shape (not a caller's sub-block), and it lives
    on the CPU."""
    # layouts without a layer wide enough never block (the cheapest check per call); a
    # network unpickled from before the flag existed has none: dense
    if not net.__dict__.get("_blockable") or weights[0].device.type != "cpu":
        return (None,) * len(weights)
    mask = net.mask  # a bank row's is a view: key on its storage, which the memo keeps alive
    keep = mask if mask._base is None else mask._base
    plans = net.memo("block_plans", (mask.data_ptr(), mask._version),
                     lambda: (keep, _plans_from_mask(net, mask)))[1]
    if plans is None:
        return (None,) * len(weights)
    return [plan if plan is not None and tuple(w.shape) == shape else None
            for plan, w, shape in zip(plans, weights, net._shapes, strict=True)]


def _plans_from_mask(net: nn.Module, mask: Tensor) -> list[_Blocks | None] | None:
    """The block plans of the layers' weight masks held in ``mask`` (laid out as
    ``flat_parameters``); ``None`` where no layer blocks."""
    pieces = torch.split_with_sizes(mask.detach().to("cpu"), net._sizes)
    plans = [_block_plan(pieces[2 * k].view(shape) != 0) for k, shape in enumerate(net._shapes)]
    return plans if any(p is not None for p in plans) else None


def _used_range(used: Tensor) -> tuple[int, int]:
    """The smallest ``(start, stop)`` holding every true entry of the 1-D ``used``."""
    where = used.nonzero().flatten().tolist()
    return (where[0], where[-1] + 1) if where else (0, 0)


def _block_plan(mask: Tensor) -> _Blocks | None:
    """A :class:`_Blocks` for the boolean weight mask ``mask`` (rows, columns), or ``None``
    where blocking does not pay (a side narrower than ``_BLOCK_MIN_WIDTH``, or blocks that
    cover more than ``_BLOCK_MAX_FRACTION`` of the dense products)."""
    num_rows, num_cols = mask.shape
    if min(num_rows, num_cols) < _BLOCK_MIN_WIDTH:
        return None

    def splits(n: int) -> list[tuple[int, int]]:
        count = max(2, round(n / _BLOCK_SIZE))
        return [(i * n // count, (i + 1) * n // count) for i in range(count)]

    rows = tuple((r0, r1, *_used_range(mask[r0:r1].any(0))) for r0, r1 in splits(num_rows))
    cols = tuple((c0, c1, *_used_range(mask[:, c0:c1].any(1))) for c0, c1 in splits(num_cols))
    covered = (sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rows)
               + sum((c1 - c0) * (s1 - s0) for c0, c1, s0, s1 in cols))
    if covered > _BLOCK_MAX_FRACTION * 2 * num_rows * num_cols:
        return None
    return _Blocks(rows, cols)


def _blocked_linear(h: Tensor, weight: Tensor, bias: Tensor, blocks: _Blocks) -> Tensor:
    """``F.linear(h, weight, bias)`` for a masked ``weight`` that is zero outside the blocks:
    one product per row block, written in place into its columns of the output."""
    out = h.new_empty(h.shape[0], weight.shape[0])
    for r0, r1, c0, c1 in blocks.rows:
        if c1 > c0:
            torch.addmm(bias[r0:r1], h[:, c0:c1], weight[r0:r1, c0:c1].t(), out=out[:, r0:r1])
        else:  # rows that see no input: the bias alone
            out[:, r0:r1] = bias[r0:r1]
    return out


def _blocked_weight_grad(grad: Tensor, h: Tensor, blocks: _Blocks, out: Tensor) -> None:
    """``out = grad^T h`` inside the blocks, 0 outside them (where the mask is 0); unmasked
    inside, as the dense product is."""
    num_cols = out.shape[1]
    for r0, r1, c0, c1 in blocks.rows:
        if c1 > c0:
            torch.mm(grad[:, r0:r1].t(), h[:, c0:c1], out=out[r0:r1, c0:c1])
        if c0 > 0:
            out[r0:r1, :c0].zero_()
        if c1 < num_cols:
            out[r0:r1, c1:].zero_()


def _blocked_input_grad(grad: Tensor, weight: Tensor, blocks: _Blocks) -> Tensor:
    """``grad @ weight`` for a masked ``weight`` that is zero outside the blocks: one product
    per column block, over the rows that use it."""
    out = grad.new_empty(grad.shape[0], weight.shape[1])
    for c0, c1, s0, s1 in blocks.cols:
        if s1 > s0:
            torch.mm(grad[:, s0:s1], weight[s0:s1, c0:c1], out=out[:, c0:c1])
        else:
            out[:, c0:c1].zero_()
    return out


def fused_forward(net: nn.Module, x: Tensor, weights: Sequence[Tensor],
                  biases: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The network's ``forward`` for a 2-D ``x`` of shape (N, D) without autograd, given
    :func:`masked_weights`. Returns the output and the inputs of every linear layer (``x``
    first), which is all :func:`fused_backward` needs. A dense layer runs the operation of
    ``forward`` (``F.linear`` on a matrix), so the same numbers; a blocked layer
    (:func:`block_plans`) sums the same nonzero products in a different grouping, so its values
    agree to rounding."""
    relu = type(net._modules["activation"]) is nn.ReLU
    plans = block_plans(net, weights)
    inputs = [x]
    h = x
    for weight, bias, plan in zip(weights[:-1], biases[:-1], plans[:-1], strict=True):
        if plan is None:
            h = F.linear(h, weight, bias)  # addmm(bias, h, weight.t()), one call from Python
        else:
            h = _blocked_linear(h, weight, bias, plan)
        h = h.relu_() if relu else h.tanh_()  # a fresh tensor: in place is safe
        inputs.append(h)
    if plans[-1] is None:
        return F.linear(h, weights[-1], biases[-1]), inputs
    return _blocked_linear(h, weights[-1], biases[-1], plans[-1]), inputs


def fused_backward(
    net: nn.Module,
    grad_out: Tensor,
    inputs: Sequence[Tensor],
    weights: Sequence[Tensor],
    grad_flat: Tensor | None,
    need_input_grad: bool,
    grad_params: Sequence[tuple[Tensor, Tensor]] | None = None,
    mask_grad: bool = True,
) -> Tensor | None:
    r"""Backpropagate ``grad_out`` (N, P D) through the network of a :func:`fused_forward`.

    With :math:`g` the gradient at the output of linear layer :math:`k` and :math:`h_k` its
    input: :math:`\nabla W_k = (g^\top h_k) \odot M_k`, :math:`\nabla b_k = (\sum_n g_n)
    \odot m_k`, and below it :math:`g \leftarrow (g\, (W_k \odot M_k)) \odot a'`, with
    :math:`a' = [h_k > 0]` for ReLU and :math:`1 - h_k^2` for tanh, written from the
    activations themselves. The parameter gradient goes into ``grad_flat`` (laid out as
    ``flat_parameters``; ``None`` skips it) and is masked there (unless ``mask_grad`` is
    false: a caller that masks a whole bank's gradient at once after the last layer).
    Alternatively ``grad_params`` gives, for every layer, contiguous ``(weight, bias)``
    tensors of the shapes of ``weights`` to write the (unmasked) gradients into: for a caller
    that passes sub-blocks of the weights. A blocked layer (:func:`block_plans`) computes its
    weight gradient inside its blocks only and writes exact zeros outside them, where the mask
    is 0; either way the caller masks the gradient afterwards. Returns the gradient with
    respect to the input (``None`` unless ``need_input_grad``).
    """
    relu = type(net._modules["activation"]) is nn.ReLU
    into_flat = grad_params is None and grad_flat is not None
    if into_flat:
        grad_params = list(zip(*split_weights(net, grad_flat), strict=True))
    plans = block_plans(net, weights)
    g = grad_out
    for k in range(len(weights) - 1, -1, -1):
        thin = weights[k].shape[1] < _THIN  # few inputs to this layer: the first, at small D
        plan = plans[k]
        if grad_params is not None:
            grad_weight, grad_bias = grad_params[k]
            if plan is not None:
                _blocked_weight_grad(g, inputs[k], plan, grad_weight)
            elif thin:  # the same sums, with the thin side as the rows of the product
                grad_weight.copy_(torch.mm(inputs[k].t(), g).t())
            else:
                torch.mm(g.t(), inputs[k], out=grad_weight)
            torch.sum(g, 0, out=grad_bias)
        if k == 0 and not need_input_grad:
            g = None
            break
        if plan is not None:
            g = _blocked_input_grad(g, weights[k], plan)
        else:
            g = torch.mm(weights[k].t(), g.t()).t() if thin else g.mm(weights[k])
        if k > 0:
            h = inputs[k]
            if relu:
                g = torch.ops.aten.threshold_backward(g, h, 0)
            else:
                g = g.addcmul_(g, h * h, value=-1)  # g (1 - h^2)
    if into_flat and mask_grad:
        grad_flat.mul_(net.mask)
    return g
