"""FlowStack: a composition of pyroflows layers with one cache and fused passes."""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from .. import _legacy, _private
from .. import transforms as T
from ..transforms.autoregressive import AffineAutoregressiveCore, affine_chain, traced
from ..transforms.base import FlowTransform, _CacheEntry, module_stamp
from ..transforms.planar import (
    StackedPlanar,
    planar_inverse_step,
    planar_u_hat,
    stacked_planar_parameters,
)
from ..transforms.radial import (
    StackedRadial,
    radial_alpha,
    radial_forward,
    radial_inverse,
    stacked_radial_parameters,
)

__all__ = ["FlowStack", "planar_chain", "radial_chain"]


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
        self._register_load_state_dict_pre_hook(_legacy.per_layer_keys_to_stacked,
                                                 with_module=True)

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
            inv = self.__dict__["_fused_inv"] = _private.InverseTransform(self)
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
        hit = self.lookup(y=value) if inverse else self.lookup(x=value)
        if hit is not None:
            return (hit.x if inverse else hit.y), hit.log_det
        return self.run(value, inverse)

    def run(self, x: Tensor, inverse: bool = False, validate: bool = True
            ) -> tuple[Tensor, Tensor]:
        """``(image, log|det J|)`` of ``x`` through the stack (forward, or the inverse), the
        log-det of the forward map, with no cache lookup or store; ``validate=False`` skips
        the input checks (a fresh draw of the base)."""
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

    def lookup(self, x: Tensor | None = None, y: Tensor | None = None) -> _CacheEntry | None:
        """The cached ``(x, y, log_det)`` entry when ``x`` (or ``y``) is the stack's last
        input (or output) and nothing changed since; else ``None``."""
        return FlowTransform.lookup(self, x=x, y=y)

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
        hit = self.lookup(y=value) if inverse else self.lookup(x=value)
        if hit is not None:
            return hit.x if inverse else hit.y
        stamp = self._stamp()
        image, log_det = self.run(value, inverse)
        x, y = (image, value) if inverse else (value, image)
        self._store(x, y, log_det, stamp)
        return image

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._fused:
            hit = self.lookup(x=x) or self.lookup(y=y)
            if hit is not None:
                return hit.log_det
        return super().log_abs_det_jacobian(x, y)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None
        state.pop("_fused_inv", None)
        state.pop("_compiled_chain", None)
        return state

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
