"""The Laplace start of the flow guides: exact on a Gaussian posterior, rejected where the
mode is useless, carried by state dicts; its Gaussian ELBO check from one vectorized model run
against the hand-written log joint and the per-draw loop, on models with plates,
deterministic, masked, scaled, discrete and constrained sites and models that mix the draws."""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from guide_models import gaussian_problem, seeded_draw
from pyro import poutine

import pyroflows as pf
from pyroflows.guides import AutoIAF, AutoPlanar
from pyroflows.guides.laplace import LAPLACE_ELBO_DRAWS, LogDensity, gaussian_elbo

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- the start -------------------------------------------------------------------------------

def test_laplace_init_starts_at_the_exact_gaussian_posterior(device, dtype):
    """On a Gaussian posterior the Laplace approximation is exact: before any training the
    guide's draws have the closed-form mean and covariance (the plain start is N(0, 0.1^2))."""
    model, mean, cov, _ = gaussian_problem(device, dtype)
    guide = AutoIAF(model, num_layers=2, hidden_dims=(8,), laplace_init=True)
    guide()
    assert guide.laplace_info["used"], guide.laplace_info
    draws = guide.sample_posterior(num_samples=40000)["z"].double().cpu()
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.03
    assert (torch.cov(draws.T) - cov).abs().max() < 0.03 * sd.max() ** 2
    # the preconditioner is state: it moves and saves with the guide
    assert {"laplace.loc", "laplace.scale_tril"} <= set(guide.state_dict())
    before = seeded_draw(guide)
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    after = seeded_draw(torch.load(buf, weights_only=False))
    torch.testing.assert_close(after["z"], before["z"], rtol=0, atol=0)


def test_laplace_init_falls_back_where_the_mode_is_useless(device, dtype):
    """Neal's funnel: the density of (x0, x_1..x_9) peaks at x0 = -40.5 with scales e^-20, a
    Laplace Gaussian with a hopeless ELBO; the guide keeps the plain start N(init loc,
    init_scale^2) instead."""
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        x0 = pyro.sample("x0", dist.Normal(zero, 3.0))
        with pyro.plate("coordinates", 9):  # a plate draws its subsample indices at random
            pyro.sample("x", dist.Normal(zero, torch.exp(x0 / 2)))

    start = torch.zeros(10, device=device, dtype=dtype)
    start[0] = 0.5
    init = pyro.infer.autoguide.init_to_value(values={"x0": start[0], "x": start[1:]})
    guides, first_draws = {}, {}  # first draws: after set-up (and the search)
    for laplace in (True, False):
        pyro.set_rng_seed(5)
        guides[laplace] = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=laplace,
                                  init_scale=0.2, init_loc_fn=init)
        guides[laplace]()
    guide = guides[True]
    assert not guide.laplace_info["used"], guide.laplace_info
    assert "laplace" not in dict(guide.named_modules())
    draws = guide.get_posterior().sample((20000,))
    torch.testing.assert_close(draws.mean(0), start, atol=0.01, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.full_like(draws[0], 0.2), atol=0.005, rtol=0)
    # the search left the random state alone: the same seed gives the plain guide's draw (also
    # with init_to_median, which samples the prior wherever a site is not conditioned)
    for laplace in (True, False):
        pyro.set_rng_seed(5)
        first_draws[laplace] = AutoIAF(model, num_layers=1, laplace_init=laplace)()
    for name in ("x0", "x"):
        torch.testing.assert_close(first_draws[True][name], first_draws[False][name], rtol=0,
                                   atol=0)


def test_state_dict_loads_across_laplace_and_plain_starts(device, dtype):
    """A guide whose Laplace start was kept loads into a fresh guide without it and vice versa
    (the fixed layer comes or goes with the state_dict): the draws are the saved guide's."""
    model = gaussian_problem(device, dtype)[0]
    with_laplace = AutoIAF(model, num_layers=1, hidden_dims=(8,))
    with_laplace()
    assert with_laplace.laplace_info["used"]
    pyro.clear_param_store()
    plain = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    plain()
    pf.testing.randomize_parameters_(plain, scale=0.2)
    for source, make in ((with_laplace, lambda: AutoIAF(model, num_layers=1, hidden_dims=(8,),
                                                         laplace_init=False)),
                         (plain, lambda: AutoIAF(model, num_layers=1, hidden_dims=(8,)))):
        pyro.clear_param_store()
        target = make()
        target()
        assert (target._modules.get("laplace") is None) != (source._modules.get("laplace")
                                                             is None)
        target.load_state_dict(source.state_dict())
        want, got = seeded_draw(source), seeded_draw(target)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert target.laplace_info["used"] == (source._modules.get("laplace") is not None)


@pytest.mark.parametrize("size, part", [(20, 5), (23, 5), (7, 3)])
def test_a_subsampled_plate_is_scored_on_every_row(size, part, device, dtype):
    """A model that subsamples its data plate (Pyro's minibatch idiom): the log density the
    Laplace search and keep_best use is the whole data's, exactly (the plate's windows, the
    last one's repeated rows masked), for one draw and a batch of draws, in a plate of two
    dims; so the Laplace start is the exact posterior whatever the random state (on its
    random subsamples the search stopped on noise)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(size, 2, generator=gen, dtype=torch.float64) + 1.0).to(device, dtype)
    zero = torch.zeros(2, device=device, dtype=dtype)

    def model(sub=None):
        mu = pyro.sample("mu", dist.Normal(zero, 10.0).to_event(1))
        with pyro.plate("data", size, subsample_size=sub, dim=-2) as rows:
            with pyro.plate("columns", 2, dim=-1):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x[rows])

    guide = AutoIAF(model, hidden_dims=(8,), laplace_init=False)
    guide()
    full = LogDensity(model, guide._unpack_latent, (), {})
    sub = LogDensity(model, guide._unpack_latent, (part,), {})
    draws = torch.randn(16, 2, generator=gen, dtype=torch.float64).to(device, dtype)
    tol = {"rtol": 1e-10, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                         "atol": 1e-3}
    torch.testing.assert_close(sub.values(draws), full.values(draws), **tol)
    torch.testing.assert_close(sub(draws[0]), full(draws[0]), **tol)
    assert full.whole_data and sub.whole_data and len(sub.runs()) == -(-size // part)
    assert sub.subsampled == [f"'data' ({part} of {size})"] and not full.subsampled
    precision = 1 / 100 + size  # the exact posterior of each column's mean
    for seed in range(2):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        start = AutoIAF(model, hidden_dims=(8,))
        start(part)
        assert start.laplace_info["used"], start.laplace_info
        torch.testing.assert_close(start.laplace.loc, x.sum(0) / precision, **tol)
        torch.testing.assert_close(start.laplace.scale_tril.diagonal(),
                                   torch.full_like(zero, precision ** -0.5), **tol)


def test_a_model_with_an_improper_prior_keeps_its_laplace_start(device, dtype):
    """The model's structure (subsampled plates, enumerated sites) is read from a run with
    every latent site conditioned, never from a draw of the prior, which an improper prior
    cannot give: the Laplace start and keep_best work as for any other model."""
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("y", dist.Normal(x, 1.0), obs=zero + 0.5)

    guide = AutoIAF(model, hidden_dims=(8,),
                    init_loc_fn=pyro.infer.autoguide.init_to_value(values={"x": zero}))
    guide()
    assert guide.laplace_info["used"], guide.laplace_info
    torch.testing.assert_close(guide.laplace.loc, (zero + 0.5).reshape(1))
    info = guide.keep_best()
    assert all(math.isfinite(v) for v in info["elbo"].values())


def test_a_subsampled_plate_of_local_latents_has_no_laplace_start(device, dtype):
    """Latents inside a subsampled plate take one subsample's values: no run sees every row,
    so the Laplace start is not searched, and its reason says why."""
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 1.0))
        with pyro.plate("data", 10, subsample_size=4):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=zero + 0.5)

    guide = AutoIAF(model, hidden_dims=(8,))
    guide()
    assert not guide.laplace_info["used"]
    assert "subsamples 'data' (4 of 10)" in guide.laplace_info["reason"]


def test_enumerated_discrete_sites_are_summed_out(device, dtype):
    """A mixture whose assignments are enumerated (left to TraceEnum_ELBO): the density the
    Laplace search and keep_best use sums them out, equal to the hand-written marginal, for
    one draw and for a batch (it drew them from the prior: a random density), so the Laplace
    start is the same whatever the random state."""
    data = torch.tensor([-2.1, -1.7, 1.9, 2.4, 2.0], device=device, dtype=dtype)
    zero = torch.zeros(2, device=device, dtype=dtype)

    @pyro.infer.config_enumerate
    def model():
        locs = pyro.sample("locs", dist.Normal(zero, 3.0).to_event(1))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(logits=zero))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    def marginal(u: torch.Tensor) -> torch.Tensor:
        prior = dist.Normal(zero, 3.0).log_prob(u).sum(-1)
        each = dist.Normal(u[..., None, :], 1.0).log_prob(data[:, None]) - math.log(2.0)
        return prior + torch.logsumexp(each, -1).sum(-1)

    guide = AutoIAF(model, hidden_dims=(8,), laplace_init=False)
    guide()
    density = LogDensity(model, guide._unpack_latent, (), {})
    draws = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    draws = draws.to(device, dtype)
    tol = {"rtol": 1e-10, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                         "atol": 1e-4}
    torch.testing.assert_close(density.values(draws), marginal(draws), **tol)
    assert density.enumerated == ["z"]
    modes = []
    for seed in range(2):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        start = AutoIAF(model, hidden_dims=(8,),
                        init_loc_fn=pyro.infer.autoguide.init_to_value(
                            values={"locs": torch.tensor([-1.0, 1.0], device=device,
                                                         dtype=dtype)},
                            fallback=pyro.infer.autoguide.init_to_median))
        start()
        assert start.laplace_info["used"], start.laplace_info
        modes.append(start.laplace.loc)
    torch.testing.assert_close(modes[0], modes[1], **tol)
    grad = torch.func.grad(lambda u: marginal(u))(modes[0])
    assert grad.abs().max() < 1e-3  # the marginal's mode


# ---- the Gaussian ELBO check against the hand-written log joint ------------------------------

def _hierarchical(device, dtype, calls: list, broadcasts: bool = True):
    """A normal hierarchy with a positive scale, a plate of latents and a data plate; its log
    joint written by hand below. ``broadcasts=False`` sums a term over every dim (also the
    draws' dim of a vectorized run), the mistake a model that assumes unbatched latents
    makes: it runs batched, but mixes the draws."""
    y = torch.tensor([1.5, -0.3, 0.8, 2.1], device=device, dtype=dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        calls.append(1)
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        tau = pyro.sample("tau", dist.LogNormal(zero, 0.5))
        with pyro.plate("groups", 4):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
        if not broadcasts:
            pyro.factor("pull", -0.1 * mu.square().sum())

    def log_joint(u: torch.Tensor) -> torch.Tensor:
        """log p(y, T(u)) + log|det J_T(u)| for u = (mu, log tau, theta_1..4), rows of u."""
        mu, log_tau, theta = u[..., 0], u[..., 1], u[..., 2:]
        tau = log_tau.exp()
        normal = dist.Normal(zero, 1.0)
        lp = normal.log_prob(mu / 2.0) - math.log(2.0)
        lp = lp + normal.log_prob(log_tau / 0.5) - math.log(0.5) - log_tau  # LogNormal
        lp = lp + (normal.log_prob((theta - mu[..., None]) / tau[..., None])
                   - log_tau[..., None]).sum(-1)
        lp = lp + normal.log_prob(y - theta).sum(-1)
        if not broadcasts:
            lp = lp - 0.1 * mu.square()
        return lp + log_tau  # the Jacobian of tau = exp(u)

    return model, log_joint


def _elbo_draws(device, dtype):
    gen = torch.Generator().manual_seed(1)
    loc = torch.tensor([0.5, -0.2, 1.0, 0.1, 0.6, 1.2], dtype=torch.float64)
    a = 0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64))
    eps = torch.randn(LAPLACE_ELBO_DRAWS, 6, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (loc, scale_tril, eps)]


def _expected_elbo(log_joint, loc, scale_tril, eps) -> float:
    """The Gaussian ELBO estimate on the draws loc + L eps, from the hand-written log joint
    and the Gaussian's entropy."""
    u = (loc + eps @ scale_tril.T).double()
    entropy = (0.5 * eps.shape[-1] * math.log(2 * math.pi * math.e)
               + float(scale_tril.double().diagonal().log().sum()))
    return float(log_joint(u).mean()) + entropy


@pytest.mark.parametrize("broadcasts", [True, False])
def test_laplace_elbo_is_one_model_run_where_the_model_broadcasts(device, dtype, broadcasts):
    """The Laplace start's Gaussian ELBO (the decision whether the Laplace start is kept) equals
    the hand-computed estimate on the same draws. A model that broadcasts over the draws runs
    once for all of them (plus a plain run at the first and last draw that checks the batch):
    it ran once per draw (64 runs, most of the set-up's time on German credit); a new log
    density also runs the prior once, to find subsampled plates and enumerated sites. A model that
    runs batched but mixes the draws fails that check and is run per draw."""
    calls: list = []
    model, log_joint = _hierarchical(device, dtype, calls, broadcasts)
    guide = AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    loc, scale_tril, eps = _elbo_draws(device, dtype)
    calls.clear()
    with torch.no_grad(), pyro.validation_enabled(False):
        elbo = gaussian_elbo(LogDensity(model, guide._unpack_latent, (), {}), loc, scale_tril,
                            eps)
    expected = _expected_elbo(log_joint, loc, scale_tril, eps)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert elbo == pytest.approx(expected, rel=tol, abs=tol)
    if broadcasts:
        assert len(calls) <= 4
    else:  # the check caught the mixing (else the sum over all draws enters each draw)
        assert len(calls) >= LAPLACE_ELBO_DRAWS


def test_laplace_elbo_of_a_model_that_does_not_broadcast_is_the_per_draw_loop(device, dtype):
    """A model written for one latent vector (``torch.dot`` refuses a batch of draws) gets the
    per-draw ELBO, equal to the hand-computed estimate. It is tried vectorized once: the
    second ELBO on the same log density (the Laplace Gaussian's, after the plain start's) runs
    the model once per draw, no more, and is the hand-computed estimate too. A draw the model
    rejects makes the ELBO -inf."""
    x = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)
    zero = torch.zeros(3, device=device, dtype=dtype)
    calls: list = []

    def model(reject_above: float = math.inf):
        calls.append(1)
        w = pyro.sample("w", dist.Normal(zero, 1.0).to_event(1))
        if bool((w.abs() > reject_above).any()):
            raise ValueError("out of range")
        pyro.sample("y", dist.Normal(torch.dot(w, x), 1.0), obs=x.new_tensor(0.7))

    def log_joint(u: torch.Tensor) -> torch.Tensor:
        normal = dist.Normal(torch.zeros((), dtype=u.dtype), 1.0)
        return normal.log_prob(u).sum(-1) + normal.log_prob(0.7 - u @ x.double())

    guide = AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    loc, scale_tril, eps = _elbo_draws(device, dtype)
    loc, scale_tril, eps = loc[:3], scale_tril[:3, :3], eps[:, :3]
    density = LogDensity(model, guide._unpack_latent, (), {})
    with torch.no_grad(), pyro.validation_enabled(False):
        first = gaussian_elbo(density, loc, scale_tril, eps)
        calls.clear()
        second = gaussian_elbo(density, loc, 2 * scale_tril, eps)
        assert len(calls) == LAPLACE_ELBO_DRAWS
        rejected = gaussian_elbo(LogDensity(model, guide._unpack_latent, (1.5,), {}), loc,
                                 scale_tril, eps)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for scale, got in ((scale_tril, first), (2 * scale_tril, second)):
        expected = _expected_elbo(log_joint, loc, scale, eps)
        assert got == pytest.approx(expected, rel=tol, abs=tol)
    assert (loc + eps @ scale_tril.T).abs().max() > 1.5  # some draw is rejected
    assert rejected == -math.inf


# ---- the Gaussian ELBO check: vectorized run against the per-draw loop -----------------------

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
        monkeypatch.setattr(LogDensity, "vectorized_values", lambda *a, **k: None)
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
