"""Pareto-smoothed importance sampling: k-hat against known tail indices, its verdict, a
mean-field guide flagged on the banana, and importance resampling against Stan reference draws
(eight schools, posteriordb)."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows import diagnostics as dg

pytestmark = pytest.mark.usefixtures("fresh_param_store")


def test_psis_handles_uniform_and_bad_weights():
    lw, k = dg.psis(np.full(100, -3.0))
    assert k == -math.inf and np.allclose(np.exp(lw), 0.01)
    with pytest.raises(ValueError):
        dg.psis(np.array([0.0]))
    with pytest.raises(ValueError):
        dg.psis(np.full(10, -np.inf))


@pytest.mark.parametrize("k", [0.3, 0.6, 0.9])
def test_khat_recovers_the_tail_index_of_pareto_weights(k):
    """w = exp(k E), E ~ Exponential(1), is Pareto with tail index k: P(w > t) = t^(-1/k). One
    k-hat of 20000 weights has sd about 0.1 at k = 0.9; the mean of 8 has about 0.03."""
    rng = np.random.default_rng(1)
    khats = []
    for _ in range(8):
        smoothed, khat = dg.psis(k * rng.exponential(size=20000))
        assert abs(np.logaddexp.reduce(smoothed)) < 1e-9  # normalized
        khats.append(khat)
    assert abs(np.mean(khats) - k) < 0.1


def test_khat_verdict_thresholds():
    assert [dg.khat_verdict(k) for k in (0.49, 0.5, 0.7, 0.71, math.nan)] == [
        "good", "usable", "usable", "do not trust", "unknown"]


def banana(b, sd):
    x0 = pyro.sample("x0", dist.Normal(b.new_zeros(()), sd))
    pyro.sample("x1", dist.Normal(b * (x0**2 - sd**2), b.new_ones(())))


def test_mean_field_guide_on_the_banana_is_flagged(device, dtype, bench_data):
    target = json.load(open(os.path.join(bench_data, "synthetic", "targets.json")))
    spec = target["banana2d_b0.1"]
    assert spec["log_density"] == "N(x0|0,10) + N(x1|0.1*(x0^2-100),1)"
    sd = torch.tensor(spec["true_sd"][0], device=device, dtype=dtype)  # 10 is the sd of x0
    b = torch.tensor(0.1, device=device, dtype=dtype)
    draws = np.load(os.path.join(bench_data, "synthetic",
                                 "banana2d_b0.1_exact_draws.npz"))["draws"]
    np.testing.assert_allclose(draws.std(0), spec["true_sd"], rtol=0.05)  # the model we wrote

    guide = AutoNormal(banana)
    svi = SVI(banana, guide, pyro.optim.Adam({"lr": 0.1}),
              Trace_ELBO(num_particles=4, vectorize_particles=True))
    losses = [svi.step(b, sd) for _ in range(200)]
    khat = dg.psis_khat(banana, guide, b, sd, num_samples=20000)
    assert khat > 0.7 and dg.khat_verdict(khat) == "do not trust"
    report = dg.vi_report(banana, guide, b, sd, num_samples=20000, elbo_trace=-np.array(losses))
    assert report.khat > 0.7 and report.convergence is not None
    assert "do not trust" in str(report) and "ELBO trace" in str(report)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resampled = dg.importance_resample(banana, guide, b, sd, num_samples=20000)
    warned = any("k-hat" in str(w.message) for w in caught)
    assert warned == (resampled.posterior.attrs["pareto_k"] > 0.7)  # its own k-hat estimate


def eight_schools(sigma, y):
    zero = y.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, zero + 5))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + 5))
    with pyro.plate("school", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(zero, zero + 1))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_importance_resampling_corrects_a_too_narrow_guide(device, dtype, bench_data):
    """Eight schools (non-centered) against Stan's reference draws: a mean-field guide at the
    posterior's centre with 0.75 times its sd, resampled."""
    folder = os.path.join(bench_data, "posteriordb",
                          "eight_schools-eight_schools_noncentered")
    data = json.load(open(os.path.join(folder, "data.json")))
    ref = np.load(os.path.join(folder, "reference_draws.npz"))
    draws = ref["draws"].reshape(-1, 10)
    assert list(ref["names"][8:]) == ["mu", "tau"]
    theta, mu, tau = draws[:, :8], draws[:, 8], draws[:, 9]
    y = torch.tensor(data["y"], device=device, dtype=dtype)
    sigma = torch.tensor(data["sigma"], device=device, dtype=dtype)

    theta_trans = (theta - mu[:, None]) / tau[:, None]
    unconstrained = {"mu": mu, "tau": np.log(tau), "theta_trans": theta_trans}

    def mean_field_guide(spread: float):
        """The posterior's centre (unconstrained scale), ``spread`` times its sd."""
        guide = AutoNormal(eight_schools)
        guide(sigma, y)
        with torch.no_grad():
            for name, v in unconstrained.items():
                setattr(guide.locs, name, y.new_tensor(v.mean(0)))
                setattr(guide.scales, name, y.new_tensor(spread * v.std(0)))
        return guide

    guide = mean_field_guide(0.75)
    reference = np.column_stack(list(unconstrained.values()))

    def moments(idata):
        """Standardized mean error and log sd ratio against the reference draws, per parameter,
        on the unconstrained scale, where the guide is exactly 0.75 too narrow."""
        p = idata.posterior
        x = np.column_stack([p["mu"].values[0], np.log(p["tau"].values[0]),
                             p["theta_trans"].values[0]])
        return ((x.mean(0) - reference.mean(0)) / reference.std(0),
                np.log(x.std(0) / reference.std(0)))

    guide_mean, guide_log_sd = moments(dg.to_inference_data(eight_schools, guide, sigma, y,
                                                            num_samples=4000))
    with warnings.catch_warnings():  # k-hat may exceed 0.7 here; the moments still improve
        warnings.simplefilter("ignore", UserWarning)
        resampled = dg.importance_resample(eight_schools, guide, sigma, y, num_samples=16000,
                                           num_draws=4000)
    is_mean, is_log_sd = moments(resampled)
    assert guide_log_sd.mean() < -0.2  # the guide is too narrow ...
    assert np.abs(is_log_sd).mean() < 0.5 * np.abs(guide_log_sd).mean()  # ... resampling widens
    assert np.abs(is_mean).mean() < 0.15
    assert resampled.posterior.attrs["pareto_k"] < 1.0
    assert resampled.posterior.attrs["ess"] > 100
    assert resampled.posterior["theta"].dims == ("chain", "draw", "school")
    # Exact log evidence (README): -31.3113; every ELBO lies below it.
    report = dg.vi_report(eight_schools, guide, sigma, y, num_samples=4000)
    assert report.elbo + 3 * report.elbo_se < -31.3113
