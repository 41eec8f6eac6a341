r"""The MADE network as autograd-free kernels, with the backward pass written out.

:func:`fused_forward` and :func:`fused_backward` compute what :meth:`pyroflows.nn.MADE.forward`
and autograd through it compute, for ReLU and tanh networks without residual connections
(:func:`supports_fused`), reading the network's layout (``_sizes``, ``_shapes``, ``mask``, ...).

Blocked products (on CPU): hidden degrees are non-decreasing along each layer, so a
hidden-to-hidden mask is a staircase and about half of the dense product multiplies zeros. A
layer at least ``_BLOCK_MIN_WIDTH`` wide on both sides is computed in row blocks of about
``_BLOCK_SIZE`` units, each over the inputs its mask uses (the input gradient in column
blocks), where the blocks skip at least ``1 - _BLOCK_MAX_FRACTION`` of the product (the plan,
:func:`block_plans`, follows the mask buffer), and only for products of at least
``_BLOCK_MIN_ROWS`` rows: for fewer (a guide's few particles), the blocks' extra calls cost
more than the skipped products save. The blocks hold every nonzero weight, so the
values are the dense sums grouped differently: equal to rounding. The thresholds are measured
choices (``benchmarks/results/speed-cpu.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import broadcast_batch, periodic_rows

__all__ = [
    "blockable", "supports_fused", "masked_weights", "split_weights", "split_rows",
    "hidden_degree_ranges", "block_plans", "fused_forward", "fused_backward",
]

# activations the written-out backward knows: relu (the default) and tanh
_FUSED_ACTIVATIONS = (nn.ReLU, nn.Tanh)

# a backward product of a layer with fewer inputs runs with its operands swapped and the result
# transposed: the same sums, where a single-thread sgemm with an output side this thin is slow
_THIN = 16

# blocked products: both sides of a weight at least _BLOCK_MIN_WIDTH, blocks of about
# _BLOCK_SIZE rows (columns for the input gradient), covering at most _BLOCK_MAX_FRACTION of
# the dense products
_BLOCK_MIN_WIDTH = 256
_BLOCK_SIZE = 64
_BLOCK_MAX_FRACTION = 0.7
# ... for products of at least _BLOCK_MIN_ROWS rows (at 256 x 256: 0.95x the dense time at 256
# rows, 1.0x at 128, 1.1x at 64, 1.6x at 8)
_BLOCK_MIN_ROWS = 256


def blockable(shapes: Sequence[tuple[int, int]]) -> bool:
    """Whether a network with weights of these shapes has a layer wide enough to be blocked."""
    return any(min(shape) >= _BLOCK_MIN_WIDTH for shape in shapes)


def supports_fused(net: nn.Module) -> bool:
    """Whether the kernels compute ``net``: a ReLU or tanh MLP without residual connections
    or module hooks (which only its ``forward`` runs)."""
    return (  # the activation from _modules (nn.Module.__getattr__ is a Python call); not
        # there when it is a plain function (an attribute): then the plain operations
        type(net._modules.get("activation")) in _FUSED_ACTIVATIONS
        and not net.residual
        and not (net._forward_hooks or net._forward_pre_hooks or net._backward_hooks
                 or net._backward_pre_hooks)
    )


def masked_weights(net: nn.Module, flat: Tensor | None = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
    r""":math:`(W_k \odot M_k, b_k \odot m_k)` of every layer as views into one product outside
    autograd (of ``flat``, default the network's ``flat_parameters``), computed afresh."""
    with torch.no_grad():
        product = (net.flat_parameters if flat is None else flat) * net.mask
    return split_weights(net, product)


def split_weights(net: nn.Module, product: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's weight and bias as views into ``product``, laid out as ``flat_parameters``."""
    pieces = torch.split_with_sizes(product, net._sizes)
    weights = [w.view(shape) for w, shape in zip(pieces[0::2], net._shapes, strict=True)]
    return weights, list(pieces[1::2])


def split_rows(net: nn.Module, stacked: Tensor, rows: Sequence[int] | None = None
               ) -> list[tuple[list[Tensor], list[Tensor]]]:
    """:func:`split_weights` of ``rows`` (default: all) of a contiguous (L, P) ``stacked``, by
    one split of the whole tensor instead of one per row."""
    num_rows = stacked.shape[0]
    sizes, shapes = net._sizes, net._shapes
    count = len(sizes)
    pieces = stacked.view(-1).split_with_sizes(sizes * num_rows)
    return [([pieces[r * count + 2 * k].view(shape) for k, shape in enumerate(shapes)],
             list(pieces[r * count + 1:(r + 1) * count:2]))
            for r in (range(num_rows) if rows is None else rows)]


def hidden_degree_ranges(net: nn.Module) -> list[list[tuple[int, int]]]:
    """``ranges[layer][d] = (start, stop)``: the rows of a hidden layer's units of degree ``d``."""
    ranges = []
    for degrees in net.hidden_degrees():
        degrees = degrees.tolist()
        width = len(degrees)
        ranges.append([(degrees.index(d) if d in degrees else 0,
                        width - degrees[::-1].index(d) if d in degrees else 0)
                       for d in range(net.num_levels + 1)])
    return ranges


class _Blocks(NamedTuple):
    """The block plan of one masked layer ``out = h W^T + b``: ``rows``, ``(r0, r1, c0, c1)``
    partitioning the rows, the mask of rows ``r0:r1`` zero outside columns ``c0:c1``; ``cols``,
    ``(c0, c1, s0, s1)`` partitioning the columns, the mask of columns ``c0:c1`` zero outside
    rows ``s0:s1``. Ranges may be empty."""

    rows: tuple[tuple[int, int, int, int], ...]
    cols: tuple[tuple[int, int, int, int], ...]


def block_plans(net: nn.Module, weights: Sequence[Tensor], rows: int | None = None
                ) -> Sequence[_Blocks | None]:
    """Every layer's block plan for these ``weights`` (``None``: dense): where the layer has
    one, the weight has the layer's full shape (not a sub-block), and it lives on the CPU;
    none for products of fewer than ``_BLOCK_MIN_ROWS`` ``rows`` (``None``: any)."""
    # the cheapest checks first; a network pickled without the flag stays dense
    if (not net.__dict__.get("_blockable") or (rows is not None and rows < _BLOCK_MIN_ROWS)
            or weights[0].device.type != "cpu"):
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
    """The block plans of the weight masks in ``mask``; ``None`` where no layer blocks."""
    pieces = torch.split_with_sizes(mask.detach().to("cpu"), net._sizes)
    plans = [_block_plan(pieces[2 * k].view(shape) != 0) for k, shape in enumerate(net._shapes)]
    return plans if any(p is not None for p in plans) else None


def _used_range(used: Tensor) -> tuple[int, int]:
    """The smallest ``(start, stop)`` holding every true entry of the 1-D ``used``."""
    where = used.nonzero().flatten().tolist()
    return (where[0], where[-1] + 1) if where else (0, 0)


def _block_plan(mask: Tensor) -> _Blocks | None:
    """A :class:`_Blocks` for the boolean weight ``mask``; ``None`` where blocking does not pay."""
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
    """``F.linear(h, weight, bias)`` for a ``weight`` zero outside the blocks, by row blocks."""
    out = h.new_empty(h.shape[0], weight.shape[0])
    for r0, r1, c0, c1 in blocks.rows:
        if c1 > c0:
            torch.addmm(bias[r0:r1], h[:, c0:c1], weight[r0:r1, c0:c1].t(), out=out[:, r0:r1])
        else:  # rows that see no input: the bias alone
            out[:, r0:r1] = bias[r0:r1]
    return out


def _blocked_weight_grad(grad: Tensor, h: Tensor, blocks: _Blocks, out: Tensor) -> None:
    """``out = grad^T h`` inside the blocks (unmasked, as the dense product), 0 outside."""
    num_cols = out.shape[1]
    for r0, r1, c0, c1 in blocks.rows:
        if c1 > c0:
            torch.mm(grad[:, r0:r1].t(), h[:, c0:c1], out=out[r0:r1, c0:c1])
        if c0 > 0:
            out[r0:r1, :c0].zero_()
        if c1 < num_cols:
            out[r0:r1, c1:].zero_()


def _blocked_input_grad(grad: Tensor, weight: Tensor, blocks: _Blocks) -> Tensor:
    """``grad @ weight`` for a ``weight`` zero outside the blocks, by column blocks."""
    out = grad.new_empty(grad.shape[0], weight.shape[1])
    for c0, c1, s0, s1 in blocks.cols:
        if s1 > s0:
            torch.mm(grad[:, s0:s1], weight[s0:s1, c0:c1], out=out[:, c0:c1])
        else:
            out[:, c0:c1].zero_()
    return out


def fused_forward(net: nn.Module, x: Tensor, weights: Sequence[Tensor],
                  biases: Sequence[Tensor], row_bias: Tensor | None = None
                  ) -> tuple[Tensor, list[Tensor]]:
    """The network's ``forward`` of an (N, D) ``x`` without autograd, given :func:`masked_weights`:
    the output and every linear layer's input (for :func:`fused_backward`). ``row_bias``
    (M, H_1), with N a multiple of M, is added to the first layer's output, row n getting row
    ``n % M`` (a context's bias :math:`V c`, repeated over leading sample dims)."""
    relu = type(net._modules["activation"]) is nn.ReLU
    plans = block_plans(net, weights, x.shape[0])
    inputs = [x]
    h = x
    last = len(weights) - 1
    for k, (weight, bias, plan) in enumerate(zip(weights, biases, plans, strict=True)):
        if plan is None:
            h = F.linear(h, weight, bias)  # addmm(bias, h, weight.t()), one call from Python
        else:
            h = _blocked_linear(h, weight, bias, plan)
        if k == 0 and row_bias is not None and h.numel():  # (no rows: nothing to add)
            h.view(-1, *row_bias.shape).add_(row_bias)
        if k == last:
            return h, inputs
        h = h.relu_() if relu else h.tanh_()  # a fresh tensor: in place is safe
        inputs.append(h)
    raise AssertionError("a network has an output layer")


def fused_backward(net: nn.Module, grad_out: Tensor, inputs: Sequence[Tensor],
                   weights: Sequence[Tensor], grad_flat: Tensor | None, need_input_grad: bool,
                   grad_params: Sequence[tuple[Tensor, Tensor]] | None = None,
                   mask_grad: bool = True, row_bias_grad: list[Tensor] | None = None
                   ) -> Tensor | None:
    r"""Backpropagate ``grad_out`` (N, P D) through the network of a :func:`fused_forward`.

    With :math:`g` the gradient at the output of linear layer :math:`k` and :math:`h_k` its
    input: :math:`\nabla W_k = (g^\top h_k) \odot M_k`, :math:`\nabla b_k = (\sum_n g_n)
    \odot m_k`, and below it :math:`g \leftarrow (g\, (W_k \odot M_k)) \odot a'`, with
    :math:`a' = [h_k > 0]` for ReLU and :math:`1 - h_k^2` for tanh. The parameter gradient goes
    into ``grad_flat`` (``None`` skips it), masked there unless ``mask_grad`` is false, or
    unmasked into ``grad_params``, per layer ``(weight, bias)`` of the shapes of ``weights``.
    Returns the input's gradient (``None`` unless ``need_input_grad``); with a list
    ``row_bias_grad``, the gradient at the first layer's output (N, H_1), which is the gradient
    of a per-row first-layer bias, is appended to it.
    """
    relu = type(net._modules["activation"]) is nn.ReLU
    into_flat = grad_params is None and grad_flat is not None
    if into_flat:
        grad_params = list(zip(*split_weights(net, grad_flat), strict=True))
    plans = block_plans(net, weights, grad_out.shape[0])
    g = grad_out
    for k in range(len(weights) - 1, -1, -1):
        thin = weights[k].shape[1] < _THIN  # few inputs to this layer: the first, at small D
        plan = plans[k]
        if k == 0 and row_bias_grad is not None:
            row_bias_grad.append(g)
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


#: a level's solve for :func:`sequential_levels`: ``(v_level, out) -> (solved, term)``
LevelSolve = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def sequential_levels(layer: nn.Module, v: Tensor, num_params: int, solve: LevelSolve
                      ) -> tuple[Tensor, Tensor]:
    r"""The D-pass direction of an autoregressive layer over its MADE ``conditioner``, without
    autograd, by levels of the order: at level :math:`d` only the hidden units of degree
    :math:`d - 1` (whose inputs are all solved by then) and the network's outputs for the
    coordinates of degree :math:`d`, so about one network pass in all, against a full pass
    per level. ``solve(v_level, out)`` solves a level's coordinates: ``v_level`` (N, L) their
    values of ``v``, ``out`` (N, num_params * L) the network's outputs for them, the
    ``num_params`` blocks of the head (each D wide) in turn; it returns their solution and a
    per-coordinate term (a log-derivative), both (N, L), and may work in place on ``out``.
    A conditioned layer's :math:`V c` joins the first hidden layer's bias (``v`` broadcast
    against the context's batch dims). Returns the solution and the terms, of ``v``'s
    (broadcast) shape."""
    net = layer._modules["conditioner"]
    weights, biases = masked_weights(net)
    relu = type(net._modules["activation"]) is nn.ReLU
    context = layer.__dict__.get("context")
    row_bias = None
    if context is not None:
        row_bias = net.context_bias(context)
        batch = broadcast_batch(v.shape[:-1], row_bias.shape[:-1])
        v = v.expand(*batch, v.shape[-1])
        row_bias = periodic_rows(row_bias, batch)
    shape = v.shape
    if v.numel() == 0:  # (no rows: a block view below could not infer its rows)
        return v.clone(), torch.zeros_like(v)
    v2 = v.reshape(-1, shape[-1])
    u = v2.clone()
    terms = torch.zeros_like(v2)
    hidden = [v2.new_zeros(v2.shape[0], h) for h in net.hidden_dims]
    degrees = net.degrees  # (a loaded state of another order changes its version)
    plan = net.memo("level_plan", (degrees._version, degrees.data_ptr(), v2.device, num_params),
                    lambda: _level_plan(net, num_params, v2.device))
    head_w, head_b = weights[-1], biases[-1]
    for units, cols, rows in plan:
        below = u
        for k, h in enumerate(hidden):
            # level 1: the units of degree 0 (a context's alone; none without one)
            start, stop = units[k]
            if stop > start:
                block = torch.addmm(biases[k][start:stop], below, weights[k][start:stop].t())
                if k == 0 and row_bias is not None:
                    block.view(-1, row_bias.shape[0], stop - start).add_(
                        row_bias[:, start:stop])
                h[:, start:stop] = block.relu_() if relu else block.tanh_()
            below = h
        if cols is None:
            continue
        out = torch.addmm(head_b.index_select(0, rows), below, head_w.index_select(0, rows).t())
        solved, term = solve(v2.index_select(1, cols), out)
        u.index_copy_(1, cols, solved)
        terms.index_copy_(1, cols, term)
    return u.reshape(shape), terms.reshape(shape)


def _level_plan(net: nn.Module, num_params: int, device: torch.device
                ) -> list[tuple[list[tuple[int, int]], Tensor | None, Tensor | None]]:
    """For each level d of ``net``'s order, lowest first: every hidden layer's range of units
    of degree d - 1, and the level's coordinates and their ``num_params`` output rows (``None``
    where no coordinate has degree d)."""
    ranges = hidden_degree_ranges(net)
    degrees = net.degrees.tolist()
    dim = len(degrees)
    coordinates: dict[int, list[int]] = {}
    for i, d in enumerate(degrees):
        coordinates.setdefault(d, []).append(i)
    plan = []
    for level in range(1, net.num_levels + 1):
        units = [r[level - 1] for r in ranges]
        idx = coordinates.get(level)
        if idx is None:
            plan.append((units, None, None))
            continue
        cols = torch.tensor(idx, device=device)
        plan.append((units, cols, torch.cat([cols + j * dim for j in range(num_params)])))
    return plan
