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
