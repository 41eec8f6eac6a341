"""FlowELBO's direct path against Pyro's trace, replay and Trace_ELBO."""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import prune_subsample_sites

import pyroflows as pf
from pyroflows.guides import AutoIAF, AutoPlanar, FlowELBO, direct, landing
from pyroflows.guides.direct import _ReplayAndScore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (see conftest)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _perturbed_guide(model):
    """A set-up AutoIAF for ``model`` moved off its identity start."""
    guide = AutoIAF(model, num_layers=2, hidden_dims=(8,), laplace_init=False)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return guide


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---- a zoo of models for the model-scoring handler -------------------------------------------
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
    guide_trace = direct.draw(guide, shape, False)[0]
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


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("name", ZOO)
def test_direct_flowelbo_is_pyros_trace_elbo(name, vectorized, device, dtype):
    """End to end: FlowELBO's direct path (no sticking the landing) against Pyro's own
    Trace_ELBO at the same seed (vectorized particles with max_plate_nesting given; sequential
    particles with it left unset): the same loss value and the same gradients in every guide
    and model parameter."""
    model, mpn = _zoo(name, device, dtype)
    guide = _perturbed_guide(model)
    kw = (dict(num_particles=4, vectorize_particles=True, max_plate_nesting=mpn) if vectorized
          else dict(num_particles=2))
    results = []
    for elbo in (FlowELBO(direct=True, stick_the_landing=False, **kw), Trace_ELBO(**kw)):
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
    guide_trace = direct.draw(guide, (), False)[0]
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


GUIDES = {
    "iaf": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=False),
    "iaf-laplace": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=True),
    "planar": lambda m: AutoPlanar(m, num_layers=3, laplace_init=False),
}


@pytest.mark.parametrize("make", sorted(GUIDES))
@pytest.mark.parametrize("case", ["subsampled-latents", "scale-around-step"])
def test_traced_stl_matches_the_inverse_route(case, make, monkeypatch, device, dtype):
    """The traced path (latents in a subsampled plate; a poutine.scale around the step) with
    sticking the landing, for IAF (with and without the Laplace layers in the stack) and
    planar guides: the gradients from the stack's cached draw equal those with the Jacobian
    route switched off (STL_JACOBIAN_MAX_DIM = 0: the flow's inverse)."""
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
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = GUIDES[make](model)
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
