"""A heavy-tailed base for flow guides (issue 24, item 5): ``base="studentt"`` learns one
degrees of freedom per coordinate; its log-density, its sticking-the-landing gradient and its
files against independent routes, and the fit it was made for: a Student t posterior, where a
Gaussian base leaves k-hat above 0.7 and the Student t base finds the posterior's tails."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.distributions import UnitStudentT
from pyroflows.guides import direct, landing

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


def student_t_posterior(df: float, dim: int, device, dtype):
    """``x ~ t_df(0, 1)^dim`` as a Pyro model (log Z = 0)."""
    def model():
        pyro.sample("x", dist.StudentT(df, torch.zeros(dim, device=device, dtype=dtype), 1.0)
                    .to_event(1))
    return model


def trained(model, base: str, steps: int, **kwargs):
    pyro.set_rng_seed(0)
    guide = pf.guides.AutoIAF(model, base=base, **kwargs)
    guide()
    elbo = pf.guides.FlowELBO(num_particles=16, vectorize_particles=True)
    optimizer = torch.optim.Adam(guide.param_groups())
    for _ in range(steps):
        optimizer.zero_grad()
        elbo.differentiable_loss(model, guide).backward()
        optimizer.step()
    return guide


def _set_up(device, dtype, **kwargs):
    guide = pf.guides.AutoIAF(student_t_posterior(3.0, 3, device, dtype), base="studentt",
                              hidden_dims=(8,), **kwargs)
    guide()
    with torch.no_grad():  # away from the start, so every term is exercised
        guide.base.log_excess_df.copy_(torch.tensor([-1.0, 0.0, 2.0]))
        for p in guide.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return guide


def test_the_draws_log_density_is_the_transformed_student_t(device, dtype):
    """The fast draw's log q (direct.draw) against Pyro's TransformedDistribution with the
    same base and transforms scored through the inverse."""
    guide = _set_up(device, dtype)
    pyro.set_rng_seed(1)
    trace, log_q, _, _ = direct.draw(guide, (5,), stick_the_landing=False)
    latent = next(iter(trace.nodes.values()))["value"]
    base, transforms = guide._posterior_parts()
    assert isinstance(base, UnitStudentT)
    expected = dist.TransformedDistribution(base, transforms).log_prob(latent.detach())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(log_q, expected, rtol=tol, atol=tol)


def test_sticking_the_landing_gradient_by_the_jacobian_equals_the_inverse_route(device, dtype):
    """d/dz log q_{phi-bar}(z) from the draw's Jacobian (path_log_density, with the Student t
    base's score) against the flow's inverse (log_prob_detached)."""
    guide = _set_up(device, dtype)
    base, transforms = guide._posterior_parts()
    stack = transforms[0]
    eps = base.rsample((7,)).detach()
    z, log_det = stack.run(eps, inverse=False, validate=False)
    z = z.detach().requires_grad_(True)
    log_q = base.log_prob(eps) - log_det
    (by_jacobian,) = torch.autograd.grad(
        landing.path_log_density(stack, eps, z, log_q, base).sum(), z)
    (by_inverse,) = torch.autograd.grad(landing.log_prob_detached(base, [stack], z).sum(), z)
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(by_jacobian, by_inverse, rtol=tol, atol=tol)


def test_a_student_t_posterior_gets_its_tails(device, dtype):
    """On a 4-D t(2.2) posterior, the Gaussian base's importance weights say "tails too
    light"; the Student t base learns df near 2.2, its k-hat is below 0.7 and its KL (log Z -
    ELBO, log Z = 0) under half the Gaussian base's."""
    model = student_t_posterior(2.2, 4, device, dtype)
    reports = {}
    for base in ("normal", "studentt"):
        guide = trained(model, base, steps=300, num_layers=1, hidden_dims=(8,))
        pyro.set_rng_seed(2)
        reports[base] = pf.diagnostics.vi_report(model, guide, num_samples=4000)
    assert reports["normal"].verdict == "tails too light", str(reports["normal"])
    assert reports["studentt"].verdict in ("good", "usable"), str(reports["studentt"])
    assert -reports["studentt"].elbo < 0.5 * -reports["normal"].elbo, str(reports)
    df = guide.base.df.detach()
    assert bool(((df > 2.0) & (df < 2.8)).all()), df


def test_student_t_base_files_groups_and_checks(device, dtype, tmp_path):
    guide = _set_up(device, dtype)
    names = {id(p) for group in guide.param_groups() for p in group["params"]}
    assert id(guide.base.log_excess_df) in names
    assert "base.log_excess_df" in guide.state_dict()
    path = tmp_path / "guide.pt"
    torch.save(guide.state_dict(), path)
    pyro.clear_param_store()
    again = pf.guides.AutoIAF(student_t_posterior(3.0, 3, device, dtype), base="studentt",
                              hidden_dims=(8,))
    again()
    again.load_state_dict(torch.load(path))
    torch.testing.assert_close(again.base.df, guide.base.df)
    with pytest.raises(ValueError, match="base"):
        pf.guides.AutoIAF(student_t_posterior(3.0, 3, device, dtype), base="cauchy")


@pytest.mark.parametrize("base", ["normal", "studentt"])
def test_sticking_the_landing_without_flow_layers(base, device, dtype):
    """num_layers=0: the stack is affine only, its log-det constant in the draws; the
    sticking-the-landing gradient still runs (it raised before)."""
    model = student_t_posterior(3.0, 2, device, dtype)
    guide = pf.guides.AutoIAF(model, num_layers=0, base=base, stick_the_landing=True)
    loss = pf.guides.FlowELBO(num_particles=4, vectorize_particles=True).differentiable_loss(
        model, guide)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)
