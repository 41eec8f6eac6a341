"""Conditional IAF, MAF, RealNVP and NSF over a batch of contexts: round trips, log-dets against the
autograd Jacobian per row, the autoregressive structure, each row equal to the plain layer
whose first bias is that row's, gradients (gradcheck; the fused kernels against the plain
path), broadcasting, save/load, no stale cache across contexts, bad contexts, and the MADE's
context path (state dicts of networks without one unchanged)."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows.nn import MADE
from pyroflows.testing import check_conditional_transform, randomize_parameters_, tolerances

C = 3

# (constructor, dim, keyword arguments): small cases, a custom order, the compact coupling
CASES = [
    ("iaf", 4, {}),
    ("iaf", 4, {"order": [2, 0, 3, 1], "activation": torch.nn.Tanh}),
    ("iaf", 3, {"gated": True}),
    ("maf", 4, {}),
    ("maf", 4, {"order": [1, 1, 0, 2]}),
    ("realnvp", 4, {"mask": [True, False, True, False]}),
    ("realnvp", 32, {}),  # contiguous halves at D >= 32: the compact network
    ("nsf", 4, {}),
    ("nsf", 4, {"order": [1, 1, 0, 2], "bins": 5}),
]
IDS = [f"{n}-{d}-{'-'.join(k) or 'default'}" for n, d, k in CASES]


def _layer(name, dim, kwargs, device, dtype, fused=True, seed=1):
    ctor = getattr(pf.transforms, f"conditional_{name}")
    torch.manual_seed(0)
    layer = ctor(dim, C, hidden_dims=(12, 10), **kwargs)
    randomize_parameters_(layer, scale=0.3, seed=seed)
    layer = layer.to(device=device, dtype=dtype)
    layer.fused = fused
    return layer


def _draw(shape, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def _order(name, dim, kwargs):
    if name == "realnvp":
        mask = kwargs.get("mask")
        mask = torch.arange(dim) < dim // 2 if mask is None else torch.tensor(mask)
        return (~mask).long()
    order = kwargs.get("order")
    return torch.arange(dim) if order is None else torch.tensor(order)


@pytest.mark.parametrize("name, dim, kwargs", CASES, ids=IDS)
def test_round_trips_and_log_det_against_the_jacobian_per_row(name, dim, kwargs, device, dtype):
    layer = _layer(name, dim, kwargs, device, dtype)
    batch = 5
    c = _draw((batch, C), device, dtype, 2)
    x = _draw((batch, dim), device, dtype, 3)
    t = layer.condition(c)
    y, log_det = t.forward_and_log_det(x)
    x_back, log_det_back = t.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, **tolerances(dtype))
    torch.testing.assert_close(log_det_back, log_det, **tolerances(dtype))
    y_back, _ = t.forward_and_log_det(t.inverse_and_log_det(x)[0])
    torch.testing.assert_close(y_back, x, **tolerances(dtype))
    # the Jacobian of each row in float64, through the plain operations, against the log-det;
    # the coordinates' dependence in the order: lower triangular after sorting by it
    plain = _layer(name, dim, kwargs, device, torch.float64, fused=False)
    rank = torch.argsort(_order(name, dim, kwargs), stable=True)
    for b in range(batch):
        ct = plain.condition(c[b].double())
        jac = torch.autograd.functional.jacobian(ct, x[b].double())
        torch.testing.assert_close(log_det[b].double(), torch.linalg.slogdet(jac)[1],
                                   **tolerances(dtype))
        sorted_jac = jac[rank][:, rank]
        assert torch.equal(sorted_jac.triu(1), torch.zeros_like(sorted_jac)), "not triangular"


@pytest.mark.parametrize("name, dim, kwargs", CASES, ids=IDS)
def test_each_row_is_the_plain_layer_with_that_rows_first_bias(name, dim, kwargs, device,
                                                               dtype):
    """The math of the context path: for context row c_b the map is the unconditional layer
    whose MADE (with the conditional one's masks) has first-layer bias b_1 + V c_b."""
    layer = _layer(name, dim, kwargs, device, dtype)
    plain_cls = {"iaf": pf.transforms.IAF, "maf": pf.transforms.MAF,
                 "realnvp": pf.transforms.RealNVP, "nsf": pf.transforms.NSF}[name]
    init = {k: v for k, v in kwargs.items()}
    plain = plain_cls(dim, hidden_dims=(12, 10), **init).to(device=device, dtype=dtype)
    c = _draw((3, C), device, dtype, 4)
    x = _draw((3, dim), device, dtype, 5)
    y, log_det = layer.condition(c).forward_and_log_det(x)
    net = layer.conditioner
    for b in range(3):
        with torch.no_grad():
            plain.conditioner.mask.copy_(net.mask)  # the hidden units of degree 0 included
            plain.conditioner.flat_parameters.copy_(net.flat_parameters)
            plain.conditioner.layer_parameters(0)[1].add_(net.context_bias(c[b]))
        y_b, log_det_b = plain.forward_and_log_det(x[b:b + 1])
        torch.testing.assert_close(y[b:b + 1], y_b, **tolerances(dtype))
        torch.testing.assert_close(log_det[b:b + 1], log_det_b, **tolerances(dtype))


@pytest.mark.parametrize("name, dim, kwargs", CASES, ids=IDS)
def test_fused_kernels_against_the_plain_path(name, dim, kwargs, device, dtype):
    """Values and gradients (to the input, the context and every parameter) of both directions
    with samples (S, B, D) over contexts (B, C); the D-pass direction without autograd."""
    fused = _layer(name, dim, kwargs, device, dtype)
    plain = _layer(name, dim, kwargs, device, dtype, fused=False)
    c0 = _draw((5, C), device, dtype, 6)
    x0 = _draw((2, 5, dim), device, dtype, 7)
    for inverse in (False, True):
        results = []
        for layer in (fused, plain):
            layer.zero_grad()
            c = c0.clone().requires_grad_(True)
            x = x0.clone().requires_grad_(True)
            t = layer.condition(c)
            v, log_det = t.inverse_and_log_det(x) if inverse else t.forward_and_log_det(x)
            (v.sin().sum() + (log_det * log_det).sum()).backward()
            results.append([v, log_det, x.grad, c.grad]
                           + [p.grad for p in layer.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **tolerances(dtype))
        with torch.no_grad():
            no_grad = [(fused.condition(c0).inverse_and_log_det(x0) if inverse
                        else fused.condition(c0).forward_and_log_det(x0))]
        torch.testing.assert_close(no_grad[0][0], results[1][0], **tolerances(dtype))
        torch.testing.assert_close(no_grad[0][1], results[1][1], **tolerances(dtype))


@pytest.mark.parametrize("name, dim, kwargs", CASES[:1] + CASES[3:4] + CASES[5:6],
                         ids=IDS[:1] + IDS[3:4] + IDS[5:6])
def test_gradcheck_to_input_context_and_parameters(name, dim, kwargs, device):
    """Finite differences in float64 through the fused backward (one-pass direction)."""
    layer = _layer(name, dim, kwargs, device, torch.float64)
    net = layer.conditioner
    c = _draw((3, C), device, torch.float64, 8).requires_grad_(True)
    x = _draw((2, 3, dim), device, torch.float64, 9).requires_grad_(True)
    inverse = name == "maf"

    def f(x, c):
        t = layer.condition(c)
        return t.inverse_and_log_det(x) if inverse else t.forward_and_log_det(x)

    # the input and the context by gradcheck; the parameters (read from the layer) against
    # central differences of a scalar along a random direction
    assert torch.autograd.gradcheck(f, (x, c))
    t = layer.condition(c.detach())
    v, log_det = t.inverse_and_log_det(x.detach()) if inverse else t.forward_and_log_det(
        x.detach())
    loss = (v.sin().sum() + log_det.sum())
    grads = torch.autograd.grad(loss, [net.flat_parameters, net.context_weight])
    for param, grad in zip([net.flat_parameters, net.context_weight], grads, strict=True):
        gen = torch.Generator().manual_seed(10)
        direction = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(device)
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                param.add_(sign * eps * direction)
                t = layer.condition(c.detach())
                v, log_det = (t.inverse_and_log_det(x.detach()) if inverse
                              else t.forward_and_log_det(x.detach()))
                values.append(v.sin().sum() + log_det.sum())
                param.sub_(sign * eps * direction)
        numeric = (values[0] - values[1]) / (2 * eps)
        direction = direction * (net.mask if param is net.flat_parameters else 1)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, dim, kwargs", CASES, ids=IDS)
def test_contexts_broadcast(name, dim, kwargs, device, dtype):
    """c (B, C) with x (S, B, D) is c expanded to (S, B, C); c (C,) is the same context for
    every row; x (D,) with c (B, C) maps one point under every context."""
    layer = _layer(name, dim, kwargs, device, dtype)
    c = _draw((4, C), device, dtype, 11)
    x = _draw((3, 4, dim), device, dtype, 12)
    for inverse in (False, True):
        def run(t, v, inverse=inverse):
            return t.inverse_and_log_det(v) if inverse else t.forward_and_log_det(v)

        y, log_det = run(layer.condition(c), x)
        y_full, log_det_full = run(layer.condition(c.expand(3, 4, C).contiguous()), x)
        assert y.shape == x.shape and log_det.shape == x.shape[:-1]
        torch.testing.assert_close(y, y_full, **tolerances(dtype))
        torch.testing.assert_close(log_det, log_det_full, **tolerances(dtype))
        y_one, _ = run(layer.condition(c[1]), x)
        y_rows, _ = run(layer.condition(c[1].expand(3, 4, C)), x)
        torch.testing.assert_close(y_one, y_rows, **tolerances(dtype))
        y_point, log_det_point = run(layer.condition(c), x[0, 0])
        assert y_point.shape == (4, dim) and log_det_point.shape == (4,)
        torch.testing.assert_close(y_point[0], y[0, 0], **tolerances(dtype))


@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
def test_new_layers_are_the_identity_for_every_context(name, device, dtype):
    ctor = getattr(pf.transforms, f"conditional_{name}")
    layer = ctor(4, C, hidden_dims=(8,)).to(device=device, dtype=dtype)
    x = _draw((6, 4), device, dtype, 13)
    y, log_det = layer.condition(_draw((6, C), device, dtype, 14)).forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros_like(log_det))


def test_iaf_samples_and_scores_in_one_pass_and_maf_scores_in_one_pass(device, dtype):
    dim = 5
    calls = []
    layers = {n: _layer(n, dim, {}, device, dtype) for n in ("iaf", "maf")}
    for layer in layers.values():
        layer.conditioner.register_forward_hook(lambda *_: calls.append(1))
        layer.fused = False  # the hook counts plain passes (hooks also turn the kernel off)
    c = _draw((8, C), device, dtype, 15)
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    base = Independent(Normal(zeros, 1.0), 1)
    q = TransformedDistribution(base, [layers["iaf"].condition(c)])
    z = q.rsample((3, 8))
    q.log_prob(z)
    assert len(calls) == 1, "the IAF scored its own draws with more than its forward pass"
    calls.clear()
    p = TransformedDistribution(base, [layers["maf"].condition(c)])
    p.log_prob(_draw((3, 8, dim), device, dtype, 16))
    assert len(calls) == 1
    calls.clear()
    p.sample((2, 8))
    assert len(calls) == dim  # sampling: D passes


def test_no_stale_cache_across_contexts(device, dtype):
    for name in ("iaf", "maf", "realnvp"):
        layer = _layer(name, 4, {}, device, dtype)
        c1, c2 = _draw((5, C), device, dtype, 17), _draw((5, C), device, dtype, 18)
        t1 = layer.condition(c1)
        x = _draw((5, 4), device, dtype, 19)
        y1 = t1(x)
        t2 = layer.condition(c2)
        assert t2 is not t1
        x2 = t2.inv(y1)  # the cached x of c1 must not come back
        assert not torch.allclose(x2, x)
        torch.testing.assert_close(t2(x2), y1, **tolerances(dtype))
        assert not torch.allclose(t2(x), y1)
        assert not torch.allclose(t2.log_abs_det_jacobian(x, y1),
                                  t1.log_abs_det_jacobian(x, y1))


def test_bad_contexts_get_a_value_error(device, dtype):
    layer = _layer("iaf", 4, {}, device, dtype)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    for bad in (torch.zeros(5, C + 1, device=device, dtype=dtype),
                torch.zeros((), device=device, dtype=dtype),
                torch.zeros(5, C, device=device, dtype=torch.long),
                torch.zeros(5, C, device=device, dtype=other),
                torch.full((5, C), float("nan"), device=device, dtype=dtype),
                [[0.0] * C]):
        with pytest.raises(ValueError):
            layer.condition(bad)
    t = layer.condition(torch.zeros(5, C, device=device, dtype=dtype))
    with pytest.raises(ValueError, match="broadcast"):
        t(torch.zeros(4, 4, device=device, dtype=dtype))
    with pytest.raises(ValueError, match="hidden"):
        pf.transforms.conditional_iaf(4, C, hidden_dims=())


@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
def test_save_and_load(name, device, dtype):
    layer = _layer(name, 4, {}, device, dtype)
    c, x = _draw((5, C), device, dtype, 20), _draw((5, 4), device, dtype, 21)
    expected = layer.condition(c)(x)
    fresh = getattr(pf.transforms, f"conditional_{name}")(4, C, hidden_dims=(12, 10))
    fresh = fresh.to(device=device, dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.condition(c)(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.condition(c)(x), expected, rtol=0, atol=0)
    assert "conditioner.context_weight" in layer.state_dict()


def test_made_without_a_context_keeps_its_state_dict(device, dtype):
    """A MADE built without context_dim has the same state-dict entries as before the context
    path (no context_weight), loads such states, and refuses a context; with one, it needs it."""
    net = MADE(4, (8, 8)).to(device=device, dtype=dtype)
    assert set(net.state_dict()) == {"degrees", "mask", "flat_parameters"}
    state = {"degrees": torch.arange(1, 5), "mask": net.state_dict()["mask"],
             "flat_parameters": torch.randn(net.flat_parameters.shape, dtype=dtype)}
    net.load_state_dict(state)
    torch.testing.assert_close(net.flat_parameters.detach().cpu(), state["flat_parameters"])
    x = _draw((3, 4), device, dtype, 22)
    with pytest.raises(ValueError, match="no context"):
        net(x, torch.zeros(3, 2, device=device, dtype=dtype))
    conditional = MADE(4, (8, 8), context_dim=2).to(device=device, dtype=dtype)
    with pytest.raises(ValueError, match="needs a context"):
        conditional(x)
    with pytest.raises(RuntimeError, match="context_weight"):
        conditional.load_state_dict(net.state_dict())


def test_made_context_enters_the_first_hidden_layer_unmasked(device, dtype):
    """Every output depends on the context (the first level's included, through the hidden
    units of degree 0), no output on inputs at or after its own rank."""
    net = MADE(3, (16, 16), num_params=2, context_dim=2).to(device=device, dtype=dtype)
    randomize_parameters_(net, seed=23)
    x = _draw((3,), device, dtype, 24)
    c = _draw((2,), device, dtype, 25)
    jac_x, jac_c = torch.autograd.functional.jacobian(net, (x, c))
    assert (jac_c.abs().sum(-1) > 0).all()
    for i in range(3):
        assert torch.equal(jac_x[[i, i + 3]][:, i:], torch.zeros_like(jac_x[[i, i + 3]][:, i:]))


@pytest.mark.parametrize("name, dim, kwargs", CASES, ids=IDS)
def test_conformance_checks(name, dim, kwargs, device, dtype):
    """pyroflows.testing's conformance suite of conditional layers."""
    ctor = getattr(pf.transforms, f"conditional_{name}")
    check_conditional_transform(lambda: ctor(dim, C, hidden_dims=(12, 10), **kwargs), dim, C,
                                device=device, dtype=dtype)


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
def test_no_rows_with_no_contexts(family, device, dtype):
    """Zero input rows with zero context rows: empty results both ways, not an error in the
    fused kernels' per-row context bias."""
    flow = pf.flows.build(family, 3, context_dim=2, num_layers=2, hidden_dims=(8,)).to(
        device, dtype)
    t = flow.condition(torch.zeros(0, 2, device=device, dtype=dtype))
    x = torch.zeros(0, 3, device=device, dtype=dtype)
    y = t(x)
    assert y.shape == (0, 3) and t.inv(y).shape == (0, 3)
    assert t.log_abs_det_jacobian(x, y).shape == (0,)
