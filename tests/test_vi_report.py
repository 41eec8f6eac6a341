"""The VI report: ELBO, log evidence and importance ESS against closed forms, the ELBO trace's
convergence rule, and the report as a table, a dict and a figure."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import data, exact, exact_guide, linear_gaussian, log_tol, mvn_guide

from pyroflows import diagnostics as dg

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("fresh_param_store")


def test_ess_and_elbo_match_closed_forms():
    """p = N(0, 1), q = N(0, s^2): E_q[w^2] = s^2 / sqrt(2 s^2 - 1), ELBO = -KL(q || p)."""
    s = 1.3

    def model():
        pyro.sample("x", dist.Normal(torch.tensor(0.0), torch.tensor(1.0)))

    def guide():
        pyro.sample("x", dist.Normal(torch.tensor(0.0), torch.tensor(s)))

    report = dg.vi_report(model, guide, num_samples=8000)
    assert abs(report.ess_fraction - math.sqrt(2 * s**2 - 1) / s**2) < 0.03
    kl = -math.log(s) + (s**2 - 1) / 2
    assert abs(report.elbo + kl) < 4 * report.elbo_se
    assert abs(report.log_evidence) < 0.02 and report.khat_verdict == "good"


def test_elbo_and_evidence_of_an_inexact_guide(device, dtype):
    """q = N(m + 0.3 L e_1, 1.3 S) around the exact posterior N(m, S = L L^T): the weights are
    bounded, ELBO = log Z - KL(q || p) in closed form, and log mean w estimates log Z."""
    y = data(device, dtype)
    mean, cov, log_z = exact(y.cpu().double().numpy())
    q_mean, q_cov = mean + 0.3 * np.linalg.cholesky(cov)[:, 0], 1.3 * cov
    guide = mvn_guide(y, q_mean, q_cov)
    precision = np.linalg.inv(cov)
    delta = q_mean - mean
    kl = 0.5 * (np.trace(precision @ q_cov) + delta @ precision @ delta - 3
                + np.linalg.slogdet(cov)[1] - np.linalg.slogdet(q_cov)[1])
    report = dg.vi_report(linear_gaussian, guide, y, num_samples=4000)
    assert abs(report.elbo - (log_z - kl)) < 4 * report.elbo_se + 10 * log_tol(dtype)
    assert abs(report.log_evidence - log_z) < 0.05
    assert report.khat < 0.5 and 0.5 < report.ess_fraction < 0.99


def test_elbo_convergence_rule():
    gen = np.random.default_rng(0)
    noise = gen.normal(0, 1.0, 400)
    flat = dg.elbo_convergence(noise - 50)
    assert flat.verdict == "converged" and flat.window == 40
    step = noise.copy()
    step[-40:] += 5.0  # the last 10% jump by 5 nats
    rising = dg.elbo_convergence(step)
    assert rising.verdict == "still rising" and abs(rising.difference - 5.0) < 0.6
    assert 0.15 < rising.standard_error < 0.3  # sqrt(1/40 + 1/40) = 0.22
    assert dg.elbo_convergence(-step).verdict == "falling"
    assert dg.elbo_convergence(noise[:15]).verdict == "too short"
    assert dg.elbo_convergence(torch.tensor(noise)).verdict == "converged"


def test_vi_report_table_dict_and_plot(device, dtype):
    import matplotlib.pyplot as plt

    y = data(device, dtype)
    guide = exact_guide(y)
    log_z = exact(y.cpu().double().numpy())[2]
    trace = log_z - 30 * np.exp(-np.arange(300) / 20)
    report = dg.vi_report(linear_gaussian, guide, y, num_samples=1000, elbo_trace=trace)
    numbers = report.to_dict()
    assert numbers["khat_verdict"] == "good" and numbers["convergence"] == "converged"
    assert abs(numbers["elbo"] - log_z) < log_tol(dtype) * 10
    assert abs(numbers["log_evidence"] - log_z) < log_tol(dtype) * 10
    assert numbers["ess"] == pytest.approx(1000, rel=1e-3)
    assert numbers["guide"] == "AutoMultivariateNormal"
    assert numbers["verdict"] == "good" and numbers["log_weight_spread"] < 0.05
    text = str(report)
    for word in ("ELBO", "k-hat", "good", "ESS", "converged", "spread", "verdict"):
        assert word in text
    fig = report.plot()
    assert len(fig.axes) == 3
    plt.close(fig)
    fig = dg.vi_report(linear_gaussian, guide, y, num_samples=200).plot()  # no trace given
    plt.close(fig)


def test_vi_report_plot_clips_early_huge_losses(device, dtype):
    """A trace whose first steps are 1e6 nats down: the axis shows the converged part (the
    window means of the convergence check lie inside it, spread over a visible range)."""
    import matplotlib.pyplot as plt

    y = data(device, dtype)
    guide = exact_guide(y)
    rng = np.random.default_rng(0)
    trace = -10.0 + 0.1 * rng.standard_normal(500)
    trace[:10] = -1e6 * np.exp(-np.arange(10.0))
    report = dg.vi_report(linear_gaussian, guide, y, num_samples=200, elbo_trace=trace)
    fig = report.plot()
    lo, hi = fig.axes[0].get_ylim()
    assert trace[10:].max() <= hi < -9 and -11 < lo <= np.percentile(trace, 5)
    assert "below the axis" in fig.axes[0].get_title()
    plt.close(fig)
    # a trace without an early blow-up keeps matplotlib's own limits
    smooth = -10 - 30 * np.exp(-np.arange(500) / 20)
    assert dg.elbo_trace_ylim(smooth) is None
    fig = dg.vi_report(linear_gaussian, guide, y, num_samples=200, elbo_trace=smooth).plot()
    lo, hi = fig.axes[0].get_ylim()
    assert lo <= smooth.min() and hi >= smooth.max()
    plt.close(fig)


def _normal_guide(loc: float, scale: float, dim: int, device, dtype):
    def guide():
        pyro.sample("x", dist.Normal(torch.tensor(loc, device=device, dtype=dtype),
                                     scale).expand([dim]).to_event(1))
    return guide


@pytest.mark.parametrize("loc, scale, verdict", [
    (0.0, 1.0, "good"),  # exact: constant weights, k-hat -inf
    (1.5, 1.0, "poor"),  # KL 4.5 nats: the bulk's log weights spread ~ sqrt(4 * 1.5^2) = 3
    (0.0, 0.5, "poor"),  # too narrow: KL 1.1 nats
])
def test_verdict_of_a_normal_guide_on_a_normal_posterior(loc, scale, verdict, device, dtype):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros((), device=device, dtype=dtype), 1.0)
                    .expand([4]).to_event(1))

    pyro.set_rng_seed(0)
    report = dg.vi_report(model, _normal_guide(loc, scale, 4, device, dtype), num_samples=4000)
    assert report.verdict == verdict, str(report)


def test_verdict_tells_light_tails_from_a_poor_approximation(device, dtype):
    """A normal guide of a Student t(2) posterior: its bulk is close (log weights spread about
    0.2 nats, against 3 for a shifted guide) but the posterior's tails are far heavier, so k-hat
    is above 0.7: "tails too light", not "poor"."""
    def model():
        pyro.sample("x", dist.StudentT(2.0, torch.zeros((), device=device, dtype=dtype), 1.0)
                    .expand([4]).to_event(1))

    pyro.set_rng_seed(0)
    report = dg.vi_report(model, _normal_guide(0.0, 1.0, 4, device, dtype), num_samples=4000)
    assert report.khat > 0.7 and report.log_weight_spread < 0.35, str(report)
    assert report.verdict == "tails too light" and "studentt" in report.verdict_reason


def test_robust_spread_is_the_bulks_standard_deviation():
    rng = np.random.default_rng(1)
    lw = rng.normal(3.0, 0.8, 200000)
    assert dg.robust_spread(lw) == pytest.approx(0.8, rel=0.02)
    lw[:100] = 1e3  # the largest weights leave it alone; the standard deviation is ruined
    assert dg.robust_spread(lw) == pytest.approx(0.8, rel=0.02) and lw.std() > 10
    assert np.isnan(dg.robust_spread(np.array([1.0, np.nan])))
    assert dg.approximation_verdict(float("nan"), 0.1)[0] == "unknown"
