"""Flow guides under the loop a Pyro user writes (issue 24, item 6): ``SVI`` with a plain
``pyro.optim.Adam`` and ``Trace_ELBO`` on a Gaussian posterior whose KL is known in closed form,
and :func:`pyroflows.guides.recommended_optimizer` (its groups' step sizes and its decay)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from guide_models import gaussian_problem
from pyro.infer import SVI, Trace_ELBO

import pyroflows as pf
from pyroflows.guides import AutoIAF, FlowELBO, recommended_optimizer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


def _exact_kl(guide, mean, cov, num_draws=4000):
    """KL(q || p) = E_q[log q(z) - log p(z | y)] from the guide's draws, the normalized
    posterior in closed form (float64)."""
    posterior = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    with torch.no_grad():
        z = guide._draw_latent(num_draws, seed=7)
        log_q = guide.get_posterior().log_prob(z)
        return float((log_q.double().cpu() - posterior.log_prob(z.double().cpu())).mean())


def test_plain_adam_and_trace_elbo_fit_a_gaussian_posterior(device, dtype):
    """From the plain start (not the exact Laplace one), 400 steps of SVI with
    ``pyro.optim.Adam({"lr": 5e-3})`` constant and ``Trace_ELBO`` (8 vectorized particles; the
    IAF guide sticks the landing through its posterior) take an AutoIAF from a KL above 1 nat
    to within 0.03 nats of the correlated 3-D Gaussian posterior."""
    model, mean, cov, _ = gaussian_problem(device, dtype)
    guide = AutoIAF(model, hidden_dims=(16,), laplace_init=False)
    guide()
    start = _exact_kl(guide, mean, cov)
    assert start > 1.0
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}),
              Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0))
    with pf.validation(False):
        for _ in range(400):
            svi.step()
    assert _exact_kl(guide, mean, cov) < 0.03


def _lrs(optimizer, guide):
    """The current step size of each of the guide's parameters in a Pyro optimizer."""
    return {name: optimizer.optim_objs[p].param_groups[0]["lr"]
            for name, p in guide.named_parameters() if p in optimizer.optim_objs}


def _small_guide(model, flow):
    kwargs = {"hidden_dims": (8,)} if flow == "iaf" else {}
    return pf.guides.AutoFlowGuide(model, flow=flow, num_layers=2, **kwargs)


@pytest.mark.parametrize("flow, flow_lr", [("iaf", 3e-3), ("planar", 1e-2)])
def test_recommended_optimizer_steps_at_the_family_sizes_decayed(flow, flow_lr, device, dtype):
    """The optimizer's groups start at the family's step sizes (affine layer 5e-2, flow layers
    the family's) and fall by the factor ``decay`` over ``num_steps`` SVI steps (every step the
    same factor), each gradient entry clipped to ``clip_norm``."""
    model, _, _, _ = gaussian_problem(device, dtype)
    guide = _small_guide(model, flow)
    num_steps, decay = 20, 50.0
    optimizer = recommended_optimizer(guide, num_steps)
    assert isinstance(optimizer, pyro.optim.PyroOptim)
    svi = SVI(model, guide, optimizer, FlowELBO(num_particles=2, vectorize_particles=True))
    svi.step()
    first = _lrs(optimizer, guide)
    assert first.keys() == dict(guide.named_parameters()).keys()
    rate = decay ** (-1 / num_steps)
    for name, lr in first.items():
        want = flow_lr if name.startswith("flow.") else 5e-2
        assert math.isclose(lr, want * rate, rel_tol=1e-12), name
    for p in guide.parameters():
        assert optimizer.optim_objs[p].param_groups[0]["clip_norm"] == 10.0
    for _ in range(num_steps - 1):
        svi.step()
    for name, lr in _lrs(optimizer, guide).items():
        want = flow_lr if name.startswith("flow.") else 5e-2
        assert math.isclose(lr, want / decay, rel_tol=1e-9), name
    # overrides; a constant step size with decay=1
    pyro.clear_param_store()
    guide = _small_guide(model, flow)
    optimizer = recommended_optimizer(guide, 5, lr=1e-2, flow_lr=2e-3, decay=1.0, clip_norm=3.0)
    svi = SVI(model, guide, optimizer, FlowELBO(num_particles=2, vectorize_particles=True))
    for _ in range(5):
        svi.step()
    for name, lr in _lrs(optimizer, guide).items():
        assert lr == (2e-3 if name.startswith("flow.") else 1e-2)
    assert optimizer.optim_objs[guide.affine.packed].param_groups[0]["clip_norm"] == 3.0


def test_recommended_optimizer_holds_through_the_annealing(device, dtype):
    """With ``hold_steps=h`` every step size stays at its start for the first h SVI steps, then
    falls by the same factor each step to the start / ``decay`` at step ``num_steps``."""
    model, _, _, _ = gaussian_problem(device, dtype)
    guide = _small_guide(model, "iaf")
    num_steps, hold, decay = 12, 5, 50.0
    optimizer = recommended_optimizer(guide, num_steps, hold_steps=hold)
    svi = SVI(model, guide, optimizer, FlowELBO(num_particles=2, vectorize_particles=True,
                                                anneal_steps=hold))
    rate = decay ** (-1 / (num_steps - hold))
    for step in range(1, num_steps + 1):
        svi.step()
        for name, lr in _lrs(optimizer, guide).items():
            start = 3e-3 if name.startswith("flow.") else 5e-2
            want = start * rate ** max(0, step - hold)
            assert math.isclose(lr, want, rel_tol=1e-9), (step, name)
    state = optimizer.get_state()  # the count left travels with the optimizer's state
    assert all(s["param_groups"][0]["hold"] == 0 for s in state.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=10, hold_steps=10), "hold_steps"), (dict(num_steps=10, hold_steps=-1),
                                                        "hold_steps"),
    (dict(num_steps=0), "num_steps"), (dict(num_steps=2.5), "num_steps"),
    (dict(num_steps=10, decay=0.5), "decay"), (dict(num_steps=10, decay=math.inf), "decay"),
    (dict(num_steps=10, clip_norm=0.0), "clip_norm"), (dict(num_steps=10, lr=-1.0), "lr"),
    (dict(num_steps=10, flow_lr=0.0), "flow_lr"),
])
def test_recommended_optimizer_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recommended_optimizer("iaf", **kwargs)
