"""testing.check_gradients must catch a wrong backward and accept correct transforms."""

from __future__ import annotations

import pytest
import torch

import pyroflows as pf
from pyroflows import testing as pf_testing
from pyroflows.nn import made as made_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (see conftest)


# ---- check_gradients against torch.func.grad ----------------------------------------------------
def _wide_iaf():
    return pf.flows.build("iaf", 8, num_layers=2, hidden_dims=(256, 256)).double()


@pytest.mark.parametrize("kernel", ["_blocked_input_grad", "_blocked_weight_grad"])
def test_check_gradients_catches_a_wrong_blocked_backward(kernel, monkeypatch):
    """Mutation test: a blocked backward kernel off by 1% in one block must make
    check_gradients fail (the reference, torch.func.grad, runs the plain operations, not the
    kernels); unmutated, the same check passes."""
    flow = _wide_iaf()
    pf_testing.randomize_parameters_(flow, scale=0.3)
    pf_testing.check_gradients(flow, 8)
    real = getattr(made_module, kernel)
    calls = [0]

    def wrong(*args):
        calls[0] += 1
        if kernel == "_blocked_input_grad":
            return real(*args) * 1.01
        real(*args)
        args[-1].mul_(1.01)

    monkeypatch.setattr(made_module, kernel, wrong)
    with pytest.raises(AssertionError):
        pf_testing.check_gradients(flow, 8)
    assert calls[0] > 0


def test_check_gradients_with_frozen_parameters_and_a_mixed_stack():
    """A stack with one parameter frozen (requires_grad False): the names, the autograd
    gradients and the reference line up (no false failure); a FlowStack holding a plain
    torch transform is skipped by the reference, not failed."""
    flow = pf.flows.build("maf", 4, num_layers=2, hidden_dims=(16,)).double()
    pf_testing.randomize_parameters_(flow, scale=0.3)
    first = next(iter(flow.parameters()))
    first.requires_grad_(False)
    pf_testing.check_gradients(flow, 4)
    mixed = pf.flows.FlowStack([pf.transforms.planar(4).double(),
                                torch.distributions.transforms.AffineTransform(0.5, 2.0)])
    assert pf_testing._plain_gradients(mixed, torch.randn(3, 4, dtype=torch.float64),
                                       False) is None


class _LegacyScale(torch.autograd.Function):
    """y = x exp(s), with a correct hand-written backward, in the pre-functorch style (no
    setup_context), as many user extensions are written."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s.exp()

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s.exp(), (g * x * s.exp()).reshape(-1, x.shape[-1]).sum(0)


class _UserElementwise(pf.transforms.base.FlowTransform):
    """A user's own, correct FlowTransform: y = x exp(s)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.s = torch.nn.Parameter(torch.linspace(-0.5, 0.5, dim))

    def forward_and_log_det(self, x):
        return _LegacyScale.apply(x, self.s), self.s.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y):
        return y * (-self.s).exp(), self.s.sum().expand(y.shape[:-1])


def test_check_gradients_accepts_a_correct_user_transform_with_a_custom_function():
    """A correct user transform whose forward uses a torch.autograd.Function without
    setup_context (torch.func cannot run it) passes check_gradients: there is no plain
    reference to compare with, not a failure."""
    pf_testing.check_gradients(_UserElementwise(3).double(), 3)
