"""Neural spline flows: the rational-quadratic spline against its definition (it passes through
its knots with the knots' slopes, rises, joins the identity tails, inverts), the conditional
NSF layer through the conformance checks of conditional layers, the one-pass density and
D-pass sampling, a new layer as the identity, and the density estimator with ``flow="nsf"``.
The plain NSF layer is in the conformance suite (``test_transforms.py``) and the Hypothesis
properties (``test_layer_properties.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows.testing import check_conditional_transform, randomize_parameters_, tolerances
from pyroflows.transforms.spline import (
    MIN_BIN,
    MIN_DERIVATIVE,
    rational_quadratic_spline,
)

K, D, BOUND = 6, 3, 2.0


def _raw(device, dtype, batch=(5,), seed=0, scale=1.5):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (scale * torch.randn(*batch, *shape, generator=gen, dtype=torch.float64)).to(
            device, dtype)

    return draw(K, D), draw(K, D), draw(K - 1, D)


def _knots_by_hand(raw: np.ndarray) -> np.ndarray:
    """The K + 1 knots of the definition (numpy, float64): bins of shares
    MIN_BIN + (1 - K MIN_BIN) softmax(raw) of [-B, B]."""
    e = np.exp(raw - raw.max(axis=-2, keepdims=True))
    shares = MIN_BIN + (1 - K * MIN_BIN) * e / e.sum(axis=-2, keepdims=True)
    inner = -BOUND + 2 * BOUND * np.cumsum(shares, axis=-2)
    first = np.full(raw.shape[:-2] + (1, raw.shape[-1]), -BOUND)
    return np.concatenate([first, inner], axis=-2)


def test_spline_passes_through_its_knots_with_their_slopes(device, dtype):
    """At every knot x^k (computed here from the definition) the spline is y^k and its
    derivative (by autograd) is delta^k: softplus(raw + c) + MIN_DERIVATIVE inside, 1 at the
    ends; exp(log_det) is that derivative."""
    rw, rh, rd = _raw(device, dtype)
    xk = _knots_by_hand(rw.double().cpu().numpy())
    yk = _knots_by_hand(rh.double().cpu().numpy())
    inner = torch.nn.functional.softplus(rd.double().cpu() + math.log(math.expm1(
        1 - MIN_DERIVATIVE))) + MIN_DERIVATIVE
    slopes = torch.cat([torch.ones(5, 1, D, dtype=torch.float64), inner,
                        torch.ones(5, 1, D, dtype=torch.float64)], dim=-2).numpy()
    # float32: the knots' own rounding moves a point by up to 1e-4 of a narrow bin's width,
    # and the slope along the bin with it
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else tolerances(dtype)
    for k in range(K + 1):
        x = torch.as_tensor(xk[:, k, :], device=device, dtype=dtype).requires_grad_(True)
        y, log_det = rational_quadratic_spline(x, rw, rh, rd, BOUND)
        (slope,) = torch.autograd.grad(y.sum(), x)
        np.testing.assert_allclose(y.detach().double().cpu().numpy(), yk[:, k, :], **tol)
        np.testing.assert_allclose(slope.double().cpu().numpy(), slopes[:, k, :], **tol)
        np.testing.assert_allclose(log_det.exp().detach().double().cpu().numpy(),
                                   slopes[:, k, :], **tol)


def test_spline_rises_is_continuous_and_has_identity_tails(device, dtype):
    """On a fine grid over [-2B, 2B]: increasing, no jump bigger than the slope allows,
    the identity (log-det 0) outside [-B, B]; the inverse returns the grid and the same
    log-det."""
    rw, rh, rd = _raw(device, dtype, batch=())
    grid = torch.linspace(-2 * BOUND, 2 * BOUND, 4001, dtype=torch.float64)
    x = grid[:, None].expand(-1, D).to(device, dtype)
    y, log_det = rational_quadratic_spline(x, rw, rh, rd, BOUND)
    step = float(grid[1] - grid[0])
    rises = y.diff(dim=0)
    assert (rises > 0).all()
    # a jump would exceed the largest slope times the step
    assert (rises <= step * log_det.exp().max(dim=0).values * 1.01 + 1e-6).all()
    outside = x.abs() > BOUND
    assert torch.equal(y[outside], x[outside])
    assert torch.equal(log_det[outside], torch.zeros_like(log_det[outside]))
    x_back, log_det_back = rational_quadratic_spline(y, rw, rh, rd, BOUND, inverse=True)
    tol = tolerances(dtype)
    torch.testing.assert_close(x_back, x, rtol=tol["rtol"], atol=10 * tol["atol"])
    torch.testing.assert_close(log_det_back, log_det, rtol=tol["rtol"], atol=10 * tol["atol"])


def test_extreme_bins_and_slopes_stay_finite_and_invertible(device, dtype):
    """Raw outputs far out (one bin takes almost all the interval, slopes at their floor or
    large): every value and gradient finite, the round trip within the map's conditioning."""
    rw, rh, rd = _raw(device, dtype, seed=3, scale=40.0)
    x = torch.linspace(-BOUND, BOUND, 101, dtype=torch.float64)[:, None, None].expand(
        -1, 5, D).to(device, dtype).clone().requires_grad_(True)
    params = [p.clone().requires_grad_(True) for p in (rw, rh, rd)]
    y, log_det = rational_quadratic_spline(x, *params, BOUND)
    grads = torch.autograd.grad(y.sum() + log_det.sum(), [x, *params])
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()
    assert all(torch.isfinite(g).all() for g in grads)
    x_back, _ = rational_quadratic_spline(y.detach(), *params, BOUND, inverse=True)
    # slopes here range over 1e-8 .. 1e2: the inverse at x resolves y's rounding (the
    # interval's resolution) divided by the slope there, and no better
    resolution = torch.finfo(dtype).eps * 2 * BOUND
    assert ((x_back - x.detach()).abs() <= 1e3 * resolution / log_det.detach().exp()).all()


CASES = [({}, 3), ({"order": [1, 0, 2], "activation": torch.nn.Tanh}, 3),
         ({"bins": 3, "bound": 0.5}, 3),  # most inputs in the identity tails
         ({}, 1)]
IDS = ["default", "order-tanh", "tails", "1d"]


@pytest.mark.parametrize("kwargs, dim", CASES, ids=IDS)
def test_conditional_nsf_conformance(kwargs, dim, device, dtype):
    """pyroflows.testing's checks of conditional layers: shapes and broadcasting, round trips,
    log-det per context row against the autograd Jacobian, gradients to the input, context
    and parameters, save/load, no stale cache across contexts, bad contexts."""
    def factory():
        # a fixed start (the checks then move it by a seeded draw): an unseeded one can give a
        # spline whose slope reaches 10^3 where the checks' y points lie, and there no float32
        # inverse returns y to the checks' fixed 2e-3 (the conformance checks' tolerances are
        # fixed; the Hypothesis properties, whose tolerances follow the conditioning, draw
        # such splines on purpose)
        torch.manual_seed(0)
        return pf.transforms.conditional_nsf(dim, 2, hidden_dims=(12, 10), **kwargs)

    check_conditional_transform(factory, dim, 2, device=device, dtype=dtype)


def test_new_layers_are_the_identity(device, dtype):
    """A zero network output is the identity spline: plain and conditional, for any context,
    to rounding (the knots are sums of equal bins)."""
    x = 2 * torch.randn(7, D, dtype=torch.float64).to(device, dtype)
    plain = pf.transforms.nsf(D, hidden_dims=(8,)).to(device, dtype)
    conditional = pf.transforms.conditional_nsf(D, 2, hidden_dims=(8,)).to(device, dtype)
    c = torch.randn(7, 2, dtype=torch.float64).to(device, dtype)
    eps = torch.finfo(dtype).eps
    for t in (plain, conditional.condition(c)):
        for v, log_det in (t.forward_and_log_det(x), t.inverse_and_log_det(x)):
            torch.testing.assert_close(v, x, rtol=0, atol=20 * eps)
            torch.testing.assert_close(log_det, torch.zeros_like(log_det), rtol=0,
                                       atol=20 * eps)


def test_log_prob_takes_one_pass_and_sampling_one_per_coordinate(device, dtype):
    dim = 4
    layer = pf.transforms.conditional_nsf(dim, 2, hidden_dims=(8,)).to(device, dtype)
    randomize_parameters_(layer, scale=0.3, seed=2)
    calls = []
    layer.conditioner.register_forward_hook(lambda *_: calls.append(1))
    c = torch.randn(6, 2, dtype=torch.float64).to(device, dtype)
    base = Independent(Normal(torch.zeros(dim, device=device, dtype=dtype), 1.0), 1)
    q = TransformedDistribution(base, [layer.condition(c)])
    y = q.sample((3, 6))
    assert len(calls) == dim and y.shape == (3, 6, dim)
    calls.clear()
    q.log_prob(torch.randn(3, 6, dim, dtype=torch.float64).to(device, dtype))
    assert len(calls) == 1


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 6), scale=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**16), ties=st.booleans(), conditioned=st.booleans(),
       tanh=st.booleans())
def test_sampling_by_levels_is_the_plain_passes(dim, scale, seed, ties, conditioned, tanh):
    """Without autograd, sampling (the D-pass direction) computes each hidden unit once, level
    by level (``_fast.made.sequential_levels``): the same draws and log-dets as a full network
    pass per level (``fused = False``), at the parameters' extremes, orders with ties, a
    context broadcast against the draws, ReLU or tanh networks (float64)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randint(0, max(1, dim - 1), (dim,), generator=gen) if ties else None
    activation = torch.nn.Tanh if tanh else torch.nn.ReLU
    if conditioned:
        owner = pf.transforms.conditional_nsf(dim, 3, hidden_dims=(12, 9), bins=5, order=order,
                                              activation=activation).double()
        randomize_parameters_(owner, scale=scale, seed=seed)
        layer = owner.condition(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    else:
        layer = pf.transforms.nsf(dim, hidden_dims=(12, 9), bins=5, order=order,
                                  activation=activation).double()
        randomize_parameters_(layer, scale=scale, seed=seed)
    z = 2 * torch.randn(3, 4, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got = layer.forward_and_log_det(z)
        layer.fused = False
        want = layer.forward_and_log_det(z)
        layer.fused = True
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_sampling_by_levels_skips_the_full_passes(monkeypatch, device, dtype):
    """Sampling without autograd runs no full network pass (``spline_parameters``), and its
    draws invert back to the base draws by the one-pass density direction; with autograd, or
    ``fused = False`` (on a conditional layer too), one full pass a level as before."""
    from pyroflows.transforms.spline import SplineAutoregressiveCore

    layer = pf.transforms.nsf(5, hidden_dims=(16, 16)).to(device, dtype)
    randomize_parameters_(layer, scale=0.3, seed=3)
    full = []
    real = SplineAutoregressiveCore.spline_parameters
    monkeypatch.setattr(SplineAutoregressiveCore, "spline_parameters",
                        lambda self, u: full.append(1) or real(self, u))
    z = torch.randn(50, 5, dtype=torch.float64).to(device, dtype)
    with torch.no_grad():
        y, log_det = layer.forward_and_log_det(z)
    assert not full
    back, back_log_det = layer.inverse_and_log_det(y)
    torch.testing.assert_close(back, z, **tolerances(dtype))
    torch.testing.assert_close(back_log_det, log_det, **tolerances(dtype))  # (the forward's)
    full.clear()
    layer.forward_and_log_det(z)
    assert len(full) == 5
    full.clear()
    layer.fused = False
    with torch.no_grad():
        layer.forward_and_log_det(z)
    assert len(full) == 5
    # a conditional layer's switch reaches the transforms it conditions
    owner = pf.transforms.conditional_nsf(5, 2, hidden_dims=(16,)).to(device, dtype)
    randomize_parameters_(owner, scale=0.3, seed=4)
    c = torch.randn(50, 2, dtype=torch.float64).to(device, dtype)
    for fused, passes in ((True, 0), (False, 5)):
        owner.fused = fused
        full.clear()
        with torch.no_grad():
            owner.condition(c).forward_and_log_det(z)
        assert len(full) == passes


def test_bad_arguments_get_a_value_error():
    for bad in ({"bins": 1}, {"bins": 2.5}, {"bound": 0.0}, {"bound": math.inf}):
        with pytest.raises(ValueError):
            pf.transforms.nsf(2, **bad)
        with pytest.raises(ValueError):
            pf.transforms.conditional_nsf(2, 3, **bad)


def test_estimator_fits_a_bimodal_density_better_than_an_affine_flow(device, dtype, tmp_path):
    """Two well-separated modes in 2-D, equal budgets: the spline flow's held-out
    log-likelihood is within 0.15 nats of the true density's and above the affine MAF's of the
    same size; its draws put half their mass in each mode; save/load reproduces it exactly."""
    gen = np.random.default_rng(0)

    def data(n):
        sign = gen.choice([-1.0, 1.0], size=(n, 1))
        return np.concatenate([sign * 2.0, np.zeros((n, 1))], axis=1) + 0.3 * gen.standard_normal(
            (n, 2))

    def log_p(x):
        comp = [-0.5 * (((x - m) / 0.3) ** 2).sum(1) - 2 * math.log(0.3) - math.log(2 * math.pi)
                for m in (np.array([2.0, 0.0]), np.array([-2.0, 0.0]))]
        return np.logaddexp(*comp) - math.log(2)

    x, x_test = data(3000), data(2000)
    truth = float(log_p(x_test).mean())
    scores = {}
    for flow in ("nsf", "maf"):
        est = pf.DensityEstimator(flow, num_layers=2, hidden_dims=(32,), dtype=dtype, seed=0)
        est.fit(torch.as_tensor(x, device=device, dtype=dtype), max_epochs=60, progress=False)
        scores[flow] = est.score(torch.as_tensor(x_test, device=device, dtype=dtype))
        if flow == "nsf":
            draws = est.sample(4000, seed=1)
            assert draws.shape == (4000, 2) and draws.device.type == device.type
            assert abs(float((draws[:, 0] > 0).double().mean()) - 0.5) < 0.05
            est.save(tmp_path / "nsf.pt")
            loaded = pf.DensityEstimator.load(tmp_path / "nsf.pt", device=device)
            xt = torch.as_tensor(x_test[:100], device=device, dtype=dtype)
            assert torch.equal(loaded.log_prob(xt), est.log_prob(xt))
            assert loaded.get_params()["flow"] == "nsf"
    assert scores["nsf"] == pytest.approx(truth, abs=0.15)
    assert scores["nsf"] > scores["maf"]



@pytest.mark.parametrize("grad", [True, False])
def test_sampling_follows_the_order_of_a_loaded_state(grad, device, dtype):
    """The D-pass inverse solves level by level in the order its network holds, read at each
    call (with autograd: full passes; without: the levelled kernel's plan): a state of another
    order loaded into a layer still inverts exactly."""
    source = pf.transforms.nsf(3, hidden_dims=(8,), order=[2, 0, 1])
    randomize_parameters_(source, scale=0.3, seed=4)
    layer = pf.transforms.nsf(3, hidden_dims=(8,)).to(device, dtype)  # order 0, 1, 2
    z = torch.randn(6, 3, dtype=torch.float64).to(device, dtype)
    with torch.set_grad_enabled(grad):
        layer(z)  # sampled once under its own order (the levels are then kept) ...
    layer.load_state_dict(source.state_dict())  # ... which the loaded state replaces
    source = source.to(device, dtype)
    with torch.set_grad_enabled(grad):
        y = layer(z)
    torch.testing.assert_close(y, source(z), **tolerances(dtype))
    torch.testing.assert_close(layer.inv(y.clone()), z, **tolerances(dtype))
