"""Where a flow guide starts and where it ends (issue 24): every family's flow is the identity
at set-up, so the guide's draws and ELBO at step 0 are its start's (the Laplace Gaussian or the
plain one); ``keep_best`` never leaves a guide worse than its start, on a Gaussian posterior
whose exact answer is known; the Laplace start's MAP search survives the starts that ran off
before (an ARMA(1, 1) posterior) and stops early on an unbounded density."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.guides import AutoFlowGuide
from pyroflows.guides.laplace import LogDensity

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")

FAMILIES = ("planar", "radial", "iaf", "maf", "realnvp", "nsf")


def equicorrelated(dim: int, rho: float, device, dtype):
    """``z ~ N(m, (1 - rho) I + rho 1 1^T)`` as a Pyro model, and its log normalizer (0)."""
    cov = ((1 - rho) * torch.eye(dim, dtype=torch.float64)
           + rho * torch.ones(dim, dim, dtype=torch.float64))
    loc = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64).to(device, dtype)
    scale_tril = torch.linalg.cholesky(cov).to(device, dtype)

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    return model


def _network(family: str) -> dict:
    """Small conditioner networks for the network families (planar and radial have none)."""
    return {} if family in ("planar", "radial") else {"hidden_dims": (8,)}


def _elbo(guide, density: LogDensity, eps: torch.Tensor) -> float:
    """The guide's ELBO on the base draws ``eps`` (S, D): mean of log p(T(eps)) - log q."""
    with torch.no_grad():
        stack = guide._transforms()
        u, log_det = eps, torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        for t in stack:
            y = t(u)
            log_det = log_det + t.log_abs_det_jacobian(u, y)
            u = y
        log_q = dist.Normal(torch.zeros_like(eps), 1.0).log_prob(eps).sum(-1) - log_det
        return density.mean(u) - float(log_q.mean())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("laplace", [True, False], ids=["laplace", "plain"])
def test_every_family_starts_at_the_identity(family, laplace, device, dtype):
    """At set-up the flow layers are the identity: the guide's draws are its start's Gaussian
    (the Laplace layer's m + C eps, or init loc + init_scale eps) and its ELBO is the start's,
    on common base draws (before: planar and radial layers moved the draws at once)."""
    model = equicorrelated(6, 0.6, device, dtype)
    guide = AutoFlowGuide(model, flow=family, num_layers=3, laplace_init=laplace,
                          **_network(family))
    guide()
    assert (guide._modules.get("laplace") is not None) == laplace, guide.laplace_info
    gen = torch.Generator(device=device).manual_seed(3)
    eps = torch.randn(256, 6, generator=gen, device=device, dtype=dtype)
    density = LogDensity(model, guide._unpack_latent, (), {})
    if laplace:
        loc, scale_tril = guide.laplace.loc, guide.laplace.scale_tril
    else:
        loc = guide.affine.loc.detach()
        scale_tril = torch.diag(torch.full_like(loc, guide._init_scale))
    want_draws = loc + eps @ scale_tril.T
    with torch.no_grad():
        draws = eps
        for t in guide._transforms():
            draws = t(draws)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(draws, want_draws, rtol=tol, atol=tol)
    # the start's own estimate on the same draws: log q = log N(eps) - log|det C|
    log_q = (dist.Normal(torch.zeros_like(eps), 1.0).log_prob(eps).sum(-1)
             - scale_tril.diagonal().log().sum())
    start_elbo = density.mean(want_draws) - float(log_q.mean())
    assert math.isclose(_elbo(guide, density, eps), start_elbo, rel_tol=tol, abs_tol=tol * 10)
    if laplace:  # the Laplace Gaussian of a Gaussian posterior is exact: ELBO = log Z = 0
        assert abs(start_elbo) < (1e-8 if dtype == torch.float64 else 1e-3)


# ---- never worse than the start ----------------------------------------------------------------

def _kl(guide, model, dim: int, num_draws: int = 4000) -> float:
    """KL(q || p) = log Z - ELBO with log Z = 0, from fresh draws of the guide."""
    with torch.no_grad():
        draws = guide._draw_latent(num_draws, seed=11)
        posterior = guide.get_posterior()
        log_q = posterior.log_prob(draws)
    density = LogDensity(model, guide._unpack_latent, (), {})
    return float(log_q.mean()) - density.mean(draws)


@pytest.mark.parametrize("loop", ["FlowELBO", "Trace_ELBO + record_loss"])
def test_keep_best_never_ends_worse_than_an_exact_start(loop, device, dtype):
    """A Gaussian posterior: the Laplace start is exact (KL 0). Training at a step size far too
    large for it spoils the start (KL well above 0.05: the test can fail); ``keep_best`` goes
    back to the start, whose KL is 0 again, with FlowELBO recording the losses itself and with
    a plain Trace_ELBO whose losses the loop passes to ``record_loss``."""
    dim = 8
    model = equicorrelated(dim, 0.7, device, dtype)
    guide = pf.guides.AutoPlanar(model, num_layers=4)
    kwargs = {"num_particles": 8, "vectorize_particles": True}
    elbo = pf.guides.FlowELBO(**kwargs) if loop == "FlowELBO" else pyro.infer.Trace_ELBO(**kwargs)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.2}), elbo)
    for _ in range(60):
        loss = svi.step()
        if loop != "FlowELBO":
            guide.record_loss(loss)
    assert guide._best.steps == 60
    spoiled = _kl(guide, model, dim)
    assert spoiled > 0.05, spoiled
    info = guide.keep_best()
    assert info["kept"] == "start", info
    assert info["elbo"]["start"] > info["elbo"]["last"]
    assert abs(_kl(guide, model, dim)) < (1e-8 if dtype == torch.float64 else 1e-3)


def test_keep_best_keeps_the_best_tracked_state_and_drops_a_diverged_one(device, dtype):
    """From the plain start (KL well above 0), training improves the guide; a spoiled end
    (parameters pushed far off, then one NaN) scores -inf or worse, and ``keep_best`` keeps
    the best tracked state, whose KL is below the start's."""
    dim = 4
    model = equicorrelated(dim, 0.5, device, dtype)
    guide = pf.guides.AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}),
                         pf.guides.FlowELBO(num_particles=8, vectorize_particles=True))
    for _ in range(100):
        svi.step()
    trained = _kl(guide, model, dim)
    with torch.no_grad():
        guide.affine.log_scale.add_(3.0)
    assert _kl(guide, model, dim) > trained + 1.0
    with torch.no_grad():
        guide.affine.loc[0] = math.nan
    info = guide.keep_best(num_draws=128)
    assert info["kept"] == "best tracked", info
    assert info["elbo"]["last"] == -math.inf
    assert info["elbo"]["best tracked"] > info["elbo"]["start"]
    assert _kl(guide, model, dim) < min(trained + 0.1, -info["elbo"]["start"])
    assert all(bool(torch.isfinite(p).all()) for p in guide.parameters())


# ---- a robust Laplace start ------------------------------------------------------------------

def arma11(num_steps: int, device, dtype):
    """An ARMA(1, 1) posterior (posteriordb's ``arma11`` model) on a series simulated with
    mu = 1, phi = 0.6, theta = 0.3, sigma = 1: its conditional likelihood explodes like
    theta^T where |theta| > 1, the region where a MAP search from there runs off."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(num_steps, generator=gen, dtype=torch.float64)
    y = torch.zeros(num_steps, dtype=torch.float64)
    for t in range(num_steps):
        y[t] = 1.0 + 0.6 * (y[t - 1] if t else 1.0) + 0.3 * (noise[t - 1] if t else 0.0) + noise[t]
    y = y.to(device, dtype)
    zero = torch.zeros((), device=device, dtype=dtype)
    # err_t = c_t - theta err_{t-1} with c_t = y_t - mu - phi y_{t-1} (y_{-1} = mu), so
    # err_t = sum_{k <= t} (-theta)^(t - k) c_k: one product with the powers' matrix (the
    # powers of the exponent 0 and of the upper triangle are masked, gradients included)
    steps = torch.arange(num_steps, device=device)
    lag = (steps[:, None] - steps[None, :]).to(dtype)
    lower = lag > 0

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 10.0))
        phi = pyro.sample("phi", dist.Normal(zero, 2.0))
        theta = pyro.sample("theta", dist.Normal(zero, 2.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(zero + 2.5))
        previous = torch.cat([mu.unsqueeze(-1), y[:-1].expand(mu.shape + (num_steps - 1,))], -1)
        c = y - mu.unsqueeze(-1) - phi.unsqueeze(-1) * previous
        powers = torch.pow(-theta[..., None, None], torch.where(lower, lag, 1.0))
        weights = torch.where(lower, powers, (lag == 0).to(dtype))
        errors = (weights @ c.unsqueeze(-1)).squeeze(-1)
        log_lik = dist.Normal(zero, sigma.unsqueeze(-1)).log_prob(errors)
        pyro.factor("likelihood", log_lik.sum(-1))

    return model


def test_laplace_start_recovers_where_the_map_search_ran_off(device, dtype):
    """ARMA(1, 1) from a start at theta = 1.6 (mu 6.9, phi -0.1, sigma 2.6): the search of the
    previous release ended at a point whose Hessian is not positive definite (in float32 it
    also ran off to infinity from theta = 0.62) and the guide fell back to the plain start. Now
    a failed search is followed by other starts: the guide keeps the Laplace start, says which
    start gave it and why the first failed, and its mode is the one a search from the true
    parameters finds, a true mode (zero gradient, positive definite Hessian)."""
    model = arma11(40, device, dtype)
    values = {"mu": 6.9, "phi": -0.1, "theta": 1.6, "sigma": 2.6}
    init = pyro.infer.autoguide.init_to_value(
        values={k: torch.tensor(v, device=device, dtype=dtype) for k, v in values.items()})
    guide = pf.guides.AutoIAF(model, hidden_dims=(8,), init_loc_fn=init)
    guide()
    info = guide.laplace_info
    assert info["used"], info
    assert info["search_start"] != "the initial location", info
    assert info["attempts"][0].startswith("the initial location: "), info
    assert "converged" not in info["attempts"][0], info
    density = LogDensity(model, guide._unpack_latent, (), {})
    truth = torch.tensor([1.0, 0.6, 0.3, 0.0], device=device, dtype=dtype)  # log sigma = 0
    with pyro.validation_enabled(False):
        reference, why = pf.guides.laplace.map_search(lambda u: -density(u), truth)
    assert reference is not None and why.startswith("converged"), why
    tol = 1e-6 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(guide.laplace.loc, reference, rtol=tol, atol=tol)
    mode = guide.laplace.loc.clone().requires_grad_(True)
    with pyro.validation_enabled(False):
        (grad,) = torch.autograd.grad(density(mode), mode)
    assert float(grad.abs().max()) < (1e-5 if dtype == torch.float64 else 0.05)


def test_laplace_start_stops_early_on_an_unbounded_density(device, dtype):
    """A scale whose density grows like tau^-9 as tau -> 0 (the unconstrained log tau runs to
    -infinity, as a funnel's neck does): every start's search reports the unbounded direction
    within a few dozen model runs (not the full iteration budget), the guide falls back to the
    plain start and says why."""
    zero = torch.zeros((), device=device, dtype=dtype)
    runs = [0]

    def model():
        runs[0] += 1
        tau = pyro.sample("tau", dist.HalfCauchy(zero + 1.0))
        pyro.sample("x", dist.Normal(zero, 1.0))
        pyro.factor("towards_zero", -10.0 * tau.log())

    guide = pf.guides.AutoPlanar(model, num_layers=2)
    guide()
    info = guide.laplace_info
    assert not info["used"] and "laplace" not in dict(guide.named_modules())
    assert len(info["attempts"]) == 2 + pf.guides.laplace.LAPLACE_PRIOR_RESTARTS, info
    assert all("an unbounded direction" in a for a in info["attempts"]), info
    assert "no start gave a usable mode" in info["reason"]
    assert runs[0] < 60 * len(info["attempts"]), runs


@pytest.mark.parametrize("how", ["searched", "laplace_init=False", "restored"])
def test_laplace_info_has_the_documented_keys(how, device, dtype):
    """``used``, ``reason``, ``search_start`` and ``attempts`` after every set-up (it was
    ``None`` without ``laplace_init`` and lacked the last two when restored)."""
    pyro.clear_param_store()
    y = torch.tensor([0.3, -0.2], device=device, dtype=dtype)

    def model(y):
        x = pyro.sample("x", dist.Normal(y.new_zeros(()), 1.0))
        pyro.sample("y", dist.Normal(x, 1.0).expand([2]).to_event(1), obs=y)

    guide = pf.guides.AutoIAF(model, laplace_init=how != "laplace_init=False")
    guide(y)
    if how == "restored":
        guide = pf.guides.AutoIAF(model)  # the same name: the store holds its Laplace layer
        guide(y)
    info = guide.laplace_info
    assert {"used", "reason", "search_start", "attempts"} <= set(info)
    assert info["used"] == (how != "laplace_init=False")
    assert (info["search_start"] is None) == (how != "searched")
    assert (how != "restored") or info["reason"] == "restored from the param store"
    pyro.clear_param_store()
