"""The fast paths (issue 9) against the plain ones: same values, same gradients, same checks.

The fused :class:`~pyroflows.flows.FlowStack` is compared with Pyro's plain
``ComposeTransformModule`` over the very same layers (the composition rule of
``torch.distributions``, which the conformance suite checks against autograd Jacobians), and the
compiled stack runs the conformance checks themselves. The compiled path is traced with the
``aot_eager`` backend: the same Dynamo capture and AOT-Autograd graphs as the default Inductor
backend, without its C++ code generation (minutes on a small shared CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows import testing
from pyroflows.flows import FlowStack
from pyroflows.transforms.base import module_stamp

FAMILIES = [("maf", 4), ("iaf", 3), ("realnvp", 4), ("planar", 3)]


def _stack(family: str, dim: int, device, dtype, **kwargs) -> FlowStack:
    hidden = {} if family == "planar" else {"hidden_dims": (8,)}
    flow = pf.flows.build(family, dim, num_layers=3, affine=True, **hidden, **kwargs)
    testing.randomize_parameters_(flow, scale=0.3, seed=3)
    return flow.to(device=device, dtype=dtype)


def _base(dim: int, device, dtype) -> Independent:
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


@pytest.mark.parametrize("family,dim", FAMILIES)
def test_fused_stack_matches_plain_composition(family, dim, device, dtype):
    fused = _stack(family, dim, device, dtype)
    assert isinstance(fused, FlowStack) and fused._fused
    plain = ComposeTransformModule(list(fused.parts))  # the same layers, composed by torch
    tol = testing.tolerances(dtype)
    y = torch.randn(16, dim, device=device, dtype=dtype)
    losses, grads = [], []
    for flow in (fused, plain):
        flow.zero_grad()
        d = TransformedDistribution(_base(dim, device, dtype), flow)
        loss = -d.log_prob(y.clone()).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    # forward direction and its log-det, scored from the stack's cache
    z = torch.randn(16, dim, device=device, dtype=dtype)
    x_fused, x_plain = fused(z), plain(z.clone())
    torch.testing.assert_close(x_fused, x_plain, **tol)
    torch.testing.assert_close(fused.log_abs_det_jacobian(z, x_fused),
                               plain.log_abs_det_jacobian(z.clone(), x_plain), **tol)


def test_fused_stack_cache_is_one_pass(device, dtype):
    """Scoring the stack's own samples runs no inverse: IAF's inverse would take D passes."""
    flow = _stack("iaf", 3, device, dtype)
    z = torch.randn(5, 3, device=device, dtype=dtype)
    x = flow(z)
    calls = []
    for part in flow.parts:
        part.register_forward_pre_hook(lambda *a: calls.append(1))  # never fires: no forward()
        part.inverse_and_log_det = lambda y, _f=part.inverse_and_log_det: calls.append(1) or _f(y)
    assert flow.inv(x) is z
    flow.log_abs_det_jacobian(z, x)
    assert calls == []


@pytest.mark.parametrize("family,dim", [("maf", 4), ("realnvp", 4)])
def test_compiled_stack_passes_conformance(family, dim, device, dtype):
    flow = _stack(family, dim, device, dtype, compile="aot_eager")
    plain = copy.deepcopy(flow)
    plain.compile_backend = None
    y = torch.randn(6, dim, device=device, dtype=dtype)
    torch.testing.assert_close(flow.inv(y), plain.inv(y.clone()), **testing.tolerances(dtype))
    for check in (testing.check_round_trips, testing.check_log_det, testing.check_gradients,
                  testing.check_stale_cache, testing.check_deepcopy, testing.check_bad_input,
                  testing.check_transformed_distribution):
        check(flow, dim, device=device, dtype=dtype)


def test_compile_needs_flow_transforms():
    with pytest.raises(ValueError, match="compile"):
        FlowStack([torch.distributions.transforms.ExpTransform()], compile=True)


def test_module_stamp_sees_every_change(device, dtype):
    flow = _stack("maf", 3, device, dtype)
    stamp = module_stamp(flow)
    assert module_stamp(flow) == stamp
    with torch.no_grad():
        flow.parts[1].conditioner.flat_parameters.add_(0.0)  # an in-place edit bumps the version
    assert module_stamp(flow) != stamp
    stamp = module_stamp(flow)
    flow.load_state_dict(flow.state_dict())
    assert module_stamp(flow) != stamp
    with torch.no_grad():
        assert module_stamp(flow) != module_stamp(flow.parts[0])  # grad mode, and fewer tensors


def test_validation_overflowing_sum_is_not_an_error(device):
    """Finite inputs whose sum overflows must pass the one-reduction finiteness check."""
    t = pf.transforms.ElementwiseAffine(4).to(device=device, dtype=torch.float32)
    x = torch.full((3, 4), 3e38, device=device, dtype=torch.float32)
    with pf.validation(True):
        assert torch.isfinite(t(x)).all()  # the identity at initialization
        bad = x.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            t(bad)
