"""Flow guides at the edges: a guide called with data of another size names the site and
both shapes; SVI steps with a non-finite loss or gradient are skipped, never applied (issue 19,
items 6 and 8)."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from guide_models import gaussian_problem
from pyro.infer import SVI, Trace_ELBO

from pyroflows.guides import AutoFlowGuide, AutoIAF, AutoPlanar, AutoRadial, FlowELBO

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")

GUIDES = {
    "planar": lambda model: AutoPlanar(model, num_layers=2),
    "radial": lambda model: AutoRadial(model, num_layers=2),
    "iaf": lambda model: AutoIAF(model, num_layers=2, hidden_dims=(8,)),
    "realnvp": lambda model: AutoFlowGuide(model, flow="realnvp", num_layers=2,
                                           hidden_dims=(8,)),
}


def _rows_model(runs=None):
    """A global and one local latent per row; ``runs`` counts the model's calls."""
    def model(x):
        if runs is not None:
            runs[0] += 1
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with pyro.plate("N", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model


# ---- a guide called with data of another size ------------------------------------------------

@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("how", ["call", "direct", "traced", "trace_elbo"])
def test_another_data_size_names_the_site_and_both_shapes(name, how, device, dtype):
    x50 = torch.randn(50, device=device, dtype=dtype)
    x80 = torch.randn(80, device=device, dtype=dtype)
    model = _rows_model()
    guide = GUIDES[name](model)
    assert guide(x50)["z"].shape == (50,)
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    with pytest.raises(ValueError, match=r"'z' has shape \(80,\) .* but \(50,\) where"):
        if how == "call":
            guide(x80)
        else:
            elbo = Trace_ELBO() if how == "trace_elbo" else FlowELBO(direct=how == "direct")
            SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo).step(x80)
    after = guide.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing lost
    assert guide(x50)["z"].shape == (50,)  # the set-up size still works


def test_global_latents_take_any_data_size_and_each_size_is_checked_once(device, dtype):
    """Where no latent's shape follows the data, another size is fine; the model runs once per
    new argument shape, not per call."""
    runs = [0]

    def model(x):
        runs[0] += 1
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), device=device, dtype=dtype), 1.0))
        with pyro.plate("N", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    guide = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    x50 = torch.randn(50, device=device, dtype=dtype)
    x80 = torch.randn(80, device=device, dtype=dtype)
    guide(x50)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), FlowELBO())
    svi.step(x50)
    start = runs[0]
    for _ in range(3):
        assert math.isfinite(svi.step(x80))
        assert guide(x80)["mu"].shape == ()
    assert runs[0] == start + 1 + 3  # one check of x80, then the three SVI model runs


# ---- non-finite steps are skipped ------------------------------------------------------------

# (direct path, sticking the landing layer by layer) -> the seeds whose steps go non-finite
LARGE_STEP_CASES = {"direct": (True, True, (1, 2, 4)), "traced": (False, True, (2, 5)),
                    "traced-jacobian": (False, False, (4, 15))}


@pytest.mark.parametrize("case", sorted(LARGE_STEP_CASES))
def test_the_issue_case_large_steps_leave_no_nan_parameter(case, monkeypatch):
    """AutoIAF without the Laplace start, Adam at lr=1.0 (float32, CPU): the seeds whose
    parameters turned NaN within three steps (the direct path: a finite loss with NaN
    gradients; the traced path: a non-finite step, and with the draw's whole Jacobian for
    sticking the landing, a singular Jacobian) keep finite parameters, their bad steps
    skipped and counted."""
    from pyroflows.guides import landing

    direct, layerwise, seeds = LARGE_STEP_CASES[case]
    monkeypatch.setattr(landing, "STL_LAYERWISE", layerwise)
    model = gaussian_problem("cpu", torch.float32)[0]
    for seed in seeds:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoIAF(model, laplace_init=False)
        elbo = FlowELBO(direct=direct)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1.0}), elbo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(3):
                svi.step()
        assert all(bool(torch.isfinite(p).all()) for p in guide.parameters()), seed
        assert elbo.skipped_steps > 0, seed


def _poisoned(poison, kind):
    """A Gaussian model with a factor that, while ``poison[0]``, makes the loss infinite
    ("loss") or keeps it finite with NaN gradients ("grad": d sqrt(u) at u = 0)."""
    def model_with_poison():
        z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 2.0).to_event(1))
        pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=torch.tensor(1.0, dtype=z.dtype))
        if poison[0] and kind == "loss":
            pyro.factor("poison", torch.tensor(-math.inf, dtype=z.dtype))
        elif poison[0]:
            pyro.factor("poison", ((z - z.detach()) ** 2).sqrt().sum(-1))

    return model_with_poison


@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_forced_non_finite_step_is_skipped_on_every_guide_and_path(name, direct, kind):
    poison = [False]
    model = _poisoned(poison, kind)
    guide = GUIDES[name](model)
    elbo = FlowELBO(direct=direct)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    svi.step()
    before = [p.detach().clone() for p in guide.parameters()]
    poison[0] = True
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = svi.step()
    assert math.isfinite(loss) == (kind == "grad")
    assert all(torch.equal(a, p) for a, p in zip(before, guide.parameters(), strict=True))
    assert (elbo.step_count, elbo.skipped_steps) == (1, 1)
    poison[0] = False
    assert math.isfinite(svi.step())
    assert not all(torch.equal(a, p) for a, p in zip(before, guide.parameters(), strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in guide.parameters())
    assert (elbo.step_count, elbo.skipped_steps) == (2, 1)
