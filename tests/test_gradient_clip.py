"""Adaptive gradient clipping of density fits (``pyroflows.density.training.GradientClip``)."""

import math

import pytest
import torch

import pyroflows as pf
from pyroflows.density.training import MAX_GRAD_NORM, GradientClip


def _params_with_grad(norm: float, device, dtype, dim: int = 5) -> list[torch.Tensor]:
    g = torch.randn(dim, device=device, dtype=dtype)
    p = torch.zeros(dim, device=device, dtype=dtype, requires_grad=True)
    p.grad = g * (norm / g.norm())
    return [p]


def test_a_spike_is_clipped_to_factor_times_the_running_norm(device, dtype):
    clip = GradientClip(factor=2.0, rate=0.1)
    for _ in range(50):  # steady gradients of norm 3: nothing clipped, the running norm is 3
        params = _params_with_grad(3.0, device, dtype)
        before = params[0].grad.clone()
        assert float(clip(params)) == pytest.approx(3.0, rel=1e-5)
        torch.testing.assert_close(params[0].grad, before)
    assert float(clip.running) == pytest.approx(3.0, rel=1e-5)
    params = _params_with_grad(500.0, device, dtype)  # a spike
    direction = params[0].grad / params[0].grad.norm()
    assert float(clip(params)) == pytest.approx(500.0, rel=1e-5)  # the norm before clipping
    torch.testing.assert_close(params[0].grad, 6.0 * direction)  # 2 x the running norm 3
    # the running norm takes the clipped norm, not the spike: 3 + 0.1 (6 - 3)
    assert float(clip.running) == pytest.approx(3.3, rel=1e-5)


def test_a_non_finite_gradient_leaves_the_running_norm_alone(device, dtype):
    clip = GradientClip(factor=2.0)
    clip(_params_with_grad(1.0, device, dtype))
    running = float(clip.running)
    params = _params_with_grad(1.0, device, dtype)
    params[0].grad[0] = math.nan
    assert not math.isfinite(float(clip(params)))
    assert float(clip.running) == running


def test_factor_zero_is_the_fixed_cap_only(device, dtype):
    clip = GradientClip(factor=0.0)
    params = _params_with_grad(100.0, device, dtype)
    before = params[0].grad.clone()
    for _ in range(3):
        clip(params)
    torch.testing.assert_close(params[0].grad, before)  # below the cap: untouched
    assert clip.running is None
    big = _params_with_grad(10 * MAX_GRAD_NORM, device, dtype)
    clip(big)
    assert float(big[0].grad.norm()) == pytest.approx(MAX_GRAD_NORM, rel=1e-4)


def test_fit_records_the_default_factor_and_refuses_a_negative_one(dtype):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(200, 1, generator=gen, dtype=dtype)
    y = c + 0.1 * torch.randn(200, 2, generator=gen, dtype=dtype)
    options = {"max_epochs": 2, "progress": False}
    est = pf.DensityEstimator("maf", num_layers=1, hidden_dims=(8,), seed=0)
    assert est.fit(y, context=c, **options).history_["clip_factor"] == 2.0
    assert est.fit(y, **options).history_["clip_factor"] == 0.0
    assert est.fit(y, clip_factor=3, **options).history_["clip_factor"] == 3.0
    with pytest.raises(ValueError, match="clip_factor must be >= 0"):
        est.fit(y, context=c, clip_factor=-1.0, **options)
