"""RealNVP affine coupling: the conditioning half passes through exactly, both directions are
one network pass, the Jacobian has the coupling structure, and it matches eq. 35-36 written
out by hand with gathers."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows.nn import MADE
from pyroflows.testing import randomize_parameters_, tolerances


def _layer(mask, device, dtype, dim=5):
    t = pf.transforms.realnvp(dim, hidden_dims=(16, 16), mask=mask)
    randomize_parameters_(t, scale=0.4)
    return t.to(device, dtype)


MASKS = [None, [True, False, True, False, True], [False, False, False, True, False]]


@pytest.mark.parametrize("mask", MASKS)
def test_conditioning_half_is_untouched_both_ways(mask, device, dtype):
    t = _layer(mask, device, dtype)
    keep = t.mask
    x = torch.randn(20, 5, device=device, dtype=dtype) * 2
    y = t(x)
    assert torch.equal(y[:, keep], x[:, keep])
    assert not torch.isclose(y[:, ~keep], x[:, ~keep]).any()
    x_back = t.inv(y.clone())
    assert torch.equal(x_back[:, keep], y[:, keep])
    torch.testing.assert_close(x_back, x, **tolerances(dtype))


@pytest.mark.parametrize("mask", MASKS)
def test_matches_equation_35_36_with_explicit_halves(mask, device, dtype):
    """Recompute y_b = z_b * exp(s(z_a)) + mu(z_a) by feeding the network only z_a (the masked
    columns zeroed): any leak from z_b into the network would change the result."""
    t = _layer(mask, device, dtype)
    keep = t.mask
    z = torch.randn(10, 5, device=device, dtype=dtype)
    shift, log_scale = t.shift_and_log_scale(z * keep)  # network sees z_a only
    y_expected = torch.where(keep, z, z * log_scale.exp() + shift)
    tol = tolerances(dtype)
    torch.testing.assert_close(t(z), y_expected, **tol)
    torch.testing.assert_close(
        t.log_abs_det_jacobian(z, t(z)), log_scale[:, ~keep].sum(-1), **tol
    )
    assert torch.equal(log_scale[:, keep], torch.zeros_like(log_scale[:, keep]))


def test_jacobian_has_the_coupling_structure(device, dtype):
    t = _layer([True, True, False, False, False], device, dtype)
    keep = t.mask
    for x in torch.randn(3, 5, device=device, dtype=dtype):
        jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0], x)
        eye = torch.eye(5, device=device, dtype=dtype)
        assert torch.equal(jac[keep], eye[keep])  # y_a = z_a
        block = jac[~keep][:, ~keep]  # dy_b / dz_b is diagonal
        assert torch.equal(block, torch.diag(block.diagonal()))
        assert (jac[~keep][:, keep] != 0).all()  # y_b depends on every z_a


def test_both_directions_are_one_pass(device, dtype):
    t = _layer(None, device, dtype)
    calls = []
    for m in t.modules():
        if isinstance(m, MADE):
            m.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(8, 5, device=device, dtype=dtype)
    y = t(x)
    assert len(calls) == 1
    t.inv(y.clone())
    assert len(calls) == 2
    zeros = torch.zeros(5, device=device, dtype=dtype)
    TransformedDistribution(Independent(Normal(zeros, 1.0), 1), [t]).log_prob(y.clone())
    assert len(calls) == 3


def test_mask_validation_and_buffers(device):
    for bad in ([True] * 4, [False] * 4, [True, False]):
        with pytest.raises(ValueError, match="mask"):
            pf.transforms.realnvp(4, mask=bad)
    with pytest.raises(ValueError, match="at least 2"):
        pf.transforms.realnvp(1)
    t = pf.transforms.realnvp(4).to(device)
    assert t.mask.tolist() == [True, True, False, False]
    assert "mask" in t.state_dict()
    assert t.mask.device.type == torch.device(device).type
