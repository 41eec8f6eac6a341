"""The Laplace start's Gaussian ELBO from one vectorized model run, against the per-draw loop on
models with plates, deterministic, masked, scaled, discrete and constrained sites and models
that mix the draws."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyroflows.guides import AutoPlanar
from pyroflows.guides.laplace import LAPLACE_ELBO_DRAWS, LogDensity, gaussian_elbo

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- the Laplace start's Gaussian ELBO: vectorized run against the per-draw loop -------------
def _models(device, dtype):
    """Models that broadcast (or must be caught not to), as ``name -> (model, args)``."""
    def t(*values):
        return torch.tensor(values, device=device, dtype=dtype)

    zero, one = t(0.0), t(1.0)
    y4 = t(1.5, -0.3, 0.8, 2.1)
    y6 = t(0.2, 1.1, -0.7, 0.4, 2.0, -1.3).reshape(3, 2)
    counts = t(0.0, 2.0, 5.0, 1.0)
    flags = t(1.0, 0.0, 1.0, 1.0)
    models = {}

    def nested_auto_dims():  # plates with dim=None, nested and sequential
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        with pyro.plate("rows", 3):
            a = pyro.sample("a", dist.Normal(mu, 1.0))
            with pyro.plate("cols", 2):
                pyro.sample("y", dist.Normal(a, 0.5), obs=y6.T)
        with pyro.plate("other", 4):
            pyro.sample("w", dist.Normal(mu, 1.0), obs=y4)
    models["nested_auto_dims"] = (nested_auto_dims, ())

    def explicit_far_dim():  # an explicit dim=-3 plate: the draws' plate goes left of it
        mu = pyro.sample("mu", dist.Normal(zero, 1.0))
        with pyro.plate("data", 4, dim=-3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y4.reshape(4, 1, 1))
    models["explicit_far_dim"] = (explicit_far_dim, ())

    def deterministic():
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        tau = pyro.sample("tau", dist.HalfCauchy(one))
        pyro.deterministic("twice", 2 * mu)
        pyro.deterministic("pair", torch.stack([mu, tau], -1), event_dim=1)
        pyro.deterministic("total", mu.sum())  # a reduction, but a zero log density
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(mu, tau), obs=y4)
    models["deterministic"] = (deterministic, ())

    def obs_batch_outside_plates():  # observed batch dims with no plate (Pyro sums them)
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y4)
        pyro.sample("y2", dist.Normal(mu, 2.0), obs=y6)
    models["obs_batch_outside_plates"] = (obs_batch_outside_plates, ())

    def obs_with_draws_size():  # an unplated observation as long as the draws: lines up
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))   # with them in a vectorized run
        y = torch.linspace(-2, 2, LAPLACE_ELBO_DRAWS, device=device, dtype=dtype)
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    models["obs_with_draws_size"] = (obs_with_draws_size, ())

    def plated_and_unplated_obs():  # a plate, and an unplated (3, 2) observation
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y4)
        pyro.sample("y2", dist.Normal(mu, 1.5), obs=y6)
    models["plated_and_unplated_obs"] = (plated_and_unplated_obs, ())

    def masked_and_scaled():
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        tau = pyro.sample("tau", dist.LogNormal(zero, 0.5))
        with pyro.plate("data", 4), poutine.mask(mask=t(1, 0, 1, 1).bool()):
            pyro.sample("y", dist.Normal(mu, tau), obs=y4)
        with poutine.scale(scale=3.0), pyro.plate("data2", 4):
            pyro.sample("y2", dist.Normal(mu, 1.0), obs=y4 + 1)
        with pyro.plate("data3", 4), poutine.scale(scale=t(0.5, 1.0, 2.0, 4.0)):
            pyro.sample("y3", dist.Normal(mu, 1.0), obs=y4 - 1)
        with poutine.mask(mask=False):
            pyro.sample("ignored", dist.Normal(mu, 0.01), obs=t(100.0))
    models["masked_and_scaled"] = (masked_and_scaled, ())

    def discrete_obs():
        b = pyro.sample("b", dist.Normal(zero, 1.0).expand([2]).to_event(1))
        rate = pyro.sample("rate", dist.Gamma(2 * one, one))
        with pyro.plate("data", 4):
            pyro.sample("k", dist.Poisson(rate), obs=counts)
            pyro.sample("f", dist.Bernoulli(logits=b[..., 0] + b[..., 1] * y4), obs=flags)
    models["discrete_obs"] = (discrete_obs, ())

    def constrained():
        p = pyro.sample("p", dist.Dirichlet(t(1.0, 2.0, 3.0)))
        q = pyro.sample("q", dist.Beta(2 * one, 3 * one))
        u = pyro.sample("u", dist.Uniform(-one, 2 * one))
        with pyro.plate("data", 4):
            s = pyro.sample("s", dist.LogNormal(zero, 1.0))
            pyro.sample("y", dist.Normal(u + q * s, 1.0), obs=y4)
        pyro.sample("c", dist.Categorical(probs=p), obs=t(2.0))
    models["constrained"] = (constrained, ())

    def factor_per_draw():
        x = pyro.sample("x", dist.Normal(zero, 1.0).expand([3]).to_event(1))
        pyro.factor("f", -0.5 * (x - 1).square().sum(-1))
    models["factor_per_draw"] = (factor_per_draw, ())

    def factor_sums_everything():  # mixes the draws: the sum runs over them too
        x = pyro.sample("x", dist.Normal(zero, 1.0).expand([3]).to_event(1))
        pyro.factor("f", -0.5 * (x - 1).square().sum())
    models["factor_sums_everything"] = (factor_sums_everything, ())

    def mean_of_latent():  # mixes the draws: the mean of a scalar latent
        x = pyro.sample("x", dist.Normal(zero, 1.0))
        pyro.sample("y", dist.Normal(x.mean(), 1.0), obs=t(0.7))
    models["mean_of_latent"] = (mean_of_latent, ())

    def unplated_latent_batch():  # a latent with a batch dim and no plate (no to_event)
        w = pyro.sample("w", dist.Normal(torch.zeros(3, device=device, dtype=dtype), 1.0))
        pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=t(0.3))
    models["unplated_latent_batch"] = (unplated_latent_batch, ())

    def raw_torch_obs():  # torch.distributions (no event_dim) for observations
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        pyro.sample("y", torch.distributions.Normal(mu, 1.0), obs=y4)
        with pyro.plate("data", 3):
            pyro.sample("y2", torch.distributions.Normal(mu, 1.5), obs=y6[:, 0])
    models["raw_torch_obs"] = (raw_torch_obs, ())

    def python_branch(limit=1.0):  # branches in Python on a latent's value
        x = pyro.sample("x", dist.Normal(zero, 1.0))
        scale = 1.0 if float(x) < limit else 2.0
        pyro.sample("y", dist.Normal(x, scale), obs=t(0.3))
    models["python_branch"] = (python_branch, ())
    return models


_MODEL_NAMES = list(_models("cpu", torch.float64))


# the vectorized run must be used for these (the speed claim); the others may fall back
_BATCHED = {"nested_auto_dims", "explicit_far_dim", "deterministic", "masked_and_scaled",
            "discrete_obs", "constrained", "factor_per_draw", "obs_batch_outside_plates",
            "plated_and_unplated_obs", "obs_with_draws_size", "raw_torch_obs"}


@pytest.mark.parametrize("name", _MODEL_NAMES)
def test_laplace_elbo_vectorized_equals_per_draw_loop(name, device, dtype, monkeypatch):
    """_gaussian_elbo (one vectorized run where the model broadcasts) against the per-draw
    loop it replaced (forced: the vectorized path disabled) and the plain per-draw log
    densities averaged here; the models the vectorized run can read must not fall back."""
    model, args = _models(device, dtype)[name]
    guide = AutoPlanar(model, num_layers=1, laplace_init=False)
    with pyro.validation_enabled(False):
        guide(*args)
    d = guide.latent_dim
    gen = torch.Generator().manual_seed(3)
    loc = (0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(device, dtype)
    a = 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(a @ a.T + 0.2 * torch.eye(d, dtype=torch.float64))
    scale_tril = scale_tril.to(device, dtype)
    eps = torch.randn(LAPLACE_ELBO_DRAWS, d, generator=gen, dtype=torch.float64).to(device, dtype)
    batched_results = []
    original = LogDensity.batched

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        batched_results.append(out)
        return out

    with torch.no_grad(), pyro.validation_enabled(False):
        monkeypatch.setattr(LogDensity, "batched", spy)
        got = gaussian_elbo(LogDensity(model, guide._unpack_latent, args, {}), loc, scale_tril,
                            eps)
        monkeypatch.setattr(LogDensity, "vectorized_mean", lambda *a, **k: None)
        density = LogDensity(model, guide._unpack_latent, args, {})
        loop = gaussian_elbo(density, loc, scale_tril, eps)
        per_draw = [float(density(loc + scale_tril @ e)) for e in eps]
    entropy = (0.5 * d * math.log(2 * math.pi * math.e)
               + float(scale_tril.double().diagonal().log().sum()))
    want = sum(per_draw) / len(per_draw) + entropy
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert math.isfinite(want)
    assert loop == pytest.approx(want, rel=tol, abs=tol)
    assert got == pytest.approx(want, rel=tol, abs=tol)
    if name in _BATCHED:
        assert batched_results and batched_results[0] is not None


def test_laplace_elbo_memo_sends_a_refused_model_to_the_loop(device, dtype):
    """A model the vectorized run cannot take (``torch.dot`` refuses a batch of draws) is tried
    once: the second ELBO of the same set-up (the Laplace Gaussian's, after the plain start's)
    shares the memo and runs the model once per draw, no more; both equal the per-draw
    average."""
    x = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)
    zero = torch.zeros(3, device=device, dtype=dtype)
    calls: list = []

    def model():
        calls.append(1)
        w = pyro.sample("w", dist.Normal(zero, 1.0).to_event(1))
        pyro.sample("y", dist.Normal(torch.dot(w, x), 1.0), obs=x.new_tensor(0.7))

    guide = AutoPlanar(model, num_layers=1, laplace_init=False)
    guide()
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(LAPLACE_ELBO_DRAWS, 3, generator=gen, dtype=torch.float64).to(device, dtype)
    loc, scale_tril = 0.1 * eps[0], 0.5 * torch.eye(3, device=device, dtype=dtype)
    density = LogDensity(model, guide._unpack_latent, (), {})
    with torch.no_grad(), pyro.validation_enabled(False):
        first = gaussian_elbo(density, loc, scale_tril, eps)
        calls.clear()
        second = gaussian_elbo(density, loc, 2 * scale_tril, eps)
        assert len(calls) == LAPLACE_ELBO_DRAWS
        for scale, got in ((scale_tril, first), (2 * scale_tril, second)):
            draws = [float(density(loc + scale @ e)) for e in eps]
            entropy = 1.5 * math.log(2 * math.pi * math.e) + float(scale.diagonal().log().sum())
            assert got == pytest.approx(sum(draws) / len(draws) + entropy, rel=1e-9, abs=1e-9)
