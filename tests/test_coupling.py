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


@pytest.mark.parametrize("mask,hidden_dims,residual", [
    (None, (16, 16), False),
    ([False, False, True, True, True], (16, 16), False),  # conditioning half last
    ([True, False, False, False, False], (), False),  # the output layer alone
    (None, (8, 8), True),
])
def test_compact_conditioner_is_the_full_masked_network(mask, hidden_dims, residual, device,
                                                        dtype):
    """With contiguous halves, the fused kernel and the plain path run the network on z_a and
    compute the outputs of b only; against the full masked network through autograd (every
    input, every output): the same map, log-det and gradients, both directions."""
    t = pf.transforms.realnvp(5, hidden_dims=hidden_dims, mask=mask, residual=residual)
    randomize_parameters_(t, scale=0.4, seed=8)
    t = t.to(device, dtype)
    assert t.coupling_halves is None  # D = 5: the full masked network (faster at small D)
    t.compact_min_dim = 0
    assert t.coupling_halves is not None
    plain = pf.transforms.realnvp(5, hidden_dims=hidden_dims, mask=mask, residual=residual)
    plain = plain.to(device, dtype)
    plain.load_state_dict(t.state_dict())
    plain.fused, plain.compact_min_dim = False, 0
    keep = t.mask
    x = torch.randn(2, 6, 5, device=device, dtype=dtype)
    weights = torch.linspace(0.5, 2.0, 12, device=device, dtype=dtype).view(2, 6)
    tol = tolerances(dtype)
    for inverse in (False, True):
        t.zero_grad()
        xr = x.clone().requires_grad_(True)
        shift, log_scale = t.shift_and_log_scale(xr)  # the full network, all D inputs
        if inverse:
            y_ref = torch.where(keep, xr, (xr - shift) * torch.exp(-log_scale))
        else:
            y_ref = torch.where(keep, xr, xr * log_scale.exp() + shift)
        ld_ref = log_scale.sum(-1)
        (y_ref.sin().sum() + (ld_ref * weights).sum()).backward()
        want = [y_ref.detach(), ld_ref.detach(), xr.grad, t.conditioner.flat_parameters.grad]
        for layer in (t, plain):
            layer.zero_grad()
            xv = x.clone().requires_grad_(True)
            y, ld = layer.inverse_and_log_det(xv) if inverse else layer.forward_and_log_det(xv)
            (y.sin().sum() + (ld * weights).sum()).backward()
            got = [y.detach(), ld.detach(), xv.grad, layer.conditioner.flat_parameters.grad]
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **tol)
            assert torch.equal(got[0][..., keep], x[..., keep])


def test_built_stacks_use_the_compact_conditioner_from_32_dimensions():
    flow = pf.flows.build("realnvp", 32, num_layers=3, hidden_dims=(8,))
    first, last = slice(0, 16), slice(16, 32)
    assert [t.coupling_halves for t in flow.parts] == [(first, last), (last, first),
                                                       (first, last)]
    assert pf.flows.build("realnvp", 16, num_layers=2).parts[0].coupling_halves is None
    assert pf.transforms.realnvp(32, mask=[True, False] * 16).coupling_halves is None
