"""Conformance checks that every pyroflows transform passes, usable on your own transforms too.

Each ``check_*`` raises :class:`AssertionError` saying what broke; :func:`check_transform` runs
them all. The truth is independent: log-dets against ``slogdet`` of the autograd Jacobian, round
trips from both sides, gradients against :func:`torch.func.grad` through the plain operations
(which checks the fused kernels' backward passes), save/load, the stale-cache case.

Example:
    >>> import torch, pyroflows as pf
    >>> from pyroflows.testing import check_transform
    >>> check_transform(lambda: pf.transforms.planar(3), dim=3, dtype=torch.float64)
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution

__all__ = [
    "check_transform", "check_shapes", "check_round_trips", "check_log_det", "check_gradients",
    "check_save_load", "check_stale_cache", "check_in_place_edit", "check_deepcopy",
    "check_bad_input", "check_transformed_distribution", "randomize_parameters_", "tolerances",
    "check_conditional_transform", "check_conditional_shapes", "check_conditional_round_trips",
    "check_conditional_log_det", "check_conditional_gradients", "check_conditional_save_load",
    "check_conditional_stale_cache", "check_conditional_bad_context",
]

Factory = Callable[[], torch.nn.Module]


def tolerances(dtype: torch.dtype) -> dict:
    """``rtol``/``atol`` for comparisons in ``dtype``."""
    if dtype == torch.float64:
        return {"rtol": 1e-7, "atol": 1e-7}
    return {"rtol": 2e-3, "atol": 2e-3}


def randomize_parameters_(t: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every parameter of ``t`` away from its (often near-identity) initialization, so the
    checks exercise a genuinely non-trivial map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_(scale * noise.to(device=p.device, dtype=p.dtype))


def _draw(shape, device, dtype, seed: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)


def _fresh(t: Tensor) -> Tensor:
    """A copy with a new identity, so no identity cache can answer for it."""
    return t.detach().clone()


def check_shapes(t, dim: int, device=None, dtype=torch.float64) -> None:
    x = _draw((3, 5, dim), device, dtype, 1)
    y = t(x)
    assert y.shape == x.shape, f"forward changed the shape {tuple(x.shape)} -> {tuple(y.shape)}"
    assert y.dtype == dtype and y.device == x.device, "forward output does not follow input"
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == x.shape[:-1], f"log_abs_det_jacobian shape {tuple(ladj.shape)}"
    xi = t.inv(_fresh(y))
    assert xi.shape == x.shape, "inverse changed the shape"
    ladj_inv = t.inv.log_abs_det_jacobian(_fresh(y), _fresh(xi))
    assert ladj_inv.shape == x.shape[:-1], "inverse log_abs_det_jacobian has the wrong shape"
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all(), "non-finite outputs"
    x1 = _draw((dim,), device, dtype, 12)  # an unbatched point keeps its shape both ways
    y1 = t(x1)
    assert y1.shape == (dim,), f"forward of a ({dim},) input has shape {tuple(y1.shape)}"
    assert t.log_abs_det_jacobian(x1, y1).shape == (), "log-det of an unbatched point not scalar"
    assert t.inv(_fresh(y1)).shape == (dim,), "inverse of an unbatched point changed its shape"


def check_round_trips(t, dim: int, device=None, dtype=torch.float64) -> None:
    tol = tolerances(dtype)
    x = _draw((64, dim), device, dtype, 2)
    y = t(x)
    x_back = t.inv(_fresh(y))
    torch.testing.assert_close(x_back, x, **tol, msg=lambda m: f"inv(t(x)) != x: {m}")
    # Points the forward map never produced, some far out in the tails.
    y_new = _draw((64, dim), device, dtype, 3, scale=2.0)
    x_new = t.inv(y_new)
    torch.testing.assert_close(t(_fresh(x_new)), y_new, **tol, msg=lambda m: f"t(inv(y)) != y: {m}")


def check_log_det(t, dim: int, device=None, dtype=torch.float64, num_points: int = 4) -> None:
    """log_abs_det_jacobian (forward and inverse) against slogdet of the autograd Jacobian."""
    tol = tolerances(dtype)
    xs = _draw((num_points, dim), device, dtype, 4)
    for x in xs:
        jac = torch.autograd.functional.jacobian(lambda v: t(v.unsqueeze(0)).squeeze(0), _fresh(x))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0, "the autograd Jacobian is singular"
        x_b = _fresh(x).unsqueeze(0)
        y_b = t(x_b)
        cached = t.log_abs_det_jacobian(x_b, y_b).squeeze(0)
        uncached = t.log_abs_det_jacobian(_fresh(x_b), _fresh(y_b)).squeeze(0)
        for got, how in ((cached, "cached"), (uncached, "recomputed")):
            torch.testing.assert_close(
                got.detach(), expected.detach(), **tol,
                msg=lambda m, how=how: f"{how} log|det J| != slogdet(autograd Jacobian): {m}")
        inv_ladj = t.inv.log_abs_det_jacobian(_fresh(y_b), _fresh(x_b)).squeeze(0)
        torch.testing.assert_close(inv_ladj.detach(), -expected.detach(), **tol,
                                   msg=lambda m: f"inverse log|det J| != -slogdet: {m}")
        if getattr(t, "sign", None) in (1, -1):
            assert int(sign) == int(t.sign), f"declared sign {t.sign} but det has sign {sign}"


def check_gradients(t, dim: int, device=None, dtype=torch.float64) -> None:
    """Gradients of ``sum(y^2) + sum(log|det J|)`` reach the input and every trainable
    parameter, finite and not all zero; for a pyroflows transform, in both directions, they
    equal those :func:`torch.func.grad` takes through the plain operations."""
    params = [p for p in t.parameters() if p.requires_grad]
    x = _draw((16, dim), device, dtype, 5).requires_grad_(True)
    y = t(x)
    loss = (y.square().sum() + t.log_abs_det_jacobian(x, y).sum())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all(), "no gradient w.r.t. the input"
    names = [n for n, p in t.named_parameters() if p.requires_grad]
    for name, g in zip(names, grads[1:], strict=True):
        assert g is not None, f"parameter {name} gets no gradient"
        assert torch.isfinite(g).all(), f"parameter {name} has a non-finite gradient"
    if params:
        assert any(float(g.abs().sum()) > 0 for g in grads[1:]), "all parameter gradients are 0"
    _compare_with_plain(t, x, grads, inverse=False, dtype=dtype)
    # the inverse direction (a MAF's density direction runs its fused kernel this way)
    y = _fresh(t(_fresh(x))).requires_grad_(True)
    x_inv = t.inv(y)
    loss = x_inv.square().sum() + t.inv.log_abs_det_jacobian(y, x_inv).sum()
    grads = torch.autograd.grad(loss, [y, *params], allow_unused=True)
    _compare_with_plain(t, y, grads, inverse=True, dtype=dtype)


def _compare_with_plain(t, value: Tensor, grads, inverse: bool, dtype) -> None:
    reference = _plain_gradients(t, value, inverse)
    if reference is None:
        return
    names = ["input"] + [n for n, p in t.named_parameters() if p.requires_grad]
    direction = "inverse" if inverse else "forward"
    tol = tolerances(dtype)
    for name, got, want in zip(names, grads, reference, strict=True):
        got = torch.zeros_like(want) if got is None else got.detach()
        torch.testing.assert_close(
            got, want.detach(), **tol,
            msg=lambda m, name=name: (f"{direction} gradient w.r.t. {name} != the plain "
                                      f"operations': {m}"))


class _LossOf(torch.nn.Module):
    """:func:`check_gradients`' loss through ``t.forward_and_log_det`` or
    ``t.inverse_and_log_det``, as a module for :func:`torch.func.functional_call`."""

    def __init__(self, t: torch.nn.Module, inverse: bool) -> None:
        super().__init__()
        self.t = t
        self.inverse = inverse

    def forward(self, value: Tensor) -> Tensor:
        if self.inverse:
            x, log_det = self.t.inverse_and_log_det(value)
            return x.square().sum() - log_det.sum()
        y, log_det = self.t.forward_and_log_det(value)
        return y.square().sum() + log_det.sum()


def _plain_gradients(t, value: Tensor, inverse: bool) -> list[Tensor] | None:
    """The gradients of :func:`check_gradients`' loss w.r.t. ``value`` and every trainable
    parameter by :func:`torch.func.grad`, under which the fused kernels step aside for the plain
    operations: an independent reference for their backward passes. ``None`` where there is
    no plain path (not a pyroflows transform) or torch.func cannot run it."""
    method = getattr(t, "inverse_and_log_det" if inverse else "forward_and_log_det", None)
    if not callable(method) or getattr(t, "all_flow_transforms", True) is False:
        return None  # not a pyroflows transform, or a FlowStack holding other transforms
    module = _LossOf(t, inverse)
    params = {n: p.detach() for n, p in module.named_parameters()}
    trainable = {n: params[n] for n, p in module.named_parameters() if p.requires_grad}

    def loss(value_, trainable_):
        return torch.func.functional_call(module, {**params, **trainable_}, (value_,))

    try:
        grad_value, grad_params = torch.func.grad(loss, argnums=(0, 1))(_fresh(value), trainable)
    except RuntimeError as e:
        # a user's torch.autograd.Function without setup_context: no reference to compare with
        if "setup_context" in str(e):
            return None
        raise
    return [grad_value, *grad_params.values()]


def check_save_load(t, dim: int, factory: Factory, device=None, dtype=torch.float64) -> None:
    tol = tolerances(dtype)
    x = _draw((8, dim), device, dtype, 6)
    y = t(x)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    t2 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(t2(_fresh(x)), y, **tol, msg=lambda m: f"torch.save/load: {m}")
    t3 = factory().to(device=device, dtype=dtype)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    t3.load_state_dict(torch.load(buf))
    torch.testing.assert_close(t3(_fresh(x)), y, **tol, msg=lambda m: f"state_dict round trip: {m}")


def check_stale_cache(t, dim: int, device=None, dtype=torch.float64) -> None:
    """After an optimizer step, ``t(x)`` on the same tensor object must recompute (Pyro #2564)."""
    params = [p for p in t.parameters() if p.requires_grad]
    if not params:
        return
    tol = tolerances(dtype)
    x = _draw((8, dim), device, dtype, 7)
    y1 = t(x)  # one training step, exactly as a user writes it
    ladj1 = t.log_abs_det_jacobian(x, y1)
    opt = torch.optim.SGD(params, lr=0.2)
    opt.zero_grad()
    (y1.square().sum() + ladj1.sum()).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # a modest step, like a real optimizer's
    for p in params:  # make sure every parameter moves, even those with zero gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(0.1)
    opt.step()
    y2 = t(x)
    y_ref = t(_fresh(x))
    torch.testing.assert_close(y2, y_ref, **tol, msg=lambda m: f"stale forward cache: {m}")
    assert not torch.allclose(y1, y2), "the map did not change after an optimizer step"
    ladj2 = t.log_abs_det_jacobian(x, y2)
    torch.testing.assert_close(ladj2, t.log_abs_det_jacobian(_fresh(x), _fresh(y2)), **tol,
                               msg=lambda m: f"stale log-det cache: {m}")
    x_back = t.inv(y1)  # y1 is the stale output: must be inverted with the new parameters
    torch.testing.assert_close(t(_fresh(x_back)), y1, **tol, msg=lambda m: f"stale inverse: {m}")


def check_in_place_edit(t, dim: int, device=None, dtype=torch.float64) -> None:
    """An input edited in place, by an ordinary operation or through ``.data`` (as
    :func:`torch.autograd.gradcheck` perturbs it, unseen by version counters), is mapped
    afresh; so is an output edited in place and passed to the inverse."""
    tol = tolerances(dtype)
    x = _draw((6, dim), device, dtype, 13)
    t(x)
    x.data.mul_(1.5)
    torch.testing.assert_close(t(x), t(_fresh(x)), **tol,
                               msg=lambda m: f"stale output after an edit through .data: {m}")
    t(x)
    x.add_(0.25)
    torch.testing.assert_close(t(x), t(_fresh(x)), **tol,
                               msg=lambda m: f"stale output after an in-place edit: {m}")
    with torch.no_grad():  # autograd refuses in-place edits of some kernels' outputs
        y = t(x)
        y.mul_(0.8)
        torch.testing.assert_close(t.inv(y), t.inv(_fresh(y)), **tol,
                                   msg=lambda m: f"stale inverse after an in-place edit: {m}")


def check_deepcopy(t, dim: int, device=None, dtype=torch.float64) -> None:
    tol = tolerances(dtype)
    x = _draw((4, dim), device, dtype, 8).requires_grad_(True)
    y = t(x)  # leaves a cache entry holding a non-leaf tensor
    t2 = copy.deepcopy(t)
    torch.testing.assert_close(t2(_fresh(x)), y.detach(), **tol)


def _expect_value_error(fn, what: str) -> None:
    try:
        fn()
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what}: raised {type(e).__name__} instead of ValueError: {e}") from e
    raise AssertionError(f"{what}: no ValueError raised")


def check_bad_input(t, dim: int, device=None, dtype=torch.float64) -> None:
    """A wrong event size and non-finite values raise ValueError, both directions."""
    from ._config import validation

    wrong = _draw((4, dim + 1), device, dtype, 9)
    _expect_value_error(lambda: t(wrong), "wrong event size, forward")
    _expect_value_error(lambda: t.inv(_fresh(wrong)), "wrong event size, inverse")
    bad = _draw((4, dim), device, dtype, 10)
    bad[1, 0] = float("nan")
    bad[2, -1] = float("inf")
    with validation(True):
        _expect_value_error(lambda: t(bad), "non-finite input, forward")
        _expect_value_error(lambda: t.inv(_fresh(bad)), "non-finite input, inverse")


def check_transformed_distribution(t, dim: int, device=None, dtype=torch.float64) -> None:
    tol = tolerances(dtype)
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    base = Independent(Normal(zeros, torch.ones_like(zeros)), 1)
    d = TransformedDistribution(base, [t])
    s = d.sample((6,))
    assert s.shape == (6, dim) and s.dtype == dtype
    lp = d.log_prob(s)
    assert lp.shape == (6,) and torch.isfinite(lp).all(), "log_prob of own samples not finite"
    y = _draw((6, dim), device, dtype, 11)
    x = t.inv(_fresh(y))
    expected = base.log_prob(x) - t.log_abs_det_jacobian(_fresh(x), _fresh(y))
    torch.testing.assert_close(d.log_prob(y), expected, **tol, msg=lambda m: f"log_prob: {m}")


def check_transform(factory: Factory, dim: int, device=None, dtype=torch.float64) -> None:
    """Run every conformance check on a transform built by ``factory`` (a no-argument callable
    returning a fresh transform; the checks move it to ``device``/``dtype``)."""
    def make():
        return factory().to(device=device, dtype=dtype)

    for check in (check_shapes, check_round_trips, check_log_det, check_gradients,
                  check_stale_cache, check_in_place_edit, check_deepcopy, check_bad_input,
                  check_transformed_distribution):
        check(make(), dim, device=device, dtype=dtype)
    check_save_load(make(), dim, factory, device=device, dtype=dtype)


# ---- conditional layers (seed eq. 27): ``layer.condition(c)`` is a transform per context row ----

ConditionalFactory = Callable[[], torch.nn.Module]


def _conditioned_rows(layer, context: Tensor, x: Tensor) -> list[Tensor]:
    """Row ``b`` of the map of ``x`` (B, D) by ``layer.condition(context[b])`` alone."""
    return [layer.condition(_fresh(context[b]))(_fresh(x[b])) for b in range(x.shape[0])]


def check_conditional_shapes(layer, dim: int, context_dim: int, device=None,
                             dtype=torch.float64) -> None:
    """Contexts broadcast: ``c`` (B, C) with ``x`` (B, D) or (S, B, D), ``c`` (C,) with any
    ``x``; each ``condition`` call returns a new transform; outputs follow the input's dtype."""
    c = _draw((4, context_dim), device, dtype, 20)
    t = layer.condition(c)
    assert layer.condition(c) is not t, "condition returned the same transform twice"
    for shape in ((4, dim), (3, 4, dim)):
        x = _draw(shape, device, dtype, 21)
        y = t(x)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device, (
            f"forward of {shape} under contexts (4, {context_dim}) gave {tuple(y.shape)}")
        ladj = t.log_abs_det_jacobian(x, y)
        assert ladj.shape == x.shape[:-1], f"log-det shape {tuple(ladj.shape)} for x {shape}"
        assert t.inv(_fresh(y)).shape == x.shape, "the inverse changed the shape"
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all(), "non-finite outputs"
    x = _draw((3, 4, dim), device, dtype, 22)
    one = layer.condition(c[1])  # one context (C,) for every row
    torch.testing.assert_close(one(x)[:, 1], t(_fresh(x))[:, 1], **tolerances(dtype),
                               msg=lambda m: f"context (C,) != its row of a batch: {m}")
    for b, row in enumerate(_conditioned_rows(layer, c, x[0])):
        torch.testing.assert_close(row, t(_fresh(x[0]))[b], **tolerances(dtype),
                                   msg=lambda m: f"row of a batch != its context alone: {m}")


def check_conditional_round_trips(layer, dim: int, context_dim: int, device=None,
                                  dtype=torch.float64) -> None:
    """``inv(t(x)) == x`` and ``t(inv(y)) == y`` per context row, also for points (S, B, D)
    the forward map never produced."""
    tol = tolerances(dtype)
    c = _draw((6, context_dim), device, dtype, 23)
    t = layer.condition(c)
    x = _draw((5, 6, dim), device, dtype, 24)
    torch.testing.assert_close(t.inv(_fresh(t(x))), x, **tol,
                               msg=lambda m: f"inv(t(x)) != x: {m}")
    y = _draw((5, 6, dim), device, dtype, 25, scale=2.0)
    torch.testing.assert_close(t(_fresh(t.inv(y))), y, **tol,
                               msg=lambda m: f"t(inv(y)) != y: {m}")


def check_conditional_log_det(layer, dim: int, context_dim: int, device=None,
                              dtype=torch.float64) -> None:
    """Per context row, ``log_abs_det_jacobian`` (cached, recomputed, inverse) against
    slogdet of that row's block of the autograd Jacobian of the batched map; the blocks
    between rows are zero (each row is mapped by its own context only)."""
    tol = tolerances(dtype)
    rows = 4
    c = _draw((rows, context_dim), device, dtype, 26)
    t = layer.condition(c)
    x = _draw((rows, dim), device, dtype, 27)
    jac = torch.autograd.functional.jacobian(lambda v: layer.condition(c)(v), _fresh(x))
    jac = jac.detach()
    y = t(x)
    cached = t.log_abs_det_jacobian(x, y).detach()
    uncached = t.log_abs_det_jacobian(_fresh(x), _fresh(y)).detach()
    inverse = t.inv.log_abs_det_jacobian(_fresh(y), _fresh(x)).detach()
    for b in range(rows):
        block = jac[b, :, b, :]
        sign, expected = torch.linalg.slogdet(block)
        assert sign > 0, f"row {b}: the autograd Jacobian's determinant has sign {sign}"
        for got, how in ((cached[b], "cached"), (uncached[b], "recomputed"),
                         (-inverse[b], "inverse (negated)")):
            torch.testing.assert_close(
                got, expected, **tol,
                msg=lambda m, how=how, b=b: f"row {b}: {how} log|det J| != slogdet: {m}")
    between = jac.clone()
    for b in range(rows):
        between[b, :, b, :] = 0
    assert float(between.abs().max()) == 0, "a row's output depends on another row's input"


def check_conditional_gradients(layer, dim: int, context_dim: int, device=None,
                                dtype=torch.float64) -> None:
    """Gradients of ``sum(y^2) + sum(log|det J|)`` (and of the inverse's) reach the input,
    the context and every trainable parameter, finite, not all zero; in float64, the input's
    and the context's against finite differences (:func:`torch.autograd.gradcheck`)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    for inverse in (False, True):
        direction = "inverse" if inverse else "forward"
        c = _draw((5, context_dim), device, dtype, 28).requires_grad_(True)
        x = _draw((3, 5, dim), device, dtype, 29).requires_grad_(True)
        t = layer.condition(c)
        if inverse:
            out = t.inv(x)
            ladj = t.inv.log_abs_det_jacobian(x, out)
        else:
            out = t(x)
            ladj = t.log_abs_det_jacobian(x, out)
        grads = torch.autograd.grad(out.square().sum() + ladj.sum(), [x, c, *params],
                                    allow_unused=True)
        for what, g in (("the input", grads[0]), ("the context", grads[1])):
            assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0, (
                f"{direction}: no finite non-zero gradient w.r.t. {what}")
        for name, g in zip(names, grads[2:], strict=True):
            assert g is not None, f"{direction}: parameter {name} gets no gradient"
            assert torch.isfinite(g).all(), f"{direction}: parameter {name}'s gradient not finite"
        if params:
            assert any(float(g.abs().sum()) > 0 for g in grads[2:]), (
                f"{direction}: every parameter gradient is 0")
    if dtype != torch.float64:
        return

    def loss(x_, c_, inverse):
        t = layer.condition(c_)
        out = t.inv(x_) if inverse else t(x_)
        ladj = (t.inv if inverse else t).log_abs_det_jacobian(x_, out)
        return out.square().sum(-1) + ladj

    c = _draw((2, context_dim), device, dtype, 30).requires_grad_(True)
    x = _draw((2, dim), device, dtype, 31).requires_grad_(True)
    for inverse in (False, True):
        assert torch.autograd.gradcheck(lambda x_, c_, inverse=inverse: loss(x_, c_, inverse),
                                        (x, c), eps=1e-6, atol=1e-5, rtol=1e-4), "gradcheck"


def check_conditional_save_load(layer, dim: int, context_dim: int, factory: ConditionalFactory,
                                device=None, dtype=torch.float64) -> None:
    """``torch.save`` of the module and a ``state_dict`` round trip into a fresh module give
    identical outputs (both directions) for the same contexts."""
    c = _draw((4, context_dim), device, dtype, 32)
    x = _draw((4, dim), device, dtype, 33)
    t = layer.condition(c)
    y, back = t(x), t.inv(_fresh(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = factory().to(device=device, dtype=dtype)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for other, how in ((loaded, "torch.save/load"), (fresh, "state_dict round trip")):
        t2 = other.condition(_fresh(c))
        torch.testing.assert_close(t2(_fresh(x)), y, rtol=0, atol=0,
                                   msg=lambda m, how=how: f"{how}, forward: {m}")
        torch.testing.assert_close(t2.inv(_fresh(x)), back, rtol=0, atol=0,
                                   msg=lambda m, how=how: f"{how}, inverse: {m}")


def check_conditional_stale_cache(layer, dim: int, context_dim: int, device=None,
                                  dtype=torch.float64) -> None:
    """Condition on ``c1``, call, condition on ``c2``, call: ``c2``'s answers, never ``c1``'s
    cached ones (forward, log-det, inverse of ``c1``'s output); after an optimizer step the
    layer conditions afresh."""
    tol = tolerances(dtype)
    c1 = _draw((4, context_dim), device, dtype, 34)
    c2 = _draw((4, context_dim), device, dtype, 35)
    x = _draw((4, dim), device, dtype, 36)
    t1 = layer.condition(c1)
    y1 = t1(x)
    ladj1 = t1.log_abs_det_jacobian(x, y1)
    t2 = layer.condition(c2)
    y2 = t2(x)
    assert not torch.allclose(y1, y2), "contexts c1 and c2 gave the same map"
    torch.testing.assert_close(y2, layer.condition(_fresh(c2))(_fresh(x)), **tol,
                               msg=lambda m: f"forward under c2 != c2's fresh map: {m}")
    torch.testing.assert_close(t2.log_abs_det_jacobian(x, y1),
                               t2.log_abs_det_jacobian(_fresh(x), _fresh(y1)), **tol,
                               msg=lambda m: f"log-det under c2 answered from c1's call: {m}")
    back = t2.inv(y1)  # c1's output: inverted by c2's map, not read from c1's cache
    assert not torch.allclose(back, x), "c2's inverse of c1's output returned c1's input"
    torch.testing.assert_close(t2(_fresh(back)), y1, **tol,
                               msg=lambda m: f"c2's inverse of c1's output: {m}")
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        return
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    (y1.square().sum() + ladj1.sum()).backward()
    for p in params:
        p.grad = torch.full_like(p, 0.1) if p.grad is None else p.grad.add(0.1)
    opt.step()
    y3 = layer.condition(c1)(x)
    assert not torch.allclose(y3, y1), "the map under c1 did not change after an optimizer step"
    torch.testing.assert_close(y3, layer.condition(_fresh(c1))(_fresh(x)), **tol,
                               msg=lambda m: f"stale map after an optimizer step: {m}")


def check_conditional_bad_context(layer, dim: int, context_dim: int, device=None,
                                  dtype=torch.float64) -> None:
    """A context of the wrong size, an integer or non-tensor context, and (while validation
    is on) a non-finite one raise ValueError."""
    from ._config import validation

    wrong = _draw((4, context_dim + 1), device, dtype, 37)
    _expect_value_error(lambda: layer.condition(wrong), "context of the wrong size")
    _expect_value_error(lambda: layer.condition(torch.zeros(4, context_dim, dtype=torch.long,
                                                            device=device)),
                        "integer context")
    _expect_value_error(lambda: layer.condition([0.0] * context_dim), "context not a tensor")
    _expect_value_error(lambda: layer.condition(_draw((), device, dtype, 38)), "scalar context")
    bad = _draw((4, context_dim), device, dtype, 39)
    bad[2, 0] = float("nan")
    with validation(True):
        _expect_value_error(lambda: layer.condition(bad), "non-finite context")


def check_conditional_transform(factory: ConditionalFactory, dim: int, context_dim: int,
                                device=None, dtype=torch.float64) -> None:
    """Run every conformance check of a conditional layer built by ``factory`` (a no-argument
    callable returning a fresh :class:`pyro.distributions.ConditionalTransformModule` of event
    size ``dim`` and context size ``context_dim``): shapes and broadcasting, round trips, the
    log-det against the autograd Jacobian per context row, gradients to the input, the context
    and the parameters, save/load, no stale cache across contexts, a bad context. The checks
    move the layer to ``device``/``dtype`` and move its parameters away from their
    initialization (:func:`randomize_parameters_`), since a layer that starts as the same map
    for every context cannot show that the context matters.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.testing import check_conditional_transform
        >>> check_conditional_transform(
        ...     lambda: pf.transforms.conditional_planar(2, 3, hidden_dims=(8,)), 2, 3)
    """
    def make():
        layer = factory().to(device=device, dtype=dtype)
        randomize_parameters_(layer, scale=0.3, seed=1)
        return layer

    for check in (check_conditional_shapes, check_conditional_round_trips,
                  check_conditional_log_det, check_conditional_gradients,
                  check_conditional_stale_cache, check_conditional_bad_context):
        check(make(), dim, context_dim, device=device, dtype=dtype)
    check_conditional_save_load(make(), dim, context_dim, factory, device=device, dtype=dtype)
