"""MADE, IAF and MAF: the autoregressive property, one-pass / D-pass directions, the cache that
lets IAF score its own samples, closed forms, bounded and gated log-scales, devices, the flat
parameter storage and the check of a loaded state's levels."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows.nn import MADE
from pyroflows.testing import randomize_parameters_, tolerances


def _jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x)


def _count_passes(t):
    """Count conditioner forward calls (network passes) of every autoregressive layer in t."""
    calls = []
    for m in t.modules():
        if isinstance(m, MADE):
            m.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "order, hidden_dims, residual",
    [
        (None, (32, 32), False),
        ([3, 0, 4, 1, 2], (32, 32), False),
        ([3, 0, 4, 1, 2], (3, 2), False),  # hidden narrower than D
        ([1, 4, 0, 3, 2], (16, 16, 16), True),
    ],
)
def test_made_is_autoregressive(order, hidden_dims, residual, device, dtype):
    """d out_{p,i} / d x_j == 0 exactly whenever order_j >= order_i, and (for wide hidden
    layers) != 0 whenever order_j < order_i: the masks neither leak nor over-restrict."""
    dim = 5
    net = MADE(dim, hidden_dims, num_params=2, order=order, residual=residual,
               activation=nn.Tanh)
    randomize_parameters_(net, scale=0.5)
    net = net.to(device, dtype)
    rank = torch.tensor(order if order is not None else list(range(dim)), device=device)
    allowed = rank[None, :] < rank[:, None]  # allowed[i, j]: out_i may depend on x_j
    for x in torch.randn(3, dim, device=device, dtype=dtype):
        jac = _jacobian(net, x).reshape(2, dim, dim)
        assert jac.shape == (2, dim, dim)
        assert (jac[:, ~allowed] == 0).all(), "an output depends on a later input"
        if min(hidden_dims) >= dim:
            assert (jac[:, allowed] != 0).all(), "a permitted dependency is missing"


@pytest.mark.parametrize("cls", [pf.transforms.IAF, pf.transforms.MAF])
def test_transform_jacobian_is_triangular_in_the_made_order(cls, device, dtype):
    order = [2, 0, 3, 1]
    t = cls(4, hidden_dims=(16, 16), order=order, activation=nn.Tanh)
    randomize_parameters_(t, scale=0.3)
    t = t.to(device, dtype)
    rank = torch.tensor(order, device=device)
    for x in torch.randn(2, 4, device=device, dtype=dtype):
        jac = _jacobian(lambda v: t(v[None])[0], x)
        later = rank[None, :] > rank[:, None]  # y_i must not depend on x_j ranked after i
        assert (jac[later] == 0).all()
        assert (jac[rank[None, :] < rank[:, None]] != 0).all()
        # the log-det is the sum of log-diagonal entries (seed eq. 34)
        torch.testing.assert_close(
            t.log_abs_det_jacobian(x[None].clone(), t(x[None]).clone())[0],
            jac.diagonal().abs().log().sum(), **tolerances(dtype),
        )


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_network_passes_per_direction(dim, device, dtype):
    """IAF: forward 1 pass, inverse D passes; MAF: the reverse; both exact."""
    for cls, fwd_passes, inv_passes in (
        (pf.transforms.IAF, 1, dim),
        (pf.transforms.MAF, dim, 1),
    ):
        t = cls(dim, hidden_dims=(8,))
        randomize_parameters_(t, scale=0.3)
        t = t.to(device, dtype)
        calls = _count_passes(t)
        x = torch.randn(7, dim, device=device, dtype=dtype)
        y = t(x)
        assert len(calls) == fwd_passes, f"{cls.__name__} forward"
        calls.clear()
        x_back = t.inv(y.clone())
        assert len(calls) == inv_passes, f"{cls.__name__} inverse"
        torch.testing.assert_close(x_back, x, **tolerances(dtype))


def test_iaf_scores_its_own_samples_without_the_inverse(device, dtype):
    dim, num_layers = 5, 3
    flow = pf.flows.build("iaf", dim, num_layers=num_layers, hidden_dims=(16,))
    randomize_parameters_(flow, scale=0.3)
    flow = flow.to(device, dtype)
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    q = TransformedDistribution(Independent(Normal(zeros, 1.0), 1), [flow])
    calls = _count_passes(flow)
    z = q.rsample((64,))
    lp = q.log_prob(z)
    assert len(calls) == num_layers, "scoring own samples ran the D-pass inverse"
    # against independent truth: the base density and the autograd Jacobian of the stack
    calls.clear()
    x = flow.inv(z.detach().clone())
    assert len(calls) == num_layers * dim  # a point it did not sample: D passes per layer
    for k in range(2):
        jac = _jacobian(lambda v: flow(v[None])[0], x[k].clone())
        expected = Normal(zeros, 1.0).log_prob(x[k]).sum() - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(lp[k].detach(), expected, **tolerances(dtype))


def test_maf_log_prob_is_one_pass_per_layer(device, dtype):
    dim, num_layers = 6, 4
    flow = pf.flows.build("maf", dim, num_layers=num_layers, hidden_dims=(16,))
    randomize_parameters_(flow, scale=0.3)
    flow = flow.to(device, dtype)
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    p = TransformedDistribution(Independent(Normal(zeros, 1.0), 1), [flow])
    calls = _count_passes(flow)
    data = torch.randn(32, dim, device=device, dtype=dtype)
    p.log_prob(data)
    assert len(calls) == num_layers
    calls.clear()
    # a cache miss on the log-det alone is still one pass, from y
    maf = flow.parts[0]
    x = torch.randn(4, dim, device=device, dtype=dtype)
    y = maf(x).detach()
    calls.clear()
    maf.log_abs_det_jacobian(x.clone(), y.clone())
    assert len(calls) == 1


def test_new_layers_are_the_identity(device, dtype):
    x = torch.randn(9, 4, device=device, dtype=dtype)
    for t in (pf.transforms.iaf(4), pf.transforms.maf(4), pf.transforms.realnvp(4)):
        t = t.to(device, dtype)
        y = t(x)
        assert torch.equal(y, x)
        assert torch.equal(t.log_abs_det_jacobian(x, y), torch.zeros_like(x[:, 0]))


def test_maf_with_constant_conditioner_is_a_gaussian(device, dtype):
    """Head weights zero, biases (a, s): z = a + e^s y, so y ~ N(-a e^{-s}, e^{-2s}) exactly."""
    dim = 3
    t = pf.transforms.maf(dim, hidden_dims=(8,)).to(device, dtype)
    a = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)
    s = torch.tensor([0.3, -0.7, 1.1], device=device, dtype=dtype)
    b = t.log_scale_bound  # raw log-scales that the soft clamp b tanh(./b) maps to s
    with torch.no_grad():
        t.conditioner.layer_parameters(-1)[1].copy_(torch.cat([a, torch.atanh(s / b) * b]))
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    p = TransformedDistribution(Independent(Normal(zeros, 1.0), 1), [t])
    y = torch.randn(20, dim, device=device, dtype=dtype) * 2
    expected = Normal(-a * torch.exp(-s), torch.exp(-s)).log_prob(y).sum(-1)
    torch.testing.assert_close(p.log_prob(y), expected, **tolerances(dtype))
    draws = p.sample((4000,))
    torch.testing.assert_close(draws.mean(0), -a * torch.exp(-s), rtol=0, atol=0.15)


def test_bounded_and_gated_log_scales_stay_finite(device, dtype):
    dim = 3
    x = torch.randn(5, dim, device=device, dtype=dtype) * 3
    for gated in (False, True):
        t = pf.transforms.iaf(dim, hidden_dims=(8,), gated=gated, log_scale_bound=2.0)
        with torch.no_grad():
            head_bias = t.conditioner.layer_parameters(-1)[1]
            head_bias.fill_(1e4)  # raw log-scales far beyond any sane value
            head_bias[:dim].fill_(3.0)
        t = t.to(device, dtype)
        for sign in (1.0, -1.0):
            with torch.no_grad():
                t.conditioner.layer_parameters(-1)[1][dim:].mul_(sign)
            y = t(x)
            ladj = t.log_abs_det_jacobian(x, y)
            assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
            if gated:
                assert (ladj <= 0).all()  # sigma < 1: the gated update only contracts
            else:
                assert (ladj.abs() <= dim * 2.0 + 1e-6).all()


def test_gated_update_matches_its_formula(device, dtype):
    """y = sigma z + (1 - sigma) m with (m, raw) the conditioner outputs, sigma = sigmoid(raw+2)
    (at least e^-b in the scale)."""
    t = pf.transforms.iaf(3, hidden_dims=(8,), gated=True)
    randomize_parameters_(t, scale=0.5)
    t = t.to(device, dtype)
    z = torch.randn(6, 3, device=device, dtype=dtype)
    m, raw = t.conditioner(z).chunk(2, -1)
    sigma = (1 / (1 + torch.exp(-(raw + 2)))).clamp_min(math.exp(-t.log_scale_bound))
    torch.testing.assert_close(t(z), sigma * z + (1 - sigma) * m, **tolerances(dtype))
    torch.testing.assert_close(
        t.log_abs_det_jacobian(z, t(z)), sigma.log().sum(-1), **tolerances(dtype)
    )


def test_parameters_are_visible_to_optimizers_and_pyro():
    pyro.clear_param_store()
    flow = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,))
    pyro.module("maf_flow", flow)
    names = set(pyro.get_param_store().keys())
    expected = {f"maf_flow$$${n}" for n, _ in flow.named_parameters()}
    assert expected and expected <= names
    for t in (pf.transforms.iaf(3), pf.transforms.maf(3)):
        # one flat tensor holds every weight and bias (see MADE): 3 layers, fused head
        (flat,) = t.parameters()
        hidden = t.conditioner.hidden_dims
        assert flat.numel() == 3 * hidden[0] + hidden[0] + hidden[0] * hidden[1] + hidden[1] + (
            hidden[1] * 6 + 6
        )
    pyro.clear_param_store()


def test_buffers_follow_the_module_and_nothing_uses_the_default_device(device, dtype):
    """Masks and degrees are buffers; under a 'meta' default device any tensor made without
    device= inside a call would be on 'meta' and fail to mix with real ones."""
    t = pf.flows.build("maf", 4, num_layers=2, hidden_dims=(8,)).to(device, dtype)
    for name, b in t.named_buffers():
        assert b.device.type == torch.device(device).type, name
        if b.is_floating_point():
            assert b.dtype == dtype, name
    flows = [
        t,
        pf.flows.build("iaf", 4, num_layers=2, hidden_dims=(8,), gated=True).to(device, dtype),
        pf.flows.build("realnvp", 4, num_layers=2, permutation="random").to(device, dtype),
    ]
    x = torch.randn(5, 4, device=device, dtype=dtype)
    with torch.device("meta"):
        for flow in flows:
            y = flow(x)
            x_back = flow.inv(y.clone())
            ladj = flow.log_abs_det_jacobian(x_back.clone(), y.clone())
            (y.sum() + ladj.sum()).backward()
            assert y.device == x.device and ladj.device == x.device


def test_constructor_errors():
    with pytest.raises(ValueError, match="order"):
        pf.transforms.maf(3, order=[0, 1])
    with pytest.raises(ValueError, match="residual"):
        pf.transforms.maf(3, hidden_dims=(8, 4), residual=True)
    with pytest.raises(ValueError, match="log_scale_bound"):
        pf.transforms.iaf(3, log_scale_bound=0.0)


def test_default_hidden_dims_and_repr():
    t = pf.transforms.maf(40)
    assert t.conditioner.hidden_dims == (160, 160)
    assert pf.transforms.iaf(2).conditioner.hidden_dims == (64, 64)
    assert "MADE" in repr(t) and "log_scale_bound" in repr(t)
    assert math.isfinite(t.log_scale_bound)


def test_flat_storage_masks_gradients_and_views_write_through(device, dtype):
    net = MADE(4, (8, 8), order=[1, 3, 0, 2]).to(device, dtype)
    weight, bias = net.layer_parameters(0)
    assert weight.shape == (8, 4) and bias.shape == (8,)
    with torch.no_grad():
        weight.fill_(0.5)  # writes into flat_parameters
    assert (net.layer_parameters(0)[0] == 0.5).all()
    randomize_parameters_(net, scale=0.5)  # masked entries move too: the mask must cut them
    x = torch.randn(16, 4, device=device, dtype=dtype)
    net(x).square().sum().backward()
    grad = net.flat_parameters.grad
    assert (grad[net.mask == 0] == 0).all(), "a masked weight gets a gradient"
    assert (grad[net.mask == 1] != 0).any()


def test_a_state_with_another_number_of_levels_is_refused():
    """A MADE's number of levels (from its order's ties) fixes its hidden degrees and passes,
    which the buffers do not carry: loading the state of a network with another one raises a
    clear error instead of leaving an inconsistent network; a permuted order (same levels)
    loads."""
    full = MADE(4, (16,))
    coupling = MADE(4, (16,), order=[0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="2 levels, this network's 4"):
        full.load_state_dict(coupling.state_dict())
    permuted = MADE(4, (16,), order=[3, 1, 0, 2])
    full.load_state_dict(permuted.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(full(x), permuted(x))


@pytest.mark.parametrize("gate", [-20.0, -50.0, -200.0, -1000.0])
@pytest.mark.parametrize("cls", [pf.transforms.IAF, pf.transforms.MAF])
def test_gated_inverse_when_the_gate_saturates(cls, gate, device, dtype):
    """Issue 19, 4: where sigmoid(raw + 2) underflows (or nears it), the gated layer's D-pass
    direction was NaN (e^{-log sigma} overflows, 0 * inf in its next masked pass). log sigma
    is clamped at -b: finite both ways, an exact round trip, and the log-det is the clamped
    sum against the autograd Jacobian."""
    dim = 3
    t = cls(dim, hidden_dims=(8,), gated=True)
    with torch.no_grad():
        weight, bias = t.conditioner.layer_parameters(-1)
        weight.normal_(0.0, 0.3)
        bias[:dim] = 0.5
        bias[dim:] = gate
    t = t.to(device, dtype)
    x = torch.randn(5, dim, device=device, dtype=dtype)
    y = t(x)
    x_back = t.inv(y.clone())
    assert torch.isfinite(y).all() and torch.isfinite(x_back).all()
    tol = {"rtol": 1e-8, "atol": 1e-8} if dtype == torch.float64 else {"rtol": 0, "atol": 5e-3}
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(t(t.inv(x.clone()).clone()), x, **tol)
    ladj = t.log_abs_det_jacobian(x, y)
    assert torch.isfinite(ladj).all()
    jac = torch.autograd.functional.jacobian(lambda v: t(v.unsqueeze(0)).squeeze(0),
                                             x[0].double() if dtype == torch.float64 else x[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1], **tolerances(dtype))
    y_grad = y.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad(t.inv(y_grad).sum(), [y_grad, *t.parameters()],
                                allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
