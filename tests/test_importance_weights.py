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


def _conjugate(device, dtype, size: int, subsample: int):
    """A normal mean with a subsampled plate of ``size`` rows, and its exact posterior guide
    and log evidence."""
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(size, generator=gen, dtype=torch.float64) + 1.0).to(device, dtype)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), y.new_tensor(10.0)))
        with pyro.plate("data", size, subsample_size=subsample) as rows:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[rows])

    precision = 1 / 100 + size
    loc = float(y.double().sum()) / precision

    def guide(y):
        pyro.sample("mu", dist.Normal(y.new_tensor(loc), y.new_tensor(precision ** -0.5)))

    y64 = y.cpu().double().numpy()
    log_z = stats.multivariate_normal(np.zeros(size), np.eye(size) + 100.0).logpdf(y64)
    return model, guide, y, log_z


@pytest.mark.parametrize("size,subsample", [(103, 10), (50, 7), (12, 12)])
def test_subsampled_plate_is_scored_on_every_row(device, dtype, size, subsample):
    """Each weight of the exact posterior guide is the log evidence of all rows, not a
    minibatch's estimate (the last window's repeated rows masked out); before, k-hat of this
    exact guide was 2.0 at 100 of 1000 rows."""
    model, guide, y, log_z = _conjugate(device, dtype, size, subsample)
    lw = dg.log_importance_weights(model, guide, y, num_samples=50, chunk_size=20)
    np.testing.assert_allclose(lw.cpu().double().numpy(), log_z, atol=10 * log_tol(dtype),
                               rtol=1e-5)


def test_subsampled_plate_with_local_latents_warns(device, dtype):
    """Local latents inside a subsampled plate have one subsample's values: the weights stay
    one minibatch's, and the user is told."""
    y = torch.arange(20.0, device=device, dtype=dtype)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 10.0))
        with pyro.plate("data", 20, subsample_size=5) as rows:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[rows])

    guide = AutoNormal(model)
    with pytest.warns(UserWarning, match="one random subsample") as caught:
        lw = dg.log_importance_weights(model, guide, y, num_samples=8)
    assert lw.shape == (8,) and torch.isfinite(lw).all()
    assert caught[0].filename == __file__  # (the caller's line, not one inside pyroflows)


_WEIGHTS = (0.3, 0.7)
_SHIFTS = (-2.0, 2.0)


def _mixture_data(device, dtype):
    gen = torch.Generator().manual_seed(1)
    y = torch.cat([torch.randn(9, generator=gen, dtype=torch.float64) - 2,
                   torch.randn(11, generator=gen, dtype=torch.float64) + 2])
    return y.to(device, dtype)


def _mixture_log_joint(y, z, local: bool):
    """log p(y, z) with the assignments summed out by hand, at each z of (S,), in float64."""
    y, z = y.cpu().double(), z.cpu().double()
    weights, shifts = torch.tensor(_WEIGHTS).double(), torch.tensor(_SHIFTS).double()
    comp = dist.Normal(z[:, None, None] + shifts, 1.0).log_prob(y[None, :, None])  # (S, N, K)
    if local:  # one assignment per row
        like = torch.logsumexp(weights.log() + comp, -1).sum(-1)
    else:  # one assignment for all rows
        like = torch.logsumexp(weights.log() + comp.sum(1), -1)
    return dist.Normal(0.0, 3.0).log_prob(z) + like


@pytest.mark.parametrize("case", ["local", "local, subsampled", "global"])
def test_enumerated_sites_are_summed_out(device, dtype, case):
    """A discrete site enumerated in parallel is summed out of log p(x, z), as TraceEnum_ELBO
    does, where it used to be drawn from its prior (a mixture's weights then spread by tens of
    nats, so k-hat said 'do not trust' of any guide); it has no draws in the posterior."""
    y = _mixture_data(device, dtype)
    weights = y.new_tensor(_WEIGHTS)
    shifts = y.new_tensor(_SHIFTS)
    subsample = 6 if case == "local, subsampled" else None

    def model(y):
        z = pyro.sample("z", dist.Normal(y.new_zeros(()), 3.0))
        if case == "global":
            k = pyro.sample("k", dist.Categorical(weights), infer={"enumerate": "parallel"})
            with pyro.plate("data", len(y)):
                pyro.sample("obs", dist.Normal(z + shifts[k], 1.0), obs=y)
        else:
            with pyro.plate("data", len(y), subsample_size=subsample) as rows:
                k = pyro.sample("k", dist.Categorical(weights), infer={"enumerate": "parallel"})
                pyro.sample("obs", dist.Normal(z + shifts[k], 1.0), obs=y[rows])

    def guide(y):
        pyro.sample("z", dist.Normal(y.new_tensor(0.1), y.new_tensor(0.5)))

    idata = dg.to_inference_data(model, guide, y, num_samples=40)
    assert "k" not in idata.posterior
    z = torch.as_tensor(idata.posterior["z"].values[0])
    log_q = dist.Normal(0.1, 0.5).log_prob(z.double())
    expected = (_mixture_log_joint(y, z, local=case != "global") - log_q).numpy()
    tol = {"atol": 10 * log_tol(dtype), "rtol": 1e-5}
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], expected, **tol)


def test_a_site_drawn_from_its_prior_after_an_enumerated_one_is_refused(device, dtype):
    y = _mixture_data(device, dtype)

    def model(y):
        k = pyro.sample("k", dist.Categorical(y.new_tensor(_WEIGHTS)),
                        infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(y.new_tensor(_SHIFTS)[k], 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y)

    def guide(y):  # samples neither k nor z
        pass

    with pytest.raises(ValueError, match="'z' is neither sampled by the guide nor enumerated"):
        dg.log_importance_weights(model, guide, y, num_samples=4)


def test_deterministic_sites_of_enumerated_ones_are_left_out_with_a_warning(device, dtype):
    """Their values hold the enumerated support, not a value per draw: ArviZ got them in
    shapes such as (1, 16, 1, 2, 16, 1)."""
    y = _mixture_data(device, dtype)
    shifts = y.new_tensor(_SHIFTS)

    def model(y):
        z = pyro.sample("z", dist.Normal(y.new_zeros(()), 3.0))
        pyro.deterministic("z2", 2 * z)
        with pyro.plate("data", len(y)):
            k = pyro.sample("k", dist.Categorical(y.new_tensor(_WEIGHTS)),
                            infer={"enumerate": "parallel"})
            loc = pyro.deterministic("loc", z + shifts[k])
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)

    def guide(y):
        pyro.sample("z", dist.Normal(y.new_tensor(0.1), y.new_tensor(0.5)))

    with pytest.warns(UserWarning, match=r"deterministic sites \['loc'\] depend on enumerated"):
        idata = dg.to_inference_data(model, guide, y, num_samples=16)
    assert "loc" not in idata.posterior and idata.posterior["z2"].shape == (1, 16)


def test_a_global_enumerated_site_with_a_subsampled_plate_is_named(device, dtype):
    """Its sum over every row does not split into windows; Pyro's scale error said nothing."""
    y = _mixture_data(device, dtype)

    def model(y):
        k = pyro.sample("k", dist.Categorical(y.new_tensor(_WEIGHTS)),
                        infer={"enumerate": "parallel"})
        with pyro.plate("data", len(y), subsample_size=5) as rows:
            pyro.sample("obs", dist.Normal(y.new_tensor(_SHIFTS)[k], 1.0), obs=y[rows])

    def guide(y):
        pass

    with pytest.raises(ValueError, match="score this model with its whole data"):
        dg.log_importance_weights(model, guide, y, num_samples=4)
