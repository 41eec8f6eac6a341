"""The affine autoregressive layers (IAF, MAF, RealNVP) as fused kernels: :func:`affine_chain`
runs a chain of one-pass directions as one autograd node with the backward pass written out,
:func:`sequential_no_grad` the D-pass direction without autograd, level by level."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .banks import BankRow, tensor_of
from .dispatch import broadcast_batch, incoming_log_det_grad, periodic_rows, traced
from .made import (
    fused_backward,
    fused_forward,
    sequential_levels,
    split_rows,
    split_weights,
)

__all__ = ["affine_chain", "sequential_no_grad", "Linearization", "keeping_linearizations"]


def affine_chain(x: Tensor, layers: Sequence[nn.Module], kinds: Sequence[tuple[bool, float]],
                 log_det: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Run ``x`` through a chain of affine autoregressive layers in one autograd node.

    Layer :math:`k` maps its input :math:`u` with :math:`(\mu, s) = \mathrm{head}(
    \mathrm{MADE}_k(u))` either by the parallel map :math:`v = \mu + e^{s} \odot u` or by the
    single-pass inverse :math:`v = (u - \mu) \odot e^{-s}`, as ``kinds[k] = (parallel, sign)``
    says (the layers' ``fused_kind``), and adds :math:`\mathrm{sign} \sum_i s_i` to the log-det,
    which starts at ``log_det`` (or 0): the layers' own operations in their order.

    The backward pass, for the parallel map, with :math:`g` the gradient at :math:`v` and
    :math:`\ell` the one at the log-det,
    :math:`\nabla\mu = g`, :math:`\nabla s = g \odot e^{s} \odot u + \mathrm{sign}\,\ell`,
    :math:`\nabla u = g \odot e^{s} + J_{\mathrm{MADE}}^\top(\nabla\mu, \nabla\tilde s)`,
    with :math:`\nabla\tilde s = \nabla s\,(1 - \tanh^2(\tilde s / b))` through the bound
    :math:`s = b \tanh(\tilde s / b)`; the MADE part is
    :func:`~pyroflows._fast.made.fused_backward` (not twice differentiable: second derivatives
    raise). Networks that are rows of one bank are read, masked and differentiated as one
    tensor. A conditioned layer (one whose ``context`` is a tensor) adds its network's
    :math:`V c` (``context_bias``, computed here with autograd) to the first hidden layer's
    bias, per row; its gradient there is the first layer's output gradient summed over the
    rows sharing a context, and autograd takes it on to :math:`V` and :math:`c`. ``x`` is
    broadcast against the contexts' batch dims first. Under :func:`traced` it runs the
    layers' ``plain_map``.
    """
    if traced():
        for layer, (parallel, _) in zip(layers, kinds, strict=True):
            inverse = layer.forward_is_parallel != parallel
            x, ld = layer.plain_map(x, inverse)
            log_det = ld if log_det is None else log_det + ld
        return x, log_det
    chain = _Chain(layers, kinds)
    flats, row_biases = chain.flats, chain.row_biases
    if row_biases:
        batch = broadcast_batch(x.shape[:-1], *(r.shape[:-1] for r in row_biases))
        if batch != x.shape[:-1]:
            x = x.expand(*batch, x.shape[-1])
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in flats)
        or (log_det is not None and log_det.requires_grad)
        or any(r.requires_grad for r in row_biases)
    ):
        return _AffineChain.apply(x, log_det, chain, *flats, *row_biases)
    return _chain_forward(x, log_det, chain, flats, row_biases, None)


class _Chain:
    """What an :func:`affine_chain` call reads of its layers, afresh on every call (never stale).

    Parameters come as groups in the layers' order: consecutive rows of one bank give the
    whole (L, P) tensor with the rows they use (in the order they run), any other layer (or a
    row alone) its (P,) ``flat_parameters`` with ``rows = None``; ``flats``, ``masks``,
    ``rows`` and ``nets`` (a network of the group, for its layout) are per group.
    ``row_biases`` are the conditioned layers' :math:`V c` (..., H_1), ``bias_of[k]`` the
    index of layer k's there (``None``: a layer without a context)."""

    __slots__ = ("layers", "kinds", "flats", "masks", "rows", "nets", "row_biases", "bias_of")

    def __init__(self, layers: Sequence[nn.Module], kinds: Sequence[tuple[bool, float]]) -> None:
        self.layers, self.kinds = tuple(layers), tuple(kinds)
        flats: list[Tensor] = []
        masks: list[Tensor] = []
        rows: list[tuple[int, ...] | None] = []
        nets: list[nn.Module] = []
        layers = self.layers
        bias_of: list[int | None] = []
        conditioned: list[tuple[nn.Module, Tensor]] = []
        for layer in layers:
            context = layer.__dict__.get("context")
            if context is None:
                bias_of.append(None)
            else:
                bias_of.append(len(conditioned))
                conditioned.append((layer._modules["conditioner"], context))
        self.row_biases, self.bias_of = _context_biases(conditioned), bias_of
        count = len(layers)
        i = 0
        while i < count:
            net = layers[i]._modules["conditioner"]
            i += 1
            stacked = net._modules.get("stacked")
            if stacked is not None and isinstance(net, BankRow):
                taken = [net.__dict__["index"]]
                while i < count:
                    nxt = layers[i]._modules["conditioner"]
                    if (nxt._modules.get("stacked") is not stacked
                            or type(nxt) is not type(net) or nxt.__dict__["index"] in taken):
                        break
                    taken.append(nxt.__dict__["index"])
                    i += 1
                if len(taken) > 1:
                    flats.append(tensor_of(stacked, "flat_parameters"))
                    masks.append(tensor_of(stacked, "mask"))
                    rows.append(tuple(taken))
                    nets.append(net)
                    continue
            # a network of its own, or a row alone (its row views cost less than all rows)
            flats.append(tensor_of(net, "flat_parameters"))
            masks.append(tensor_of(net, "mask"))
            rows.append(None)
            nets.append(net)
        self.flats, self.masks, self.rows, self.nets = flats, masks, rows, nets

    def split(self, tensors: Sequence[Tensor | None], wanted: Sequence[bool] | None = None
              ) -> list:
        """Every layer's ``(weights, biases)`` views into per-group ``tensors`` laid out as the
        groups' parameters (``None`` for a ``None`` tensor or a layer not ``wanted``)."""
        out: list = []
        k = 0
        for t, rows, net in zip(tensors, self.rows, self.nets, strict=True):
            if rows is None:
                out.append(None if t is None or (wanted is not None and not wanted[k])
                           else split_weights(net, t))
                k += 1
                continue
            if t is None or (wanted is not None and not any(wanted[k:k + len(rows)])):
                out.extend([None] * len(rows))
            elif wanted is None:
                out.extend(split_rows(net, t, rows))
            else:
                use = wanted[k:k + len(rows)]
                pieces = iter(split_rows(net, t, [r for r, w in zip(rows, use, strict=True)
                                                   if w]))
                out.extend(next(pieces) if w else None for w in use)
            k += len(rows)
        return out


def _context_biases(conditioned: Sequence[tuple[nn.Module, Tensor]]) -> list[Tensor]:
    """Every ``(network, context)``'s :math:`V c`; where all share one context, by one product
    with the networks' ``context_weight`` stacked (one node instead of one per layer)."""
    if len(conditioned) < 2 or any(c is not conditioned[0][1] for _, c in conditioned):
        return [net.context_bias(c) for net, c in conditioned]
    weights = [net.context_weight for net, _ in conditioned]
    product = F.linear(conditioned[0][1], torch.cat(weights))
    return list(product.split([w.shape[0] for w in weights], dim=-1))


def _chain_forward(x, log_det, chain: _Chain, flats, row_biases, saved: list | None):
    # runs with autograd off; every tensor made here is fresh, so in-place ops are safe
    shape = x.shape
    batch_shape = shape[:-1]
    u = x.reshape(-1, shape[-1])
    rows = [periodic_rows(r, batch_shape) for r in row_biases]
    # one mask product per group: a stacked run of layers is masked (and split) at once; the
    # split views the product as one vector, so it must be contiguous (a parameter may not be)
    split = chain.split([(flat * mask).contiguous()
                         for flat, mask in zip(flats, chain.masks, strict=True)])
    for layer, (parallel, sign), (weights, biases), which in zip(
            chain.layers, chain.kinds, split, chain.bias_of, strict=True):
        net = layer._modules["conditioner"]
        halves = layer.coupling_halves
        row_bias = None if which is None else rows[which]
        if halves is not None:  # a coupling layer: the network on the conditioning half only
            weights, biases = layer.compact_weights(weights, biases)
            out, inputs = fused_forward(net, u[:, halves[0]], weights, biases, row_bias)
        else:
            out, inputs = fused_forward(net, u, weights, biases, row_bias)
        shift, raw_log_scale = out.chunk(2, dim=-1)
        # the operations of shift_and_log_scale / _parallel / _sequential (RealNVP:
        # _compact_map), in their order
        b = layer.log_scale_bound
        tanh = torch.mul(raw_log_scale, 1.0 / b).tanh_()
        log_scale = tanh * b
        u_in = u if halves is None else u[:, halves[1]]
        if parallel:
            scale = log_scale.exp()
            v = torch.addcmul(shift, scale, u_in)
        else:
            scale = torch.exp(-log_scale)
            v = (u_in - shift).mul_(scale)
        if halves is not None:  # y_a = z_a
            pair = (u[:, halves[0]], v) if halves[0].start == 0 else (v, u[:, halves[0]])
            v = torch.cat(pair, dim=-1)
        ld = log_scale.sum(-1)
        if len(batch_shape) != 1:
            ld = ld.view(batch_shape)
        if log_det is None:
            log_det = ld if sign > 0 else -ld
        else:  # a - b is a + (-b) exactly
            log_det = log_det + ld if sign > 0 else log_det - ld
        if saved is not None:
            saved.append((net, inputs, weights, tanh, scale, shift, u, halves))
        u = v
    return u.reshape(shape), log_det


#: The list :func:`keeping_linearizations` collects into (``None``: outside it).
_KEPT: contextvars.ContextVar[list | None] = contextvars.ContextVar("kept_linearizations",
                                                                   default=None)


@contextlib.contextmanager
def keeping_linearizations() -> Iterator[list]:
    """Within: every :func:`affine_chain` node run with autograd appends the
    :class:`Linearization` of each of its layers that ran its forward map in one pass (IAF's,
    conditioned or not), at that layer's input to the list yielded, in the order they ran, from
    the activations its forward pass computes anyway (for sticking the landing, which would
    otherwise run the layers' networks a second time)."""
    kept: list = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def _linearizations(chain: _Chain, saved: list, v: Tensor) -> list:
    """The :class:`Linearization` of each layer of a chain that ran its forward map in one
    pass (IAF's), without a compact network, from the ``saved`` steps of the chain's forward
    pass (a conditioned layer's with its context's bias in them); ``v`` the chain's output."""
    out = []
    for k, (layer, (parallel, sign)) in enumerate(zip(chain.layers, chain.kinds, strict=True)):
        if parallel and layer.forward_is_parallel and saved[k][7] is None:
            output = saved[k + 1][6] if k + 1 < len(saved) else v.reshape(-1, v.shape[-1])
            out.append(Linearization.from_step(layer, sign, saved[k], output))
    return out


class _AffineChain(torch.autograd.Function):
    """The autograd node of :func:`affine_chain`."""

    @staticmethod
    def forward(ctx, x, log_det, chain, *tensors):
        saved: list = []
        ctx.log_det_shape = None if log_det is None else log_det.shape
        flats, row_biases = tensors[:len(chain.flats)], tensors[len(chain.flats):]
        ctx.row_bias_shapes = [r.shape for r in row_biases]
        v, log_det = _chain_forward(x, log_det, chain, flats, row_biases, saved)
        kept = _KEPT.get()
        if kept is not None:
            kept.extend(_linearizations(chain, saved, v))
        ctx.save_for_backward(x, *flats)  # in-place edits of these after the call are errors
        ctx.chain, ctx.saved = chain, saved
        ctx.set_materialize_grads(False)
        return v, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v, grad_log_det):
        x, *flats = ctx.saved_tensors
        num_biases = len(ctx.row_bias_shapes)
        if grad_v is None and grad_log_det is None:
            return (None,) * (3 + len(flats) + num_biases)
        chain, saved = ctx.chain, ctx.saved
        needs = ctx.needs_input_grad
        dim = x.shape[-1]
        g = None if grad_v is None else grad_v.reshape(-1, dim)
        g_ld = None if grad_log_det is None else grad_log_det.reshape(-1, 1)
        # every group's gradient, written unmasked row by row, masked once at the end; rows
        # of a stacked tensor that the chain does not use get zeros
        grad_flats: list[Tensor | None] = [
            (flat.new_empty(flat.shape) if rows is None or len(rows) == flat.shape[0]
             else flat.new_zeros(flat.shape)) if needs[3 + j] else None
            for j, (flat, rows) in enumerate(zip(flats, chain.rows, strict=True))]
        # the conditioned layers' V c: their gradient at the first layer's output, summed over
        # the rows that share a context
        grad_row_biases: list[Tensor | None] = [None] * num_biases
        bias_needs = needs[3 + len(flats):]
        # the gradient pieces of every layer, split once per group like the weights; a
        # coupling layer writes its compact blocks through its own views instead
        compact = [step[7] is not None for step in saved]
        grad_pieces = chain.split(grad_flats, [not c for c in compact] if any(compact)
                                  else None)
        g_ld_neg = None
        for k in range(len(saved) - 1, -1, -1):
            parallel, sign = chain.kinds[k]
            # halves as the forward pass ran, whatever since
            net, inputs, weights, tanh, scale, shift, u, halves = saved[k]
            if sign > 0 or g_ld is None:
                signed_g_ld = g_ld
            else:
                if g_ld_neg is None:
                    g_ld_neg = -g_ld
                signed_g_ld = g_ld_neg
            if k == 0:
                u = x.reshape(-1, dim)
            # the transformed coordinates and the gradient at their image
            u_in = u if halves is None else u[:, halves[1]]
            g_out = g if g is None or halves is None else g[:, halves[1]]
            grad_out, direct = _head_backward(parallel, tanh, scale, shift, u_in, g_out,
                                              signed_g_ld)
            need_input = k > 0 or needs[0]
            grad_params = None
            if halves is not None:
                grad_flat = _layer_row(grad_flats, chain, k)
                if grad_flat is not None:
                    grad_params = _compact_grad_buffers(net, grad_flat, weights)
            elif grad_pieces[k] is not None:
                grad_params = list(zip(*grad_pieces[k], strict=True))
            which = chain.bias_of[k]
            first_grad: list[Tensor] | None = (
                [] if which is not None and bias_needs[which] else None)
            g_in = fused_backward(net, grad_out, inputs, weights, None, need_input,
                                  grad_params, mask_grad=False, row_bias_grad=first_grad)
            if first_grad:
                target = ctx.row_bias_shapes[which]
                grad_row_biases[which] = first_grad[0].reshape(
                    *x.shape[:-1], target[-1]).sum_to_size(target)
            if grad_params is not None and halves is not None:
                _scatter_compact_grads(net, chain.layers[k].dim, halves, grad_flat,
                                       grad_params)
            if halves is not None and need_input:  # back to all D coordinates
                g_cond = g_in if g is None else g_in.add_(g[:, halves[0]])  # dv_a/du_a = 1
                g_trans = torch.zeros_like(tanh) if direct is None else direct
                pair = (g_cond, g_trans) if halves[0].start == 0 else (g_trans, g_cond)
                g = torch.cat(pair, dim=-1)
                continue
            if g_in is not None and direct is not None:
                g_in = g_in.add_(direct)
            g = g_in
        for grad, mask in zip(grad_flats, chain.masks, strict=True):
            if grad is not None:
                grad.mul_(mask)
        grad_x = None if g is None else g.reshape(x.shape)
        grad_ld0 = incoming_log_det_grad(ctx, 1, grad_log_det)
        return (grad_x, grad_ld0, None, *grad_flats, *grad_row_biases)


def _head_backward(parallel: bool, tanh: Tensor, scale: Tensor, shift: Tensor, u_in: Tensor,
                   g_out: Tensor | None, g_ld: Tensor | None) -> tuple[Tensor, Tensor | None]:
    r"""One layer's map :math:`v(u; \mu, s)` backwards from the gradients ``g_out`` at
    :math:`v` and ``g_ld`` at the signed log-det (either may be ``None``, not both): the
    gradient at the network's output :math:`(\mu, \tilde s)`, and the direct part
    :math:`g \odot \partial v / \partial u` at fixed :math:`(\mu, s)` (``None`` without
    ``g_out``)."""
    if g_out is None:
        direct = None
        grad_log_scale = g_ld.expand_as(tanh)
        grad_shift = torch.zeros_like(tanh)
    else:
        direct = g_out * scale  # dv/du at fixed (mu, s)
        if parallel:  # v = mu + e^s u
            grad_shift = g_out
            grad_log_scale = direct * u_in
        else:  # v = (u - mu) e^{-s}
            grad_shift = -direct
            grad_log_scale = (shift - u_in).mul_(direct)
        if g_ld is not None:
            grad_log_scale = grad_log_scale.add_(g_ld)
    # through s = b tanh(raw / b): ds/draw = 1 - tanh^2
    grad_raw = torch.ops.aten.tanh_backward(grad_log_scale, tanh)
    return torch.cat([grad_shift, grad_raw], dim=-1), direct


def _layer_row(grad_flats: Sequence[Tensor | None], chain: _Chain, k: int) -> Tensor | None:
    """Layer ``k``'s (P,) piece of its group's gradient (``None`` where not wanted)."""
    start = 0
    for grad, rows in zip(grad_flats, chain.rows, strict=True):
        count = 1 if rows is None else len(rows)
        if k < start + count:
            return grad if grad is None or rows is None else grad[rows[k - start]]
        start += count
    raise IndexError(k)


def _compact_grad_buffers(net: nn.Module, grad_flat: Tensor, weights: Sequence[Tensor]):
    """Zero ``grad_flat`` and say where each layer's gradient of a compact coupling network
    goes: hidden layers into ``grad_flat``, the first and output layers' sub-blocks into
    buffers that :func:`_scatter_compact_grads` copies to their places."""
    grad_flat.zero_()
    grad_params = list(zip(*split_weights(net, grad_flat), strict=True))
    last = len(weights) - 1
    grad_params[0] = (grad_flat.new_empty(weights[0].shape), grad_params[0][1])
    grad_params[last] = (grad_flat.new_empty(weights[last].shape),
                         grad_flat.new_empty(weights[last].shape[0]))
    return grad_params


def _scatter_compact_grads(net: nn.Module, dim: int, halves, grad_flat: Tensor,
                           grad_params) -> None:
    cond, trans = halves
    half = trans.stop - trans.start
    pieces = torch.split_with_sizes(grad_flat, net._sizes)
    last = len(net._shapes) - 1
    first_weight = pieces[0].view(net._shapes[0])
    if last > 0:
        first_weight[:, cond] = grad_params[0][0]
        head_weight = pieces[2 * last].view(net._shapes[last])
    else:  # a single (output) layer: the column block of its row block
        head_weight = first_weight[:, cond]
    head_bias = pieces[2 * last + 1]
    grad_weight, grad_bias = grad_params[last]
    log_scale_rows = slice(trans.start + dim, trans.stop + dim)
    head_weight[trans] = grad_weight[:half]
    head_weight[log_scale_rows] = grad_weight[half:]
    head_bias[trans] = grad_bias[:half]
    head_bias[log_scale_rows] = grad_bias[half:]


def sequential_no_grad(layer: nn.Module, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""The D-pass direction of ``layer``, :math:`u_i = (v_i - \mu_i(u_{<i}))\,
    e^{-s_i(u_{<i})}`, without autograd, by levels
    (:func:`~pyroflows._fast.made.sequential_levels`: about one network pass in all). Values
    agree with the plain passes to rounding."""
    inv_b, b = 1.0 / layer.log_scale_bound, layer.log_scale_bound

    def solve(v_level: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw_log_scale = out.chunk(2, dim=-1)
        log_scale = torch.mul(raw_log_scale, inv_b).tanh_().mul_(b)
        return (v_level - shift).mul_(torch.exp(-log_scale)), log_scale

    u, log_scale = sequential_levels(layer, v, 2, solve)
    return u, log_scale.sum(-1)


class Linearization:
    r"""A one-pass layer (IAF's forward map :math:`v = \mu(u) + e^{s(u)} \odot u`) at an input
    ``u`` (..., D), outside autograd and with its parameters as constants: ``output``
    :math:`v` (of ``u``'s shape; (N, D) where kept by a fused run), ``diagonal`` :math:`e^{s}`
    (the diagonal of :math:`J = \partial v / \partial u`, triangular in the layer's order),
    :meth:`pullback` and :meth:`solve_transposed` on the N rows of ``u`` as (N, D) (``shape``),
    a conditioned layer's context bias repeated over the leading batch dims. For many
    products with one :math:`J`: its network ran once (here, or in the fused run that kept it,
    :func:`keeping_linearizations`), each product is one pass of the written-out backward
    (:func:`~pyroflows._fast.made.fused_backward`), without parameter gradients."""

    @staticmethod
    def takes(layer: nn.Module) -> bool:
        """Whether ``layer`` (an affine autoregressive layer, conditioned or not) has a fused
        one-pass forward map whose network sees all D coordinates (not a coupling layer's
        compact network)."""
        kind = layer.fused_kind(inverse=False)
        return kind is not None and kind[0] and layer.coupling_halves is None

    def __init__(self, layer: nn.Module, u: Tensor) -> None:
        if not self.takes(layer):
            raise ValueError(f"Linearization: {type(layer).__name__} has no fused one-pass "
                             "forward map of all coordinates")
        kind = layer.fused_kind(inverse=False)
        chain = _Chain([layer], [kind])  # (a conditioned layer: its context's bias V c)
        saved: list = []
        with torch.no_grad():
            v, _ = _chain_forward(u, None, chain, chain.flats, chain.row_biases, saved)
        self._set(layer, kind[1], saved[0], v)

    @classmethod
    def from_step(cls, layer: nn.Module, sign: float, step: tuple, output: Tensor
                  ) -> Linearization:
        """The linearization of ``layer`` from one layer's ``saved`` step of
        :func:`_chain_forward` and its ``output`` (N, D), without a pass of its own."""
        lin = cls.__new__(cls)
        lin._set(layer, sign, step, output)
        return lin

    def _set(self, layer: nn.Module, sign: float, step: tuple, output: Tensor) -> None:
        self.layer, self.sign, self.output = layer, sign, output
        self._net, self._inputs, self._weights, self._tanh, self._scale, self._shift, \
            self._u, _ = step
        self.shape = self._u.shape
        self.diagonal = self._scale
        self.levels = self._net.num_levels

    def pullback(self, g: Tensor, g_log_det: Tensor | None = None) -> Tensor:
        r""":math:`J^\top g + \ell\, \nabla_u \log|\det J|` for ``g`` (N, D) and
        ``g_log_det`` :math:`\ell` (N,)."""
        dim = self.shape[-1]
        g_ld = None if g_log_det is None else (self.sign * g_log_det).reshape(-1, 1)
        with torch.no_grad():
            grad_out, direct = _head_backward(True, self._tanh, self._scale, self._shift,
                                              self._u, g.reshape(-1, dim), g_ld)
            g_in = fused_backward(self._net, grad_out, self._inputs, self._weights, None, True,
                                  mask_grad=False)
            return g_in.add_(direct).view(self.shape)

    def solve_transposed(self, v: Tensor, tol: float, with_log_det: bool = False) -> Tensor:
        r"""The :math:`u` (N, D) of :math:`J^\top u = v`, or with ``with_log_det`` of
        :math:`J^\top u + \nabla_u \log|\det J| = v`, by the iteration
        :math:`u \leftarrow u + S^{-1}(v - \mathrm{pullback}(u))` from :math:`u = S^{-1} v`,
        :math:`S = \mathrm{diag}(e^{s})`.

        With :math:`J = S + L`, :math:`L` strictly lower triangular in the layer's order, the
        error is multiplied by :math:`N = -S^{-1} L^\top` each step. :math:`N` takes a level's
        coordinates only to lower levels, and the first error,
        :math:`S^{-1}(L^\top u + \nabla \log|\det J|)`, is zero at the top level (no output
        depends on those inputs), so the iteration is exact after at most ``levels - 1``
        steps (the levels of the order: D for a full MADE). It stops earlier, once a step is
        within ``tol`` of :math:`u` (max norms), or is not finite (a non-finite ``v`` or
        :math:`J` gives a non-finite :math:`u` after one step)."""
        inv_diag = self.diagonal.reciprocal()
        ones = v.new_ones(v.shape[:-1]) if with_log_det else None
        u = v * inv_diag
        for _ in range(self.levels - 1 if v.numel() else 0):  # (no rows: nothing to solve)
            step = (v - self.pullback(u, ones)).mul_(inv_diag)
            u = u + step
            size, scale = torch.stack([step.abs().max(), u.abs().max()]).tolist()
            if size <= tol * scale or not math.isfinite(size):  # (non-finite: stays so)
                break
        return u
