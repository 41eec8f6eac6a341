"""FlowELBO: sticking the landing on every route (the draw's Jacobian on the direct and the
traced path against the flow's inverse, unbiased, exact at the optimum), annealing, the
divergence error, and the direct path against Pyro's trace, replay and Trace_ELBO."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from guide_models import gaussian_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import prune_subsample_sites

from pyroflows.guides import (
    AutoFlowGuide,
    AutoIAF,
    AutoPlanar,
    AutoRadial,
    FlowELBO,
    FlowPosterior,
    landing,
)
from pyroflows.guides import direct as direct_path
from pyroflows.guides.direct import _ReplayAndScore

# tiny SVI steps; the routes of the path gradient held against each other to rounding
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store", "exact_stl")


DEFAULT_STL_TOL = landing.STL_TOL  # (before the exact_stl fixture sets it to 0)


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---- sticking the landing: unbiased, exact at the optimum ------------------------------------

def _exact_gaussian_model(device, dtype):
    loc = torch.tensor([0.5, -1.0], device=device, dtype=dtype)

    def model():
        pyro.sample("x", dist.Normal(loc, 0.7).to_event(1))

    return model


def test_sticking_the_landing_is_unbiased_and_exact_at_the_optimum(device, dtype):
    # the expectation check compares 20000-draw averages: run it in float64 whatever dtype
    model, mean, cov, _ = gaussian_problem(device, torch.float64)
    guide = AutoPlanar(model, num_layers=2)
    guide()
    params = list(guide.parameters())

    def mean_grad(stl, seed, n=20000):
        pyro.set_rng_seed(seed)
        elbo = FlowELBO(stick_the_landing=stl, num_particles=n, vectorize_particles=True)
        loss = elbo.differentiable_loss(model, guide)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    g_std, g_stl = mean_grad(False, 0), mean_grad(True, 0)
    noise = (mean_grad(False, 1) - g_std).norm()
    assert (g_stl - g_std).norm() < 2 * noise + 1e-6  # same expectation
    # A guide that is exactly the posterior: the path-derivative gradient is 0 for every draw
    # (the score-function term of the standard estimator is not).
    exact_model = _exact_gaussian_model(device, dtype)
    loc = torch.tensor([0.5, -1.0], device=device, dtype=dtype)
    guide = AutoIAF(exact_model, init_loc_fn=pyro.infer.autoguide.init_to_value(
        values={"x": loc}), init_scale=0.7, num_layers=2, hidden_dims=(8,))
    guide()
    params = list(guide.parameters())
    zero_tol = 1e-5 if dtype == torch.float64 else 1e-3

    def is_zero(elbo):
        loss = elbo.differentiable_loss(exact_model, guide)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        return float(grad.abs().max()) < zero_tol

    kw = dict(num_particles=16, vectorize_particles=True)
    assert is_zero(FlowELBO(stick_the_landing=True, **kw))
    assert not is_zero(FlowELBO(stick_the_landing=False, **kw))
    # the default follows the guide: on for IAF guides (the family's stick_the_landing), unless the
    # guide says otherwise
    assert guide.stick_the_landing and is_zero(FlowELBO(**kw))
    # Pyro's own ELBOs that read a site's entropy term stick the landing too, by the guide's
    # posterior (FlowPosterior.score_parts)
    assert is_zero(Trace_ELBO(**kw)) and is_zero(TraceMeanField_ELBO(**kw))
    guide.stick_the_landing = False
    assert not is_zero(FlowELBO(**kw))
    assert not is_zero(Trace_ELBO(**kw))
    assert not AutoPlanar(exact_model).stick_the_landing
    # the measured family defaults (vi-stl-families.md, vi-stl-planar-radial.md)
    for flow, on in {"iaf": True, "maf": True, "realnvp": True, "nsf": True, "planar": False,
                     "radial": False}.items():
        assert AutoFlowGuide(exact_model, flow=flow).stick_the_landing is on, flow


def test_trace_elbo_sticks_the_landing_with_flowelbos_loss_and_gradients(device, dtype):
    """Under Pyro's Trace_ELBO an IAF guide's gradient is FlowELBO's sticking-the-landing one
    (the traced path: the same draws), its loss value Pyro's, and without gradients (loss,
    evaluate_loss) no landing term is computed."""
    model, _, _, _ = gaussian_problem(device, dtype)
    guide = _perturbed_guide(model)
    params = list(guide.parameters())
    results = []
    for elbo in (Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0),
                 FlowELBO(direct=False, stick_the_landing=True, num_particles=4,
                          vectorize_particles=True, max_plate_nesting=0)):
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(model, guide)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got, want, **_tol(dtype))
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))
    calls = []
    original = landing.path_entropy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(landing, "path_entropy", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            Trace_ELBO(num_particles=4, vectorize_particles=True,
                       max_plate_nesting=0).differentiable_loss(model, guide)
        assert not calls
        Trace_ELBO(num_particles=4, vectorize_particles=True,
                   max_plate_nesting=0).differentiable_loss(model, guide)
        assert calls


def test_stick_the_landing_needs_a_flow_guide():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    guide = pyro.infer.autoguide.AutoNormal(model)
    with pytest.raises(ValueError, match="flow guide"):
        FlowELBO(stick_the_landing=True).differentiable_loss(model, guide)
    assert math.isfinite(FlowELBO().differentiable_loss(model, guide).item())  # default: as is


# ---- sticking the landing from the draw's Jacobian against the inverse -----------------------

@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp", "planar", "radial"])
def test_sticking_the_landing_from_the_jacobian_matches_the_inverse(flow, monkeypatch, device,
                                                                    dtype):
    """The direct draw's sticking-the-landing term takes grad_z log q(z) from the Jacobian of
    the draw; the reference is autograd through the flow's inverse (log_prob_detached), for
    every family: same value, same gradient in z, and no gradient to the parameters from
    either. The Jacobian comes from one pass over D + 1 copies of the particles (below
    STL_BATCHED_BACKWARD_MIN_ROWS rows), or, as the guide runs it here (above it), from one
    forward pass over the particles and a backward batched over the D + 1 cotangents; the two
    agree to rounding, and the batched one raises no vmap warning (a batching-rule fallback
    would warn and crawl). IAF's backward runs batched; planar's does not (an in-place update)
    and falls back to the copies. (IAF, RealNVP, planar and radial stacks take the
    layer-by-layer route by default: switched off here.)"""
    monkeypatch.setattr(landing, "STL_LAYERWISE", False)
    model = gaussian_problem(device, dtype)[0]
    kw = {"num_layers": 3} if flow in ("planar", "radial") else {"hidden_dims": (8,)}
    guide = AutoFlowGuide(model, flow=flow, **kw)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))  # away from the identity
    posterior = guide.get_posterior()
    stack = posterior.transforms[0]
    n, d = 128, 3
    assert n * (d + 1) >= landing.STL_BATCHED_BACKWARD_MIN_ROWS
    monkeypatch.setattr(landing, "_RUNS_BATCHED", {})  # as in a fresh process
    eps = torch.randn(n, 1, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-0.5 * eps.square().sum(-1) - 0.5 * d * math.log(2 * math.pi) - log_det).detach()
    leaf = z.detach().requires_grad_(True)  # the draw, as a leaf: its gradient is compared
    want = posterior.log_prob_detached(leaf)
    (grad_want,) = torch.autograd.grad(want.sum(), leaf)
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    forward = landing._Call.forward
    results = {}
    for route, threshold in (("batched", landing.STL_BATCHED_BACKWARD_MIN_ROWS),
                             ("copies", 10**9)):
        rows: list[int] = []  # the rows of every forward pass the Jacobian takes

        def counted(self, value, rows=rows):
            rows.append(value.numel() // value.shape[-1])
            return forward(self, value)

        leaf = z.detach().requires_grad_(True)
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("error")
            patch.setattr(landing._Call, "forward", counted)
            patch.setattr(landing, "STL_BATCHED_BACKWARD_MIN_ROWS", threshold)
            got = landing.path_log_density(stack, eps, leaf, log_q)
        if route == "copies":
            assert rows == [n * (d + 1)]
        elif flow == "iaf":
            assert rows == [n]
        elif flow == "planar" and device.type == "cpu":  # the batched backward refused
            assert rows == [n, n * (d + 1)]
        else:
            assert rows in ([n], [n, n * (d + 1)])
        (grad_got,) = torch.autograd.grad(got.sum(), leaf)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(grad_got, grad_want, **tol)
        results[route] = grad_got
    close = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(results["batched"], results["copies"], rtol=close, atol=close)
    assert all(p.grad is None for p in guide.parameters())


def test_stl_refused_batched_backward_is_not_retried(device, dtype, monkeypatch):
    """Planar's backward does not run batched (an in-place copy under vmap): the first call
    tries it and falls back to the copies; later calls, on the same stack or on a new stack
    of the same layers (a conditioned flow is a new stack every step), go to the copies
    directly (they paid a forward pass and a failed backward every step), with the same
    result. (Planar stacks take the layer-by-layer route by default: switched off here.)"""
    monkeypatch.setattr(landing, "_RUNS_BATCHED", {})  # as in a fresh process
    monkeypatch.setattr(landing, "STL_LAYERWISE", False)
    zeros = torch.zeros(4, device=device, dtype=dtype)

    def model():
        pyro.sample("z", dist.Normal(zeros, 1.5).to_event(1))

    guide = AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    stack = guide.get_posterior().transforms[0]
    n, d = 96, 4
    eps = torch.randn(n, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-log_det).detach()
    rows: list[int] = []
    forward = landing._Call.forward

    def counted(self, value):
        rows.append(value.numel() // value.shape[-1])
        return forward(self, value)

    monkeypatch.setattr(landing._Call, "forward", counted)
    first = landing.path_log_density(stack, eps, z.detach(), log_q)
    refused = rows == [n, n * (d + 1)]
    assert refused or (device.type != "cpu" and rows == [n])  # (CPU: it refuses)
    rows.clear()
    second = landing.path_log_density(stack, eps, z.detach(), log_q)
    assert rows == ([n * (d + 1)] if refused else [n])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    rows.clear()
    landing.path_log_density(copy.deepcopy(stack), eps, z.detach(), log_q)
    assert rows == ([n * (d + 1)] if refused else [n])


LAYERWISE_GUIDES = {  # guides whose stacks the layer-by-layer route takes
    "iaf-laplace": (lambda m: AutoIAF(m, num_layers=3, hidden_dims=(24,)), True),
    "iaf-diagonal": (lambda m: AutoIAF(m, num_layers=2, hidden_dims=(24,), full_rank=False),
                     True),
    "iaf-plain-start": (lambda m: AutoIAF(m, num_layers=2, hidden_dims=(24,),
                                          laplace_init=False), True),
    "iaf-student-t": (lambda m: AutoIAF(m, num_layers=2, hidden_dims=(24,), base="studentt"),
                      True),
    "realnvp": (lambda m: AutoFlowGuide(m, flow="realnvp", num_layers=2, hidden_dims=(24,)),
                True),
    "maf": (lambda m: AutoFlowGuide(m, flow="maf", num_layers=2, hidden_dims=(24,)), True),
    "planar": (lambda m: AutoPlanar(m, num_layers=3), True),
    "radial": (lambda m: AutoRadial(m, num_layers=3), True),
    "nsf": (lambda m: AutoFlowGuide(m, flow="nsf", num_layers=2, hidden_dims=(24,)), True),
}


@pytest.mark.parametrize("make", sorted(LAYERWISE_GUIDES))
def test_layerwise_score_is_the_gradient_of_the_inverse(make, monkeypatch, device, dtype):
    """path_log_density takes the layer-by-layer route for stacks of IAF, RealNVP, MAF, NSF,
    planar, radial and affine layers (Laplace start, diagonal, plain start, a Student t
    base); its value and gradient in z are those of autograd through the flow's inverse
    (log_prob_detached), with the parameters far from their start."""
    dim = 20
    loc = torch.linspace(-1.0, 1.0, dim, device=device, dtype=dtype)
    cov = 0.5 * torch.eye(dim, device=device, dtype=dtype) + 0.3

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, cov))

    build, layerwise = LAYERWISE_GUIDES[make]
    guide = build(model)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.15 * torch.randn_like(p))
    posterior = guide.get_posterior()
    stack, base = posterior.transforms[0], posterior.base_dist
    eps = base.sample((4, 2))
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (base.log_prob(eps) - log_det).detach()
    taken = []
    real = landing.layerwise_score
    monkeypatch.setattr(landing, "layerwise_score",
                        lambda *args: taken.append(True) or real(*args))
    leaf = z.detach().requires_grad_(True)
    got = landing.path_log_density(stack, eps, leaf, log_q, base)
    assert taken == ([True] if layerwise else [])
    (grad_got,) = torch.autograd.grad(got.sum(), leaf)
    leaf = z.detach().requires_grad_(True)
    want = posterior.log_prob_detached(leaf)
    (grad_want,) = torch.autograd.grad(want.sum(), leaf)
    # (layerwise_score stops within sqrt(eps) of the solution: exact_stl)
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(grad_got, grad_want, **tol)
    assert all(p.grad is None for p in guide.parameters())


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 7), num_layers=st.integers(1, 3),
       scale=st.sampled_from([0.0, 0.1, 0.3]), affine=st.sampled_from(["none", "diag", "tril"]),
       seed=st.integers(0, 2**16))
def test_layerwise_score_is_the_whole_jacobians(dim, num_layers, scale, affine, seed, device,
                                                dtype):
    """Stacks of IAF layers (1-3, from the identity to random weights) with no, a diagonal or
    a triangular affine layer, any D from 1: the layer-by-layer score equals the one from the
    draw's whole Jacobian (D + 1 pullbacks through autograd, one dense solve). (Saturated
    layers, whose stacked Jacobians are too ill-conditioned for two solves to agree, are held
    to their own residuals one layer at a time: test_linearization_is_the_layers_jacobian.)"""
    from pyroflows import flows, testing
    from pyroflows.transforms import ElementwiseAffine, TriangularAffine

    stack = flows.build("iaf", dim, num_layers=num_layers, hidden_dims=(8,))
    extra = {"none": [], "diag": [ElementwiseAffine(dim, scale=0.7)],
             "tril": [TriangularAffine(dim, loc=0.2, scale=1.3)]}[affine]
    stack = flows.FlowStack([*stack.parts, *extra])
    testing.randomize_parameters_(stack, scale=scale, seed=seed)
    stack = stack.to(device, dtype)
    eps = torch.randn(3, 2, dim, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64).to(device, dtype)
    assert landing.path_route(stack, eps) and landing._layerwise(stack)
    got = landing.layerwise_score(stack, eps)
    want = landing._jacobian_score(stack, eps, None).reshape(eps.shape)
    size = max(float(want.abs().max()), 1.0)
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * size)


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(["maf", "nsf", "realnvp", "realnvp-compact", "maf+permute"]),
       conditioned=st.booleans(), scale=st.sampled_from([0.0, 0.1, 0.3]),
       seed=st.integers(0, 2**16))
def test_one_pass_inverse_steps_are_the_whole_jacobians(family, conditioned, scale, seed,
                                                        device, dtype):
    """Stacks of MAF, NSF and RealNVP layers (compact coupling networks from D = 32), with a
    permutation between, conditioned on a batch of contexts or not, from the identity to
    random weights: the layer-by-layer score (MAF and NSF by one vector-Jacobian product of
    their one-pass inverse; small RealNVP layers by their linearization) equals the one from
    the draw's whole Jacobian. (Saturated layers: one at a time by their residuals,
    test_score_steps.py.)"""
    from pyroflows import flows, testing
    from pyroflows.transforms import Permute

    name = family.split("-")[0].split("+")[0]
    dim = 32 if family == "realnvp-compact" else 5
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(2, 3, generator=gen, dtype=torch.float64) if conditioned else None
    built = flows.build(name, dim, num_layers=2, hidden_dims=(12,),
                        context_dim=3 if conditioned else None)
    testing.randomize_parameters_(built, scale=scale, seed=seed)
    built = built.to(device, dtype)
    stack = built.condition(context.to(device, dtype)) if conditioned else built
    if family == "maf+permute":
        stack = flows.FlowStack([stack.parts[0], Permute.reverse(dim).to(device),
                                 stack.parts[1]])
    eps = torch.randn(3, 2, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    assert landing._layerwise(stack)
    got = landing.layerwise_score(stack, eps)
    want = landing._jacobian_score(stack, eps, None).reshape(eps.shape)
    size = max(float(want.abs().max()), 1.0)
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * size)


@pytest.mark.parametrize("scale", [0.1, 0.3])
def test_layerwise_score_default_tolerance(scale, monkeypatch, device):
    """At its default tolerance (landing.STL_TOL) the layer-by-layer score is within that
    fraction of the solved-to-rounding one (float64), and took fewer pullbacks to get there."""
    from pyroflows import flows, testing
    from pyroflows._fast.affine import Linearization

    dim = 24
    stack = flows.build("iaf", dim, num_layers=3, hidden_dims=(32,))
    testing.randomize_parameters_(stack, scale=scale, seed=3)
    stack = stack.to(device, torch.float64)
    eps = torch.randn(16, dim, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to(device)
    pullbacks = []
    real = Linearization.pullback
    monkeypatch.setattr(Linearization, "pullback",
                        lambda self, *args: pullbacks.append(1) or real(self, *args))

    def score(tol):
        monkeypatch.setattr(landing, "STL_TOL", tol)
        pullbacks.clear()
        return landing.layerwise_score(stack, eps), len(pullbacks)

    (exact, exact_count), (got, count) = score(0.0), score(DEFAULT_STL_TOL)
    assert DEFAULT_STL_TOL > torch.finfo(torch.float64).eps ** 0.5
    assert count < exact_count
    assert float((got - exact).abs().max()) <= DEFAULT_STL_TOL * float(exact.abs().max())


@pytest.mark.parametrize("elbo", ["flow-elbo-direct", "flow-elbo-traced", "trace-elbo"])
def test_a_draw_reuses_its_linearizations(elbo, monkeypatch, device, dtype):
    """Sticking the landing linearizes no IAF layer a second time: the draw kept them (FlowELBO's
    direct draw, FlowStack.run_linearized; a traced draw of the posterior, under FlowELBO off
    its direct path or Pyro's Trace_ELBO reading the posterior's score_parts). Loss and
    gradients equal those of the same step with every layer linearized afresh."""
    from pyroflows.flows import FlowStack
    from pyroflows.transforms import IAF

    model = gaussian_problem(device, dtype)[0]
    results, calls = [], []
    real_linearize, real_run = IAF.linearize, FlowStack.run_linearized
    monkeypatch.setattr(IAF, "linearize",
                        lambda self, u: calls.append(1) or real_linearize(self, u))
    for keep in (True, False):
        if not keep:  # draws that keep nothing
            monkeypatch.setattr(FlowStack, "run_linearized",
                                lambda self, x: (*real_run(self, x)[:2], []))
            monkeypatch.setattr(landing, "kept_linearizations", lambda posterior, value: [])
        calls.clear()
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoIAF(model, num_layers=2, hidden_dims=(8,))
        guide()
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.1 * torch.randn_like(p))
        loss_fn = (Trace_ELBO(num_particles=4, vectorize_particles=True) if elbo == "trace-elbo"
                   else FlowELBO(num_particles=4, vectorize_particles=True,
                                 stick_the_landing=True, direct=elbo == "flow-elbo-direct"))
        if elbo == "flow-elbo-direct":
            assert loss_fn._direct(model, guide, (), {})
        torch.manual_seed(1)
        loss = loss_fn.differentiable_loss(model, guide)
        results.append((loss.detach(), torch.autograd.grad(loss, list(guide.parameters()))))
        assert len(calls) == (0 if keep else 2)
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got, want, **_tol(dtype))
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype))


def test_kept_linearizations_live_with_the_draw(device, dtype):
    """A posterior's draw keeps its IAF layers' linearizations for itself: a posterior the
    user holds keeps none alive once its draws are gone (and the flow's one-entry cache holds
    another), and another posterior over a different flow does not take them."""
    import gc
    import weakref

    model = gaussian_problem(device, dtype)[0]
    guide = AutoIAF(model, num_layers=2, hidden_dims=(8,))
    guide()
    posterior = guide.get_posterior()
    value = posterior.rsample((5,))
    kept = posterior.linearizations(value)
    assert len(kept) == 2
    other = AutoIAF(model, num_layers=2, hidden_dims=(8,))
    other()
    assert other.get_posterior().linearizations(value) == []
    assert posterior.linearizations(value.detach()) == []
    gone = weakref.ref(kept[0].output)
    del value, kept
    posterior.sample((5,))  # (the stack's cache now holds this draw)
    gc.collect()
    assert gone() is None


def _posterior(make, device, dtype, dim=3):
    zero = torch.zeros(dim, device=device, dtype=dtype)

    def model():
        pyro.sample("x", dist.Normal(zero, 1.0).to_event(1))

    guide = make(model)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return guide, guide.get_posterior()


MAKERS = {"iaf": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=False),
          "planar": lambda m: AutoPlanar(m, num_layers=3, laplace_init=False)}


def _check_entropy(guide, posterior, z, got, dtype):
    """The value and the path gradient (in the guide's parameters, through the draw; the
    parameters themselves are detached in both) of the inverse route."""
    want = posterior.log_prob_detached(z)
    params = list(guide.parameters())
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)
    g_got = torch.autograd.grad(got.sum(), params, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want.sum(), params, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_want)
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(g_got, g_want, strict=True):
        a = torch.zeros_like(b) if a is None and b is not None else a
        if b is not None:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("make", sorted(MAKERS))
def test_path_entropy_only_answers_for_the_draw_it_cached(make, device, dtype):
    """Two draws of one posterior before scoring: the first is no longer in the stack's cache,
    so _path_entropy declines (the caller runs the inverse); the second gets the inverse's
    value and z-gradient. An in-place edit of the draw, a parameter update, a draw under
    no_grad and a draw of another posterior object of the same guide all decline too."""
    guide, posterior = _posterior(MAKERS[make], device, dtype)
    z1 = posterior.rsample((4,))
    z2 = posterior.rsample((4,))
    assert landing.path_entropy(posterior, z1) is None
    got = landing.path_entropy(posterior, z2)
    assert got is not None and got.shape == (4,)
    _check_entropy(guide, posterior, z2, got, dtype)
    z4 = posterior.rsample((4,)).detach()
    z4.mul_(1.0)
    assert landing.path_entropy(posterior, z4) is None
    z5 = posterior.rsample((4,))
    with torch.no_grad():
        next(iter(guide.parameters())).add_(0.01)
    assert landing.path_entropy(posterior, z5) is None
    with torch.no_grad():
        z6 = posterior.rsample((4,))
    assert landing.path_entropy(posterior, z6) is None
    other = guide.get_posterior()
    z7 = other.rsample((4,))
    got7 = landing.path_entropy(posterior, z7)  # the same stack: the cache holds z7's base point
    if got7 is not None:
        _check_entropy(guide, posterior, z7, got7, dtype)


@pytest.mark.parametrize("make", sorted(MAKERS))
def test_path_entropy_of_expanded_and_unbatched_draws_is_the_inverse(make, device, dtype):
    """An expanded posterior (what a plate does to the guide's site) and an unbatched draw
    (one particle): the Jacobian route's value and z-gradient are the inverse route's."""
    guide, posterior = _posterior(MAKERS[make], device, dtype)
    expanded = posterior.expand((2, 3))
    z = expanded.rsample()
    got = landing.path_entropy(expanded, z)
    assert got is not None and got.shape == (2, 3)
    _check_entropy(guide, expanded, z, got, dtype)
    z = posterior.rsample()
    got = landing.path_entropy(posterior, z)
    assert got is not None and got.shape == ()
    _check_entropy(guide, posterior, z, got, dtype)
    z = posterior.rsample((2,))[0]  # an unbatched tensor that is not the remembered draw
    assert landing.path_entropy(posterior, z) is None


def _local_latents(device, dtype):
    """Local latents in a subsampled plate (the traced path) plus a global scale."""
    y = torch.linspace(-2, 2, 10, device=device, dtype=dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        s = pyro.sample("s", dist.LogNormal(zero, 0.5))
        with pyro.plate("data", 10, subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(zero, s))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])
    return model


STL_GUIDES = {
    "iaf": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=False),
    "iaf-laplace": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=True),
    "planar": lambda m: AutoPlanar(m, num_layers=3, laplace_init=False),
}


@pytest.mark.parametrize("make", sorted(STL_GUIDES))
@pytest.mark.parametrize("case", ["subsampled-latents", "scale-around-step"])
def test_traced_stl_matches_the_inverse_route(case, make, monkeypatch, device, dtype):
    """The traced path (latents in a subsampled plate; a poutine.scale around the step) with
    sticking the landing, for IAF (with and without the Laplace layers in the stack) and
    planar guides: the gradients from the stack's cached draw equal those with the Jacobian
    route switched off (STL_JACOBIAN_MAX_DIM = 0 and STL_LAYERWISE off: the flow's
    inverse)."""
    model = (_local_latents(device, dtype) if case == "subsampled-latents"
             else _zoo("nested-plates", device, dtype)[0])
    mpn = 1 if case == "subsampled-latents" else 2
    results = []
    answered = []
    real = landing.path_entropy

    def counted(posterior, value):
        out = real(posterior, value)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(landing, "path_entropy", counted)
    for max_dim in (256, 0):
        monkeypatch.setattr(landing, "STL_JACOBIAN_MAX_DIM", max_dim)
        monkeypatch.setattr(landing, "STL_LAYERWISE", max_dim > 0)
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = STL_GUIDES[make](model)
        guide()
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.1 * torch.randn_like(p))
        elbo = FlowELBO(stick_the_landing=True, num_particles=3, vectorize_particles=True,
                        max_plate_nesting=mpn)
        assert not elbo._direct(model, guide, (), {}) or case == "scale-around-step"
        torch.manual_seed(1)
        ctx = poutine.scale(scale=0.5) if case == "scale-around-step" else contextlib.nullcontext()
        with ctx:
            loss = elbo.differentiable_loss(model, guide)
        grads = torch.autograd.grad(loss, list(guide.parameters()))
        results.append((loss.detach(), grads))
    assert answered == [True, False]  # the Jacobian route ran, then the inverse
    (got, got_g), (want, want_g) = results
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "one-particle"])
def test_traced_sticking_the_landing_from_the_jacobian_steps_as_the_inverse(
        vectorized, monkeypatch, device, dtype):
    """On the traced path (direct=False) the sticking-the-landing term comes from the draw's
    Jacobian (the flow stack's cache of the draw); the reference is the same run with the
    Jacobian route switched off (STL_JACOBIAN_MAX_DIM = 0, STL_LAYERWISE off: the flow's
    inverse): the same losses and parameters after several Adam steps, and the inverse is not
    run when the Jacobian is."""
    model = _schools_with_a_model_param(device, dtype)
    kw = dict(num_particles=4 if vectorized else 1, vectorize_particles=vectorized,
              stick_the_landing=True)
    inverse_calls = [0]
    detached = FlowPosterior.log_prob_detached

    def counted(self, value):
        inverse_calls[0] += 1
        return detached(self, value)

    monkeypatch.setattr(FlowPosterior, "log_prob_detached", counted)
    got_losses, got = _svi_run(model, direct=False, **kw)
    assert inverse_calls[0] == 0
    monkeypatch.setattr(landing, "STL_JACOBIAN_MAX_DIM", 0)
    monkeypatch.setattr(landing, "STL_LAYERWISE", False)
    want_losses, want = _svi_run(model, direct=False, **kw)
    assert inverse_calls[0] == 4
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    assert got_losses == pytest.approx(want_losses, rel=tol["rtol"] * 10)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)


# ---- annealing -------------------------------------------------------------------------------

def _half_cauchy_problem(device, dtype):
    """mu ~ N(0, 5^2), tau ~ HalfCauchy(5), y_i ~ N(mu, tau^2) for 4 observations, and the
    log density of the unconstrained vector u = (mu, log tau), written out by hand:
    log p(y, mu, e^v) + v (the Jacobian of tau = e^v)."""
    y = torch.tensor([1.0, -0.5, 2.5, 0.3], device=device, dtype=dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, tau), obs=y)

    def log_p(u):
        mu, v = u[..., 0], u[..., 1]
        tau = v.exp()
        log_prior = (-0.5 * (mu / 5) ** 2 - math.log(5 * math.sqrt(2 * math.pi))
                     + math.log(2 / (math.pi * 5)) - torch.log1p((tau / 5) ** 2))
        resid = (y - mu.unsqueeze(-1)) / tau.unsqueeze(-1)
        log_lik = (-0.5 * resid**2 - v.unsqueeze(-1) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return log_prior + log_lik + v

    return model, log_p


@pytest.mark.parametrize("num_layers", [0, 2], ids=["affine", "planar"])
def test_annealing_tempers_the_unconstrained_density(num_layers, device, dtype):
    """At inverse temperature beta the training loss is -mean(beta log p(u) - log q(u)) with
    p(u) the model's density of the unconstrained vector (Jacobian included), not the model's
    log joint alone."""
    model, log_p = _half_cauchy_problem(device, dtype)
    guide = AutoPlanar(model, num_layers=num_layers, laplace_init=False)
    guide()
    with torch.no_grad():  # a guide away from its start, with correlations
        guide.affine.loc.copy_(torch.tensor([0.7, 0.4]))
        guide.affine.log_scale.copy_(torch.tensor([-0.2, 0.3]))
        guide.affine.lower.copy_(torch.tensor([[0.0, 0.0], [0.6, 0.0]]))
    elbo = FlowELBO(anneal_steps=4, anneal_start=0.2, num_particles=5, vectorize_particles=True,
                    max_plate_nesting=1)
    betas = []
    for _ in range(6):
        betas.append(elbo.beta)
        traced = poutine.trace(guide)
        loss = elbo.differentiable_loss(model, traced)
        u = traced.trace.nodes["_AutoPlanar_latent"]["value"].reshape(-1, 2).detach()
        if num_layers == 0:  # q is N(loc, L L^T): its density in closed form
            affine = guide.affine
            log_q = torch.distributions.MultivariateNormal(
                affine.loc.detach(), scale_tril=affine.scale_tril.detach()).log_prob(u)
        else:  # scored through the layers' inverses, on a copy the caches do not know
            log_q = guide.get_posterior().log_prob(u.clone()).detach()
        expected = -(betas[-1] * log_p(u) - log_q).mean()
        tol = 1e-8 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(loss.detach(), expected, atol=tol, rtol=tol)
    assert betas == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    # the reported loss() is the plain -ELBO, whatever the schedule
    kw = dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    elbo.step_count = 0
    pyro.set_rng_seed(3)
    plain = Trace_ELBO(**kw).loss(model, guide)
    pyro.set_rng_seed(3)
    assert FlowELBO(anneal_steps=4, **kw).loss(model, guide) == pytest.approx(plain)


# ---- a diverged step -------------------------------------------------------------------------

def _wall_problem(device, dtype):
    """A guide whose draws (init_scale 10) land beyond |z| = 3, where the model's density is 0."""
    three = torch.tensor(3.0, device=device, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2, device=device, dtype=dtype), 1.0)
                        .to_event(1))
        pyro.sample("wall", dist.Uniform(-three, three), obs=z.abs().max(-1).values)

    guide = AutoIAF(model, num_layers=1, hidden_dims=(8,), init_scale=10.0, laplace_init=False)
    guide()
    return model, guide


@pytest.mark.parametrize("direct", [True, False])
def test_a_diverged_step_is_skipped_and_many_in_a_row_raise(direct, device, dtype, monkeypatch):
    """An SVI step whose loss is not finite is skipped (no parameter and no optimizer state
    moves, its gradients dropped), warned about once and counted; MAX_CONSECUTIVE_SKIPS in a
    row raise a ValueError naming the model site and the draws' size; a finite step resets the
    run."""
    from pyroflows.guides import elbo as elbo_module

    monkeypatch.setattr(elbo_module, "MAX_CONSECUTIVE_SKIPS", 3)
    model, guide = _wall_problem(device, dtype)
    elbo = FlowELBO(num_particles=16, vectorize_particles=True, stick_the_landing=False,
                    direct=direct)
    before = [p.detach().clone() for p in guide.parameters()]
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = SVI(model, guide, optim, elbo)
    with pyro.validation_enabled(False):  # the draws leave Uniform's support
        with pytest.warns(RuntimeWarning, match=r"not finite .* 'wall' .* largest unconstrained"):
            assert math.isinf(svi.step())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # warned once only
            assert math.isinf(svi.step())
        assert all(torch.equal(a, p) for a, p in zip(before, guide.parameters(), strict=True))
        assert all(p.grad is None for p in guide.parameters())
        assert all(not opt.state for opt in optim.optim_objs.values())  # no Adam state either
        assert (elbo.step_count, elbo.skipped_steps) == (0, 2)
        with pytest.raises(ValueError, match=r"'wall' .* 3 steps in a row were skipped"):
            svi.step()
        with torch.no_grad():
            guide.affine.log_scale.fill_(math.log(0.1))  # narrow: every draw inside the wall
        assert math.isfinite(svi.step())
    assert (elbo.step_count, elbo.skipped_steps, elbo._skips_in_a_row) == (1, 3, 0)


def test_a_non_finite_differentiable_loss_raises(device, dtype):
    """differentiable_loss leaves the step to the caller's optimizer: a non-finite loss raises
    before anything is backpropagated."""
    model, guide = _wall_problem(device, dtype)
    elbo = FlowELBO(num_particles=16, vectorize_particles=True, stick_the_landing=False)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match=r"not finite .*'wall'"):
        elbo.differentiable_loss(model, guide).backward()
    assert all(p.grad is None for p in guide.parameters())
    assert elbo.step_count == 0


# ---- the direct path steps as the traced guide -----------------------------------------------

def _schools_with_a_model_param(device, dtype):
    """Eight schools, non-centered (a positive scale, a plate of local latents; the centered
    form's funnel has no mode for the Laplace start), with a learnt model parameter, so both
    the guide's and the model's parameters train."""
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12], device=device, dtype=dtype)
    sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18], device=device, dtype=dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        noise = pyro.param("noise", torch.ones((), device=device, dtype=dtype),
                           constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(zero, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
        with pyro.plate("J", 8):
            raw = pyro.sample("raw", dist.Normal(zero, 1.0))
            pyro.sample("obs", dist.Normal(mu + tau * raw, sigma * noise), obs=y)

    return model


@pytest.fixture
def direct_draws(monkeypatch):
    """How many times FlowELBO drew a guide directly."""
    count = [0]
    draw = direct_path.draw

    def counted(*args, **kwargs):
        count[0] += 1
        return draw(*args, **kwargs)

    monkeypatch.setattr(direct_path, "draw", counted)
    return count


def _svi_run(model, direct, steps=4, context=None, laplace=False, **elbo_kw):
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoIAF(model, num_layers=2, hidden_dims=(16, 16), laplace_init=laplace)
    guide()
    elbo = FlowELBO(direct=direct, max_plate_nesting=1, **elbo_kw)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    torch.manual_seed(1)
    with context or contextlib.nullcontext():
        losses = [svi.step() for _ in range(steps)]
    params = {name: value.detach().clone()
              for name, value in pyro.get_param_store().named_parameters()}
    return losses, params


@pytest.mark.parametrize("elbo_kw", [
    dict(num_particles=8, vectorize_particles=True, laplace=True),
    dict(num_particles=8, vectorize_particles=True, stick_the_landing=True),
    dict(num_particles=8, vectorize_particles=True, anneal_steps=6, stick_the_landing=False),
    dict(num_particles=3, vectorize_particles=False, anneal_steps=6),
    dict(num_particles=1, vectorize_particles=False),
], ids=["vectorized", "vectorized-stl", "vectorized-anneal", "sequential-anneal-stl", "one"])
def test_direct_path_steps_exactly_as_the_traced_guide(elbo_kw, direct_draws, device, dtype):
    """FlowELBO draws a set-up flow guide directly, without tracing it; Pyro's traced
    estimator (the guide traced, the model replayed against it) is the reference: the same
    losses and, after several Adam steps, the same guide and model parameters, with the
    sticking-the-landing, annealing and particle options."""
    model = _schools_with_a_model_param(device, dtype)
    got_losses, got = _svi_run(model, direct=True, **elbo_kw)
    assert direct_draws[0] == 4 * (1 if elbo_kw["vectorize_particles"]
                                   else elbo_kw["num_particles"])
    direct_draws[0] = 0
    want_losses, want = _svi_run(model, direct=False, **elbo_kw)
    assert direct_draws[0] == 0
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert got_losses == pytest.approx(want_losses, rel=tol["rtol"] * 10)
    assert got.keys() == want.keys() and "noise" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)


def test_direct_path_differentiable_loss_matches_the_traced_one(direct_draws, device, dtype):
    """The differentiable loss of the direct path has the value and the gradients (guide and
    model parameters) of the traced estimator at the same random draws."""
    model = _schools_with_a_model_param(device, dtype)
    guide = AutoIAF(model, num_layers=2, hidden_dims=(16, 16), laplace_init=False)
    guide()
    results = []
    for direct in (True, False):
        elbo = FlowELBO(direct=direct, num_particles=6, vectorize_particles=True,
                        max_plate_nesting=1)
        torch.manual_seed(3)
        with poutine.trace(param_only=True) as params:
            loss = elbo.differentiable_loss(model, guide)
        leaves = [site["value"].unconstrained() for site in params.trace.nodes.values()]
        assert any(leaf is guide.affine.packed for leaf in leaves)
        grads = torch.autograd.grad(loss, leaves)
        results.append((loss.detach(), dict(zip(params.trace.nodes, grads, strict=True))))
    assert direct_draws[0] == 1
    (got, got_grads), (want, want_grads) = results
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    assert got_grads.keys() == want_grads.keys() and "noise" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol)


def test_direct_path_with_module_local_params_steps_as_the_traced_guide(direct_draws):
    """With Pyro's module-local parameters (trained by a torch optimizer on the guide's own
    tensors; Pyro's SVI needs the global store) the guide's parameters never enter the
    global param store; the direct path then makes its param statements through
    PyroModule's attribute access (not its own one-walk registration) and steps exactly as
    the traced estimator."""
    data = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)

    def model():  # (module-local mode refuses a model's own pyro.param in a PyroModule guide)
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2, dtype=data.dtype), 1.0).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=data.dtype), 0.5))
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(loc.sum(-1, keepdim=True), scale.unsqueeze(-1)),
                        obs=data)

    runs = []
    for direct in (True, False):
        pyro.clear_param_store()
        with pyro.settings.context(module_local_params=True):
            torch.manual_seed(0)
            guide = AutoIAF(model, num_layers=2, hidden_dims=(8, 8), laplace_init=False)
            guide()
            start = [p.detach().clone() for p in guide.parameters()]
            elbo = FlowELBO(direct=direct, num_particles=4, vectorize_particles=True,
                            max_plate_nesting=1)
            optim = torch.optim.Adam(guide.parameters(), lr=1e-2)  # (SVI needs the store)
            torch.manual_seed(1)
            losses = []
            for _ in range(3):
                optim.zero_grad()
                loss = elbo.differentiable_loss(model, guide)
                loss.backward()
                optim.step()
                losses.append(loss.item())
        assert not any("AutoIAF" in name for name in pyro.get_param_store().keys())
        moved = [not torch.equal(p.detach(), s)
                 for p, s in zip(guide.parameters(), start, strict=True)]
        assert moved and all(moved)  # every guide tensor was stepped
        runs.append((losses, [p.detach().clone() for p in guide.parameters()]))
    assert direct_draws[0] == 3
    (got_losses, got), (want_losses, want) = runs
    assert got_losses == pytest.approx(want_losses, rel=1e-9)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_direct_path_steps_aside_for_handlers_and_warns_on_a_changed_model(direct_draws):
    """Under an effect handler around the step (here poutine.scale) the guide is traced as
    usual, so the handler applies to it as to the model; a model whose latent sites changed
    since the guide was set up gets Pyro's warning on the direct path too."""
    model = _schools_with_a_model_param("cpu", torch.float64)
    scaled = _svi_run(model, direct=True, context=poutine.scale(scale=0.5), steps=2,
                      num_particles=4, vectorize_particles=True)
    assert direct_draws[0] == 0
    unscaled = _svi_run(model, direct=True, steps=2, num_particles=4, vectorize_particles=True)
    assert direct_draws[0] == 2
    assert scaled[0][0] == pytest.approx(0.5 * unscaled[0][0])

    extra = [False]

    def changing():
        model()
        if extra[0]:
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    guide = AutoIAF(changing, num_layers=1, hidden_dims=(8,), laplace_init=False)
    guide()
    extra[0] = True
    elbo = FlowELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(True), pytest.warns(UserWarning, match="model but not guide"):
        elbo.differentiable_loss(changing, guide)


def _regression_with_subsampled_data(device, dtype):
    """A model with what the direct path's model scoring must treat as Pyro's trace does: a
    subsampled data plate (its subsample site is not scored), a masked observation, a
    deterministic site, a factor, a model parameter and a constrained latent."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 2, generator=gen).to(device, dtype)
    y = (x @ torch.tensor([1.0, -2.0]).to(device, dtype) + 0.3 * torch.randn(
        40, generator=gen).to(device, dtype))
    keep = torch.arange(40, device=device) % 7 != 0

    def model():
        shift = pyro.param("shift", torch.zeros((), device=device, dtype=dtype))
        w = pyro.sample("w", dist.Normal(torch.zeros(2, device=device, dtype=dtype), 2.0)
                        .to_event(1))
        sigma = pyro.sample("sigma", dist.LogNormal(torch.zeros((), device=device,
                                                                 dtype=dtype), 1.0))
        pyro.deterministic("w_norm", w.norm(dim=-1))
        pyro.factor("shrink", -0.1 * w.square().sum(-1))
        with pyro.plate("data", 40, subsample_size=16) as idx:
            mean = (x[idx] * w.unsqueeze(-2)).sum(-1) + shift
            with poutine.mask(mask=keep[idx]):
                pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)), obs=y[idx])

    return model


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "sequential"])
def test_direct_path_scores_the_model_as_the_trace_does(vectorized, direct_draws, device, dtype):
    """The direct path scores the model in one handler (no trace + replay + second pass):
    with a subsampled data plate, a masked observation, deterministic and factor sites and a
    model parameter, the losses and the parameters after several Adam steps are those of
    Pyro's traced estimator (which draws the same subsample indices in the same order)."""
    model = _regression_with_subsampled_data(device, dtype)
    kw = dict(num_particles=4, vectorize_particles=vectorized, stick_the_landing=False)
    got_losses, got = _svi_run(model, direct=True, **kw)
    assert direct_draws[0] == 4 * (1 if vectorized else 4)
    want_losses, want = _svi_run(model, direct=False, **kw)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert got_losses == pytest.approx(want_losses, rel=tol["rtol"] * 10)
    assert got.keys() == want.keys() and "shift" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)


def test_direct_path_model_errors_read_as_the_traced_ones():
    """On the direct path a model that fails names its sites' shapes as ``poutine.trace``
    does, and a repeated site name is Pyro's error."""
    state = {"fail": None}

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if state["fail"] == "shape":
            pyro.sample("obs", dist.Normal(z, 1.0).to_event(1), obs=torch.zeros(3))
        elif state["fail"] == "repeat":
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    guide = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    guide()
    elbo = FlowELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=0)
    assert elbo._direct(model, guide, (), {})
    state["fail"] = "shape"
    with pytest.raises((ValueError, RuntimeError), match=r"(?s)Sample Sites:.*z dist"):
        elbo.differentiable_loss(model, guide)
    state["fail"] = "repeat"
    with pytest.raises(RuntimeError, match="Multiple sample sites named 'obs'"):
        elbo.differentiable_loss(model, guide)


# ---- the direct path's model scoring against Pyro's trace and replay -------------------------

def _perturbed_guide(model):
    """A set-up AutoIAF for ``model`` moved off its identity start."""
    guide = AutoIAF(model, num_layers=2, hidden_dims=(8,), laplace_init=False)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return guide


def _zoo(name, device, dtype):
    """``(model, max_plate_nesting)``: models with the Pyro features whose scoring the direct
    path must reproduce."""
    gen = torch.Generator().manual_seed(11)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    zero = torch.zeros((), device=device, dtype=dtype)
    if name == "nested-plates":
        y = t(3, 4)

        def model():
            a = pyro.sample("a", dist.Normal(zero, 1.0))
            with pyro.plate("outer", 3, dim=-2):
                b = pyro.sample("b", dist.Normal(a, 1.0))
                with pyro.plate("inner", 4, dim=-1):
                    pyro.sample("y", dist.Normal(b, 0.5), obs=y)
        return model, 2
    if name == "sequential-plate":
        y = t(3)

        def model():
            # (AutoGuide refuses latents in a sequential plate: observations only)
            s = pyro.sample("s", dist.LogNormal(zero, 0.5))
            x = pyro.sample("x", dist.Normal(zero, s))
            for i in pyro.plate("seq", 3):
                pyro.sample(f"o_{i}", dist.Normal(x * (i + 1), 1.0), obs=y[i])
        return model, 1
    if name == "scale-mask-block-factor":
        y = t(6)

        def model():
            w = pyro.sample("w", dist.Normal(zero, 2.0))
            with poutine.scale(scale=0.3):
                pyro.sample("o1", dist.Normal(w, 1.0), obs=y[0])
            with poutine.mask(mask=False):
                pyro.sample("o2", dist.Normal(w, 1.0), obs=y[1])
            with poutine.block():
                pyro.sample("hidden", dist.Normal(w, 1.0), obs=y[2])
            pyro.factor("f", -0.5 * w.square())
            pyro.deterministic("w2", 2 * w)
            with pyro.plate("data", 6, subsample_size=3) as idx:
                pyro.sample("o3", dist.Normal(w, 1.0), obs=y[idx])
        return model, 1
    if name == "masked-latents":
        y = t(4)
        keep = torch.tensor([True, False, True, True], device=device)
        weights = torch.tensor([1.0, 2.0, 0.5, 3.0], device=device, dtype=dtype)

        def model():
            w = pyro.sample("w", dist.Normal(zero, 1.0))
            with pyro.plate("J", 4):
                with poutine.mask(mask=keep):
                    loc = pyro.sample("loc", dist.Normal(w, 1.0))
                with poutine.scale(scale=weights):
                    pyro.sample("y", dist.Normal(loc, 0.5), obs=y)
        return model, 1
    if name == "constrained-params":
        y = t(5).abs()

        def model():
            lo = pyro.param("lo", zero + 0.5, constraint=dist.constraints.interval(0.1, 2.0))
            lo_again = pyro.param("lo")  # the same param read twice
            simplex = pyro.param("p", torch.ones(3, device=device, dtype=dtype) / 3,
                                 constraint=dist.constraints.simplex)
            rate = pyro.sample("rate", dist.Gamma(zero + 2.0, 1.0),
                               infer={"is_auxiliary": False, "custom_flag": 1})
            with pyro.plate("data", 5):
                pyro.sample("y", dist.Gamma(rate * lo + lo_again * simplex[0], 1.0), obs=y)
        return model, 1
    if name == "obs-mask":
        y = t(5)
        obs_mask = torch.tensor([True, False, True, True, False], device=device)

        def model():
            m = pyro.sample("m", dist.Normal(zero, 1.0))
            with pyro.plate("data", 5):
                pyro.sample("y", dist.Normal(m, 1.0), obs=y, obs_mask=obs_mask)
        return model, 1
    raise KeyError(name)


ZOO = ["nested-plates", "sequential-plate", "scale-mask-block-factor", "masked-latents",
       "constrained-params", "obs-mask"]


def _reference(model, guide_trace, plate=None):
    """Pyro's own scoring: trace(replay(model)), pruned of subsample sites, compute_log_prob."""
    replayed = poutine.replay(model, trace=guide_trace)
    if plate is not None:
        replayed = plate(replayed)
    trace = prune_subsample_sites(poutine.trace(replayed).get_trace())
    trace.compute_log_prob()
    return trace, trace.log_prob_sum()


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "one"])
@pytest.mark.parametrize("name", ZOO)
def test_replay_and_score_is_pyros_trace_replay_and_compute_log_prob(name, vectorized, device,
                                                                     dtype):
    """_ReplayAndScore against poutine.trace(poutine.replay(model)) + compute_log_prob on the
    same guide draw and the same subsample indices: the same sample sites, the same per-site
    log densities (scaled and masked), the same sum, and the same gradients in the guide's and
    the model's parameters."""
    model, mpn = _zoo(name, device, dtype)
    guide = _perturbed_guide(model)
    n = 3
    mpn_used = mpn + 1 if vectorized else mpn
    shape = (n,) + (1,) * (mpn_used - 1) if vectorized else ()
    guide_trace = direct_path.draw(guide, shape, False)[0]
    plate = (pyro.plate("num_particles_vectorized", n, dim=-mpn_used) if vectorized
             else None)
    torch.manual_seed(5)
    want_trace, want = _reference(model, guide_trace, plate)
    torch.manual_seed(5)
    scored = _ReplayAndScore(guide_trace, mpn_used, True)
    with plate if plate is not None else contextlib.nullcontext():
        scored.run(model, (), {})
    got, got_trace = scored.log_prob_sum, scored.trace
    assert _PYRO_STACK == []
    want_sites = [k for k, s in want_trace.nodes.items() if s["type"] == "sample"]
    got_sites = [k for k, s in prune_subsample_sites(got_trace).nodes.items()
                 if s["type"] == "sample"]
    assert got_sites == want_sites
    for k in want_sites:
        torch.testing.assert_close(got_trace.nodes[k]["log_prob"],
                                   want_trace.nodes[k]["log_prob"], **_tol(dtype))
        torch.testing.assert_close(got_trace.nodes[k]["value"], want_trace.nodes[k]["value"])
    torch.testing.assert_close(got, want, **_tol(dtype))
    leaves = list(guide.parameters()) + [
        v for _, v in pyro.get_param_store().named_parameters()
        if not any(v is p for p in guide.parameters())]
    g_got = torch.autograd.grad(got, leaves, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want, leaves, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **_tol(dtype))


@pytest.mark.parametrize("stl", [False, True], ids=["plain", "stl"])
@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("name", ZOO)
def test_direct_flowelbo_is_pyros_trace_elbo(name, vectorized, stl, device, dtype):
    """End to end: FlowELBO's direct path against Pyro's own Trace_ELBO at the same seed
    (vectorized particles with max_plate_nesting given; sequential particles with it left
    unset), both sticking the landing or neither (the guide's ``stick_the_landing``, which
    Trace_ELBO reads through the guide's posterior): the same loss value and the same
    gradients in every guide and model parameter."""
    model, mpn = _zoo(name, device, dtype)
    guide = _perturbed_guide(model)
    guide.stick_the_landing = stl
    kw = (dict(num_particles=4, vectorize_particles=True, max_plate_nesting=mpn) if vectorized
          else dict(num_particles=2))
    results = []
    for elbo in (FlowELBO(direct=True, **kw), Trace_ELBO(**kw)):
        if isinstance(elbo, FlowELBO):
            assert elbo._direct(model, guide, (), {})
        torch.manual_seed(7)
        with poutine.trace(param_only=True) as params:
            loss = elbo.differentiable_loss(model, guide)
        names = sorted(params.trace.nodes)
        leaves = [params.trace.nodes[k]["value"].unconstrained() for k in names]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((loss.detach(), dict(zip(names, grads, strict=True))))
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert got_g.keys() == want_g.keys()
    for k in want_g:
        if want_g[k] is None:
            assert got_g[k] is None or not got_g[k].abs().any()
        else:
            torch.testing.assert_close(got_g[k], want_g[k], **_tol(dtype))


def test_in_place_mutation_after_a_site_scores_as_trace_elbo(device, dtype):
    """A model that edits a distribution's parameters in place after its site (a state buffer)
    scores as Pyro scores it: after the model returns."""
    y = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)

    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros((), device=device, dtype=dtype), 1.0))
        state = torch.zeros(3, device=device, dtype=dtype)
        for i in range(3):
            state[i] = x * (i + 1)
            pyro.sample(f"o_{i}", dist.Normal(state, 1.0).to_event(1), obs=y)

    guide = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    guide()
    guide_trace = direct_path.draw(guide, (), False)[0]
    want = _reference(model, guide_trace)[1]
    scored = _ReplayAndScore(guide_trace, 0, True)
    scored.run(model, (), {})
    torch.testing.assert_close(scored.log_prob_sum, want, **_tol(dtype))


def test_a_failing_model_leaves_no_handler_behind_and_keeps_its_exception_type():
    """A model error on the direct path: the handler stack is empty afterwards (the next step
    runs normally), an exception type other than ValueError/RuntimeError passes unchanged,
    and a ValueError gets the site shapes appended once."""
    state = {"fail": None}

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("o", dist.Normal(z, 1.0).to_event(1), obs=torch.zeros(2))
        if state["fail"] is not None:
            raise state["fail"]("boom")

    guide = AutoIAF(model, num_layers=1, hidden_dims=(8,), laplace_init=False)
    guide()
    elbo = FlowELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=0)
    assert elbo._direct(model, guide, (), {})
    state["fail"] = KeyError
    with pytest.raises(KeyError, match="boom"):
        elbo.differentiable_loss(model, guide)
    assert _PYRO_STACK == []
    state["fail"] = ValueError
    with pytest.raises(ValueError, match="boom") as info:
        elbo.differentiable_loss(model, guide)
    assert str(info.value).count("Sample Sites:") == 1
    assert _PYRO_STACK == []
    state["fail"] = None
    assert torch.isfinite(elbo.differentiable_loss(model, guide))
