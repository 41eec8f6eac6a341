"""Cross-checks of the speed paths against independent references: FlowELBO's one-handler
model scoring (``_ReplayAndScore``) against Pyro's own ``poutine.trace(poutine.replay(model))`` +
``compute_log_prob`` and ``Trace_ELBO``; sticking the landing on the traced path
(``_path_entropy``) against the flow's inverse; the blocked MADE products against the dense
network; ``check_gradients``' comparison with ``torch.func.grad`` (can it catch a wrong
backward, and does it accept frozen parameters); ``DensityEstimator``'s snapshot."""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import prune_subsample_sites

import pyroflows as pf
from pyroflows import testing as pf_testing
from pyroflows.density import _snapshot
from pyroflows.guides import AutoIAF, AutoPlanar, FlowELBO, _path_entropy, _ReplayAndScore
from pyroflows.nn import MADE
from pyroflows.nn import made as made_module

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
    guide_trace = guide._direct_draw(shape, False)[0]
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
    guide_trace = guide._direct_draw((), False)[0]
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


# ---- sticking the landing on the traced path -------------------------------------------------
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
    assert _path_entropy(posterior, z1) is None
    got = _path_entropy(posterior, z2)
    assert got is not None and got.shape == (4,)
    _check_entropy(guide, posterior, z2, got, dtype)
    z4 = posterior.rsample((4,)).detach()
    z4.mul_(1.0)
    assert _path_entropy(posterior, z4) is None
    z5 = posterior.rsample((4,))
    with torch.no_grad():
        next(iter(guide.parameters())).add_(0.01)
    assert _path_entropy(posterior, z5) is None
    with torch.no_grad():
        z6 = posterior.rsample((4,))
    assert _path_entropy(posterior, z6) is None
    other = guide.get_posterior()
    z7 = other.rsample((4,))
    got7 = _path_entropy(posterior, z7)  # the same stack: the cache holds z7's base point
    if got7 is not None:
        _check_entropy(guide, posterior, z7, got7, dtype)


@pytest.mark.parametrize("make", sorted(MAKERS))
def test_path_entropy_of_expanded_and_unbatched_draws_is_the_inverse(make, device, dtype):
    """An expanded posterior (what a plate does to the guide's site) and an unbatched draw
    (one particle): the Jacobian route's value and z-gradient are the inverse route's."""
    guide, posterior = _posterior(MAKERS[make], device, dtype)
    expanded = posterior.expand((2, 3))
    z = expanded.rsample()
    got = _path_entropy(expanded, z)
    assert got is not None and got.shape == (2, 3)
    _check_entropy(guide, expanded, z, got, dtype)
    z = posterior.rsample()
    got = _path_entropy(posterior, z)
    assert got is not None and got.shape == ()
    _check_entropy(guide, posterior, z, got, dtype)
    z = posterior.rsample((2,))[0]  # an unbatched tensor that is not the remembered draw
    assert _path_entropy(posterior, z) is None


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
    real = pf.guides._path_entropy

    def counted(posterior, value):
        out = real(posterior, value)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(pf.guides, "_path_entropy", counted)
    for max_dim in (256, 0):
        monkeypatch.setattr(pf.guides, "STL_JACOBIAN_MAX_DIM", max_dim)
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


# ---- blocked MADE products ---------------------------------------------------------------
def test_blocked_forward_follows_a_loaded_order():
    """Real thresholds: D = 300 inputs, 320-wide hidden layers (first layer and head are
    blocked for the identity order). After loading the state of the same network with a
    random order, the fused forward must still be the network's forward."""
    torch.manual_seed(0)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1)).tolist()
    net = MADE(300, (320, 320), num_params=1)
    other = MADE(300, (320, 320), num_params=1, order=order)
    with torch.no_grad():
        other.flat_parameters.normal_(0.0, 0.05).mul_(other.mask)
    net.load_state_dict(other.state_dict())
    x = torch.randn(5, 300)
    with torch.no_grad():
        got, _ = net.fused_forward(x, *net.masked_weights())
        want = net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["tanh-zero-first", "ties-narrow", "no-hidden"])
def test_blocked_network_forward_and_backward_are_autograd(case, monkeypatch):
    """Blocked products (small-block thresholds) for layouts the session's tests did not use:
    a tanh network with zero_first (rows that see no input and a masked bias), an order
    with ties and hidden widths below D (width not a multiple of the block size) and a
    network without hidden layers: the fused
    forward and the fused backward (input and weight gradients) are autograd through
    MADE.forward, in float64."""
    monkeypatch.setattr(made_module, "_BLOCK_MIN_WIDTH", 16)
    monkeypatch.setattr(made_module, "_BLOCK_SIZE", 8)
    monkeypatch.setattr(made_module, "_BLOCK_MAX_FRACTION", 1.0)
    dtype = torch.float64
    if case == "tanh-zero-first":  # ten features of rank 0: head row blocks that see nothing
        net = MADE(20, (33, 27), num_params=2, activation=torch.nn.Tanh, zero_first=True,
                   order=[0] * 10 + list(range(1, 11)))
        assert any(c0 == c1 for r0, r1, c0, c1
                   in net.block_plans(net.masked_weights()[0])[-1].rows)
    elif case == "no-hidden":  # a masked linear map: the head alone, blocked
        net = MADE(24, (), num_params=2)
    else:
        net = MADE(30, (18, 21), num_params=3, order=[k // 4 for k in range(30)][::-1])
    net = net.to(dtype)
    assert all(p is not None for p in net.block_plans(net.masked_weights()[0]))
    pf_testing.randomize_parameters_(net, scale=0.5)
    with torch.no_grad():
        net.flat_parameters.mul_(net.mask)
    x = torch.randn(6, net.features, dtype=dtype, requires_grad=True)
    out = net(x)
    grad_out = torch.randn_like(out)
    gx, gflat = torch.autograd.grad(out, (x, net.flat_parameters), grad_out)
    with torch.no_grad():
        weights, biases = net.masked_weights()
        got, inputs = net.fused_forward(x.detach(), weights, biases)
        grad_flat = torch.zeros_like(net.flat_parameters)
        got_gx = net.fused_backward(grad_out, inputs, weights, grad_flat, True)
    torch.testing.assert_close(got, out.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_gx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_flat, gflat, rtol=1e-10, atol=1e-12)


# ---- check_gradients against torch.func.grad ----------------------------------------------------
def _wide_iaf():
    return pf.flows.build("iaf", 8, num_layers=2, hidden_dims=(256, 256)).double()


@pytest.mark.parametrize("kernel", ["_blocked_input_grad", "_blocked_weight_grad"])
def test_check_gradients_catches_a_wrong_blocked_backward(kernel, monkeypatch):
    """Mutation test: a blocked backward kernel off by 1% in one block must make
    check_gradients fail (the reference, torch.func.grad, runs the plain operations, not the
    kernels); unmutated, the same check passes."""
    flow = _wide_iaf()
    pf_testing.randomize_parameters_(flow, scale=0.3)
    pf_testing.check_gradients(flow, 8)
    real = getattr(made_module, kernel)
    calls = [0]

    def wrong(*args):
        calls[0] += 1
        if kernel == "_blocked_input_grad":
            return real(*args) * 1.01
        real(*args)
        args[-1].mul_(1.01)

    monkeypatch.setattr(made_module, kernel, wrong)
    with pytest.raises(AssertionError):
        pf_testing.check_gradients(flow, 8)
    assert calls[0] > 0


def test_check_gradients_with_frozen_parameters_and_a_mixed_stack():
    """A stack with one parameter frozen (requires_grad False): the names, the autograd
    gradients and the reference line up (no false failure); a FlowStack holding a plain
    torch transform is skipped by the reference, not failed."""
    flow = pf.flows.build("maf", 4, num_layers=2, hidden_dims=(16,)).double()
    pf_testing.randomize_parameters_(flow, scale=0.3)
    first = next(iter(flow.parameters()))
    first.requires_grad_(False)
    pf_testing.check_gradients(flow, 4)
    mixed = pf.flows.FlowStack([pf.transforms.planar(4).double(),
                                torch.distributions.transforms.AffineTransform(0.5, 2.0)])
    assert pf_testing._plain_gradients(mixed, torch.randn(3, 4, dtype=torch.float64),
                                       False) is None


class _LegacyScale(torch.autograd.Function):
    """y = x exp(s), with a correct hand-written backward, in the pre-functorch style (no
    setup_context), as many user extensions are written."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s.exp()

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s.exp(), (g * x * s.exp()).reshape(-1, x.shape[-1]).sum(0)


class _UserElementwise(pf.transforms.base.FlowTransform):
    """A user's own, correct FlowTransform: y = x exp(s)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.s = torch.nn.Parameter(torch.linspace(-0.5, 0.5, dim))

    def forward_and_log_det(self, x):
        return _LegacyScale.apply(x, self.s), self.s.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y):
        return y * (-self.s).exp(), self.s.sum().expand(y.shape[:-1])


def test_check_gradients_accepts_a_correct_user_transform_with_a_custom_function():
    """A correct user transform whose forward uses a torch.autograd.Function without
    setup_context (torch.func cannot run it) passes check_gradients: there is no plain
    reference to compare with, not a failure."""
    pf_testing.check_gradients(_UserElementwise(3).double(), 3)


# ---- DensityEstimator snapshot -----------------------------------------------------------------
def test_snapshot_clones_shared_tensors_once_and_keeps_distinct_views_apart():
    """Keys holding the same tensor share one clone; two different views of one storage
    (other offset or stride) stay distinct and keep their own values; the snapshot does not
    follow later edits of the module."""
    module = torch.nn.Module()
    base = torch.arange(12.0)
    module.register_buffer("a", base.view(3, 4))
    module.register_buffer("a_again", base.view(3, 4))
    module.register_buffer("row", base[4:8])
    module.register_buffer("col", base.view(3, 4)[:, 1])
    module.register_buffer("empty1", torch.zeros(0))
    module.register_buffer("empty2", torch.zeros(0, dtype=torch.float64))
    snap = _snapshot(module)
    assert snap["a"] is snap["a_again"]
    assert snap["row"] is not snap["a"] and snap["col"] is not snap["a"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(snap[key], value)
        assert snap[key].dtype == value.dtype
    base.add_(100.0)
    assert float(snap["a"][0, 0]) == 0.0 and float(snap["col"][2]) == 9.0
    assert math.isclose(float(snap["row"][0]), 4.0)
