"""Review of the issue-9 speed changes of this session against independent references: the
Laplace start's vectorized Gaussian ELBO against the per-draw loop on models with plates,
deterministic, masked, scaled, discrete and constrained sites and models that mix the draws;
the sticking-the-landing Jacobian's batched backward against the copies; Tabak's rewritten
passes against the plain 1-D maps step by step; the flattened triangular solve against the
explicit inverse."""

from __future__ import annotations

import importlib
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from tabak_reference import plain_passes

import pyroflows as pf
from pyroflows.guides import LAPLACE_ELBO_DRAWS, AutoPlanar

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
    original = type(guide)._batched_log_density

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        batched_results.append(out)
        return out

    with torch.no_grad(), pyro.validation_enabled(False):
        monkeypatch.setattr(type(guide), "_batched_log_density", spy)
        got = guide._gaussian_elbo(loc, scale_tril, eps, args, {})
        monkeypatch.setattr(type(guide), "_batched_gaussian_elbo", lambda *a, **k: None)
        loop = guide._gaussian_elbo(loc, scale_tril, eps, args, {})
        per_draw = [float(guide._log_density(loc + scale_tril @ e, args, {})) for e in eps]
    entropy = (0.5 * d * math.log(2 * math.pi * math.e)
               + float(scale_tril.double().diagonal().log().sum()))
    want = sum(per_draw) / len(per_draw) + entropy
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert math.isfinite(want)
    assert loop == pytest.approx(want, rel=tol, abs=tol)
    assert got == pytest.approx(want, rel=tol, abs=tol)
    if name in _BATCHED:
        assert batched_results and batched_results[0] is not None


# ---- sticking the landing: batched backward against the copies ------------------------------
@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp", "planar", "radial"])
def test_stl_batched_backward_equals_copies(flow, device, dtype, monkeypatch):
    """_path_log_density with its Jacobian from the batched backward (above the row threshold,
    as the guide runs it) against the copies' pass (threshold raised past the rows), and both
    against autograd through the flow's inverse: values and gradients in z; no vmap warnings
    (a batching-rule fallback would warn and crawl); no parameter gradient."""
    zeros = torch.zeros(4, device=device, dtype=dtype)
    y = torch.tensor([0.5, -1.0, 0.3, 1.2], device=device, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(zeros, 1.5).to_event(1))
        pyro.sample("y", dist.Normal(z.tanh(), 0.5).to_event(1), obs=y)

    guide = pf.guides.AutoFlowGuide(model, flow=flow, num_layers=2, laplace_init=False,
                                    **({} if flow in ("planar", "radial") else
                                       {"hidden_dims": (8,)}))
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    posterior = guide.get_posterior()
    stack = posterior.transforms[0]
    n, d = 96, 4  # n (d + 1) = 480 rows: above STL_BATCHED_BACKWARD_MIN_ROWS
    assert n * (d + 1) >= pf.guides.STL_BATCHED_BACKWARD_MIN_ROWS
    eps = torch.randn(n, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-0.5 * eps.square().sum(-1) - 0.5 * d * math.log(2 * math.pi) - log_det).detach()
    results = []
    for threshold in (pf.guides.STL_BATCHED_BACKWARD_MIN_ROWS, 10**9):
        monkeypatch.setattr(pf.guides, "STL_BATCHED_BACKWARD_MIN_ROWS", threshold)
        leaf = z.detach().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = pf.guides._path_log_density(stack, eps, leaf, log_q)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        results.append((value, grad))
    leaf = z.detach().requires_grad_(True)
    want = posterior.log_prob_detached(leaf)
    (grad_want,) = torch.autograd.grad(want.sum(), leaf)
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for value, grad in results:
        torch.testing.assert_close(value, want, **tol)
        torch.testing.assert_close(grad, grad_want, **tol)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10 if dtype ==
                               torch.float64 else 1e-4, atol=1e-10 if dtype == torch.float64
                               else 1e-4)
    assert all(p.grad is None for p in guide.parameters())


def test_stl_refused_batched_backward_is_not_retried(device, dtype, monkeypatch):
    """Planar's backward does not run batched (an in-place copy under vmap): the first call
    tries it and falls back to the copies; later calls on the same stack go to the copies
    directly (they paid a forward pass and a failed backward every step), with the same
    result."""
    zeros = torch.zeros(4, device=device, dtype=dtype)

    def model():
        pyro.sample("z", dist.Normal(zeros, 1.5).to_event(1))

    guide = pf.guides.AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    stack = guide.get_posterior().transforms[0]
    n, d = 96, 4
    eps = torch.randn(n, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-log_det).detach()
    rows: list[int] = []
    forward = pf.guides._Inverse.forward

    def counted(self, value):
        rows.append(value.shape[0])
        return forward(self, value)

    monkeypatch.setattr(pf.guides._Inverse, "forward", counted)
    first = pf.guides._path_log_density(stack, eps, z.detach(), log_q)
    refused = rows == [n, n * (d + 1)]
    assert refused or (device.type != "cpu" and rows == [n])  # (CPU: it refuses)
    rows.clear()
    second = pf.guides._path_log_density(stack, eps, z.detach(), log_q)
    assert rows == ([n * (d + 1)] if refused else [n])
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---- Tabak's rewritten passes against the plain 1-D maps -------------------------------------
def _tabak_state(dim, k, steps, seed):
    gen = torch.Generator().manual_seed(seed)

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    frames = torch.linalg.qr(torch.randn(steps, dim, dim, generator=gen,
                                         dtype=torch.float64))[0][..., :k]
    gammas = u(steps, k, lo=-0.95, hi=0.95)
    gammas[::3, 0] = 0.0  # identity coordinates, as the fit stores a rejected step
    return {
        "fitted": torch.ones((), dtype=torch.bool), "loc": u(dim, lo=-1, hi=1),
        "scale_tril": torch.tril(u(dim, dim, lo=-0.3, hi=0.3)) + torch.diag(u(dim, lo=0.5,
                                                                             hi=2.0)),
        "frames": frames, "sigmas": u(steps, k, lo=-1.0, hi=0.5),
        "shifts": u(steps, k, lo=-0.5, hi=0.5), "gammas": gammas,
        "centers": u(steps, k, lo=-1.0, hi=1.0), "widths": u(steps, k, lo=0.05, hi=0.5),
    }


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 7)], ids=["point", "empty", "row",
                                                                 "batch"])
@pytest.mark.parametrize("chunked", [False, True])
def test_tabak_passes_shapes_chunks_and_forward_value(shape, chunked, device, dtype,
                                                      monkeypatch):
    """log_prob, forward_and_log_det and forward_value against the plain step-by-step maps on
    a single point, an empty batch, one row and a (2, 7) batch, the rows in one chunk or in
    chunks of 3 (a remainder chunk); forward_value gives forward's points exactly, with the
    same input gradient; the forward map inverts the Gaussianizing one."""
    tabak_module = importlib.import_module("pyroflows.transforms.tabak")

    if chunked:
        monkeypatch.setattr(tabak_module, "_CHUNK_NUMEL", 3 * 2)  # 3 rows of K = 2 per chunk
    dim, k = 3, 2
    state = _tabak_state(dim, k, steps=9, seed=4)
    t = tabak_module.Tabak(dim, subspace_dim=k).double()
    t.load_state_dict(state)
    t = t.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(6)
    x64 = 1.5 * torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
    x = x64.to(device, dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    z_ref, ld_ref = plain_passes(state, x64, inverse=False)
    want_lp = ld_ref - 0.5 * z_ref.square().sum(-1) - 0.5 * dim * math.log(2 * math.pi)
    lp = t.log_prob(x)
    assert lp.shape == x.shape[:-1]
    torch.testing.assert_close(lp.cpu().double(), want_lp, **tol)
    y_ref, yld_ref = plain_passes(state, x64, inverse=True)
    xg = x.clone().requires_grad_(True)
    y, yld = t.forward_and_log_det(xg)
    torch.testing.assert_close(y.detach().cpu().double(), y_ref, **tol)
    torch.testing.assert_close(yld.detach().cpu().double(), yld_ref, **tol)
    xv = x.clone().requires_grad_(True)
    yv = t.forward_value(xv)
    assert yv.shape == x.shape
    assert torch.equal(yv.detach(), y.detach())
    weights = torch.linspace(-1, 1, dim, device=device, dtype=dtype)
    if x.numel():
        (g,) = torch.autograd.grad((y * weights).sum(), xg)
        (gv,) = torch.autograd.grad((yv * weights).sum(), xv)
        x64g = x64.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad((plain_passes(state, x64g, True)[0]
                                        * weights.cpu().double()).sum(), x64g)
        torch.testing.assert_close(gv, g, rtol=0, atol=0)
        torch.testing.assert_close(g.cpu().double(), g_ref, **tol)
    back, _ = t.inverse_and_log_det(y.detach())
    torch.testing.assert_close(back.cpu().double(), x64, **tol)


def test_tabak_gaussianizing_kink_gradient_and_second_order(device, dtype):
    """At a point exactly on a step's center (w = 0: both lerp weights 1/2) and on an identity
    coordinate, log_prob's gradient and a Hessian-vector product (double backward through the
    lerp-selected branches) equal the plain map's."""
    tabak_module = importlib.import_module("pyroflows.transforms.tabak")

    dim = k = 2
    state = _tabak_state(dim, k, steps=1, seed=9)
    state["frames"] = torch.eye(dim, dtype=torch.float64).unsqueeze(0)
    state["scale_tril"] = torch.eye(dim, dtype=torch.float64)
    state["loc"] = torch.zeros(dim, dtype=torch.float64)
    state["gammas"][0] = torch.tensor([0.6, 0.0], dtype=torch.float64)
    state["centers"][0] = torch.tensor([0.0, 0.25], dtype=torch.float64)
    t = tabak_module.Tabak(dim).double()
    t.load_state_dict(state)
    t = t.to(device=device, dtype=dtype)
    x64 = torch.tensor([[0.0, 0.25], [0.0, -0.4], [0.3, 0.25]], dtype=torch.float64)
    v = torch.tensor([0.7, -0.3], dtype=torch.float64)

    def grad_and_hvp(fn, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v.to(x)).sum(), x)
        return g.detach(), h

    def plain_lp(x):
        z, ld = plain_passes(state, x, inverse=False)
        return ld - 0.5 * z.square().sum(-1)

    g, h = grad_and_hvp(t.log_prob, x64.to(device, dtype))
    g_ref, h_ref = grad_and_hvp(plain_lp, x64)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    torch.testing.assert_close(g.cpu().double(), g_ref, **tol)
    torch.testing.assert_close(h.cpu().double(), h_ref, **tol)


# ---- the flattened triangular solve against the explicit inverse -----------------------------
@pytest.mark.parametrize("case", ["point", "empty", "rows", "batch", "batched_loc", "expanded",
                                  "batched_factor"])
def test_tril_affine_solve_against_explicit_inverse(case, device, dtype):
    """x = L^{-1}(y - mu) against (y - mu) @ inv(L)^T, values and gradients in y, mu and L,
    for a (D,) point, an empty batch, rows, a (2, 3) batch, a batched loc, an expanded
    (stride-0) y and a batched factor."""
    from pyroflows.transforms.affine import tril_affine_solve

    d = 4
    gen = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    lead = {"point": (), "empty": (0,), "rows": (5,), "batch": (2, 3), "batched_loc": (5,),
            "expanded": (5,), "batched_factor": (5, 3)}[case]
    factor = torch.tril(0.3 * randn(d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    if case == "batched_factor":
        factor = torch.tril(0.3 * randn(3, d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    loc = randn(5, d) if case == "batched_loc" else randn(d)
    y = randn(d) if case == "expanded" else randn(*lead, d)
    y, loc, factor = (v.clone().requires_grad_(True) for v in (y, loc, factor))
    rhs = y.expand(*lead, d) if case == "expanded" else y  # stride 0 over the rows
    got = tril_affine_solve(loc, factor, rhs)
    want = ((rhs - loc).unsqueeze(-2) @ torch.linalg.inv(factor).mT).squeeze(-2)
    assert got.shape == want.shape
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    weights = randn(*got.shape)
    grads = torch.autograd.grad((got * weights).sum(), (y, loc, factor), allow_unused=True)
    grads_want = torch.autograd.grad((want * weights).sum(), (y, loc, factor),
                                     allow_unused=True)
    for g, w in zip(grads, grads_want, strict=True):
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(torch.tril(g) if g.shape == factor.shape else g,
                                   torch.tril(w) if w.shape == factor.shape else w, **tol)


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
    memo: dict = {}
    with torch.no_grad(), pyro.validation_enabled(False):
        first = guide._gaussian_elbo(loc, scale_tril, eps, (), {}, memo)
        calls.clear()
        second = guide._gaussian_elbo(loc, 2 * scale_tril, eps, (), {}, memo)
        assert len(calls) == LAPLACE_ELBO_DRAWS
        for scale, got in ((scale_tril, first), (2 * scale_tril, second)):
            draws = [float(guide._log_density(loc + scale @ e, (), {})) for e in eps]
            entropy = 1.5 * math.log(2 * math.pi * math.e) + float(scale.diagonal().log().sum())
            assert got == pytest.approx(sum(draws) / len(draws) + entropy, rel=1e-9, abs=1e-9)
