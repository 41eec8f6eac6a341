"""StandardNormal and FlowDistribution against torch's Normal, TransformedDistribution and the
change-of-variables formula computed from autograd Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows import testing
from pyroflows.distributions import FlowDistribution, StandardNormal


def _normal(dim, device, dtype) -> Independent:
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def test_standard_normal_matches_torch_normal(device, dtype):
    p, q = StandardNormal(3, device=device, dtype=dtype), _normal(3, device, dtype)
    tol = testing.tolerances(dtype)
    z = (3 * torch.randn(4, 2, 3, device=device, dtype=dtype)).requires_grad_(True)
    got, want = p.log_prob(z), q.log_prob(z)
    torch.testing.assert_close(got, want, **tol)
    (g,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(g, -z.detach(), **tol)  # d/dz of -|z|^2 / 2
    torch.testing.assert_close(p.entropy(), q.entropy(), **tol)
    assert p.event_shape == (3,) and p.batch_shape == ()
    draws = p.rsample((20000,))
    assert draws.shape == (20000, 3) and draws.device.type == torch.device(device).type
    assert draws.dtype == dtype
    torch.testing.assert_close(draws.mean(0), p.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.var(0), p.variance, atol=0.05, rtol=0)
    e = p.expand((5,))
    assert e.batch_shape == (5,) and e.sample().shape == (5, 3)
    with pytest.raises(ValueError, match="shape"):
        p.log_prob(torch.zeros(4, 2, device=device, dtype=dtype))


@pytest.mark.parametrize("family,dim", [("maf", 4), ("realnvp", 4), ("iaf", 3)])
def test_flow_distribution_matches_transformed_distribution(family, dim, device, dtype):
    """Values and parameter gradients equal torch's TransformedDistribution over a Normal."""
    flow = pf.flows.build(family, dim, num_layers=3, hidden_dims=(8,), affine=True)
    testing.randomize_parameters_(flow, scale=0.3, seed=3)
    flow = flow.to(device, dtype)
    x = torch.randn(7, dim, device=device, dtype=dtype)
    results = []
    for d in (FlowDistribution(flow), TransformedDistribution(_normal(dim, device, dtype), flow)):
        flow.zero_grad()
        lp = d.log_prob(x.clone())
        lp.sum().backward()
        results.append([lp.detach()] + [p.grad.clone() for p in flow.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))


def test_flow_distribution_is_the_change_of_variables(device, dtype):
    r""":math:`\log p(x) = \log N(f^{-1}(x)) + \log|\det J_{f^{-1}}(x)|` with the Jacobian from
    autograd on the plain operations (the fused kernels off), point by point."""
    flow = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,))
    testing.randomize_parameters_(flow, scale=0.5, seed=4)
    flow = flow.to(device, dtype)
    plain = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,)).to(device, dtype)
    plain.load_state_dict(flow.state_dict())
    plain.fused = False
    x = torch.randn(5, 3, device=device, dtype=dtype)
    got = FlowDistribution(flow).log_prob(x)
    for n in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: plain._chain(v, True)[0], x[n])
        z = plain._chain(x[n], True)[0]
        want = -0.5 * (z.square().sum() + 3 * math.log(2 * math.pi)) + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(got[n], want, **testing.tolerances(dtype))


def test_flow_distribution_scores_its_samples_without_the_inverse(device, dtype):
    flow = pf.flows.build("iaf", 3, num_layers=2, hidden_dims=(8,))
    testing.randomize_parameters_(flow, scale=0.3, seed=5)
    flow = flow.to(device, dtype)
    d = FlowDistribution(flow)
    x = d.rsample((6,))
    calls = []
    for part in flow.parts:
        part.inverse_and_log_det = lambda y, _f=part.inverse_and_log_det: calls.append(1) or _f(y)
    lp = d.log_prob(x)
    assert calls == []
    torch.testing.assert_close(
        lp, TransformedDistribution(_normal(3, device, dtype), flow).log_prob(x),
        **testing.tolerances(dtype))
    with torch.no_grad():  # a parameter edit makes the cached entry stale: the inverse runs
        flow.parts[0].conditioner.flat_parameters.mul_(1.5)
    d.log_prob(x)
    assert len(calls) == 2  # one IAF inverse per layer


def test_flow_distribution_checks_and_fallback(device, dtype):
    flow = pf.flows.build("maf", 2, num_layers=2, hidden_dims=(4,)).to(device, dtype)
    d = FlowDistribution(flow)
    bad = torch.tensor([[0.0, float("nan")]], device=device, dtype=dtype)
    with pf.validation(True), pytest.raises(ValueError, match="NaN"):
        d.log_prob(bad)
    with pytest.raises(ValueError, match="shape"):
        d.log_prob(torch.zeros(3, 5, device=device, dtype=dtype))
    # any other transform: TransformedDistribution's log_prob, same value
    t = pf.transforms.ElementwiseAffine(2).to(device, dtype)
    x = torch.randn(4, 2, device=device, dtype=dtype)
    want = TransformedDistribution(_normal(2, device, dtype), [t]).log_prob(x)
    torch.testing.assert_close(FlowDistribution([t]).log_prob(x), want,
                               **testing.tolerances(dtype))
    assert FlowDistribution(flow).base_dist.rsample().dtype == dtype
    wide = d.expand((3,))
    assert isinstance(wide, FlowDistribution) and wide.batch_shape == (3,)
    x = torch.randn(3, 2, device=device, dtype=dtype)
    torch.testing.assert_close(wide.log_prob(x), d.log_prob(x), **testing.tolerances(dtype))


def test_flow_distribution_in_a_pyro_model(device, dtype):
    """As an observed site of a Pyro model: the trace's log-density is FlowDistribution's."""
    import pyro
    import pyro.poutine as poutine

    flow = pf.flows.build("realnvp", 4, num_layers=2, hidden_dims=(8,))
    testing.randomize_parameters_(flow, scale=0.3, seed=6)
    flow = flow.to(device, dtype)
    x = torch.randn(5, 4, device=device, dtype=dtype)

    def model():
        with pyro.plate("data", 5):
            pyro.sample("x", FlowDistribution(flow), obs=x)

    trace = poutine.trace(model).get_trace()
    want = TransformedDistribution(_normal(4, device, dtype), flow).log_prob(x).sum()
    torch.testing.assert_close(trace.log_prob_sum(), want, **testing.tolerances(dtype))


def test_unit_student_t_density_against_scipy(device, dtype):
    from scipy import stats

    from pyroflows.distributions import UnitStudentT

    df = torch.tensor([2.5, 4.0, 30.0], device=device, dtype=dtype)
    z = torch.tensor([[0.0, -1.3, 2.0], [7.0, 0.2, -4.0]], device=device, dtype=dtype)
    p = UnitStudentT(df)
    scale = ((df - 2) / df).sqrt().cpu().double().numpy()
    expected = stats.t.logpdf(z.cpu().double().numpy(), df.cpu().double().numpy(),
                              scale=scale).sum(-1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(p.log_prob(z).cpu().double(), torch.as_tensor(expected), atol=tol,
                          rtol=tol)
    assert p.batch_shape == () and p.event_shape == (3,)
    assert p.expand((5,)).sample((2,)).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="D"):
        UnitStudentT(torch.tensor(3.0))


def test_unit_student_t_draws_have_unit_variance_and_pathwise_df_gradients(device, dtype):
    """Var z = 1 for every df; d/d(df) of E|z| by the pathwise gradient of rsample against the
    exact E|z| = s E|t| = s * 2 sqrt(nu) Gamma((nu+1)/2) / (sqrt(pi) (nu-1) Gamma(nu/2))."""
    from pyroflows.distributions import UnitStudentT

    torch.manual_seed(0)
    df = torch.tensor([3.0, 6.0], device=device, dtype=torch.float64, requires_grad=True)
    z = UnitStudentT(df.to(dtype)).rsample((400000,))
    assert torch.allclose(z.double().var(0), torch.ones(2, device=device, dtype=torch.float64),
                          atol=0.1)
    (grad,) = torch.autograd.grad(z.abs().mean(0).sum(), df)
    nu = df.detach().clone().requires_grad_(True)
    exact = (((nu - 2) / nu).sqrt() * 2 * nu.sqrt()
             * torch.exp(torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2))
             / (math.sqrt(math.pi) * (nu - 1)))
    (exact_grad,) = torch.autograd.grad(exact.sum(), nu)
    assert torch.allclose(grad, exact_grad, rtol=0.1, atol=2e-3), (grad, exact_grad)
