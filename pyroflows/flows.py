"""Stack builders: one function turns a family name into a ready-to-train flow."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributions import constraints
from torch.distributions.transforms import Transform, _InverseTransform

from . import transforms as T
from .nn.made import MADE, StackedMADE, stacked_mades
from .transforms.autoregressive import AffineAutoregressiveCore, affine_chain, traced
from .transforms.base import FlowTransform, _CacheEntry, module_stamp
from .transforms.planar import (
    StackedPlanar,
    planar_inverse_step,
    planar_layers,
    planar_u_hat,
    stacked_planar_parameters,
)
from .transforms.radial import (
    StackedRadial,
    radial_alpha,
    radial_forward,
    radial_inverse,
    radial_layers,
    stacked_radial_parameters,
)

__all__ = [
    "build", "FlowStack", "FAMILIES", "FOLDED_PERMUTATIONS", "COMPLEMENTARY_MASKS",
    "STACKED_FAMILIES", "STACKED_CONDITIONER_FAMILIES", "register_family", "planar_chain",
    "radial_chain", "planar_u_hat", "per_layer_parameter_names",
]


class FlowStack(ComposeTransformModule):
    r"""A ``ComposeTransformModule`` of pyroflows layers with one fused pass per direction.

    .. math:: \log\left|\det \frac{\partial (t_K \circ \dots \circ t_1)}{\partial x}
              \right| = \sum_{k=1}^{K} \log\left|\det J_{t_k}(x_{k-1})\right|,
              \qquad x_k = t_k(x_{k-1}),

    accumulated while the layers run. ``ComposeTransform`` instead calls every layer, then
    asks every layer again for its log-det (a cache lookup per layer, and one more per layer
    to recompute the intermediates), and validates every intermediate. Here, when every part
    is a :class:`~pyroflows.transforms.FlowTransform`, a call runs each layer's
    ``forward_and_log_det`` (or, for ``inv``, ``inverse_and_log_det``) once, validates only
    the stack's input, and keeps ``(x, y, sum of log-dets)`` in one stack-level cache with the
    same staleness rules as a layer's (input identity and version, every parameter's identity
    and version, grad mode). The values are those of the plain composition; only the
    bookkeeping is skipped. With any other transform among the parts it behaves exactly as
    ``ComposeTransformModule``. :func:`build` returns one.

    Fused kernels (``fused = True``, the default): consecutive IAF/MAF/RealNVP layers whose
    direction is one pass run as one autograd node
    (:func:`~pyroflows.transforms.autoregressive.affine_chain`), and consecutive planar layers
    in the forward direction as another (:func:`planar_chain`), each with a hand-written
    backward pass. Same values (IAF/MAF/RealNVP: the same operations in the same order;
    planar: up to the order of the log-det sum), gradients equal to rounding. They step aside
    under ``torch.func`` transforms and ``torch.compile``.

    ``compile`` (opt-in): run the chain of layers through :func:`torch.compile` (``True`` for
    the default Inductor backend, or a backend name such as ``"aot_eager"``), which fuses the
    elementwise work between the matrix products, forward and backward. Validation, the
    cache and the staleness checks stay outside the compiled region. The first call per input
    shape, dtype and device compiles (tens of seconds on a small CPU); it pays in long
    training runs. Dropped on pickling and deep-copying (the copy compiles again on use).

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,))
        >>> x = torch.randn(4, 3)
        >>> z = flow.inv(x)
        >>> flow.inv.log_abs_det_jacobian(x, z).shape
        torch.Size([4])
    """

    #: run the fused kernels (see above); ``False`` on an instance runs every layer's plain
    #: differentiable operations
    fused: bool = True

    def __init__(self, parts, cache_size: int = 0, compile: bool | str = False) -> None:
        super().__init__(parts, cache_size=cache_size)
        self._fused = len(parts) > 0 and all(isinstance(p, FlowTransform) for p in parts)
        self._cache: _CacheEntry | None = None
        if compile and not self._fused:
            raise ValueError("FlowStack: compile needs every part to be a FlowTransform")
        self.compile_backend = ("inductor" if compile is True else compile) or None
        self._register_load_state_dict_pre_hook(_per_layer_keys_to_stacked, with_module=True)

    # ComposeTransform recomputes these from every part at each access, and a
    # TransformedDistribution reads them several times per construction: with 32 layers that
    # was a tenth of an SVI step. The parts of a FlowStack do not change after construction.
    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        cached = self.__dict__.get("_domain")
        if cached is None:
            cached = self.__dict__["_domain"] = ComposeTransformModule.domain.fget(self)
        return cached

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        cached = self.__dict__.get("_codomain")
        if cached is None:
            cached = self.__dict__["_codomain"] = ComposeTransformModule.codomain.fget(self)
        return cached

    @property
    def inv(self) -> Transform:
        if not self._fused:
            return super().inv
        # the generic inverse, which calls back into _inv_call / log_abs_det_jacobian here
        inv = self.__dict__.get("_fused_inv")
        if inv is None:
            inv = self.__dict__["_fused_inv"] = _InverseTransform(self)
        return inv

    @property
    def all_flow_transforms(self) -> bool:
        """Whether every part is a pyroflows :class:`~pyroflows.transforms.FlowTransform`, so
        that the stack runs its own calls, cache and fused kernels (otherwise it behaves as a
        plain :class:`ComposeTransformModule`, and :meth:`inverse_and_log_det` is refused)."""
        return self._fused

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(z, log|det df/dz|)`` with :math:`z = f^{-1}(y)`, the log-det of the *forward*
        map at :math:`z` summed over the layers, as each layer's method of the same name: the
        cached pair when ``y`` is what this stack just produced (no inverse is run), else one
        inverse call through the fused kernels. What
        :class:`~pyroflows.distributions.FlowDistribution` scores with."""
        return self._image_and_log_det(y, inverse=True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(y, log|det df/dx|)`` with :math:`y = f(x)`, summed over the layers: the cached
        pair when ``x`` is what this stack was last called on, else one forward call through
        the fused kernels (which, unlike calling the stack, leaves the cache as it was). What
        a flow guide's draw for :class:`~pyroflows.guides.FlowELBO` uses."""
        return self._image_and_log_det(x, inverse=False)

    def _image_and_log_det(self, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if not self._fused:
            direction = "inverse" if inverse else "forward"
            raise TypeError(f"FlowStack.{direction}_and_log_det needs every part to be a "
                            "pyroflows FlowTransform; use stack(x) / stack.inv(y) and "
                            "log_abs_det_jacobian")
        hit = self._lookup(y=value) if inverse else self._lookup(x=value)
        if hit is not None:
            return (hit.x if inverse else hit.y), hit.log_det
        return self._run(value, inverse)

    def _run(self, x: Tensor, inverse: bool, validate: bool = True) -> tuple[Tensor, Tensor]:
        if validate:
            self.parts[-1 if inverse else 0]._validate(
                x, "input to the inverse" if inverse else "input")
        if self.compile_backend is None:
            return self._chain(x, inverse)
        chain = self.__dict__.get("_compiled_chain")
        if chain is None:
            chain = self.__dict__["_compiled_chain"] = torch.compile(
                self._chain, backend=self.compile_backend, dynamic=False)
        # the compiler traces the plain operations (it cannot see into the fused kernels)
        return chain(x, inverse, False)

    def _chain(self, x: Tensor, inverse: bool, fused: bool = True) -> tuple[Tensor, Tensor]:
        fused = fused and self.fused and not traced()
        log_det = None
        run: list = []  # consecutive layers for one fused call
        kinds: list = []
        for part in reversed(self.parts) if inverse else self.parts:
            kind = _fused_kind(part, inverse) if fused else None
            if run and (kind is None or _group(kind) != _group(kinds[-1])):
                x, log_det = _run_fused(x, run, kinds, log_det, inverse)
                run, kinds = [], []
            if kind is not None:
                run.append(part)
                kinds.append(kind)
                continue
            if fused or not isinstance(part, AffineAutoregressiveCore):
                x, ld = part.inverse_and_log_det(x) if inverse else part.forward_and_log_det(x)
            else:
                x, ld = part.plain_map(x, inverse)
            log_det = ld if log_det is None else log_det + ld
        if run:
            x, log_det = _run_fused(x, run, kinds, log_det, inverse)
        return x, log_det

    def _lookup(self, x: Tensor | None = None, y: Tensor | None = None) -> _CacheEntry | None:
        return FlowTransform._lookup(self, x=x, y=y)

    def _stamp(self) -> tuple | None:
        # the stacked parameters of planar and radial layers are one module shared by the
        # layers: visit it once, not once per layer
        return module_stamp(self, shared=True)

    def _store(self, x: Tensor, y: Tensor, log_det: Tensor, stamp: tuple | None) -> None:
        FlowTransform._store(self, x, y, log_det, stamp)

    def clear_cache(self) -> None:
        """Drop the stack's cached ``(x, y, log_det)`` triple."""
        self.__dict__["_cache"] = None

    def __call__(self, x: Tensor) -> Tensor:
        if not self._fused:
            return super().__call__(x)
        return self._cached_run(x, inverse=False)

    def _inv_call(self, y: Tensor) -> Tensor:
        if not self._fused:
            return super()._inv_call(y)
        return self._cached_run(y, inverse=True)

    def _cached_run(self, value: Tensor, inverse: bool) -> Tensor:
        """The image of ``value`` (``y = t(x)``, or ``x = t.inv(y)`` when ``inverse``), from the
        stack's one-entry cache or from one run of the chain, which then fills the cache."""
        hit = self._lookup(y=value) if inverse else self._lookup(x=value)
        if hit is not None:
            return hit.x if inverse else hit.y
        stamp = self._stamp()
        image, log_det = self._run(value, inverse)
        x, y = (image, value) if inverse else (value, image)
        self._store(x, y, log_det, stamp)
        return image

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._fused:
            hit = self._lookup(x=x) or self._lookup(y=y)
            if hit is not None:
                return hit.log_det
        return super().log_abs_det_jacobian(x, y)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None
        state.pop("_fused_inv", None)
        state.pop("_compiled_chain", None)
        return state

def _banks(stack: FlowStack) -> list[tuple[str, nn.Module, list[tuple[int, int]]]]:
    """Every bank of stacked parameters that layers of ``stack`` share, as ``(path, bank,
    members)``: ``path`` is where a layer keeps the bank's submodule ``stacked`` (``""``
    for planar/radial layers, ``"conditioner."`` for IAF/MAF/RealNVP layers over
    :class:`~pyroflows.nn.made.StackedMADE` rows), ``members`` the ``(part index, row)``
    pairs of its layers in the stack."""
    found: dict[int, tuple[str, nn.Module, list[tuple[int, int]]]] = {}
    for i, part in enumerate(stack.parts):
        if type(part) in (StackedPlanar, StackedRadial):
            path, row = "", part
        elif (isinstance(part, AffineAutoregressiveCore)
              and type(part.conditioner) is StackedMADE):
            path, row = "conditioner.", part.conditioner
        else:
            continue
        found.setdefault(id(row.stacked), (path, row.stacked, []))[2].append((i, row.index))
    return list(found.values())


def per_layer_parameter_names(stack: FlowStack) -> list[str]:
    """The names (relative to ``stack``) that the parameters of its layers with stacked
    parameters had when every layer kept its own: ``"{i}.u"``, ``"{i}.w"``, ``"{i}.bias"``
    (planar; radial alike) and ``"{i}.conditioner.flat_parameters"`` (IAF/MAF/RealNVP).
    Entries under these names (an old ``state_dict`` or param store) become the stacked
    entries by :func:`_per_layer_keys_to_stacked`."""
    return [f"{i}.{path}{name}" for path, bank, members in _banks(stack) for i, _ in members
            for name, _ in bank.named_parameters(recurse=False)]


def _per_layer_keys_to_stacked(stack: FlowStack, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: per-layer entries of layers that now share stacked
    parameters become the stacked entries. Planar/radial: ``"{i}.u"`` (from stacks built
    before their parameters were stacked) becomes ``"{i}.stacked.u"``; IAF/MAF/RealNVP:
    ``"{i}.conditioner.flat_parameters"`` and ``"{i}.conditioner.mask"`` become
    ``"{i}.conditioner.stacked.flat_parameters"`` and ``"{i}.conditioner.stacked.mask"``,
    the rows stacked in the layers' row order. Converted only when every layer of a bank
    has its per-layer parameters in ``state_dict``; buffers (the masks) where present (a
    Pyro param store has none)."""
    for path, bank, members in _banks(stack):
        params = [name for name, _ in bank.named_parameters(recurse=False)]
        buffers = [name for name, _ in bank.named_buffers(recurse=False)]
        if len(members) != bank.num_layers or not all(
                f"{prefix}{i}.{path}{n}" in state_dict for i, _ in members for n in params):
            continue  # not an old-style entry: leave it to the usual checks
        part_of_row = {row: i for i, row in members}
        for n in params + buffers:
            old = [f"{prefix}{part_of_row[k]}.{path}{n}" for k in range(bank.num_layers)]
            if not all(key in state_dict for key in old):
                continue
            value = torch.stack([state_dict[key] for key in old])
            if value.dim() == 2 and value.shape[-1] == 1 and getattr(bank, n).dim() == 1:
                value = value.squeeze(-1)  # (1,) biases and radii -> (L,)
            for i, _ in members:
                state_dict[f"{prefix}{i}.{path}stacked.{n}"] = value
            for key in old:
                del state_dict[key]


# exact types: a subclass may override the map (tests/test_conformance_meta.py does)
_PLANAR_TYPES = (T.Planar, StackedPlanar)
_RADIAL_TYPES = (T.Radial, StackedRadial)


def _fused_kind(part: nn.Module, inverse: bool):
    if isinstance(part, AffineAutoregressiveCore):
        return part.fused_kind(inverse)
    if type(part) in _PLANAR_TYPES:
        return "planar"
    if type(part) in _RADIAL_TYPES:
        return "radial"
    return None


def _group(kind) -> str:
    return kind if isinstance(kind, str) else "affine"


def _run_fused(x: Tensor, run: list, kinds: list, log_det: Tensor | None, inverse: bool):
    # ``run`` is in the order of application; planar_chain and radial_chain take the
    # layers in forward order
    if kinds[0] == "planar":
        return planar_chain(x, run[::-1] if inverse else run, log_det, inverse=inverse)
    if kinds[0] == "radial":
        return radial_chain(x, run[::-1] if inverse else run, log_det, inverse=inverse)
    return affine_chain(x, run, kinds, log_det)


def radial_chain(
    x: Tensor, layers: list, log_det: Tensor | None = None, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Consecutive :class:`~pyroflows.transforms.Radial` layers (given in forward order)
    applied to ``x``, forward or (``inverse``) last layer first, and the sum of their forward
    log-dets, added to ``log_det`` (or 0).

    The same operations as the layers one by one
    (:func:`~pyroflows.transforms.radial.radial_forward`,
    :func:`~pyroflows.transforms.radial.radial_inverse`); only the parameter transforms
    :math:`\alpha = \mathrm{softplus}(\alpha')`, :math:`\alpha + \beta =
    \mathrm{softplus}(\beta')` run once for all layers, on the stacked parameters when the
    layers are rows of one :class:`~pyroflows.transforms.radial.RadialParameters` (whose
    gradients then arrive as one (K, ...) tensor each, not K row scatters).
    """
    x0, alpha_prime, beta_prime = stacked_radial_parameters(layers)
    alpha, alpha_plus_beta = radial_alpha(alpha_prime, beta_prime)
    steps = list(zip(x0.unbind(0), alpha.unbind(0), alpha_plus_beta.unbind(0), strict=True))
    step = radial_forward
    if inverse:
        steps.reverse()
        step = radial_inverse
    for x0_k, alpha_k, sum_k in steps:
        x, ld = step(x, x0_k, alpha_k, sum_k)
        log_det = ld if log_det is None else log_det + ld
    return x, log_det


def planar_chain(
    x: Tensor, layers: list, log_det: Tensor | None = None, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The forward maps of consecutive :class:`~pyroflows.transforms.Planar` layers,
    :math:`x_{k+1} = x_k + \hat u_k \tanh(w_k^\top x_k + b_k)`, and the sum of their log-dets
    :math:`\log(1 + (1 - t_k^2)\, w_k^\top \hat u_k)`, added to ``log_det`` (or 0).
    ``layers`` are given in forward order; with ``inverse`` the inverse maps run, last layer
    first (each a 1-D root solve, :func:`~pyroflows.transforms.planar.planar_inverse_step`),
    with the sum of the forward log-dets at the points found.

    The parameters are read as stacked (K, D) tensors: the
    :class:`~pyroflows.transforms.planar.PlanarParameters` themselves when the layers are its
    rows in order (what :func:`build` makes), else stacked from the layers.

    The same map as running the layers one by one; it is faster because the parameter
    transforms (:func:`planar_u_hat`) run once for all layers on the stacked tensors, each
    layer then costs three kernels (``addmv``, ``tanh``, ``addr``), the log-dets are summed
    in one pass at the end, and the backward pass is written out (:class:`_PlanarChain`): with
    :math:`g_{k+1}` the gradient at :math:`x_{k+1}`, :math:`\ell` the one at the log-det,
    :math:`q_k = 1 - t_k^2` and :math:`c_k = w_k^\top \hat u_k`,

    .. math:: \gamma_k = q_k \Bigl(g_{k+1}^\top \hat u_k
              - \frac{2 \ell\, t_k c_k}{1 + q_k c_k}\Bigr), \qquad
              g_k = g_{k+1} + \gamma_k w_k,

    :math:`\nabla w_k = \sum_n \gamma_{k,n} x_{k,n}`, :math:`\nabla \hat u_k = \sum_n
    t_{k,n} g_{k+1,n}`, :math:`\nabla b_k = \sum_n \gamma_{k,n}`,
    :math:`\nabla c_k = \sum_n \ell_n q_{k,n} / (1 + q_{k,n} c_k)`, the last four for all
    layers at once; autograd carries them on through :func:`planar_u_hat` and the stacking.
    The inverse direction runs on plain autograd operations.
    """
    w, u, bias = stacked_planar_parameters(layers)
    u_hat = planar_u_hat(w, u)
    c = (w * u_hat).sum(-1)
    if inverse:
        steps = zip(w.unbind(0), u_hat.unbind(0), bias.unbind(0), c.unbind(0), strict=True)
        for w_k, u_k, b_k, c_k in reversed(list(steps)):
            x, ld = planar_inverse_step(x, w_k, u_k, b_k, c_k)
            log_det = ld if log_det is None else log_det + ld
        return x, log_det
    args = (x, w, u_hat, bias, c, log_det)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return _PlanarChain.apply(*args)
    with torch.no_grad():
        return _planar_forward(*args)[:2]


def _planar_forward(x, w, u_hat, bias, c, log_det):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    num_layers, (n, dim) = w.shape[0], x2.shape
    xs = x2.new_empty(num_layers + 1, n, dim)  # the input of every layer, and the output
    xs[0] = x2
    tanh = x2.new_empty(num_layers, n)
    for k, (w_k, u_k, b_k) in enumerate(zip(w, u_hat, bias, strict=True)):
        torch.tanh(torch.addmv(b_k, xs[k], w_k), out=tanh[k])
        torch.addr(xs[k], tanh[k], u_k, out=xs[k + 1])
    q = 1 - tanh * tanh
    r = q * c[:, None]
    ld = torch.log1p(r).sum(0).view(shape[:-1])
    log_det = ld if log_det is None else log_det + ld
    return xs[-1].view(shape), log_det, xs, tanh, q, r


class _PlanarChain(torch.autograd.Function):
    """The autograd node of :func:`planar_chain`."""

    @staticmethod
    def forward(ctx, x, w, u_hat, bias, c, log_det):
        ctx.log_det_shape = None if log_det is None else log_det.shape
        y, log_det, xs, tanh, q, r = _planar_forward(x, w, u_hat, bias, c, log_det)
        ctx.save_for_backward(w, u_hat, c)
        ctx.xs, ctx.tanh, ctx.q, ctx.r = xs, tanh, q, r
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return y, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_log_det):
        w, u_hat, c = ctx.saved_tensors
        if grad_y is None and grad_log_det is None:
            return (None,) * 6
        xs, tanh, q = ctx.xs, ctx.tanh, ctx.q
        num_layers, n, dim = xs.shape
        num_layers -= 1
        grads = xs.new_empty(num_layers + 1, n, dim)  # gradient at every x_k
        if grad_y is None:
            grads[-1].zero_()
        else:
            grads[-1] = grad_y.reshape(n, dim)
        if grad_log_det is None:
            from_log_det = torch.zeros_like(tanh)
            grad_c = torch.zeros_like(c)
        else:
            ell = grad_log_det.reshape(1, n)
            one_plus_r = 1 + ctx.r
            # d log(1 + q c) / dt = -2 t c / (1 + q c)
            from_log_det = (-2 * ell) * tanh * c[:, None] / one_plus_r
            grad_c = (ell * q / one_plus_r).sum(-1)
        gamma = torch.empty_like(tanh)
        for k in range(num_layers - 1, -1, -1):
            torch.mul(torch.addmv(from_log_det[k], grads[k + 1], u_hat[k]), q[k], out=gamma[k])
            torch.addr(grads[k + 1], gamma[k], w[k], out=grads[k])
        grad_w = torch.bmm(gamma.unsqueeze(1), xs[:-1]).squeeze(1)
        grad_u_hat = torch.bmm(tanh.unsqueeze(1), grads[1:]).squeeze(1)
        grad_bias = gamma.sum(-1)
        grad_log_det0 = None
        if ctx.needs_input_grad[5] and grad_log_det is not None:
            grad_log_det0 = grad_log_det.sum_to_size(ctx.log_det_shape)
        grad_x = grads[0].view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_u_hat, grad_bias, grad_c, grad_log_det0


# name -> (layer constructor (dim, **kwargs) -> Transform, whether layers need permutations
# between them so that every coordinate gets transformed)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "planar": (lambda dim, **kw: T.Planar(dim, **kw), False),
    "radial": (lambda dim, **kw: T.Radial(dim, **kw), False),
    "iaf": (lambda dim, **kw: T.IAF(dim, **kw), True),
    "maf": (lambda dim, **kw: T.MAF(dim, **kw), True),
    "realnvp": (lambda dim, **kw: T.RealNVP(dim, **kw), True),
}

Fold = Callable[[int, Tensor, dict], dict]


def _fold_order(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    order = kwargs.get("order")
    order = torch.arange(dim) if order is None else torch.as_tensor(order).flatten()
    if order.numel() != dim:
        return kwargs  # the layer's own check reports it
    return {**kwargs, "order": order[inverse]}


def _fold_mask(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    mask = kwargs.get("mask")
    mask = T.RealNVP.default_mask(dim) if mask is None else torch.as_tensor(mask).flatten()
    if mask.numel() != dim:
        return kwargs
    return {**kwargs, "mask": mask.bool()[inverse]}


# Families whose layers take the permutation themselves: name -> fold(dim, inverse, kwargs),
# which turns "permute the coordinates by c, then apply the layer" into the keyword arguments
# of one layer acting on the unpermuted coordinates (``inverse`` = argsort(c)). No permutation
# layer runs at all: a stack of such layers is the permuted stack up to a fixed reordering of
# its output, with four fewer transforms per five layers.
FOLDED_PERMUTATIONS: dict[str, Fold] = {
    "iaf": _fold_order,
    "maf": _fold_order,
    "realnvp": _fold_mask,
}


# Families whose layers keep their parameters stacked: name -> layers(dim, num_layers), a list
# of layers that read rows of shared (num_layers, ...) tensors
# (:class:`~pyroflows.transforms.planar.PlanarParameters`,
# :class:`~pyroflows.transforms.radial.RadialParameters`). Used by ``build`` when no layer
# keyword arguments are given. Why: optimizers and ``pyro.module`` pay per tensor, and a
# 32-layer planar stack has 96 small ones.
STACKED_FAMILIES: dict[str, Callable[[int, int], list[nn.Module]]] = {
    "planar": planar_layers,
    "radial": radial_layers,
}


# Families whose layers' MADE conditioners keep their parameters stacked: ``build`` makes the
# networks of a run of same-size layers rows of one
# :class:`~pyroflows.nn.made.MADEParameters` (one (L, P) parameter and one (L, P) mask),
# :class:`~pyroflows.nn.made.StackedMADE` each. Why: ``torch.optim.Adam`` on CPU costs some
# eight kernels per parameter tensor, and the fused kernels mask a run of layers with one
# product forward and one masked gradient; measured about 6% of a D=8 training step of five
# layers (benchmarks/speed.py, items 1-2).
STACKED_CONDITIONER_FAMILIES: set[str] = {"iaf", "maf", "realnvp"}


# Coupling families whose odd-numbered layers take the complement of the previous layer's mask
# (Dinh et al.'s alternating masks) instead of the folded permutation: with an odd D, reversing
# the order maps the middle coordinate onto itself, so it would be transformed by every layer
# and never condition one; the complement makes every coordinate do both in each pair of
# layers (0, 1), (2, 3), ..., whatever D and ``permutation``. For an even D and the default
# mask this is the reversal itself.
COMPLEMENTARY_MASKS: set[str] = {"realnvp"}


def register_family(
    name: str,
    layer: Callable[..., nn.Module],
    needs_permutation: bool,
    fold: Fold | None = None,
) -> None:
    """Make ``build(name, ...)`` available for a new layer family.

    ``needs_permutation``: put a fixed permutation between layers. ``fold`` (optional): fold
    that permutation into the layers' keyword arguments instead of inserting
    :class:`~pyroflows.transforms.Permute` layers (see ``FOLDED_PERMUTATIONS``).
    """
    FAMILIES[name] = (layer, needs_permutation)
    STACKED_FAMILIES.pop(name, None)  # the new layer constructor is what build must call
    STACKED_CONDITIONER_FAMILIES.discard(name)
    if fold is not None:
        FOLDED_PERMUTATIONS[name] = fold
    else:
        FOLDED_PERMUTATIONS.pop(name, None)


def build(
    name: str,
    dim: int,
    num_layers: int = 5,
    hidden_dims=None,
    permutation: str = "reverse",
    affine: bool = False,
    compile: bool | str = False,
    **layer_kwargs,
) -> FlowStack:
    """Build a stack of ``num_layers`` layers of one family as a :class:`FlowStack` (a
    ``ComposeTransformModule``).

    Families whose layers see only part of the coordinates at a time (IAF, MAF, RealNVP) are
    stacked with a fixed permutation between layers, so every coordinate is transformed and
    depends on every other. For IAF and MAF it becomes the next layer's MADE order, for RealNVP
    its coupling mask, so no permutation layer runs; a family registered without ``fold`` gets
    :class:`~pyroflows.transforms.Permute` layers. RealNVP's odd-numbered layers use the
    complement of the previous layer's mask (Dinh et al.'s alternating masks; see
    ``COMPLEMENTARY_MASKS``), so with an odd D too every coordinate is transformed by one layer
    of each pair and conditions the other.

    Planar and radial stacks (``STACKED_FAMILIES``) keep the parameters of all their layers in
    three stacked tensors (:class:`~pyroflows.transforms.planar.PlanarParameters`,
    :class:`~pyroflows.transforms.radial.RadialParameters`), shared by the layers: ``flow[i]``
    is still layer ``i`` (a :class:`~pyroflows.transforms.planar.StackedPlanar` or
    :class:`~pyroflows.transforms.radial.StackedRadial`, which behave as ``Planar`` and
    ``Radial``) but ``flow.parameters()`` are three (L, D) or (L,) tensors, and the
    ``state_dict`` keys are ``"{i}.stacked.u"``, ``"{i}.stacked.w"``, ``"{i}.stacked.bias"``
    (radial: ``x0``, ``alpha_prime``, ``beta_prime``), the same tensors under every ``i``
    (as for any module shared by several layers in torch; ``torch.save`` stores them once).
    Stacks saved before this change had per-layer parameters with keys ``"{i}.u"`` etc.; a
    :class:`FlowStack` still loads such a ``state_dict``.

    IAF, MAF and RealNVP stacks (``STACKED_CONDITIONER_FAMILIES``) keep the flat parameters
    and masks of all their layers' MADE networks in one
    :class:`~pyroflows.nn.made.MADEParameters` (an (L, P) parameter and an (L, P) mask buffer;
    the networks of a built stack always have one size P): each
    layer's ``conditioner`` is a :class:`~pyroflows.nn.made.StackedMADE` whose
    ``flat_parameters`` is row ``i`` (a view), ``flow.parameters()`` is that one tensor, and the
    ``state_dict`` keys are ``"{i}.conditioner.stacked.flat_parameters"`` and
    ``"{i}.conditioner.stacked.mask"``. The fused kernels mask a run of layers with one product
    and write one gradient; an optimizer steps one tensor. Older per-layer ``state_dict`` keys
    (``"{i}.conditioner.flat_parameters"``, ``"{i}.conditioner.mask"``) still load.

    One bank module is registered under every layer of its run; module walks
    (``named_modules``, ``named_parameters(remove_duplicate=False)``) list it once, under its
    first layer (:class:`~pyroflows.nn.shared.SharedModule`), so
    ``torch.func.functional_call(flow, params, args)`` with the names of
    ``flow.named_parameters()`` swaps and restores each shared tensor exactly once (tested);
    ``state_dict`` still has every layer's keys.

    Arguments:
        name: one of ``pyroflows.flows.FAMILIES``: planar, radial, iaf, maf, realnvp, and any
            family registered with :func:`register_family`.
        dim: the event size D.
        num_layers: the number of flow layers.
        hidden_dims: conditioner hidden sizes, for families that have a network.
        permutation: ``"reverse"`` (reverse the order between layers) or ``"random"``
            (a fixed random permutation between layers, seeded by the layer's index, so
            building twice gives the same flow).
        affine: append a learnable :class:`~pyroflows.transforms.ElementwiseAffine` last.
        compile: run the stack through :func:`torch.compile` (see :class:`FlowStack`); off by
            default, as compiling takes tens of seconds per input shape.
        layer_kwargs: passed to every layer's constructor.

    The result works directly in ``TransformedDistribution(base, flow)``.

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("planar", 2, num_layers=4)
        >>> flow(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> maf = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(16, 16))
        >>> [layer.conditioner.degrees.tolist() for layer in maf.parts]
        [[1, 2, 3], [3, 2, 1], [1, 2, 3]]
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown flow family {name!r}; choose one of {sorted(FAMILIES)}")
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if permutation not in ("reverse", "random"):
        raise ValueError(f"permutation must be 'reverse' or 'random', got {permutation!r}")
    if hidden_dims is not None:
        layer_kwargs["hidden_dims"] = tuple(hidden_dims)
    parts: list[nn.Module] = []
    stacked = STACKED_FAMILIES.get(name)
    if stacked is not None and not layer_kwargs:  # (families without permutations)
        parts.extend(stacked(dim, int(num_layers)))
    else:
        parts.extend(_layer_by_layer(name, dim, int(num_layers), permutation, layer_kwargs))
        if name in STACKED_CONDITIONER_FAMILIES:
            _stack_conditioners(parts)
    if affine:
        parts.append(T.ElementwiseAffine(dim))
    return FlowStack(parts, compile=compile)


def _layer_by_layer(name: str, dim: int, num_layers: int, permutation: str,
                    layer_kwargs: dict) -> list[nn.Module]:
    """The layers of :func:`build` made one by one, with the permutations between them."""
    layer, needs_permutation = FAMILIES[name]
    fold = FOLDED_PERMUTATIONS.get(name)
    parts: list[nn.Module] = []
    cumulative = torch.arange(dim)  # layer i acts on x[cumulative]
    for i in range(num_layers):
        kwargs = layer_kwargs
        if needs_permutation and i > 0 and dim > 1:
            step = _permutation(dim, permutation, seed=i)
            if fold is None:
                parts.append(step)
            else:
                cumulative = cumulative[step.permutation]
                kwargs = fold(dim, torch.argsort(cumulative), layer_kwargs)
            if fold is not None and name in COMPLEMENTARY_MASKS and i % 2 == 1:
                kwargs = {**kwargs, "mask": ~parts[-1].mask.cpu()}
        try:
            parts.append(layer(dim, **kwargs))
        except TypeError as e:  # e.g. hidden_dims for a family without a network
            raise ValueError(f"flow family {name!r} does not take these arguments: {e}") from e
    return parts


def _stack_conditioners(parts: list[nn.Module]) -> None:
    """Give every run of consecutive layers with :class:`~pyroflows.nn.MADE` conditioners of
    one size :class:`~pyroflows.nn.made.StackedMADE` rows of one new bank instead, holding
    the same parameters (so the same maps, and under one seed the values the layers drew)."""
    runs: list[list[AffineAutoregressiveCore]] = [[]]
    for part in parts:
        net = getattr(part, "conditioner", None)
        if not (isinstance(part, AffineAutoregressiveCore) and type(net) is MADE):
            runs.append([])
        elif runs[-1] and runs[-1][-1].conditioner._shapes == net._shapes:
            runs[-1].append(part)
        else:
            runs.append([part])
    for run in runs:
        if len(run) > 1:
            rows = stacked_mades([layer.conditioner for layer in run])
            for layer, row in zip(run, rows, strict=True):
                layer.conditioner = row


def _permutation(dim: int, kind: str, seed: int) -> T.Permute:
    if kind == "reverse":
        return T.Permute.reverse(dim)
    return T.Permute.random(dim, seed=seed)
