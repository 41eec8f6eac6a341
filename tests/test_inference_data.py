"""Guide draws as ArviZ InferenceData: dims named after the plates, draws on the constrained
scale from the guide's own distribution, posterior predictive data sets, and ArviZ's summary
and plots working on the result as it comes."""

from __future__ import annotations

import math

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import data, exact_guide, linear_gaussian, log_tol
from pyro.infer.autoguide import AutoNormal
from scipy import stats

from pyroflows import diagnostics as dg

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("fresh_param_store")


def nested(y):
    zero, one = y.new_zeros(()), y.new_ones(())
    scale = pyro.sample("scale", dist.HalfNormal(one))
    w = pyro.sample("w", dist.Dirichlet(one.expand(3)))
    with pyro.plate("groups", 3, dim=-2):
        g = pyro.sample("g", dist.Normal(zero, one))
        with pyro.plate("items", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(g + w[..., 0], one))
            pyro.sample("y", dist.Normal(z, scale), obs=y)
    pyro.deterministic("total", z.sum((-1, -2)))


def test_inference_data_dims_shapes_and_arviz(device, dtype):
    y = torch.linspace(-1, 1, 12, device=device, dtype=dtype).reshape(3, 4)
    guide = AutoNormal(nested)
    s = 300
    idata = dg.to_inference_data(nested, guide, y, num_samples=s, posterior_predictive=True)
    post = idata.posterior
    expected = {
        "scale": (("chain", "draw"), (1, s)),
        "w": (("chain", "draw", "w_dim_0"), (1, s, 3)),
        "g": (("chain", "draw", "groups"), (1, s, 3)),
        "z": (("chain", "draw", "groups", "items"), (1, s, 3, 4)),
        "total": (("chain", "draw"), (1, s)),
    }
    assert set(post.data_vars) == set(expected)
    for name, (dims, shape) in expected.items():
        assert post[name].dims == dims and post[name].shape == shape, name
    # Constrained scale: positive scale, w on the simplex; the deterministic site agrees.
    assert (post["scale"].values > 0).all() and (post["w"].values > 0).all()
    np.testing.assert_allclose(post["w"].values.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(post["total"].values, post["z"].values.sum((-1, -2)),
                               rtol=1e-5, atol=1e-4)
    # Draws come from the guide: scale = exp(Normal(loc, sd)) on the unconstrained scale.
    log_scale = np.log(post["scale"].values.astype(np.float64))
    loc, sd = guide.locs.scale.item(), guide.scales.scale.item()
    assert abs(log_scale.mean() - loc) < 4 * sd / math.sqrt(s)
    assert abs(log_scale.std() / sd - 1) < 0.15

    obs = idata.observed_data["y"]
    assert obs.dims == ("groups", "items")
    np.testing.assert_array_equal(obs.values, y.cpu().numpy())
    pp = idata.posterior_predictive["y"]
    assert pp.dims == ("chain", "draw", "groups", "items") and pp.shape == (1, s, 3, 4)
    # One data set per posterior draw: y_rep | z, scale ~ N(z, scale).
    resid = (pp.values - post["z"].values) / post["scale"].values[..., None, None]
    assert abs(resid.mean()) < 0.08 and abs(resid.std() - 1) < 0.06
    assert idata.sample_stats["lp"].shape == (1, s)

    summary = az.summary(idata)
    assert len(summary) == 1 + 3 + 3 + 12 + 1


def test_arviz_plots_without_extra_steps(device, dtype):
    import matplotlib.pyplot as plt

    y = data(device, dtype)
    idata = dg.to_inference_data(linear_gaussian, exact_guide(y), y, num_samples=200)
    assert az.plot_posterior(idata).size == 3
    az.plot_pair(idata)
    plt.close("all")


def test_sites_of_plain_torch_distributions(device, dtype):
    """Model sites of plain ``torch.distributions`` (no ``event_dim``): Normal-Normal, whose
    exact guide's log weights are the closed-form log evidence N(y | 0, I + 1 1^T)."""
    y = torch.tensor([0.3, -0.2, 1.1, 0.6], device=device, dtype=dtype)
    n, s = len(y), 400

    def model(y):
        x = pyro.sample("x", torch.distributions.Normal(y.new_zeros(()), y.new_ones(())))
        with pyro.plate("data", len(y)):
            pyro.sample("y", torch.distributions.Normal(x, y.new_ones(())), obs=y)

    def guide(y):  # the exact posterior N(sum y / (n + 1), 1 / (n + 1))
        pyro.sample("x", dist.Normal(y.sum() / (n + 1), y.new_tensor(1 / (n + 1)).sqrt()))

    idata = dg.to_inference_data(model, guide, y, num_samples=s)
    y_np = y.cpu().double().numpy()
    log_z = stats.multivariate_normal(np.zeros(n), np.eye(n) + 1).logpdf(y_np)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], log_z,
                               atol=log_tol(dtype))
    x = idata.posterior["x"]
    assert x.dims == ("chain", "draw") and x.shape == (1, s)
    assert abs(x.values.mean() - y_np.sum() / (n + 1)) < 4 / math.sqrt((n + 1) * s)
    assert idata.observed_data["y"].dims == ("data",)


def test_posterior_predictive_of_a_model_with_a_deterministic_site(device, dtype):
    """``pyro.deterministic`` is an observed Delta site to Pyro: unconditioned with the data, it
    was drawn in the draws' plate and gained their dims twice (a ValueError on any model with
    one)."""
    y = torch.zeros(10, device=device, dtype=dtype)

    def model(y):
        z = pyro.sample("z", dist.Normal(y.new_zeros(()), 3.0))
        loc = pyro.deterministic("loc", 2 * z)
        with pyro.plate("data", 10):
            pyro.sample("obs", dist.Normal(loc, 1e-6), obs=y)

    def guide(y):
        pyro.sample("z", dist.Normal(y.new_tensor(0.1), y.new_tensor(0.5)))

    idata = dg.to_inference_data(model, guide, y, num_samples=16, posterior_predictive=True)
    simulated = idata.posterior_predictive["obs"].values
    assert simulated.shape == (1, 16, 10)
    expected = np.broadcast_to(2 * idata.posterior["z"].values[..., None], simulated.shape)
    np.testing.assert_allclose(simulated, expected, atol=1e-4)
