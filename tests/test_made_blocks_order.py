"""Blocked MADE products against the dense network."""

from __future__ import annotations

import pytest
import torch

from pyroflows import testing as pf_testing
from pyroflows.nn import MADE
from pyroflows.nn import made as made_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (see conftest)


# ---- blocked MADE products ---------------------------------------------------------------
def test_blocked_forward_follows_a_loaded_order():
    """Real thresholds: D = 300 inputs, 320-wide hidden layers (first layer and head are
    blocked for the identity order). After loading the state of the same network with a
    random order, the fused forward must still be the network's forward."""
    torch.manual_seed(0)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1)).tolist()
    net = MADE(300, (320, 320), num_params=1)
    other = MADE(300, (320, 320), num_params=1, order=order)
    with torch.no_grad():
        other.flat_parameters.normal_(0.0, 0.05).mul_(other.mask)
    net.load_state_dict(other.state_dict())
    x = torch.randn(5, 300)
    with torch.no_grad():
        got, _ = net.fused_forward(x, *net.masked_weights())
        want = net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["tanh-zero-first", "ties-narrow", "no-hidden"])
def test_blocked_network_forward_and_backward_are_autograd(case, monkeypatch):
    """Blocked products (small-block thresholds) for layouts the session's tests did not use:
    a tanh network with zero_first (rows that see no input and a masked bias), an order
    with ties and hidden widths below D (width not a multiple of the block size) and a
    network without hidden layers: the fused
    forward and the fused backward (input and weight gradients) are autograd through
    MADE.forward, in float64."""
    monkeypatch.setattr(made_module, "_BLOCK_MIN_WIDTH", 16)
    monkeypatch.setattr(made_module, "_BLOCK_SIZE", 8)
    monkeypatch.setattr(made_module, "_BLOCK_MAX_FRACTION", 1.0)
    dtype = torch.float64
    if case == "tanh-zero-first":  # ten features of rank 0: head row blocks that see nothing
        net = MADE(20, (33, 27), num_params=2, activation=torch.nn.Tanh, zero_first=True,
                   order=[0] * 10 + list(range(1, 11)))
        assert any(c0 == c1 for r0, r1, c0, c1
                   in net.block_plans(net.masked_weights()[0])[-1].rows)
    elif case == "no-hidden":  # a masked linear map: the head alone, blocked
        net = MADE(24, (), num_params=2)
    else:
        net = MADE(30, (18, 21), num_params=3, order=[k // 4 for k in range(30)][::-1])
    net = net.to(dtype)
    assert all(p is not None for p in net.block_plans(net.masked_weights()[0]))
    pf_testing.randomize_parameters_(net, scale=0.5)
    with torch.no_grad():
        net.flat_parameters.mul_(net.mask)
    x = torch.randn(6, net.features, dtype=dtype, requires_grad=True)
    out = net(x)
    grad_out = torch.randn_like(out)
    gx, gflat = torch.autograd.grad(out, (x, net.flat_parameters), grad_out)
    with torch.no_grad():
        weights, biases = net.masked_weights()
        got, inputs = net.fused_forward(x.detach(), weights, biases)
        grad_flat = torch.zeros_like(net.flat_parameters)
        got_gx = net.fused_backward(grad_out, inputs, weights, grad_flat, True)
    torch.testing.assert_close(got, out.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_gx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_flat, gflat, rtol=1e-10, atol=1e-12)
