"""Log importance weights log p(x, z) - log q(z) of guide draws, against closed-form evidence
and against model and guide densities computed outside Pyro's trace machinery."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import (
    COUPLING,
    NOISE_SD,
    PRIOR_MEAN,
    PRIOR_SD,
    data,
    exact,
    exact_guide,
    linear_gaussian,
    log_tol,
)
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from scipy import stats

from pyroflows import diagnostics as dg

pytestmark = pytest.mark.usefixtures("fresh_param_store")


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_exact_guide_log_weights_are_the_log_evidence(device, dtype, chunk_size):
    y = data(device, dtype)
    guide = exact_guide(y)
    log_z = exact(y.cpu().double().numpy())[2]
    lw = dg.log_importance_weights(linear_gaussian, guide, y, num_samples=100,
                                   chunk_size=chunk_size)
    assert lw.shape == (100,) and lw.device.type == y.device.type
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, rtol=0, atol=log_tol(dtype))
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
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, atol=log_tol(dtype))
    report = dg.vi_report(model, guide, y, num_samples=500)
    assert report.khat_verdict == "good" and report.ess_fraction > 0.99
    assert abs(report.elbo - log_z) < 10 * log_tol(dtype) and report.elbo_se < 1e-2


def _random_guide(kind: str, y: torch.Tensor):
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
    y = data(device, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # AutoIAFNormal makes its network and base in this dtype
    try:
        guide = _random_guide(kind, y)
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
    tol = {"atol": log_tol(dtype), "rtol": 1e-10 if dtype == torch.float64 else 1e-5}
    np.testing.assert_allclose(lp, log_p, **tol)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], log_p - log_q, **tol)


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
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, atol=log_tol(dtype))
    idata = dg.to_inference_data(model, guide, y, num_samples=200, posterior_predictive=True)
    assert idata.posterior_predictive["y"].shape == (1, 200)
    assert (idata.posterior["const"].values == [1.0, 2.0, 3.0]).all()
    assert idata.posterior["const"].dims == ("chain", "draw", "const_dim_0")


def test_point_mass_guide_is_refused(device, dtype):
    y = data(device, dtype)
    with pytest.raises(ValueError, match="point mass"):
        dg.psis_khat(linear_gaussian, AutoDelta(linear_gaussian), y, num_samples=10)
