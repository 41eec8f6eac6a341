"""MADE: the masked autoregressive MLP that conditions IAF, MAF and RealNVP layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .shared import SharedModule

__all__ = ["MADE", "MADEParameters", "StackedMADE", "default_hidden_dims", "stacked_mades"]

# activations the hand-written backward knows: relu (the default) and tanh
_FUSED_ACTIVATIONS = (nn.ReLU, nn.Tanh)

# Backward products of a layer with fewer inputs than this (the first layer at D = 8) run with
# their operands swapped and the result transposed: the same sums, but a single-thread sgemm
# whose output has a side this thin is 2-4x slower (measured: (64 x 512) @ (512 x 8) 50-75 us,
# (8 x 512) @ (512 x 64) 17-28 us; at 16 inputs and more the plain form is as fast or faster)
_THIN = 16

# Blocked products (see MADE's docstring): a layer is computed block by block when both sides
# of its weight are at least _BLOCK_MIN_WIDTH, in blocks of about _BLOCK_SIZE rows (columns for
# the input gradient), and the blocks cover at most _BLOCK_MAX_FRACTION of the dense product.
# Measured on one thread (512 x 256 x 256, float32): blocks of 64 rows are the fastest (43 and
# 85 are no faster than dense); at 128 x 128 the saving is lost to the smaller products, and a
# block plan covering 0.75 of the product (the output head, 128 x 256, by contiguous rows) is
# no faster than the dense product.
_BLOCK_MIN_WIDTH = 256
_BLOCK_SIZE = 64
_BLOCK_MAX_FRACTION = 0.7
# the plans of networks with no blocked layer, by number of layers (shared, never modified)
_DENSE = tuple((None,) * n for n in range(8))


def default_hidden_dims(features: int) -> tuple[int, ...]:
    """The conditioner widths used when none are given: two layers of ``max(64, 4 D)`` units."""
    width = max(64, 4 * int(features))
    return (width, width)


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    An MLP :math:`\mathbb{R}^D \to \mathbb{R}^{P \times D}` whose weight matrices are masked,
    :math:`h_{k+1} = a\bigl((W_k \odot M_k) h_k + b_k\bigr)`, so that output :math:`(p, i)`
    depends only on inputs :math:`j` ranked strictly before :math:`i`:

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

    Storage, for speed: all weights and biases live in one flat parameter ``flat_parameters``
    with one mask buffer ``mask`` of the same size. A call multiplies the two once and splits
    the product into the layers' matrices (views), so the masking costs one elementwise
    product per call whatever the depth, and an optimizer updates the whole network as one
    tensor (``torch.optim.Adam`` on CPU loops over parameter tensors in Python, about a quarter
    of a small flow's training step with one tensor per weight and bias). The product is
    recomputed every call, so it is always part of the current autograd graph and never stale.
    :meth:`layer_parameters` gives each layer's (unmasked) weight and bias as views for
    inspection or in-place initialization. :meth:`masked_weights`, :meth:`fused_forward` and
    :meth:`fused_backward` are the same network as autograd-free kernels, with the backward
    pass written out; the fused flow layers
    (:func:`~pyroflows.transforms.autoregressive.affine_chain`) are built on them. The
    networks of a stack built by :func:`pyroflows.flows.build` go one step further: they are
    :class:`StackedMADE` rows of one :class:`MADEParameters`, one tensor for all layers.

    Blocked products (the fused kernels, on CPU): hidden degrees are non-decreasing along each
    hidden layer, so the mask of a hidden-to-hidden layer is a staircase (row :math:`r` sees the
    units of degree :math:`\le d_r` below it, a prefix of them) and about half of the dense
    product multiplies zeros. A layer whose weight is at least 256 wide on both sides is
    computed in row blocks of about 64 units, each one product over the range of inputs its
    mask uses (the forward pass and the weight gradient), and the input gradient in column
    blocks, each over the range of rows that use it; at 256 x 256 the blocks cover 5/8 of the
    dense product. The plan (:meth:`block_plans`) is derived from the mask buffer (plain
    ranges, for whatever order the mask holds), again whenever that buffer changes (a loaded
    state, a move), and a layer is blocked only where its blocks skip at least 30% of the
    product. Measured on one thread, batch 512, 256 x 256, float32: forward 736 -> 575 us,
    weight gradient 754 -> 643 us, input gradient 746 -> 559 us (blocks of 32, 43 or 85 rows
    were slower); a 128 x 128 layer, the 128-row output head of D=64 (contiguous rows cover 3/4
    of it; gathering the P rows of one degree range into one product, 5/8, was no faster
    either: 448 against 435 us) and the 64-input first layer gained nothing, so they stay
    dense, as does everything at D=8. Exactness: the blocks contain
    every nonzero weight (the masked weights outside them are exact zeros), the diagonal blocks
    use the masked weights, and the weight gradient is written as exact zeros outside the
    blocks and masked afterwards as before; so the values are the dense masked network's sums
    of the same products, grouped differently inside the matrix products: equal to rounding,
    not bit for bit (tested against autograd through :meth:`forward`, which never blocks).
    Only on CPU, where it was measured; other devices keep the dense products.

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
            :math:`h \leftarrow h + W\,a(h) + b`; needs all hidden widths equal.
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
        self.num_levels = int(in_degrees.max())
        self.register_buffer("degrees", in_degrees)

        # (weight mask, bias mask) of every layer, hidden layers first, then the output head
        masks = []
        below = in_degrees
        for width in hidden_dims:
            hidden = _hidden_degrees(width, self.num_levels)
            masks.append((hidden[:, None] >= below[None, :], torch.ones(width, dtype=torch.bool)))
            below = hidden
        out_degrees = in_degrees.repeat(self.num_params)
        head_bias = (out_degrees > 1) if zero_first else torch.ones_like(out_degrees).bool()
        masks.append(((out_degrees[:, None] > below[None, :]) & head_bias[:, None], head_bias))

        self._shapes = [tuple(w.shape) for w, _ in masks]
        # Only layouts with a layer wide enough can ever block (never at D=8: the cheapest
        # check per call); for them block_plans() derives the plans from the mask buffer,
        # again whenever it changes (load_state_dict, .to())
        self._blockable = any(min(shape) >= _BLOCK_MIN_WIDTH for shape in self._shapes)
        self._sizes = [n for w, b in masks for n in (w.numel(), b.numel())]
        dtype = torch.get_default_dtype()
        self.register_buffer(
            "mask", torch.cat([m.flatten() for pair in masks for m in pair]).to(dtype)
        )
        self.flat_parameters = nn.Parameter(torch.empty(sum(self._sizes), dtype=dtype))
        self.activation = activation()
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # the number of levels fixes the hidden degrees, the D-pass count and the level-by-level
        # pass, which the buffers do not carry: a state with another one would load into an
        # inconsistent network (same shapes, so torch's checks pass)
        degrees = state_dict.get(prefix + "degrees")
        if isinstance(degrees, Tensor) and degrees.numel():
            levels = int(degrees.max())
            if levels != self.num_levels:
                error_msgs.append(
                    f"{type(self).__name__}: the state's input order has {levels} levels, this "
                    f"network's {self.num_levels}; build the network with the same order (ties "
                    "included) before loading")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def layer_parameters(self, index: int) -> tuple[Tensor, Tensor]:
        """Views ``(weight, bias)`` of layer ``index`` (``-1`` is the output head) into
        ``flat_parameters``, unmasked; edit them in place under ``torch.no_grad()``."""
        pieces = self.flat_parameters.split(self._sizes)
        index = range(len(self._shapes))[index]
        return pieces[2 * index].view(self._shapes[index]), pieces[2 * index + 1]

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization for the hidden layers, zeros for the output head, so
        the network starts at the constant 0 (and a flow layer on it at the identity)."""
        with torch.no_grad():
            for k, shape in enumerate(self._shapes):
                weight, bias = self.layer_parameters(k)
                if k == len(self._shapes) - 1:
                    weight.zero_()
                    bias.zero_()
                else:
                    bound = 1.0 / math.sqrt(shape[1])
                    weight.uniform_(-bound, bound)
                    bias.uniform_(-bound, bound)
            self.flat_parameters.mul_(self.mask)

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_layers(x, *self.differentiable_masked_weights())

    def differentiable_masked_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        r"""The masked weights and biases :math:`(W_k \odot M_k, b_k \odot m_k)` of every layer,
        as views into one product that autograd differentiates (what :meth:`forward` uses)."""
        pieces = (self.flat_parameters * self.mask).split(self._sizes)
        weights = [w.view(shape) for w, shape in zip(pieces[0::2], self._shapes, strict=True)]
        return weights, list(pieces[1::2])

    def apply_layers(
        self, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]
    ) -> Tensor:
        """The network with the given (masked) weights, differentiable: :meth:`forward` is
        ``apply_layers(x, *differentiable_masked_weights())``; a caller may pass sub-blocks of
        them (a coupling layer passes the columns of its conditioning inputs and the rows of
        its transformed outputs)."""
        act = self.activation
        num_hidden = len(self._shapes) - 1
        if self.residual and num_hidden > 0:
            h = F.linear(x, weights[0], biases[0])
            for k in range(1, num_hidden):
                h = h + F.linear(act(h), weights[k], biases[k])
            return F.linear(act(h), weights[-1], biases[-1])
        h = x
        for k in range(num_hidden):
            h = act(F.linear(h, weights[k], biases[k]))
        return F.linear(h, weights[-1], biases[-1])

    # ---- the autograd-free kernels of the fused flow layers (issue 9) ------------------------
    @property
    def supports_fused(self) -> bool:
        """Whether :meth:`fused_forward` / :meth:`fused_backward` compute this network: a ReLU or
        tanh MLP without residual connections and without module hooks (which only a call of
        :meth:`forward` runs)."""
        return (  # the activation from _modules (nn.Module.__getattr__ is a Python call);
            # not there when it is a plain function (an attribute): then the plain operations
            type(self._modules.get("activation")) in _FUSED_ACTIVATIONS
            and not self.residual
            and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                     or self._backward_pre_hooks)
        )

    def masked_weights(self, flat: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        r"""The masked weights and biases :math:`(W_k \odot M_k, b_k \odot m_k)` of every layer,
        as views into one product computed outside autograd (``flat`` defaults to
        ``flat_parameters``). Computed afresh on every call, so never stale."""
        flat = self.flat_parameters if flat is None else flat
        if torch.is_grad_enabled():
            with torch.no_grad():
                product = flat * self.mask
        else:  # as inside the fused kernels: skip the context manager
            product = flat * self.mask
        return self.split_weights(product)

    def split_weights(self, product: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Every layer's weight and bias as views into ``product``, a tensor laid out as
        ``flat_parameters`` that is already masked (what :meth:`masked_weights` returns for
        ``flat * mask``; the fused kernels mask a whole :class:`MADEParameters` at once)."""
        pieces = torch.split_with_sizes(product, self._sizes)
        weights = [w.view(shape) for w, shape in zip(pieces[0::2], self._shapes, strict=True)]
        return weights, list(pieces[1::2])

    def split_rows(
        self, stacked: Tensor, rows: Sequence[int] | None = None
    ) -> list[tuple[list[Tensor], list[Tensor]]]:
        """:meth:`split_weights` for rows of ``stacked``, a contiguous (L, P) tensor whose rows
        are laid out as ``flat_parameters`` (a :class:`MADEParameters` product or gradient):
        ``[(weights, biases) of row k for k in rows]`` (default: every row), views with the
        strides of :meth:`split_weights`' views. One split of the whole tensor, seen as one
        vector of L networks, instead of one per row (and no per-row ``unbind``s, which cost
        more than the split); views of the weight matrices for the rows asked for only."""
        num_rows = stacked.shape[0]
        count = len(self._sizes)
        pieces = stacked.view(-1).split_with_sizes(self._sizes * num_rows)
        shapes = self._shapes
        return [([pieces[r * count + 2 * k].view(shape) for k, shape in enumerate(shapes)],
                 list(pieces[r * count + 1:(r + 1) * count:2]))
                for r in (range(num_rows) if rows is None else rows)]

    def hidden_degree_ranges(self) -> list[list[tuple[int, int]]]:
        """For every hidden layer, ``ranges[layer][d] = (start, stop)``: the units of degree
        ``d`` (``1 <= d < num_levels``; index 0 unused) are rows ``start:stop``, since hidden
        degrees are non-decreasing along each layer."""
        ranges = []
        for width in self.hidden_dims:
            degrees = _hidden_degrees(width, self.num_levels).tolist()
            ranges.append([(degrees.index(d) if d in degrees else 0,
                            width - degrees[::-1].index(d) if d in degrees else 0)
                           for d in range(self.num_levels + 1)])
        return ranges

    def block_plans(self, weights: Sequence[Tensor]) -> Sequence[_Blocks | None]:
        """For every layer, the block plan the fused kernels use with these ``weights``, or
        ``None`` for a dense product: blocked where the layer's plan exists (see the class
        docstring), its weight has the layer's full shape (not a caller's sub-block), and it
        lives on the CPU (where blocking was measured to pay)."""
        state = self.__dict__
        # D=8 layouts never block; pickles of versions before the plans have no flag (dense)
        if not state.get("_blockable") or weights[0].device.type != "cpu":
            return _DENSE[len(weights)] if len(weights) < len(_DENSE) else [None] * len(weights)
        mask = self.mask
        key = (mask.data_ptr(), mask._version)
        cached = state.get("_cached_block_plans")  # (key, plans) of the mask they came from
        if cached is None or cached[0] != key:  # a new or edited mask: plans from it
            cached = state["_cached_block_plans"] = (key, self._plans_from_mask(mask))
        plans = cached[1]
        if plans is None:
            return _DENSE[len(weights)] if len(weights) < len(_DENSE) else [None] * len(weights)
        return [plan if plan is not None and tuple(w.shape) == shape else None
                for plan, w, shape in zip(plans, weights, self._shapes, strict=True)]

    def _plans_from_mask(self, mask: Tensor) -> list[_Blocks | None] | None:
        """The block plans of the layers' weight masks held in ``mask`` (laid out as
        ``flat_parameters``); ``None`` where no layer blocks."""
        pieces = torch.split_with_sizes(mask.detach().to("cpu"), self._sizes)
        plans = [_block_plan(pieces[2 * k].view(shape) != 0)
                 for k, shape in enumerate(self._shapes)]
        return plans if any(p is not None for p in plans) else None

    def fused_forward(
        self, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward` for a 2-D ``x`` of shape (N, D) without autograd, given
        :meth:`masked_weights`. Returns the output and the inputs of every linear layer
        (``x`` first), which is all :meth:`fused_backward` needs. A dense layer runs the
        operation of :meth:`forward` (``F.linear`` on a matrix), so the same numbers; a
        blocked layer (:meth:`block_plans`) sums the same nonzero products in a different
        grouping, so its values agree to rounding."""
        relu = type(self._modules["activation"]) is nn.ReLU
        plans = self.block_plans(weights)
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
        self,
        grad_out: Tensor,
        inputs: Sequence[Tensor],
        weights: Sequence[Tensor],
        grad_flat: Tensor | None,
        need_input_grad: bool,
        grad_params: Sequence[tuple[Tensor, Tensor]] | None = None,
        mask_grad: bool = True,
    ) -> Tensor | None:
        r"""Backpropagate ``grad_out`` (N, P D) through the network of a :meth:`fused_forward`.

        With :math:`g` the gradient at the output of linear layer :math:`k` and :math:`h_k` its
        input: :math:`\nabla W_k = (g^\top h_k) \odot M_k`, :math:`\nabla b_k = (\sum_n g_n)
        \odot m_k`, and below it :math:`g \leftarrow (g\, (W_k \odot M_k)) \odot a'`, with
        :math:`a' = [h_k > 0]` for ReLU and :math:`1 - h_k^2` for tanh, written from the
        activations themselves. The parameter gradient goes into ``grad_flat`` (laid out as
        ``flat_parameters``; ``None`` skips it) and is masked there (unless ``mask_grad`` is
        false: a caller that masks the rows of a whole :class:`MADEParameters` at once after
        the last layer, one product instead of one per layer). Alternatively
        ``grad_params`` gives, for every layer, contiguous ``(weight, bias)`` tensors of the
        shapes of ``weights`` to write the (unmasked) gradients into: for a caller that passes
        sub-blocks of the weights. A blocked layer (:meth:`block_plans`) computes its weight
        gradient inside its blocks only and writes exact zeros outside them, where the mask is
        0; either way the caller masks the gradient afterwards. Returns the gradient with
        respect to the input (``None`` unless ``need_input_grad``).
        """
        relu = type(self._modules["activation"]) is nn.ReLU
        into_flat = grad_params is None and grad_flat is not None
        if into_flat:
            pieces = torch.split_with_sizes(grad_flat, self._sizes)
            grad_params = [(pieces[2 * k].view(shape), pieces[2 * k + 1])
                           for k, shape in enumerate(self._shapes)]
        plans = self.block_plans(weights)
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
            grad_flat.mul_(self.mask)
        return g

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, hidden_dims={self.hidden_dims}, "
            f"num_params={self.num_params}, residual={self.residual}"
        )


class MADEParameters(SharedModule):
    r"""The flat parameters and masks of ``num_layers`` :class:`MADE` networks of one layout
    (the same widths and number of outputs, hence the same size :math:`P`), stacked: a
    parameter ``flat_parameters`` and a buffer ``mask``, both of shape (L, P); row
    :math:`k` is network :math:`k`'s ``flat_parameters`` and ``mask`` (the masks differ
    with the orders). The networks themselves are :class:`StackedMADE` rows of it, made by
    :func:`stacked_mades`.

    Why: an optimizer that loops over parameter tensors (``torch.optim.Adam`` on CPU, about
    eight small kernels per tensor; ``pyro.optim``, one optimizer per tensor) and
    ``pyro.module`` cost per tensor, and the fused flow kernels
    (:func:`~pyroflows.transforms.autoregressive.affine_chain`) mask a whole run of layers
    with one product forward and one masked gradient instead of one per layer: some fifty
    kernels fewer per training step of a 5-layer flow.

    Arguments:
        flats: the (P,) flat parameters of the L networks (copied).
        masks: their (P,) masks.
    """

    def __init__(self, flats: Iterable[Tensor], masks: Iterable[Tensor]) -> None:
        super().__init__()
        flats, masks = [f.detach() for f in flats], list(masks)
        if not flats or len(flats) != len(masks) or any(
                f.shape != flats[0].shape or m.shape != f.shape
                for f, m in zip(flats, masks, strict=True)):
            raise ValueError("MADEParameters: needs one or more flat parameter vectors of one "
                             "size, each with a mask of that size")
        self.num_layers = len(flats)
        self.flat_parameters = nn.Parameter(torch.stack(flats))
        self.register_buffer("mask", torch.stack(masks).to(self.flat_parameters.dtype))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, size={self.flat_parameters.shape[-1]}"


class _Row:
    """Class attribute of :class:`StackedMADE`: the tensor of the same name of its
    :class:`MADEParameters`, row ``index`` (a view, so gradients reach the stacked tensor)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, net, owner=None):
        if net is None:
            return self
        return getattr(net.stacked, self.name)[net.index]


class StackedMADE(MADE):
    """Network ``index`` of a :class:`MADEParameters`: a :class:`MADE` in every respect (the
    same map, :meth:`~MADE.layer_parameters`, the fused kernels) whose ``flat_parameters``
    and ``mask`` are row ``index`` of the stacked tensors, views, so gradients and in-place
    edits reach them. The stacked tensors are its submodule ``stacked`` (state_dict keys
    ``stacked.flat_parameters`` and ``stacked.mask``), shared with the other rows: its
    ``parameters()`` are the whole (L, P) tensor, and ``.to()`` or a copy of one network
    moves or copies all of them.

    Arguments:
        made: the network whose layout (widths, orders, activation) this row takes; its
            own parameters are not used (:func:`stacked_mades` copies them into the bank).
        stacked: the shared :class:`MADEParameters`.
        index: the row.

    Example:
        >>> import torch
        >>> from pyroflows.nn import MADE
        >>> from pyroflows.nn.made import stacked_mades
        >>> nets = stacked_mades([MADE(3, (8,)), MADE(3, (8,), order=[2, 1, 0])])
        >>> nets[1].flat_parameters.shape, nets[1].stacked.flat_parameters.shape
        (torch.Size([86]), torch.Size([2, 86]))
        >>> nets[1](torch.randn(4, 3)).shape
        torch.Size([4, 6])
    """

    flat_parameters = _Row()
    mask = _Row()

    def __init__(self, made: MADE, stacked: MADEParameters, index: int) -> None:
        nn.Module.__init__(self)  # the layout of `made`, without parameters of its own
        if not 0 <= int(index) < stacked.num_layers:
            raise ValueError(f"StackedMADE: index {index} outside 0..{stacked.num_layers - 1}")
        if sum(made._sizes) != stacked.flat_parameters.shape[-1]:
            raise ValueError("StackedMADE: the network's size differs from the stacked rows'")
        for name in _LAYOUT:
            setattr(self, name, getattr(made, name, None))  # _blockable: None in old pickles
        self.register_buffer("degrees", made.degrees)
        self.activation = made.activation
        self.stacked = stacked
        self.index = int(index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, index={self.index}"


# what a StackedMADE takes from its MADE besides `degrees` and `activation`
_LAYOUT = ("features", "hidden_dims", "num_params", "residual", "num_levels", "_shapes",
           "_sizes", "_blockable")


def stacked_mades(nets: Sequence[MADE]) -> list[StackedMADE]:
    """The networks ``nets`` (all of one size) as :class:`StackedMADE` rows of one new
    :class:`MADEParameters` holding their current parameters and masks: the same maps, one
    parameter tensor."""
    stacked = MADEParameters([n.flat_parameters for n in nets], [n.mask for n in nets])
    stacked = stacked.to(device=nets[0].flat_parameters.device)
    return [StackedMADE(n, stacked, k) for k, n in enumerate(nets)]


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
