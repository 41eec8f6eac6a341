"""The blocked products of the fused MADE kernels (issue 9): the block plans cover every
nonzero of the masks, and the blocked forward and backward passes are the dense masked network
(autograd through ``MADE.forward``, which never blocks) up to the order of additions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyroflows as pf
from pyroflows.nn import MADE
from pyroflows.nn import made as made_module
from pyroflows.testing import randomize_parameters_, tolerances


@pytest.fixture
def small_blocks(monkeypatch):
    """Plans for small networks too (blocks of 8 units, any width of 16 or more, any saving),
    so that the tests exercise many plan shapes at a small cost. Only plans built inside the
    test see these values."""
    monkeypatch.setattr(made_module, "_BLOCK_MIN_WIDTH", 16)
    monkeypatch.setattr(made_module, "_BLOCK_SIZE", 8)
    monkeypatch.setattr(made_module, "_BLOCK_MAX_FRACTION", 1.0)


def _weight_masks(net: MADE) -> list[torch.Tensor]:
    masks = net.mask.split(net._sizes)
    return [masks[2 * k].view(shape) != 0 for k, shape in enumerate(net._shapes)]


def _random_order(dim: int, seed: int) -> list[int]:
    return torch.randperm(dim, generator=torch.Generator().manual_seed(seed)).tolist()


# (features, hidden_dims, num_params, order): orders as flows.build makes them (identity,
# reversed), random, with ties (a two-level, coupling-like order), hidden widths that the block
# size does not divide and widths below D, P = 1, 2, 3
CASES = {
    "identity": (12, (40, 40), 2, None),
    "reversed": (12, (40, 40), 2, list(range(11, -1, -1))),
    "random": (12, (37, 45), 2, _random_order(12, 3)),
    "random-p3": (10, (43, 29, 35), 3, _random_order(10, 5)),
    "p1-uneven": (20, (50, 21), 1, None),
    "narrow": (24, (17, 19), 2, list(range(23, -1, -1))),  # hidden widths below D
    "two-level": (18, (32, 32), 2, [0] * 7 + [1] * 11),
    "ties-random": (16, (30, 36), 2, [k // 3 for k in _random_order(16, 7)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_plans_partition_and_cover_the_masks(name, small_blocks):
    """Row blocks partition the rows and column blocks the columns; outside its blocks every
    mask is 0 (checked against the mask itself), so skipping those products skips zeros."""
    features, hidden, num_params, order = CASES[name]
    net = MADE(features, hidden, num_params=num_params, order=order)
    plans = net.block_plans(net.masked_weights()[0])
    assert any(p is not None for p in plans)
    for mask, plan in zip(_weight_masks(net), plans, strict=True):
        if plan is None:
            continue
        num_rows, num_cols = mask.shape
        starts = [r0 for r0, _, _, _ in plan.rows]
        stops = [r1 for _, r1, _, _ in plan.rows]
        assert starts[0] == 0 and stops[-1] == num_rows and starts[1:] == stops[:-1]
        starts = [c0 for c0, _, _, _ in plan.cols]
        stops = [c1 for _, c1, _, _ in plan.cols]
        assert starts[0] == 0 and stops[-1] == num_cols and starts[1:] == stops[:-1]
        inside_rows = torch.zeros_like(mask)
        for r0, r1, c0, c1 in plan.rows:
            inside_rows[r0:r1, c0:c1] = True
        inside_cols = torch.zeros_like(mask)
        for c0, c1, s0, s1 in plan.cols:
            inside_cols[s0:s1, c0:c1] = True
        assert not (mask & ~inside_rows).any() and not (mask & ~inside_cols).any()


def test_plans_where_blocking_pays():
    """With the measured thresholds: the 256 x 256 hidden-to-hidden layer of the D=64 MAF is
    blocked (4 row blocks, covering about 5/8 of it), the first layer (64 inputs), the output
    head and every layer at D=8 (hidden 64) are dense; a random order leaves the
    hidden-to-hidden layer's staircase as it is (hidden degrees do not depend on the order)."""
    for order in (None, list(range(63, -1, -1)), _random_order(64, 0)):
        net = MADE(64, (256, 256), num_params=2, order=order)
        first, middle, head = net.block_plans(net.masked_weights()[0])
        assert first is None and head is None and middle is not None
        assert len(middle.rows) == 4 and len(middle.cols) == 4
        covered = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in middle.rows)
        assert 0.6 < covered / 256**2 < 0.67
    net = MADE(8, (64, 64), num_params=2)
    assert net.block_plans(net.masked_weights()[0]) == (None, None, None)
    # a sub-block of a weight (a caller's compact network) and weights off the CPU: dense
    net = MADE(64, (256, 256), num_params=2)
    weights = net.masked_weights()[0]
    assert net.block_plans([weights[0], weights[1][:, :128], weights[2]])[1] is None
    assert net.block_plans([w.to("meta") for w in weights]) == (None, None, None)  # not CPU
    del net._blockable  # a network pickled before the plans existed: dense products
    assert net.block_plans(weights) == (None, None, None)


def _dense_reference(net: MADE, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, input gradient and (masked) parameter gradient of the dense masked network,
    by autograd through ``MADE.forward``."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    grad_x, grad_flat = torch.autograd.grad(out, (x, net.flat_parameters), grad_out)
    return out.detach(), grad_x, grad_flat


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_kernels_match_the_dense_network(name, activation, small_blocks, device,
                                                 dtype):
    """fused_forward / fused_backward with the blocked products against autograd through the
    dense masked network: the same sums of the same products, so equal to rounding. The
    parameter gradient is checked both ways the kernels write it: into ``flat_parameters``'
    layout (masked there), and into caller buffers pre-filled with NaN (so every entry the
    blocks skip must be written: zeros, which the mask keeps at 0)."""
    features, hidden, num_params, order = CASES[name]
    net = MADE(features, hidden, num_params=num_params, order=order, activation=activation,
               zero_first=name == "identity")
    randomize_parameters_(net, scale=0.4, seed=2)
    net = net.to(device, dtype)
    x = torch.randn(33, features, device=device, dtype=dtype)
    grad_out = torch.randn(33, num_params * features, device=device, dtype=dtype)
    want_out, want_x, want_flat = _dense_reference(net, x, grad_out)

    weights, biases = net.masked_weights()
    plans = net.block_plans(weights)
    assert any(p is not None for p in plans) == (torch.device(device).type == "cpu")
    with torch.no_grad():
        out, inputs = net.fused_forward(x, weights, biases)
        grad_flat = torch.full_like(net.flat_parameters, float("nan"))
        grad_x = net.fused_backward(grad_out, inputs, weights, grad_flat, True)
        buffers = [(torch.full_like(w, float("nan")), torch.full_like(b, float("nan")))
                   for w, b in zip(weights, biases, strict=True)]
        no_grad_x = net.fused_backward(grad_out, inputs, weights, None, False, buffers)
    tol = tolerances(dtype)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(grad_x, want_x, **tol)
    torch.testing.assert_close(grad_flat, want_flat, **tol)
    assert no_grad_x is None
    written = torch.cat([t.flatten() for pair in buffers for t in pair]) * net.mask
    torch.testing.assert_close(written, want_flat, **tol)


@pytest.mark.parametrize("family", ["maf", "iaf"])
def test_stack_at_blocking_widths_matches_plain_path(family, device, dtype):
    """A built stack at the widths where blocking is on by default (D=64, hidden (256, 256),
    reversed orders between layers): the fused chain's values, log-det and gradients (input
    and parameters) against the plain differentiable path (``fused = False``, dense products,
    autograd)."""
    flow = pf.flows.build(family, 64, num_layers=2, hidden_dims=(256, 256))
    randomize_parameters_(flow, scale=0.05, seed=4)
    flow = flow.to(device, dtype)
    for layer in flow.parts:  # StackedMADE rows carry their network's plans
        net = layer.conditioner
        blocked = net.block_plans(net.masked_weights()[0])[1] is not None
        assert blocked == (torch.device(device).type == "cpu")
    plain = copy.deepcopy(flow)
    for m in plain.modules():
        if hasattr(m, "fused"):
            m.fused = False
    x = torch.randn(16, 64, device=device, dtype=dtype)
    weights = torch.linspace(0.5, 2.0, 16, device=device, dtype=dtype)
    results = []
    for t in (flow, plain):
        xr = x.clone().requires_grad_(True)
        # the parallel direction: MAF's inverse (log_prob), IAF's forward (sampling)
        v, ld = t.inverse_and_log_det(xr) if family == "maf" else t.forward_and_log_det(xr)
        (v.sin().sum() + (ld * weights).sum()).backward()
        results.append([v.detach(), ld.detach(), xr.grad]
                       + [p.grad.clone() for p in t.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tolerances(dtype))


def test_a_loaded_stack_with_other_orders_runs_its_blocks_from_the_loaded_masks():
    """Block plans follow the mask buffers: a stack built with reversed orders that loads the
    state of one built with random permutations (all keys match, the masks differ) computes
    the loaded flow, fused as plain, and the source flow's log-det (real thresholds: D = 300,
    hidden 320, so the order-dependent first layer and head are blocked)."""
    torch.manual_seed(0)
    source = pf.flows.build("maf", 300, num_layers=2, hidden_dims=(320, 320),
                            permutation="random")
    randomize_parameters_(source, scale=0.02)
    target = pf.flows.build("maf", 300, num_layers=2, hidden_dims=(320, 320))
    assert target[0].conditioner.block_plans(target[0].conditioner.masked_weights()[0])[0]
    target.load_state_dict(source.state_dict())
    y = torch.randn(5, 300)
    got = target.inverse_and_log_det(y)
    want = source.inverse_and_log_det(y)
    target.fused = False
    plain = target.inverse_and_log_det(y)
    for a, b, c in zip(got, want, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


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
