"""Inverse and masked autoregressive flows (IAF, MAF): one MADE core, two directions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _private
from ..nn.made import MADE, StackedMADE, default_hidden_dims
from .base import FlowTransform

__all__ = ["IAF", "MAF", "iaf", "maf", "affine_chain", "traced"]

# sigma = sigmoid(raw + _GATE_BIAS) starts near 1 (0.88), as Kingma et al. (2016) advise
_GATE_BIAS = 2.0


class AffineAutoregressiveCore(FlowTransform):
    r"""The map shared by IAF, MAF and RealNVP: an affine autoregressive map :math:`u \mapsto v`,

    .. math:: v_i = \mu_i(u_{<i}) + e^{s_i(u_{<i})}\, u_i, \qquad
              \log\left|\det \frac{\partial v}{\partial u}\right| = \sum_i s_i(u_{<i}),

    where ":math:`<i`" is the order of a :class:`~pyroflows.nn.MADE` that outputs
    :math:`(\mu, s)` in one pass. ``u -> v`` (:meth:`_parallel`) is one network pass;
    ``v -> u`` (:meth:`_sequential`) needs one pass per level of the order, because
    :math:`u_i = (v_i - \mu_i(u_{<i}))\, e^{-s_i(u_{<i})}` needs :math:`u_{<i}` first.

    The log-scale is bounded, :math:`s = b \tanh(\tilde s / b)`, or, with ``gated=True``, the
    map is the sigmoid-gated update of Kingma et al. (2016),
    :math:`v = \sigma \odot u + (1 - \sigma) \odot m` with :math:`\sigma = \mathrm{sigmoid}(\tilde
    s + 2)`, i.e. :math:`\mu = (1 - \sigma) m`, :math:`s = \log \sigma \le 0`, computed with
    ``logsigmoid`` so it never overflows.

    Subclasses pick the direction: IAF and RealNVP use ``u -> v`` as the forward map, MAF as the
    inverse (class attributes ``forward_is_parallel`` and ``log_det_sign``, the sign that turns
    :math:`\sum_i s_i` into the log-det of the *forward* map).

    Fast path (``fused = True``, the default): a one-pass direction of a non-gated layer over a
    ReLU or tanh :class:`~pyroflows.nn.MADE` runs as one :func:`affine_chain` call, an
    autograd function with a hand-written backward, instead of a graph of some thirty autograd
    nodes; :class:`~pyroflows.flows.FlowStack` runs a whole run of such layers as one call. The
    values are computed by the same operations in the same order as the plain path
    (``fused = False`` on an instance, or any other configuration), so they are the same
    numbers, except in wide networks on CPU, where the network skips its masked-out blocks
    (see :class:`~pyroflows.nn.MADE`) and the values agree to rounding; the gradients agree
    to rounding.
    """

    forward_is_parallel: bool = True
    log_det_sign: float = 1.0
    fused: bool = True
    #: a coupling layer's ``(conditioning, transformed)`` ranges when its conditioner runs on
    #: the conditioning half only (see :class:`~pyroflows.transforms.RealNVP`); ``None`` here
    coupling_halves: tuple[slice, slice] | None = None

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] | None = None,
        order: Sequence[int] | Tensor | None = None,
        gated: bool = False,
        log_scale_bound: float = 5.0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        residual: bool = False,
        zero_first: bool = False,
    ) -> None:
        super().__init__(dim)
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(dim)
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be positive, got {log_scale_bound}")
        self.conditioner = MADE(
            dim, hidden_dims, num_params=2, order=order, activation=activation,
            residual=residual, zero_first=zero_first,
        )
        self.gated = bool(gated)
        self.log_scale_bound = float(log_scale_bound)
        # with the first level fixed to the identity, starting the solve at u = v makes it exact
        # already, so one pass fewer is needed (a coupling layer needs a single pass)
        self.num_passes = max(1, self.conditioner.num_levels - int(zero_first))

    def shift_and_log_scale(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`(\\mu(u), s(u))`, from one pass of the conditioner."""
        raw_shift, raw_log_scale = self.conditioner(u).chunk(2, dim=-1)
        if self.gated:
            log_sigma = F.logsigmoid(raw_log_scale + _GATE_BIAS)
            # 1 - sigmoid(a) = sigmoid(-a): no cancellation when sigma is close to 1
            return raw_shift * torch.sigmoid(-(raw_log_scale + _GATE_BIAS)), log_sigma
        b = self.log_scale_bound
        return raw_shift, torch.tanh(raw_log_scale * (1.0 / b)) * b

    def _parallel(self, u: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(u)
        return torch.addcmul(shift, log_scale.exp(), u), log_scale.sum(-1)

    def _sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        # After pass k every level <= k is exact (level k depends on levels < k only), so the
        # fixed-point iteration is exact after num_passes steps; the last pass's log-scales
        # depend on levels below the top only, so they are s(u) at the solution.
        net = self.conditioner
        if (not torch.is_grad_enabled() and self.fused and not self.gated
                and isinstance(net, MADE) and net.supports_fused and not traced()):
            return self._sequential_no_grad(v)
        u = v
        for _ in range(self.num_passes):
            shift, log_scale = self.shift_and_log_scale(u)
            u = (v - shift) * torch.exp(-log_scale)
        return u, log_scale.sum(-1)

    def _sequential_no_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""``_sequential`` without autograd (MAF sampling, IAF inverse), by levels instead of
        full passes: at level :math:`d` only the hidden units of degree :math:`d - 1`, which
        see inputs of degree :math:`< d` only (all final by then), and the outputs of degree
        :math:`d` are computed. Every unit is computed once, so the D passes cost about one
        network pass (plus a few small kernels per level), instead of D. The same map; the
        matrix products sum the same terms in a different grouping, so the values agree to
        rounding, not bit for bit."""
        net = self.conditioner
        weights, biases = net.masked_weights()
        relu = type(net.activation) is nn.ReLU
        shape = v.shape
        v2 = v.reshape(-1, shape[-1])
        dim = self.dim
        u = v2.clone()
        log_scale = torch.zeros_like(v2)
        hidden = [v2.new_zeros(v2.shape[0], h) for h in net.hidden_dims]
        ranges = net.hidden_degree_ranges()
        in_degrees = net.degrees.tolist()
        inv_b, b = 1.0 / self.log_scale_bound, self.log_scale_bound
        head_w, head_b = weights[-1], biases[-1]
        for level in range(1, net.num_levels + 1):
            below = u
            for k, h in enumerate(hidden):
                start, stop = ranges[k][level - 1] if level > 1 else (0, 0)
                if stop > start:
                    block = torch.addmm(biases[k][start:stop], below, weights[k][start:stop].t())
                    h[:, start:stop] = block.relu_() if relu else block.tanh_()
                below = h
            idx = [i for i in range(dim) if in_degrees[i] == level]
            if not idx:
                continue
            cols = torch.tensor(idx, device=v2.device)
            rows = torch.cat([cols, cols + dim])
            out = torch.addmm(head_b.index_select(0, rows), below,
                              head_w.index_select(0, rows).t())
            shift, raw_log_scale = out.chunk(2, dim=-1)
            level_log_scale = torch.mul(raw_log_scale, inv_b).tanh_().mul_(b)
            u.index_copy_(1, cols, (v2.index_select(1, cols) - shift)
                          .mul_(torch.exp(-level_log_scale)))
            log_scale.index_copy_(1, cols, level_log_scale)
        return u.reshape(shape), log_scale.sum(-1).view(shape[:-1])

    def fused_kind(self, inverse: bool) -> tuple[bool, float] | None:
        """``(parallel, log_det_sign)`` of the direction (``inverse`` or forward) when the fused
        kernels compute it: a single pass of a non-gated layer over a supported network;
        ``None`` otherwise."""
        net = self._modules["conditioner"]  # as self.conditioner, without __getattr__'s call
        if not self.fused or self.gated or not (isinstance(net, MADE) and net.supports_fused):
            return None
        parallel = self.forward_is_parallel != inverse
        if not parallel and self.num_passes != 1:
            return None
        return parallel, self.log_det_sign

    def _map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        kind = self.fused_kind(inverse)
        if kind is not None and not traced():
            return affine_chain(x, [self], [kind])
        return self.plain_map(x, inverse)

    def plain_map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The map of one direction (``inverse`` or forward) and its log-det, from plain
        differentiable operations (what ``fused = False`` runs, and what a compiler traces)."""
        parallel = self.forward_is_parallel != inverse
        v, log_det = self._parallel(x) if parallel else self._sequential(x)
        return v, (log_det if self.log_det_sign > 0 else -log_det)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, inverse=False)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(y, inverse=True)

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else f"log_scale_bound={self.log_scale_bound}"
        return f"dim={self.dim}, {kind}"


class IAF(AffineAutoregressiveCore):
    r"""Inverse autoregressive flow (Kingma et al., 2016), seed eq. 39-41:

    .. math:: y_i = \mu_i(z_{<i}) + \sigma_i(z_{<i})\, z_i, \qquad
              \log|\det J| = \sum_i \log \sigma_i(z_{<i}),

    with :math:`(\mu, \log\sigma)` from one :class:`~pyroflows.nn.MADE` pass over the *input*
    :math:`z`. The forward map (latent to sample, the VI direction) is one network pass; the
    inverse :math:`z_i = (y_i - \mu_i(z_{<i})) / \sigma_i(z_{<i})` (seed eq. 40) takes D
    sequential passes. Sampling and then scoring the same samples costs no inverse: the
    forward pass caches its log-det (see :class:`~pyroflows.transforms.FlowTransform`).

    :math:`\log\sigma` is soft-clamped to :math:`(-b, b)` by :math:`b \tanh(\cdot / b)`; with
    ``gated=True`` the layer is the numerically stable LSTM-style update
    :math:`y = \sigma \odot z + (1 - \sigma) \odot m`, :math:`\sigma = \mathrm{sigmoid}(\cdot)`.
    The network's last layer starts at zero, so a new layer is the identity (``gated=False``).

    References:
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
        NeurIPS 2016, https://arxiv.org/abs/1606.04934

    Arguments:
        dim: the event size D.
        hidden_dims: the MADE hidden widths, default ``(max(64, 4D),) * 2``.
        order: the autoregressive rank of each coordinate, shape (D,), default ``0..D-1``.
        gated: use the sigmoid-gated update instead of a bounded log-scale.
        log_scale_bound: the bound :math:`b` on :math:`|\log\sigma|` (``gated=False``).
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers of the MADE.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.iaf(3, hidden_dims=(16, 16))
        >>> z = torch.randn(10, 3)
        >>> t(z).shape, t.log_abs_det_jacobian(z, t(z)).shape
        (torch.Size([10, 3]), torch.Size([10]))
    """

    forward_is_parallel = True
    log_det_sign = 1.0


class MAF(AffineAutoregressiveCore):
    r"""Masked autoregressive flow (Papamakarios et al., 2017), seed eq. 37-38.

    The inverse (data :math:`y` to base :math:`z`, the ``log_prob`` direction) is one
    :class:`~pyroflows.nn.MADE` pass over the *data*:

    .. math:: z_i = \tilde\mu_i(y_{<i}) + e^{\tilde s_i(y_{<i})}\, y_i, \qquad
              \log\left|\det \frac{\partial y}{\partial z}\right| = -\sum_i \tilde s_i(y_{<i}),

    and the forward map (sampling) :math:`y_i = \mu_i(y_{<i}) + \sigma_i(y_{<i}) z_i` with
    :math:`\mu = -\tilde\mu e^{-\tilde s}`, :math:`\sigma = e^{-\tilde s}` (seed eq. 37, 41)
    takes D sequential passes. It is the same core as :class:`IAF`, run the other way round;
    the log-det of either direction comes from the pass over :math:`y` alone.

    References:
        Papamakarios et al., "Masked Autoregressive Flow for Density Estimation",
        NeurIPS 2017, https://arxiv.org/abs/1705.07057

    Arguments:
        dim: the event size D.
        hidden_dims: the MADE hidden widths, default ``(max(64, 4D),) * 2``.
        order: the autoregressive rank of each coordinate, shape (D,), default ``0..D-1``.
        gated: use the sigmoid-gated update (for ``y -> z``) instead of a bounded log-scale.
        log_scale_bound: the bound on :math:`|\tilde s|` (``gated=False``).
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers of the MADE.

    Example:
        >>> import torch, pyroflows as pf
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> t = pf.transforms.maf(2, hidden_dims=(16, 16))
        >>> q = TransformedDistribution(Independent(Normal(torch.zeros(2), 1.0), 1), [t])
        >>> q.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    forward_is_parallel = False
    log_det_sign = -1.0

    def _log_abs_det_jacobian_uncached(self, x: Tensor, y: Tensor) -> Tensor:
        # the cheap direction: one pass over y, never the D-pass forward from x
        self._validate(y, "output")
        return self.inverse_and_log_det(y)[1]


def traced() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jacrev``, ``vmap``, ...) or the
    ``torch.compile`` tracer is running: the fused kernels, which write their own backward
    with in-place and ``out=`` operations, then step aside for the plain operations."""
    if torch.compiler.is_compiling():
        return True
    return _private.functorch_active()


def affine_chain(
    x: Tensor,
    layers: Sequence[AffineAutoregressiveCore],
    kinds: Sequence[tuple[bool, float]],
    log_det: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Run ``x`` through a chain of affine autoregressive layers in one autograd node.

    Layer :math:`k` maps its input :math:`u` with :math:`(\mu, s) = \mathrm{head}(
    \mathrm{MADE}_k(u))` either by the parallel map :math:`v = \mu + e^{s} \odot u` or by the
    single-pass inverse :math:`v = (u - \mu) \odot e^{-s}`, as ``kinds[k] = (parallel, sign)``
    says (see :meth:`AffineAutoregressiveCore.fused_kind`), and adds
    :math:`\mathrm{sign} \sum_i s_i` to the log-det, which starts at ``log_det`` (or 0).
    Returns the last output and the accumulated log-det, exactly as running each layer's
    ``forward_and_log_det`` / ``inverse_and_log_det`` and summing would (same operations, same
    order).

    The backward pass is written out by hand (:class:`_AffineChain`): for the parallel map,
    with :math:`g` the gradient at :math:`v` and :math:`\ell` the one at the log-det,
    :math:`\nabla\mu = g`, :math:`\nabla s = g \odot e^{s} \odot u + \mathrm{sign}\,\ell`,
    :math:`\nabla u = g \odot e^{s} + J_{\mathrm{MADE}}^\top(\nabla\mu, \nabla\tilde s)`,
    with :math:`\nabla\tilde s = \nabla s\,(1 - \tanh^2(\tilde s / b))` through the bound
    :math:`s = b \tanh(\tilde s / b)`; the MADE part is
    :meth:`~pyroflows.nn.MADE.fused_backward`. It is not twice differentiable (second
    derivatives raise an error instead of returning wrong values).

    Layers whose networks are rows of one :class:`~pyroflows.nn.made.MADEParameters` (the
    layers of a stack built by :func:`pyroflows.flows.build`, in either order) are read
    through the stacked tensor itself: one mask product for all of them, and one gradient,
    written row by row and masked once.
    """
    if traced():
        for layer, (parallel, _) in zip(layers, kinds, strict=True):
            inverse = layer.forward_is_parallel != parallel
            x, ld = layer.plain_map(x, inverse)
            log_det = ld if log_det is None else log_det + ld
        return x, log_det
    chain = _Chain(layers, kinds)
    flats = chain.flats
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in flats)
        or (log_det is not None and log_det.requires_grad)
    ):
        return _AffineChain.apply(x, log_det, chain, *flats)
    return _chain_forward(x, log_det, chain, flats, None)


class _Chain:
    """What an :func:`affine_chain` call reads of its layers, derived afresh on every call (so
    it cannot go stale: a replaced network, parameter or mask, another row, a moved or
    reloaded module are all read as they are now).

    The layers' parameters come as groups, in the layers' order: consecutive layers whose
    networks are rows of one :class:`~pyroflows.nn.made.MADEParameters` give one group, the
    whole stacked (L, P) tensor with the rows they use (in the order they run; a stack's
    inverse runs them last first), so the chain reads one parameter tensor, not a row view
    per layer; any other layer (and a row alone) gives its (P,) ``flat_parameters`` with
    ``rows = None``. ``flats``, ``masks``, ``rows`` and ``nets`` (a network of the group, for
    its layout) are per group. The modules are read through their ``_modules``,
    ``_parameters`` and ``_buffers`` dictionaries, which is where ``nn.Module.__getattr__``
    finds them (a Python call per lookup, some twenty per call of a two-layer chain), and
    through the attribute for a tensor that is not in them (see :func:`_read`)."""

    __slots__ = ("layers", "kinds", "flats", "masks", "rows", "nets")

    def __init__(self, layers: Sequence[AffineAutoregressiveCore],
                 kinds: Sequence[tuple[bool, float]]) -> None:
        self.layers, self.kinds = tuple(layers), tuple(kinds)
        flats: list[Tensor] = []
        masks: list[Tensor] = []
        rows: list[tuple[int, ...] | None] = []
        nets: list[MADE] = []
        layers = self.layers
        count = len(layers)
        i = 0
        while i < count:
            net = layers[i]._modules["conditioner"]
            i += 1
            kind = type(net)
            if kind is StackedMADE:
                stacked = net._modules["stacked"]
                taken = [net.__dict__["index"]]
                while i < count:
                    nxt = layers[i]._modules["conditioner"]
                    if (type(nxt) is not StackedMADE or nxt._modules["stacked"] is not stacked
                            or nxt.__dict__["index"] in taken):
                        break
                    taken.append(nxt.__dict__["index"])
                    i += 1
                if len(taken) > 1:
                    flats.append(_read(stacked, "flat_parameters", stacked._parameters))
                    masks.append(_read(stacked, "mask", stacked._buffers))
                    rows.append(tuple(taken))
                    nets.append(net)
                    continue
            if kind is MADE:
                flats.append(_read(net, "flat_parameters", net._parameters))
                masks.append(_read(net, "mask", net._buffers))
            else:  # a row alone (its row views cost less than all rows), or a MADE subclass
                flats.append(net.flat_parameters)
                masks.append(net.mask)
            rows.append(None)
            nets.append(net)
        self.flats, self.masks, self.rows, self.nets = flats, masks, rows, nets

    def split(self, tensors: Sequence[Tensor | None], wanted: Sequence[bool] | None = None
              ) -> list:
        """Every layer's ``(weights, biases)`` views (:meth:`~pyroflows.nn.MADE.split_weights`)
        into per-group tensors laid out as the groups' parameters, in the layers' order: a
        stacked group's rows split at once (:meth:`~pyroflows.nn.MADE.split_rows`). ``None``
        for the layers of a group whose tensor is ``None``, and for a layer that ``wanted``
        says is not wanted (no views made for it)."""
        out: list = []
        k = 0
        for t, rows, net in zip(tensors, self.rows, self.nets, strict=True):
            if rows is None:
                out.append(None if t is None or (wanted is not None and not wanted[k])
                           else net.split_weights(t))
                k += 1
                continue
            if t is None or (wanted is not None and not any(wanted[k:k + len(rows)])):
                out.extend([None] * len(rows))
            elif wanted is None:
                out.extend(net.split_rows(t, rows))
            else:
                use = wanted[k:k + len(rows)]
                pieces = iter(net.split_rows(t, [r for r, w in zip(rows, use, strict=True) if w]))
                out.extend(next(pieces) if w else None for w in use)
            k += len(rows)
        return out


def _read(module: nn.Module, name: str, members: dict) -> Tensor:
    """``getattr(module, name)``, from ``members`` (its ``_parameters`` or ``_buffers``) where
    it is one: a tensor kept as a plain attribute (a hypernetwork's output, say) is not."""
    value = members.get(name)
    return getattr(module, name) if value is None else value


def _chain_forward(x, log_det, chain: _Chain, flats, saved: list | None):
    # runs with autograd off; every tensor made here is fresh, so in-place ops are safe
    shape = x.shape
    batch_shape = shape[:-1]
    u = x.reshape(-1, shape[-1])
    # one mask product per group: a stacked run of layers is masked (and split) at once; the
    # split views the product as one vector, so it must be contiguous (a parameter may not be)
    split = chain.split([(flat * mask).contiguous()
                         for flat, mask in zip(flats, chain.masks, strict=True)])
    for layer, (parallel, sign), (weights, biases) in zip(chain.layers, chain.kinds, split,
                                                          strict=True):
        net = layer._modules["conditioner"]
        halves = layer.coupling_halves
        if halves is not None:  # a coupling layer: the network on the conditioning half only
            weights, biases = layer.compact_weights(weights, biases)
            out, inputs = net.fused_forward(u[:, halves[0]], weights, biases)
        else:
            out, inputs = net.fused_forward(u, weights, biases)
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


class _AffineChain(torch.autograd.Function):
    """The autograd node of :func:`affine_chain`."""

    @staticmethod
    def forward(ctx, x, log_det, chain, *flats):
        saved: list = []
        ctx.log_det_shape = None if log_det is None else log_det.shape
        v, log_det = _chain_forward(x, log_det, chain, flats, saved)
        ctx.save_for_backward(x, *flats)  # in-place edits of these after the call are errors
        ctx.chain, ctx.saved = chain, saved
        ctx.set_materialize_grads(False)
        return v, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v, grad_log_det):
        x, *flats = ctx.saved_tensors
        if grad_v is None and grad_log_det is None:
            return (None,) * (3 + len(flats))
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
            if g is None:
                direct = None
                grad_log_scale = signed_g_ld.expand_as(tanh)
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
                    grad_log_scale = grad_log_scale.add_(signed_g_ld)
            # through s = b tanh(raw / b): ds/draw = 1 - tanh^2
            grad_raw = torch.ops.aten.tanh_backward(grad_log_scale, tanh)
            grad_out = torch.cat([grad_shift, grad_raw], dim=-1)
            need_input = k > 0 or needs[0]
            grad_params = None
            if halves is not None:
                grad_flat = _layer_row(grad_flats, chain, k)
                if grad_flat is not None:
                    grad_params = _compact_grad_buffers(net, grad_flat, weights)
            elif grad_pieces[k] is not None:
                grad_params = list(zip(*grad_pieces[k], strict=True))
            g_in = net.fused_backward(grad_out, inputs, weights, None, need_input,
                                      grad_params, mask_grad=False)
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
        grad_ld0 = None
        if needs[1] and grad_log_det is not None:
            grad_ld0 = grad_log_det.sum_to_size(ctx.log_det_shape)
        return (grad_x, grad_ld0, None, *grad_flats)


def _layer_row(grad_flats: Sequence[Tensor | None], chain: _Chain, k: int) -> Tensor | None:
    """Layer ``k``'s (P,) piece of its group's gradient (``None`` where not wanted)."""
    start = 0
    for grad, rows in zip(grad_flats, chain.rows, strict=True):
        count = 1 if rows is None else len(rows)
        if k < start + count:
            return grad if grad is None or rows is None else grad[rows[k - start]]
        start += count
    raise IndexError(k)


def _compact_grad_buffers(net: MADE, grad_flat: Tensor, weights: Sequence[Tensor]):
    """Zero ``grad_flat`` (laid out as the coupling conditioner ``net``'s
    ``flat_parameters``) and say, for every layer of its compact network, where its gradient
    goes: the hidden layers' weights and biases straight into their pieces of ``grad_flat``,
    the first layer's and the output layer's sub-blocks into buffers that
    :func:`_scatter_compact_grads` copies to their places."""
    grad_flat.zero_()
    pieces = torch.split_with_sizes(grad_flat, net._sizes)
    grad_params = [(pieces[2 * k].view(shape), pieces[2 * k + 1])
                   for k, shape in enumerate(net._shapes)]
    last = len(weights) - 1
    grad_params[0] = (grad_flat.new_empty(weights[0].shape), grad_params[0][1])
    grad_params[last] = (grad_flat.new_empty(weights[last].shape),
                         grad_flat.new_empty(weights[last].shape[0]))
    return grad_params


def _scatter_compact_grads(net: MADE, dim: int, halves, grad_flat: Tensor,
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


def iaf(
    dim: int,
    hidden_dims: Sequence[int] | None = None,
    gated: bool = False,
    **kwargs,
) -> IAF:
    """Build an :class:`IAF` layer (identity at initialization unless ``gated``)."""
    return IAF(dim, hidden_dims=hidden_dims, gated=gated, **kwargs)


def maf(
    dim: int,
    hidden_dims: Sequence[int] | None = None,
    gated: bool = False,
    **kwargs,
) -> MAF:
    """Build a :class:`MAF` layer (identity at initialization unless ``gated``)."""
    return MAF(dim, hidden_dims=hidden_dims, gated=gated, **kwargs)
