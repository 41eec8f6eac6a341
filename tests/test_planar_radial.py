"""Planar and radial: agreement with Pyro's built-ins, and inverses in hard regimes."""

from __future__ import annotations

import pyro.distributions.transforms as pyro_t
import pytest
import torch

import pyroflows as pf
from pyroflows.testing import randomize_parameters_, tolerances


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_matches_pyro_builtin(family, device, dtype):
    dim = 5
    ours = getattr(pf.transforms, family)(dim)
    randomize_parameters_(ours, scale=1.0)
    theirs = getattr(pyro_t, family)(dim)
    theirs.load_state_dict(ours.state_dict())  # same parameter names on purpose
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    x = torch.randn(50, dim, device=device, dtype=dtype) * 2
    y_ours, y_theirs = ours(x), theirs(x)
    tol = tolerances(dtype)
    torch.testing.assert_close(y_ours, y_theirs, **tol)
    torch.testing.assert_close(
        ours.log_abs_det_jacobian(x, y_ours), theirs.log_abs_det_jacobian(x, y_theirs), **tol
    )


@pytest.mark.parametrize("raw_c", [-30.0, -5.0, 0.0, 5.0, 40.0])
def test_planar_inverse_near_the_invertibility_limit(raw_c, device, dtype):
    """w^T u_hat close to -1 makes the scalar equation nearly flat at a = 0; large w^T u_hat
    makes the bracket wide. The safeguarded solve converges in both, for points far out too."""
    dim = 3
    t = pf.transforms.planar(dim).to(device, dtype)
    with torch.no_grad():
        t.w.copy_(torch.tensor([1.0, 0.5, -0.5]))
        t.u.copy_(t.w * raw_c / (t.w @ t.w))  # w^T u = raw_c, so w^T u_hat = softplus(raw_c) - 1
        t.bias.fill_(0.3)
    y = torch.randn(2000, dim, device=device, dtype=dtype) * torch.logspace(-3, 2, 2000,
                                                                          device=device,
                                                                          dtype=dtype)[:, None]
    x = t.inv(y)
    tol = tolerances(dtype)
    scale = 1 + y.abs()
    torch.testing.assert_close(t(x.clone()) / scale, y / scale, **tol)


def test_planar_inverse_is_differentiable(dtype, device):
    t = pf.transforms.planar(3).to(device, dtype)
    randomize_parameters_(t, scale=1.0)
    y = torch.randn(4, 3, device=device, dtype=dtype)
    x = t.inv(y)
    (x.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in t.parameters())
    # the gradient through the solve equals the gradient of the forward map's implicit inverse
    if dtype == torch.float64:
        def f(u):
            with torch.no_grad():
                t.u.copy_(u)
            t.clear_cache()
            return t.inv(y.clone()).sum()
        u0 = t.u.detach().clone()
        eps = 1e-6
        fd = torch.stack([
            (f(u0 + eps * e) - f(u0 - eps * e)) / (2 * eps)
            for e in torch.eye(3, device=device, dtype=dtype)
        ])
        with torch.no_grad():
            t.u.copy_(u0)
        t.zero_grad()
        t.inv(y.clone()).sum().backward()
        torch.testing.assert_close(t.u.grad, fd, rtol=1e-5, atol=1e-6)


def test_radial_inverse_at_and_near_the_centre(device, dtype):
    t = pf.transforms.radial(4).to(device, dtype)
    with torch.no_grad():
        t.alpha_prime.fill_(0.0)
        t.beta_prime.fill_(-20.0)  # beta close to -alpha: strongest contraction
    y = t.x0.detach() + torch.randn(100, 4, device=device, dtype=dtype) * torch.logspace(
        -6, 1, 100, device=device, dtype=dtype)[:, None]
    y = torch.cat([y, t.x0.detach()[None]])
    x = t.inv(y)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(t(x.clone()), y, **tolerances(dtype))


def test_validation_switch(device, dtype):
    t = pf.transforms.planar(2).to(device, dtype)
    bad = torch.tensor([[float("nan"), 0.0]], device=device, dtype=dtype)
    with pytest.raises(ValueError, match="NaN"):
        t(bad)
    with pf.validation(False):
        assert torch.isnan(t(bad)).any()  # documented: no check, NaN flows through
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        t(torch.zeros(3, device=device, dtype=dtype))


def test_cache_skips_recomputation_only_when_valid(device, dtype):
    t = pf.transforms.planar(2).to(device, dtype)
    calls = []
    orig = t.forward_and_log_det

    def counting(x):
        calls.append(1)
        return orig(x)

    t.forward_and_log_det = counting
    x = torch.randn(5, 2, device=device, dtype=dtype)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    t(x)
    assert len(calls) == 1
    x.add_(1.0)  # in-place edit of the input invalidates the entry
    t(x)
    assert len(calls) == 2
    with torch.no_grad():
        t(x)  # a different grad mode must not hand back a graph-less or graph-ful stale result
    assert len(calls) == 3


# ---- stacked parameters (issue 9): flows.build keeps a run's parameters in three tensors ----
# Truth: the same parameters in per-layer Planar/Radial layers, composed by torch's own
# ComposeTransform rule (no fused kernel, no stacking), and autograd Jacobians.

FIELDS = {"planar": ("w", "u", "bias"), "radial": ("x0", "alpha_prime", "beta_prime")}


def _stack_and_layers(family, dim, num_layers, device, dtype, seed=0):
    """A built (stacked) stack with randomized parameters, and per-layer layers holding the
    same values, each in its own parameters."""
    flow = pf.flows.build(family, dim, num_layers=num_layers)
    randomize_parameters_(flow, scale=0.7, seed=seed)
    flow = flow.to(device, dtype)
    layers = []
    for row in flow.parts:
        layer = getattr(pf.transforms, family)(dim).to(device, dtype)
        with torch.no_grad():
            for name in FIELDS[family]:
                getattr(layer, name).copy_(getattr(row, name))
        layers.append(layer)
    return flow, layers


def _run(flow, x, inverse):
    """Map, log-det and the gradients of a loss using both (w.r.t. x and the parameters)."""
    x = x.clone().requires_grad_(True)
    y = flow.inv(x) if inverse else flow(x)
    ld = (-flow.inv.log_abs_det_jacobian(x, y) if inverse
          else flow.log_abs_det_jacobian(x, y))
    loss = y.sin().sum() + (ld * torch.linspace(0.5, 2, ld.numel(), dtype=x.dtype,
                                                device=x.device)).sum()
    grads = torch.autograd.grad(loss, [x, *flow.parameters()])
    return y.detach(), ld.detach(), grads


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_parameters_are_three_tensors_and_init_like_per_layer(family):
    torch.manual_seed(3)
    flow = pf.flows.build(family, 4, num_layers=5)
    torch.manual_seed(3)
    layers = [getattr(pf.transforms, family)(4) for _ in range(5)]
    params = list(flow.parameters())
    assert len(params) == 3 and params[0].shape[0] == 5
    for row, layer in zip(flow.parts, layers, strict=True):  # same draws, same order
        assert all(torch.equal(getattr(row, n), getattr(layer, n)) for n in FIELDS[family])
    assert [type(p).__name__ for p in flow.parts] == ["Stacked" + family.title()] * 5
    assert isinstance(flow[2], getattr(pf.transforms, family.title()))
    # an argument a layer does not take still fails clearly (the per-layer path)
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.flows.build(family, 3, hidden_dims=(8,))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_stack_equals_per_layer_layers(family, inverse, device, dtype):
    """The stacked stack (fused kernels on its stacked tensors) against the same parameters in
    per-layer layers composed by torch.distributions' ComposeTransform: map, log-det and
    every gradient (the stacked gradient's row k is layer k's), both directions."""
    from torch.distributions.transforms import ComposeTransform

    flow, layers = _stack_and_layers(family, 3, 5, device, dtype)
    plain = ComposeTransform(layers)
    x = torch.randn(16, 3, device=device, dtype=dtype)
    y, ld, grads = _run(flow, x, inverse)
    xv = x.clone().requires_grad_(True)
    y_ref = plain.inv(xv) if inverse else plain(xv)
    ld_ref = (-plain.inv.log_abs_det_jacobian(xv, y_ref) if inverse
              else plain.log_abs_det_jacobian(xv, y_ref))
    loss = y_ref.sin().sum() + (ld_ref * torch.linspace(0.5, 2, 16, dtype=dtype,
                                                        device=device)).sum()
    per_layer = [getattr(layer, n) for n in FIELDS[family] for layer in layers]
    ref = torch.autograd.grad(loss, [xv, *per_layer])
    tol = tolerances(dtype)
    torch.testing.assert_close(y, y_ref.detach(), **tol)
    torch.testing.assert_close(ld, ld_ref.detach(), **tol)
    torch.testing.assert_close(grads[0], ref[0], **tol)
    stacked = dict(zip([n for n, _ in flow[0].stacked.named_parameters()], grads[1:],
                       strict=True))
    for i, name in enumerate(FIELDS[family]):
        want = torch.stack(ref[1 + 5 * i: 1 + 5 * (i + 1)]).reshape(stacked[name].shape)
        torch.testing.assert_close(stacked[name], want, **tol)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_stack_log_det_matches_autograd_jacobian(family, device, dtype):
    flow, _ = _stack_and_layers(family, 3, 6, device, dtype, seed=1)
    tol = tolerances(dtype)
    for x in torch.randn(3, 3, device=device, dtype=dtype):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], x)
        xb = x[None].clone()
        yb = flow(xb)
        torch.testing.assert_close(flow.log_abs_det_jacobian(xb, yb)[0],
                                   torch.linalg.slogdet(jac)[1], **tol)
        back = flow.inv(yb.detach().clone())
        torch.testing.assert_close(back, xb, **tol)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_a_layer_of_a_stack_alone_and_in_sub_stacks(family, device, dtype):
    """``flow[i]`` maps as layer i alone; stacks made of some of the layers (a slice of the
    rows, rows out of order) equal the same per-layer layers."""
    flow, layers = _stack_and_layers(family, 3, 5, device, dtype, seed=2)
    tol = tolerances(dtype)
    x = torch.randn(7, 3, device=device, dtype=dtype)
    for i in (0, 3):
        for a, b in zip(flow[i].forward_and_log_det(x), layers[i].forward_and_log_det(x),
                        strict=True):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(flow[i].inverse_and_log_det(x), layers[i].inverse_and_log_det(x),
                        strict=True):
            torch.testing.assert_close(a, b, **tol)
    for order in ([1, 2, 3], [3, 0, 2]):
        sub = pf.flows.FlowStack([flow.parts[k] for k in order])
        ref = pf.flows.FlowStack([layers[k] for k in order])
        ref.fused = False
        for inverse in (False, True):
            got = sub._chain(x, inverse)
            want = ref._chain(x, inverse)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_stack_moves_copies_and_loads(family, device, dtype):
    """The layers share one set of stacked tensors through .to(), deepcopy and pickling; a
    state_dict round trip works, and so does a state_dict of per-layer layers (the keys of
    stacks saved before the parameters were stacked)."""
    import copy
    import io

    flow, layers = _stack_and_layers(family, 3, 4, "cpu", torch.float32, seed=4)
    flow = flow.to(device, dtype)
    assert all(p.device.type == torch.device(device).type and p.dtype == dtype
               for p in flow.parameters())
    copied = copy.deepcopy(flow)
    assert all(part.stacked is copied[0].stacked for part in copied.parts)
    assert copied[0].stacked is not flow[0].stacked
    buf = io.BytesIO()
    torch.save(flow, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(part.stacked is loaded[0].stacked for part in loaded.parts)
    x = torch.randn(5, 3, device=device, dtype=dtype)
    tol = tolerances(dtype)
    fresh = pf.flows.build(family, 3, num_layers=4).to(device, dtype)
    fresh.load_state_dict(flow.state_dict())
    for other in (copied, loaded, fresh):
        torch.testing.assert_close(other(x.clone()), flow(x.clone()), **tol)
    old = pf.flows.FlowStack([layer.to(device, dtype) for layer in layers])
    old_keys = fresh.load_state_dict(old.state_dict())
    assert not old_keys.missing_keys and not old_keys.unexpected_keys
    torch.testing.assert_close(fresh(x.clone()), old(x.clone()), **tol)
    # one layer moved alone moves the tensors it shares with the others
    if dtype == torch.float64:
        flow[1].float()
        assert all(p.dtype == torch.float32 for p in flow.parameters())
