"""Diagnostics against independent truth: closed-form evidence of a conjugate model, closed-form
importance-sampling ESS, hand-computed model and guide densities, the banana target, and Stan
reference draws (eight schools, posteriordb)."""

from __future__ import annotations

import json
import math
import os
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from scipy import stats

from pyroflows import diagnostics as dg

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _log_tol(dtype: torch.dtype) -> float:
    """Absolute tolerance for a log density of size ~50 summed in ``dtype``."""
    return 1e-8 if dtype == torch.float64 else 2e-3


# ---------------------------------------------------------------------------------------------
# A linear-Gaussian model with a plate, a vector site and a positive site: the posterior of
# theta = (loc_1, loc_2, log lam) is Gaussian, so everything is known in closed form.

PRIOR_MEAN = np.array([0.0, 0.0, 0.5])
PRIOR_SD = np.array([2.0, 2.0, 0.8])
COUPLING = np.array([1.0, -0.5])  # y_n = loc + COUPLING * log(lam) + noise
NOISE_SD = 0.7


def linear_gaussian(y):
    zero = y.new_zeros(())
    loc = pyro.sample("loc", dist.Normal(zero.expand(2), zero + PRIOR_SD[0]).to_event(1))
    lam = pyro.sample("lam", dist.LogNormal(zero + PRIOR_MEAN[2], zero + PRIOR_SD[2]))
    coupling = y.new_tensor(COUPLING)
    with pyro.plate("data", y.shape[0]):
        mean = loc + torch.log(lam).unsqueeze(-1) * coupling
        pyro.sample("obs", dist.Normal(mean, zero + NOISE_SD).to_event(1), obs=y)


def _design(n: int) -> np.ndarray:
    a = np.column_stack([np.eye(2), COUPLING])  # (2, 3): y_n = A theta + noise
    return np.tile(a, (n, 1))


def _exact(y: np.ndarray):
    """Posterior mean, covariance of theta and log evidence, by Gaussian algebra."""
    b = _design(len(y))
    prior_cov = np.diag(PRIOR_SD**2)
    precision = np.linalg.inv(prior_cov) + b.T @ b / NOISE_SD**2
    cov = np.linalg.inv(precision)
    mean = cov @ (np.linalg.solve(prior_cov, PRIOR_MEAN) + b.T @ y.reshape(-1) / NOISE_SD**2)
    marginal = stats.multivariate_normal(b @ PRIOR_MEAN, NOISE_SD**2 * np.eye(b.shape[0])
                                         + b @ prior_cov @ b.T)
    return mean, cov, marginal.logpdf(y.reshape(-1))


def _data(device, dtype, n: int = 12) -> torch.Tensor:
    gen = np.random.default_rng(1)
    theta = np.array([0.8, -1.2, 0.3])
    y = (_design(n) @ theta + NOISE_SD * gen.standard_normal(2 * n)).reshape(n, 2)
    return torch.tensor(y, device=device, dtype=dtype)


def _exact_mvn_guide(y):
    mean, cov, _ = _exact(y.cpu().double().numpy())
    guide = AutoMultivariateNormal(linear_gaussian)
    guide(y)  # set up the prototype; latent vector = (loc_1, loc_2, log lam)
    chol = np.linalg.cholesky(cov)
    like = guide.loc
    with torch.no_grad():
        guide.loc.copy_(like.new_tensor(mean))
        guide.scale = like.new_tensor(np.diag(chol))
        guide.scale_tril = like.new_tensor(chol / np.diag(chol)[:, None])
    return guide


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_exact_guide_log_weights_are_the_log_evidence(device, dtype, chunk_size):
    y = _data(device, dtype)
    guide = _exact_mvn_guide(y)
    log_z = _exact(y.cpu().double().numpy())[2]
    lw = dg.log_importance_weights(linear_gaussian, guide, y, num_samples=100,
                                   chunk_size=chunk_size)
    assert lw.shape == (100,) and lw.device.type == y.device.type
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, rtol=0, atol=_log_tol(dtype))
    khat = dg.psis_khat(linear_gaussian, guide, y, num_samples=2000)
    assert khat < 0.5 and dg.khat_verdict(khat) == "good"


def test_exact_custom_guide_on_a_constrained_site(device, dtype):
    """Gamma-Poisson: a hand-written guide that is the exact Gamma posterior."""
    y = torch.tensor([3.0, 0.0, 5.0, 2.0, 4.0], device=device, dtype=dtype)
    a, b = 2.0, 0.5

    def model(y):
        rate = pyro.sample("rate", dist.Gamma(y.new_tensor(a), y.new_tensor(b)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(rate), obs=y)

    def guide(y):
        pyro.sample("rate", dist.Gamma(a + y.sum(), b + len(y)))

    s, n = float(y.sum()), len(y)
    log_z = (a * math.log(b) - math.lgamma(a) + math.lgamma(a + s) - (a + s) * math.log(b + n)
             - sum(math.lgamma(float(v) + 1) for v in y))
    lw = dg.log_importance_weights(model, guide, y, num_samples=200)
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, atol=_log_tol(dtype))
    report = dg.vi_report(model, guide, y, num_samples=500)
    assert report.khat_verdict == "good" and report.ess_fraction > 0.99
    assert abs(report.elbo - log_z) < 10 * _log_tol(dtype) and report.elbo_se < 1e-2


def _guide(kind: str, y: torch.Tensor):
    model = linear_gaussian
    guide = {
        "AutoNormal": lambda: AutoNormal(model, init_scale=0.3),
        "AutoDiagonalNormal": lambda: AutoDiagonalNormal(model, init_scale=0.3),
        "AutoMultivariateNormal": lambda: AutoMultivariateNormal(model, init_scale=0.3),
        "AutoIAFNormal": lambda: AutoIAFNormal(model, hidden_dim=[8]),
    }[kind]()
    guide(y)
    guide.to(y.device)
    with torch.no_grad():  # a non-trivial guide: random parameters
        gen = torch.Generator().manual_seed(3)
        for p in guide.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    return guide


def _guide_log_q(kind: str, guide, loc: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log q of constrained draws from the guide's own distributions: q_u(u) |du/dz| with
    u = log lam, computed outside Pyro's trace machinery."""
    u = torch.log(lam)
    if kind == "AutoNormal":
        log_q_u = (dist.Normal(guide.locs.loc, guide.scales.loc).log_prob(loc).sum(-1)
                   + dist.Normal(guide.locs.lam, guide.scales.lam).log_prob(u))
    else:
        log_q_u = guide.get_posterior().log_prob(torch.cat([loc, u.unsqueeze(-1)], -1))
    return log_q_u - u


@pytest.mark.parametrize(
    "kind", ["AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal", "AutoIAFNormal"]
)
def test_log_weights_match_independent_densities(device, dtype, kind):
    """log p(x, z) by scipy and log q(z) by the guide's distribution, at the same draws."""
    y = _data(device, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # AutoIAFNormal makes its network and base in this dtype
    try:
        guide = _guide(kind, y)
        idata = dg.to_inference_data(linear_gaussian, guide, y, num_samples=64)
        loc = idata.posterior["loc"].values[0].astype(np.float64)
        lam = idata.posterior["lam"].values[0].astype(np.float64)
        with torch.no_grad():
            log_q = _guide_log_q(kind, guide, torch.as_tensor(loc).to(y),
                                 torch.as_tensor(lam).to(y)).cpu().double().numpy()
    finally:
        torch.set_default_dtype(default)
    assert loc.shape == (64, 2) and lam.shape == (64,) and (lam > 0).all()
    y_np = y.cpu().double().numpy()
    mean = loc[:, None, :] + np.log(lam)[:, None, None] * COUPLING
    log_p = (stats.norm(0, PRIOR_SD[0]).logpdf(loc).sum(-1)
             + stats.lognorm(PRIOR_SD[2], scale=math.exp(PRIOR_MEAN[2])).logpdf(lam)
             + stats.norm(mean, NOISE_SD).logpdf(y_np).sum((-1, -2)))
    lp = idata.sample_stats["lp"].values[0]
    tol = {"atol": _log_tol(dtype), "rtol": 1e-10 if dtype == torch.float64 else 1e-5}
    np.testing.assert_allclose(lp, log_p, **tol)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], log_p - log_q, **tol)


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


# ---------------------------------------------------------------------------------------------
# The banana: a mean-field guide cannot fit it


def banana(b, sd):
    x0 = pyro.sample("x0", dist.Normal(b.new_zeros(()), sd))
    pyro.sample("x1", dist.Normal(b * (x0**2 - sd**2), b.new_ones(())))


def test_mean_field_guide_on_the_banana_is_flagged(device, dtype, shared_dir):
    target = json.load(open(os.path.join(shared_dir, "bench", "synthetic", "targets.json")))
    spec = target["banana2d_b0.1"]
    assert spec["log_density"] == "N(x0|0,10) + N(x1|0.1*(x0^2-100),1)"
    sd = torch.tensor(spec["true_sd"][0], device=device, dtype=dtype)  # 10 is the sd of x0
    b = torch.tensor(0.1, device=device, dtype=dtype)
    draws = np.load(os.path.join(shared_dir, "bench", "synthetic",
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


# ---------------------------------------------------------------------------------------------
# InferenceData layout


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

    y = _data(device, dtype)
    idata = dg.to_inference_data(linear_gaussian, _exact_mvn_guide(y), y, num_samples=200)
    assert az.plot_posterior(idata).size == 3
    az.plot_pair(idata)
    plt.close("all")


def test_chunked_fallback_when_memory_runs_out(device, dtype):
    """A model that runs out of memory above 64 vectorized draws still gets all its weights."""
    y = torch.tensor(0.6, device=device, dtype=dtype)

    def model(y):
        x = pyro.sample("x", dist.Normal(y.new_zeros(()), y.new_ones(())))
        if x.dim() and x.shape[0] > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        pyro.sample("y", dist.Normal(x, y.new_ones(())), obs=y)
        pyro.deterministic("const", y.new_tensor([1.0, 2.0, 3.0]))  # the same in every draw

    def guide(y):  # the exact posterior N(y/2, 1/2)
        pyro.sample("x", dist.Normal(y / 2, y.new_tensor(0.5).sqrt()))

    lw = dg.log_importance_weights(model, guide, y, num_samples=200)
    assert lw.shape == (200,)
    log_z = stats.norm(0, math.sqrt(2)).logpdf(0.6)
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, atol=_log_tol(dtype))
    idata = dg.to_inference_data(model, guide, y, num_samples=200, posterior_predictive=True)
    assert idata.posterior_predictive["y"].shape == (1, 200)
    assert (idata.posterior["const"].values == [1.0, 2.0, 3.0]).all()
    assert idata.posterior["const"].dims == ("chain", "draw", "const_dim_0")


# ---------------------------------------------------------------------------------------------
# Importance resampling against Stan reference draws (eight schools, non-centered)


def eight_schools(sigma, y):
    zero = y.new_zeros(())
    mu = pyro.sample("mu", dist.Normal(zero, zero + 5))
    tau = pyro.sample("tau", dist.HalfCauchy(zero + 5))
    with pyro.plate("school", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(zero, zero + 1))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_importance_resampling_corrects_a_too_narrow_guide(device, dtype, shared_dir):
    folder = os.path.join(shared_dir, "bench", "posteriordb",
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


def test_elbo_and_evidence_of_an_inexact_guide(device, dtype):
    """q = N(m + 0.3 L e_1, 1.3 S) around the exact posterior N(m, S = L L^T): the weights are
    bounded, ELBO = log Z - KL(q || p) in closed form, and log mean w estimates log Z."""
    y = _data(device, dtype)
    mean, cov, log_z = _exact(y.cpu().double().numpy())
    q_mean, q_cov = mean + 0.3 * np.linalg.cholesky(cov)[:, 0], 1.3 * cov
    guide = AutoMultivariateNormal(linear_gaussian)
    guide(y)
    chol = np.linalg.cholesky(q_cov)
    with torch.no_grad():
        guide.loc.copy_(guide.loc.new_tensor(q_mean))
        guide.scale = guide.loc.new_tensor(np.diag(chol))
        guide.scale_tril = guide.loc.new_tensor(chol / np.diag(chol)[:, None])
    precision = np.linalg.inv(cov)
    delta = q_mean - mean
    kl = 0.5 * (np.trace(precision @ q_cov) + delta @ precision @ delta - 3
                + np.linalg.slogdet(cov)[1] - np.linalg.slogdet(q_cov)[1])
    report = dg.vi_report(linear_gaussian, guide, y, num_samples=4000)
    assert abs(report.elbo - (log_z - kl)) < 4 * report.elbo_se + 10 * _log_tol(dtype)
    assert abs(report.log_evidence - log_z) < 0.05
    assert report.khat < 0.5 and 0.5 < report.ess_fraction < 0.99


# ---------------------------------------------------------------------------------------------
# ELBO trace check and the report object


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

    y = _data(device, dtype)
    guide = _exact_mvn_guide(y)
    log_z = _exact(y.cpu().double().numpy())[2]
    trace = log_z - 30 * np.exp(-np.arange(300) / 20)
    report = dg.vi_report(linear_gaussian, guide, y, num_samples=1000, elbo_trace=trace)
    numbers = report.to_dict()
    assert numbers["khat_verdict"] == "good" and numbers["convergence"] == "converged"
    assert abs(numbers["elbo"] - log_z) < _log_tol(dtype) * 10
    assert abs(numbers["log_evidence"] - log_z) < _log_tol(dtype) * 10
    assert numbers["ess"] == pytest.approx(1000, rel=1e-3)
    assert numbers["guide"] == "AutoMultivariateNormal"
    text = str(report)
    for word in ("ELBO", "k-hat", "good", "ESS", "converged"):
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

    y = _data(device, dtype)
    guide = _exact_mvn_guide(y)
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


def test_point_mass_guide_is_refused(device, dtype):
    y = _data(device, dtype)
    with pytest.raises(ValueError, match="point mass"):
        dg.psis_khat(linear_gaussian, AutoDelta(linear_gaussian), y, num_samples=10)


def test_psis_handles_uniform_and_bad_weights():
    lw, k = dg.psis(np.full(100, -3.0))
    assert k == -math.inf and np.allclose(np.exp(lw), 0.01)
    with pytest.raises(ValueError):
        dg.psis(np.array([0.0]))
    with pytest.raises(ValueError):
        dg.psis(np.full(10, -np.inf))
    assert [dg.khat_verdict(k) for k in (0.49, 0.5, 0.7, 0.71, math.nan)] == [
        "good", "usable", "usable", "do not trust", "unknown"]
