r"""Sticking the landing (Roeder et al. 2017): a flow guide's :math:`\log q_{\bar\phi}(z)`
with the parameters :math:`\bar\phi` detached, only the path :math:`z_\phi = T_\phi(\varepsilon)`
differentiated; by the flow's inverse (:func:`log_prob_detached`; for IAF D sequential passes a
layer) or, where the draw's base point is known, from the draw itself
(:func:`path_log_density`): layer by layer (:func:`layerwise_score`; IAF, MAF, NSF, RealNVP,
planar, radial, affine and permutation layers, conditioned or not) or by the draw's whole
Jacobian (D + 1 batched pullbacks).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch
from pyro.distributions import Distribution
from torch import Tensor, nn
from torch.distributions import Transform

from .. import flows
from ..distributions import UnitStudentT
from ..transforms import FlowTransform
from ..transforms.autoregressive import AffineAutoregressiveCore, AutoregressiveCore

__all__ = ["posterior_sticks", "posterior_stl_off", "sticks", "rsample_keeping",
           "kept_linearizations", "log_prob_detached", "jacobian_route",
           "path_route", "layerwise_score", "path_log_density", "path_entropy",
           "detached_base", "base_score"]

#: Where :func:`layerwise_score` does not take the stack: up to this latent size
#: :math:`\nabla_z \log q` comes from the draw's Jacobian (a D x D solve per particle); above
#: it from the flow's inverse. Both take about D passes of the flow's
#: networks, but the Jacobian's in one batch and the inverse's (IAF: D a layer) one after
#: another, so the Jacobian is the cheaper route wherever its rows fit
#: (:data:`STL_JACOBIAN_MAX_ROWS`) and its solve, :math:`O(D^3)` a particle, stays small beside
#: the passes (``benchmarks/results/vi-scaling.md``).
STL_JACOBIAN_MAX_DIM = 1024
#: The most rows (particles x D) the Jacobian's pass may take (activations in memory).
STL_JACOBIAN_MAX_ROWS = 32768
#: Whether :func:`path_log_density` takes :func:`layerwise_score` where every layer allows it
#: (IAF, MAF, NSF, RealNVP, planar, radial, affine and permutation layers, conditioned or
#: not: every guide that pyroflows builds, autoguide or amortized); ``False``: as if none did.
STL_LAYERWISE = True
#: Where :func:`layerwise_score` stops an IAF layer's iteration: once a step is within this
#: fraction of the solution (max norms), or within :math:`\sqrt\epsilon` of the dtype where
#: that is larger (float32: 3.5e-4). The score is a term of a Monte-Carlo gradient, needed to
#: a small fraction of that gradient's noise rather than to float64's rounding; ``0``: to
#: :math:`\sqrt\epsilon` in every dtype (float64: 1.5e-8, one or two more steps a layer).
STL_TOL = 1e-4
#: From this many rows (particles x (D + 1)) on, the Jacobian comes from one forward pass and a
#: backward batched over the D + 1 cotangents; below it from one pass over D + 1 copies of the
#: particles, whose fixed cost is lower.
STL_BATCHED_BACKWARD_MIN_ROWS = 400


#: Whether a :class:`~pyroflows.guides.FlowPosterior` may stick the landing in its own
#: ``score_parts`` (for ``Trace_ELBO`` and the other ELBOs that read a site's entropy term);
#: :class:`~pyroflows.guides.FlowELBO` turns it off and makes the choice itself.
_POSTERIOR_STL: contextvars.ContextVar[bool] = contextvars.ContextVar("posterior_stl",
                                                                      default=True)


def posterior_sticks() -> bool:
    """Whether flow posteriors stick the landing in their ``score_parts`` here."""
    return _POSTERIOR_STL.get()


def sticks(posterior: Distribution, value: Tensor) -> bool:
    """Whether the ``score_parts`` of a flow posterior with a ``stick_the_landing`` switch
    give the sticking-the-landing entropy term at ``value``: switched on, a draw with
    gradients under autograd, :func:`posterior_sticks`, no ``torch.jit`` trace."""
    return (posterior.stick_the_landing and posterior.has_rsample and torch.is_grad_enabled()
            and value.requires_grad and posterior_sticks() and not torch.jit.is_tracing())


def rsample_keeping(posterior: Distribution, rsample: Callable[[], Tensor]) -> Tensor:
    """``rsample()``, a draw of ``posterior``; with autograd through one
    :class:`~pyroflows.flows.FlowStack`, the IAF layers' linearizations its fused run kept
    (the activations its autograd graph holds anyway) go on the draw itself, for its
    sticking-the-landing term (:func:`kept_linearizations`): they live exactly as long as the
    draw and its graph, whoever holds the distribution."""
    transforms = posterior.transforms
    if not (torch.is_grad_enabled() and len(transforms) == 1
            and isinstance(transforms[0], flows.FlowStack)):
        return rsample()
    with flows.FlowStack.keeping_linearizations() as kept:
        value = rsample()
    if kept:
        value._pyroflows_linearized = (transforms[0], kept)
    return value


def kept_linearizations(posterior: Distribution, value: Tensor) -> list:
    """The IAF layers' linearizations kept by the draw ``value`` of ``posterior``'s flow
    (:func:`rsample_keeping`; empty for any other tensor)."""
    kept = value.__dict__.get("_pyroflows_linearized")
    return kept[1] if kept is not None and kept[0] is posterior.transforms[0] else []


@contextlib.contextmanager
def posterior_stl_off() -> Iterator[None]:
    """Within: flow posteriors' ``score_parts`` give Pyro's plain parts (the caller decides)."""
    token = _POSTERIOR_STL.set(False)
    try:
        yield
    finally:
        _POSTERIOR_STL.reset(token)


class _Call(nn.Module):
    """A layer's (or a stack's) ``forward_and_log_det`` or ``inverse_and_log_det`` (uncached)
    as a module, for :func:`torch.func.functional_call` with detached parameters."""

    def __init__(self, t: FlowTransform | flows.FlowStack, inverse: bool) -> None:
        super().__init__()
        self.t = t
        self.inverse = inverse

    def forward(self, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.inverse:
            return self.t.inverse_and_log_det(value)
        return self.t.forward_and_log_det(value)


def _detached(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s parameters cut from the graph, named as :class:`_Call` sees them."""
    return {f"t.{name}": p.detach() for name, p in module.named_parameters()}


def detached_base(base_dist: Distribution) -> Distribution:
    """``base_dist`` with its learned parameters detached (a guide's
    :class:`~pyroflows.distributions.UnitStudentT` degrees of freedom); others as they are."""
    if isinstance(base_dist, UnitStudentT):
        return UnitStudentT(base_dist.df.detach())
    return base_dist


def base_score(base_dist: Distribution | None, eps: Tensor) -> Tensor:
    r""":math:`\nabla_\varepsilon \log p_0(\varepsilon)` of a flow guide's base at ``eps``:
    :math:`-\varepsilon` for :math:`N(0, I)`; for :class:`~pyroflows.distributions.UnitStudentT`,
    :math:`-(\nu + 1)\,\varepsilon / (\nu s^2 + \varepsilon^2)` per coordinate, the degrees of
    freedom detached."""
    if isinstance(base_dist, UnitStudentT):
        df = base_dist.df.detach()
        return -(df + 1) * eps / ((df - 2) + eps * eps)  # nu s^2 = nu - 2
    return -eps


def log_prob_detached(base_dist: Distribution, transforms: list[Transform],
                      value: Tensor) -> Tensor:
    r""":math:`\log q_{\bar\phi}(z)` of ``TransformedDistribution(base_dist, transforms)`` at
    ``value`` by every layer's inverse: differentiable in ``value`` only."""
    y = value
    log_det = torch.zeros((), dtype=value.dtype, device=value.device)
    layers = []
    for t in transforms:  # a FlowStack's layers one by one: each is frozen alone
        layers.extend(t.parts if isinstance(t, flows.FlowStack) else [t])
    for t in reversed(layers):
        if not isinstance(t, FlowTransform):
            raise TypeError(
                "sticking-the-landing gradients need pyroflows transforms (FlowTransform "
                f"subclasses) in the guide's flow; got {type(t).__name__}"
            )
        y, ld = torch.func.functional_call(_Call(t, inverse=True), _detached(t), (y,),
                                           strict=False)
        log_det = log_det + ld
    return detached_base(base_dist).log_prob(y) - log_det


def jacobian_route(eps: Tensor) -> bool:
    """Whether :func:`path_log_density` takes base draws ``eps`` (..., D): D and the rows
    (particles x D) within :data:`STL_JACOBIAN_MAX_DIM` and :data:`STL_JACOBIAN_MAX_ROWS`."""
    return eps.shape[-1] <= STL_JACOBIAN_MAX_DIM and eps.numel() <= STL_JACOBIAN_MAX_ROWS


def _layerwise(stack: flows.FlowStack) -> bool:
    """Whether :func:`layerwise_score` takes ``stack``: every layer with a closed-form score
    step (``has_score_step``: affine, permutation, planar and radial layers, their conditioned
    maps, a conditional flow's Gaussian start), IAF-like (``can_linearize``: a fused one-pass
    forward map, with a context or without) or with a one-pass inverse
    (:func:`_one_pass_inverse`: MAF, NSF, a compact coupling layer, conditioned or not)."""
    def fits(t: nn.Module) -> bool:
        return t.has_score_step() or _linearizes(t) or _one_pass_inverse(t)

    return STL_LAYERWISE and stack.all_flow_transforms and all(fits(t) for t in stack.parts)


def _linearizes(t: nn.Module) -> bool:
    """Whether ``t`` is IAF-like: a fused one-pass forward map (:class:`Linearization`)."""
    return isinstance(t, AffineAutoregressiveCore) and t.can_linearize()


def _one_pass_inverse(t: nn.Module) -> bool:
    """Whether ``t``'s inverse is one network pass while its forward map is not IAF-like:
    MAF's and NSF's direction (the forward map D levels), or a coupling layer whose compact
    network no :class:`Linearization` takes (:func:`_inverse_step`)."""
    return isinstance(t, AutoregressiveCore) and (
        not t.forward_is_parallel or getattr(t, "coupling_halves", None) is not None)


def _inverse_step(t: FlowTransform, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    r"""A layer's step of :func:`layerwise_score` by its one-pass inverse
    :math:`f^{-1}`: :math:`y = f(x)` (without autograd: MAF's and NSF's D levels compute each
    hidden unit once) and, with :math:`\ell = \log|\det J_f|`,

    .. math:: J_f^{-\top}\bigl(g - \nabla_x \ell(x)\bigr)
              = J_{f^{-1}}(y)^\top g - \nabla_y\, \ell\bigl(f^{-1}(y)\bigr),

    one vector-Jacobian product of :math:`(f^{-1}(y), \ell(f^{-1}(y)))` with cotangents
    :math:`(g, -1)`, the parameters detached."""
    y = t.forward_and_log_det(x)[0]
    leaf = y.detach().requires_grad_(True)
    with torch.enable_grad():
        back, log_det = torch.func.functional_call(_Call(t, inverse=True), _detached(t),
                                                   (leaf,))
        (step,) = torch.autograd.grad((back, log_det), leaf,
                                      (g.expand_as(back), -torch.ones_like(log_det)))
    return y, step


def path_route(stack: flows.FlowStack, eps: Tensor) -> bool:
    """Whether :func:`path_log_density` takes ``stack`` at base draws ``eps``: layer by layer,
    or by the draw's Jacobian within its limits (:func:`jacobian_route`)."""
    return _layerwise(stack) or jacobian_route(eps)


def layerwise_score(stack: flows.FlowStack, eps: Tensor, base_dist: Distribution | None = None,
                    linearizations: Sequence = ()) -> Tensor:
    r""":math:`\nabla_z \log q_{\bar\phi}(z)` at :math:`z = T(\varepsilon)` for a stack of
    IAF, MAF, NSF, RealNVP, planar, radial, affine and permutation layers (:func:`_layerwise`),
    :math:`T = t_K \circ \dots \circ t_1`, :math:`x_k = t_k(x_{k-1})`,
    :math:`x_0 = \varepsilon`, :math:`J_k = \partial t_k / \partial x_{k-1}`,
    :math:`\ell_k = \log|\det J_k(x_{k-1})|`. As
    :math:`\log q(z) = \log p_0(\varepsilon) - \sum_k \ell_k` and
    :math:`\partial x_{k-1} / \partial z = (J_K \cdots J_k)^{-1}`, it is :math:`u_K` of

    .. math:: u_0 = \nabla \log p_0(\varepsilon), \qquad
              J_k^\top u_k = u_{k-1} - \nabla \ell_k(x_{k-1}),

    one solve per layer, from the first: no pass from the top. A layer with a closed-form step
    gives it (its :meth:`~pyroflows.transforms.FlowTransform.score_step`): an affine layer's
    :math:`J_k` is its constant triangular matrix and :math:`\nabla \ell_k = 0` (a
    triangular solve), a permutation's is orthogonal, a planar or radial layer's is the
    identity plus a rank-one term. A MAF or NSF layer (or a compact coupling layer) takes one
    vector-Jacobian product of its one-pass inverse at its output (:func:`_inverse_step`). An
    IAF layer's is :math:`S + L`, :math:`S = \mathrm{diag}(e^{s})`, :math:`L` strictly lower
    triangular in the layer's order, solved by an iteration whose error is multiplied by the
    nilpotent :math:`-S^{-1} L^\top` each step, with :math:`\nabla \ell_k` inside the same
    pullbacks (``solve_transposed`` of the layer's :meth:`~pyroflows.transforms.IAF.linearize`):
    exact after at most as many steps as the order has levels (D), it stops once a step is
    within :data:`STL_TOL` (1e-4) of the solution, or :math:`\sqrt\epsilon` in a dtype whose
    :math:`\sqrt\epsilon` is larger (float32), far below the gradient's Monte-Carlo noise:
    each step shrinks the error 100- to 10000-fold after training, so two or three steps a
    layer. The parameters are constants here. ``eps`` (..., D), whose batch dims broadcast
    against a conditioned layer's rows of parameters; the result has its shape.
    ``linearizations``: the IAF layers' linearizations kept by the draw's own run
    (:meth:`~pyroflows.flows.FlowStack.run_linearized`), used in order where they are of
    the layer at hand and the draws' shape; any other layer is linearized here."""
    d = eps.shape[-1]
    x = eps.detach().reshape(-1, d) if eps.dim() < 2 else eps.detach()
    tol = max(STL_TOL, torch.finfo(x.dtype).eps ** 0.5)
    kept = iter(linearizations)
    ready = next(kept, None)
    with torch.no_grad():
        u = base_score(base_dist, x)
        for t in stack.parts:
            if t.has_score_step():
                x, u = t.score_step(x, u)
            elif not _linearizes(t):  # MAF, NSF, a compact coupling layer
                x, u = _inverse_step(t, x, u)
            else:  # an IAF layer (its linearization works on the draws as rows)
                rows = x.numel() // d
                if ready is not None and ready.layer is t and ready.shape == (rows, d):
                    lin, ready = ready, next(kept, None)
                else:  # (the batch dims: a conditioned layer's contexts broadcast against them)
                    lin = t.linearize(x)
                u = lin.solve_transposed(u.reshape(-1, d), tol, with_log_det=True).view(x.shape)
                x = lin.output.view(x.shape)
    return u.reshape(eps.shape)


def path_log_density(stack: flows.FlowStack, eps: Tensor, z: Tensor, log_q: Tensor,
                     base_dist: Distribution | None = None, linearizations: Sequence = ()
                     ) -> Tensor:
    r""":math:`\log q_{\bar\phi}(z)` from the draw :math:`z = T_\phi(\varepsilon)` itself
    instead of the inverse: its value is ``log_q`` and its gradient in :math:`z` is

    .. math:: \nabla_z \log q_{\bar\phi}(z) = J^{-\top} \nabla_\varepsilon
              \bigl[\log p_0(\varepsilon) - \log|\det J(\varepsilon)|\bigr],
              \qquad J = \partial T / \partial \varepsilon,

    so the result is ``log_q`` (detached) plus :math:`(z - \bar z) \cdot \nabla_z`. The
    gradient comes layer by layer (:func:`layerwise_score`) where the stack allows it
    (:data:`STL_LAYERWISE`), else from :math:`J` by D + 1 pullbacks (batched, or over D + 1
    copies of the draws: see :data:`STL_BATCHED_BACKWARD_MIN_ROWS`), solved per draw. ``eps``,
    ``z`` (..., D), ``log_q`` (...); ``base_dist`` the base :math:`p_0` (:func:`base_score`;
    default :math:`N(0, I)`); ``linearizations`` as for :func:`layerwise_score`."""
    if _layerwise(stack):
        grad_z = layerwise_score(stack, eps, base_dist, linearizations).reshape(z.shape)
    else:
        grad_z = _jacobian_score(stack, eps, base_dist).reshape(z.shape)
    return log_q.detach() + ((z - z.detach()) * grad_z).sum(-1)


def _jacobian_score(stack: flows.FlowStack, eps: Tensor, base_dist: Distribution | None
                    ) -> Tensor:
    """:math:`J^{-\top} h` of :func:`path_log_density` from the draw's whole Jacobian, of the
    shape (..., D) of ``eps``, whose batch dims stay as they are (they broadcast against a
    conditioned layer's rows of parameters)."""
    d = eps.shape[-1]
    e = eps.detach()
    batch = e.shape[:-1]
    n = e.numel() // max(d, 1)
    # pullback i < D of output i (row i of J), the last one of -log|det J|; the parameters are
    # detached copies, so no parameter gradient is computed (a conditioned layer's parameters,
    # tensors of its context, are not asked for either: the gradient is the draws' alone)
    frozen = _detached(stack)
    eye = torch.eye(d + 1, d, dtype=e.dtype, device=e.device)  # last row zero
    pick_y = eye.view(d + 1, *(1,) * len(batch), d).expand(d + 1, *batch, d)
    pick_ld = torch.zeros(d + 1, *batch, dtype=e.dtype, device=e.device)
    pick_ld[d] = -1.0
    pulled = None
    if n * (d + 1) >= STL_BATCHED_BACKWARD_MIN_ROWS:
        # whether the stack's backward runs batched, found by the first try: the layers'
        # kinds that refused refuse every time (in-place operations), so later stacks of
        # them go straight to the copies instead of paying a failed attempt per step
        kinds = _backward_kinds(stack, e.device)
        if _RUNS_BATCHED.get(kinds, True):
            pulled = _batched_pullbacks(stack, frozen, e, pick_y, pick_ld)
            _RUNS_BATCHED[kinds] = pulled is not None
    if pulled is None:  # one pass over D + 1 copies of the draws
        copies = e.expand(d + 1, *batch, d).clone().requires_grad_(True)
        with torch.enable_grad():
            y, log_det = torch.func.functional_call(_Call(stack, inverse=False), frozen,
                                                    (copies,))
            outputs, cotangents = _with_log_det((y, log_det), (pick_y, pick_ld))
            (pulled,) = torch.autograd.grad(outputs, copies, grad_outputs=cotangents)
    # h: the gradient of log p0(eps) - log|det J| at eps
    rows, h = pulled[:d], pulled[d] + base_score(base_dist, e)
    jac = rows.movedim(0, -2)  # jac[..., i, j] = dz_i / d eps_j
    # solve_ex: a singular Jacobian (a degenerate flow) gives a non-finite gradient, which
    # FlowELBO skips, instead of an error
    return torch.linalg.solve_ex(jac.transpose(-1, -2), h.unsqueeze(-1))[0].squeeze(-1)


#: Whether a stack's backward ran batched (:func:`_batched_pullbacks`), by
#: :func:`_backward_kinds`: the layers' code, not their values, decides it.
_RUNS_BATCHED: dict[tuple, bool] = {}


def _backward_kinds(stack: flows.FlowStack, device: torch.device) -> tuple:
    """What decides whether ``stack``'s backward runs batched: its layers' classes and fused
    switches, its own, and the device type."""
    return (device.type, stack.fused, stack.compile_backend,
            tuple((type(t), getattr(t, "fused", None)) for t in stack.parts))


def _with_log_det(outputs: tuple[Tensor, Tensor], cotangents: tuple[Tensor, Tensor]
                  ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``(y, log_det)`` and their cotangents, without ``log_det`` where it does not depend on
    the input (a stack of affine layers only: its pullback is zero)."""
    if outputs[1].requires_grad:
        return outputs, cotangents
    return outputs[:1], cotangents[:1]


def _batched_pullbacks(stack: flows.FlowStack, frozen: dict[str, Tensor], e: Tensor,
                       pick_y: Tensor, pick_ld: Tensor) -> Tensor | None:
    """The D + 1 pullbacks of :func:`path_log_density` at ``e`` (n, D) from one forward pass
    and one backward batched over the cotangents ``pick_y`` (D + 1, n, D), ``pick_ld``
    (D + 1, n); ``None`` where a layer's backward does not batch (in-place operations)."""
    x = e.clone().requires_grad_(True)
    with torch.enable_grad():
        y, log_det = torch.func.functional_call(_Call(stack, inverse=False), frozen, (x,))
        try:
            outputs, cotangents = _with_log_det((y, log_det), (pick_y, pick_ld))
            (pulled,) = torch.autograd.grad(outputs, x, grad_outputs=cotangents,
                                            is_grads_batched=True)
        except RuntimeError:
            return None
    return pulled


def path_entropy(posterior, value: Tensor) -> Tensor | None:
    """The sticking-the-landing term of a traced draw ``value`` of a
    :class:`~pyroflows.guides.FlowPosterior` by :func:`path_log_density`, where it is one
    :class:`~pyroflows.flows.FlowStack` whose cache still holds the draw's base point and
    :func:`path_route` takes it, with the IAF layers' linearizations the draw kept
    (:func:`kept_linearizations`); else ``None`` (the caller runs the inverse)."""
    transforms = posterior.transforms
    if len(transforms) != 1 or not isinstance(transforms[0], flows.FlowStack):
        return None
    stack = transforms[0]
    if not stack.all_flow_transforms:
        return None
    z = value
    last = getattr(posterior, "_unbatched", None)  # an unbatched draw went through as (1, D)
    if last is not None and value is last[0] and value._version == last[1]:
        z = last[2]
    hit = stack.lookup(y=z)
    if hit is None or not path_route(stack, hit.x) or hit.x.requires_grad:
        return None
    log_q = posterior.base_dist.log_prob(hit.x) - hit.log_det
    kept = kept_linearizations(posterior, value)
    entropy = path_log_density(stack, hit.x, z, log_q, posterior.base_dist, kept)
    return entropy[0] if z is not value else entropy
