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


def _planar_log_det_exact(z: torch.Tensor, w: torch.Tensor, u: torch.Tensor, b: float) -> float:
    """log det of the planar map's Jacobian I + (1 - t^2) u_hat w^T at ``z``, with Rezende &
    Mohamed's u_hat, in 50-digit arithmetic (mpmath): free of the cancellation float64 has
    too once w.u_hat is within 1e-13 of -1."""
    import mpmath

    with mpmath.workdps(50):
        zs, ws, us = ([mpmath.mpf(float(v)) for v in t] for t in (z, w, u))
        dim = len(ws)
        wu = mpmath.fsum(a * c for a, c in zip(ws, us, strict=True))
        w_sq = mpmath.fsum(a * a for a in ws)
        u_hat = [c + (-1 + mpmath.log1p(mpmath.exp(wu)) - wu) * a / w_sq
                 for a, c in zip(ws, us, strict=True)]
        act = mpmath.tanh(mpmath.fsum(a * c for a, c in zip(ws, zs, strict=True))
                          + mpmath.mpf(b))
        jac = mpmath.matrix(dim, dim)
        for i in range(dim):
            for j in range(dim):
                jac[i, j] = (i == j) + (1 - act * act) * u_hat[i] * ws[j]
        return float(mpmath.log(mpmath.det(jac)))


@pytest.mark.parametrize("raw_wu", [-10.0, -15.0, -30.0])
def test_planar_log_det_near_the_invertibility_edge_in_float32(raw_wu, device):
    """Issue 19, 3: with the unconstrained w.u at -10 or below, the float32 log-det was off by
    up to 0.026 nats (-10) or NaN/-inf (-15, -30). Held against the log-det of the Jacobian
    of Rezende & Mohamed's map in 50-digit arithmetic at the same float32 parameters and
    points, both directions."""
    dim = 3
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    ortho = torch.randn(dim, generator=gen, dtype=torch.float64)
    ortho = ortho - (ortho @ w) / (w @ w) * w
    t = pf.transforms.planar(dim)
    with torch.no_grad():
        t.w.copy_(w)
        t.u.copy_(raw_wu * w / (w @ w) + ortho)
        t.bias.fill_(0.3)
    t = t.to(device, torch.float32)
    # points whose w.z + b runs over [-3, 3], through 0 where the determinant is smallest
    a = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    z = ((a - 0.3)[:, None] * w / (w @ w) + 0.5 * ortho).to(device, torch.float32)
    y = t(z)
    got = t.log_abs_det_jacobian(z, y).double().cpu()
    got_inverse = t.inv.log_abs_det_jacobian(y.detach().clone(), z.clone()).double().cpu()
    w32, u32 = t.w.detach().cpu(), t.u.detach().cpu()
    want = torch.tensor([_planar_log_det_exact(point, w32, u32, 0.3) for point in z.cpu()],
                        dtype=torch.float64)
    assert torch.isfinite(got).all() and torch.isfinite(got_inverse).all()
    # 1e-3 nats: at w.z + b = 0 and w.u = -30 the log-det log(t^2 + (1 - t^2) e^-30) moves by
    # ~5e-4 with the float32 rounding of w.z + b itself (t^2 ~ 5e-17 against 9e-14)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    torch.testing.assert_close(got_inverse, -want, rtol=0, atol=1e-3)
    slack = t.constrained()[1].detach()  # 1 + w.u_hat > 0: the promise, in float32
    assert float(slack) > 0


@pytest.mark.parametrize("dtype_, alpha_primes", [
    (torch.float32, [-17.0, -20.0, -40.0, -100.0]),
    (torch.float64, [-37.0, -40.0, -100.0, -800.0]),
])
def test_radial_inverse_gradients_for_small_alpha(dtype_, alpha_primes, device):
    """Issue 19, 2: with alpha' at -17 (float32) or -37 (float64) and below, the inverse's
    backward pass was NaN (the where's unused branch divided by 0). The gradient of sum(x)
    w.r.t. y must be finite and equal 1^T J_f(x)^{-1}, J_f the forward map's autograd
    Jacobian; the parameters' gradients finite."""
    dim = 3
    for alpha_prime in alpha_primes:
        t = pf.transforms.radial(dim)
        with torch.no_grad():
            t.alpha_prime.fill_(alpha_prime)
            t.beta_prime.fill_(0.5)
            t.x0.copy_(torch.tensor([0.1, -0.2, 0.3]))
        t = t.to(device, dtype_)
        # R = |y - x0| above and below alpha + beta = softplus(0.5) ~ 0.97 (b < 0 and b > 0)
        gen = torch.Generator().manual_seed(2)
        direction = torch.randn(6, dim, generator=gen, dtype=torch.float64)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        radii = torch.tensor([0.3, 0.9, 1.1, 2.0, 5.0, 40.0], dtype=torch.float64)[:, None]
        y = (t.x0.detach().double().cpu() + radii * direction).to(device, dtype_)
        y.requires_grad_(True)
        x = t.inv(y)
        loss = x.sum() + t.inv.log_abs_det_jacobian(y, x).sum()
        grads = torch.autograd.grad(loss, [y, t.alpha_prime, t.beta_prime, t.x0])
        for name, g in zip(("y", "alpha_prime", "beta_prime", "x0"), grads, strict=True):
            assert torch.isfinite(g).all(), f"alpha'={alpha_prime}: NaN gradient w.r.t. {name}"
        grad_x_sum = torch.autograd.grad(t.inv(y).sum(), y)[0].double().cpu()
        t64 = t.to(torch.float64)  # in place: the forward map at full precision
        # outside the ball R < alpha + beta (inside, the map crushes it to within alpha of
        # x0: no resolvable Jacobian there, only the finite gradients above)
        for k, point in list(enumerate(x.detach().double().cpu()))[2:]:
            jac = torch.autograd.functional.jacobian(
                lambda v, t64=t64: t64(v.to(device)).cpu(), point.clone())
            want = torch.linalg.solve(jac.T, torch.ones(dim, dtype=torch.float64))
            tol = 1e-8 if dtype_ == torch.float64 else 1e-3
            torch.testing.assert_close(grad_x_sum[k], want, rtol=tol, atol=tol)


@pytest.mark.parametrize("beta_prime", [-100.0, 2.0, 30.0])
def test_radial_at_its_centre_when_alpha_underflows(beta_prime, device):
    """Found by the property tests: with softplus(alpha') below float32's range (alpha at the
    smallest normal number), the forward map at its centre was NaN (beta / alpha overflowed,
    times diff = 0) and the log-det there -inf (alpha (alpha + beta) underflowed), where the
    map is y = x0 with log-det D log((alpha + beta) / alpha); alpha and alpha + beta now stop
    at the square root of it. (The log-det's gradient there is 0 times ~1/alpha: not asked
    for.)"""
    dim = 3
    t = pf.transforms.radial(dim)
    with torch.no_grad():
        t.x0.copy_(torch.tensor([0.5, -1.0, 2.0]))
        t.alpha_prime.fill_(-800.0)
        t.beta_prime.fill_(beta_prime)
    t = t.to(device, torch.float32)
    x = t.x0.detach().clone().unsqueeze(0).requires_grad_(True)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    alpha, alpha_plus_beta = (v.double() for v in t._alpha_beta())
    torch.testing.assert_close(y.detach(), x.detach())
    torch.testing.assert_close(log_det.double(), dim * torch.log(alpha_plus_beta / alpha),
                               rtol=1e-6, atol=1e-6)
    if beta_prime < 30:  # at 30, dh/dr = -(alpha + beta) / alpha^2 itself overflows float32
        grads = torch.autograd.grad(y.sum(), [x, *t.parameters()])
        assert all(torch.isfinite(g).all() for g in grads)
