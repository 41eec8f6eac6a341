"""The conformance checks of :mod:`pyroflows.testing` catch broken transforms (a wrong log-det,
a broken inverse, a stale cache, a wrong blocked backward) and accept correct ones (a frozen
parameter, a mixed stack, a user transform on a legacy ``autograd.Function``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyroflows as pf
from pyroflows import testing
from pyroflows._fast import made as fast_made
from pyroflows.transforms import FlowTransform, Planar


class WrongLogDet(Planar):
    def forward_and_log_det(self, x):
        y, ld = super().forward_and_log_det(x)
        return y, 1.01 * ld


class BrokenInverse(Planar):
    def inverse_and_log_det(self, y):
        x, ld = super().inverse_and_log_det(y)
        return x + 1e-3, ld


class StaleCache(FlowTransform):
    """Caches by input identity only, like Pyro's transforms (Pyro issue #2564)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.shift = nn.Parameter(torch.zeros(dim))
        self._ident = None

    def forward_and_log_det(self, x):
        return x + self.shift, x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y):
        return y - self.shift, y.new_zeros(y.shape[:-1])

    def __call__(self, x):
        if self._ident is not None and self._ident[0] is x:
            return self._ident[1]
        y = super().__call__(x)
        self._ident = (x, y)
        return y


def _make(cls, dim=3):
    t = cls(dim).double()
    testing.randomize_parameters_(t, scale=1.0)
    return t


@pytest.mark.parametrize(
    "cls, check",
    [
        (WrongLogDet, testing.check_log_det),
        (BrokenInverse, testing.check_round_trips),
        (StaleCache, testing.check_stale_cache),
    ],
)
def test_suite_catches_broken_transforms(cls, check):
    with pytest.raises(AssertionError):
        check(_make(cls), 3)


def test_suite_passes_the_unbroken_planar():
    testing.check_transform(lambda: _make(Planar), 3)


# ---- check_gradients against torch.func.grad ----------------------------------------------------
def _wide_iaf():
    return pf.flows.build("iaf", 8, num_layers=2, hidden_dims=(256, 256)).double()


@pytest.mark.parametrize("kernel", ["_blocked_input_grad", "_blocked_weight_grad"])
def test_check_gradients_catches_a_wrong_blocked_backward(kernel, monkeypatch, one_thread,
                                                          blocks_at_any_rows):
    """Mutation test: a blocked backward kernel off by 1% in one block must make
    check_gradients fail (the reference, torch.func.grad, runs the plain operations, not the
    kernels); unmutated, the same check passes. (Its few rows run blocked: blocks_at_any_rows.)"""
    flow = _wide_iaf()
    testing.randomize_parameters_(flow, scale=0.3)
    testing.check_gradients(flow, 8)
    real = getattr(fast_made, kernel)
    calls = [0]

    def wrong(*args):
        calls[0] += 1
        if kernel == "_blocked_input_grad":
            return real(*args) * 1.01
        real(*args)
        args[-1].mul_(1.01)

    monkeypatch.setattr(fast_made, kernel, wrong)
    with pytest.raises(AssertionError):
        testing.check_gradients(flow, 8)
    assert calls[0] > 0


def test_check_gradients_with_frozen_parameters_and_a_mixed_stack():
    """A stack with one parameter frozen (requires_grad False): the names, the autograd
    gradients and the reference line up (no false failure); a FlowStack holding a plain
    torch transform is skipped by the reference, not failed."""
    flow = pf.flows.build("maf", 4, num_layers=2, hidden_dims=(16,)).double()
    testing.randomize_parameters_(flow, scale=0.3)
    first = next(iter(flow.parameters()))
    first.requires_grad_(False)
    testing.check_gradients(flow, 4)
    mixed = pf.flows.FlowStack([pf.transforms.planar(4).double(),
                                torch.distributions.transforms.AffineTransform(0.5, 2.0)])
    assert testing._plain_gradients(mixed, torch.randn(3, 4, dtype=torch.float64),
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


class _UserElementwise(FlowTransform):
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
    testing.check_gradients(_UserElementwise(3).double(), 3)
