"""Conditional planar and radial layers (seed eq. 27-31) over a batch of contexts, against
independent truth: the conformance suite of :mod:`pyroflows.testing` (round trips, log-det
against the autograd Jacobian per row, gradients, save/load, stale cache across contexts, a
bad context), per-row equality with the plain layers holding that row's parameters, finite
difference gradients to the network and the context, broadcasting, saturating outputs; each
for one layer and for K = 3 layers whose parameters are one network's output (and the
forward maps' fused node against the plain one, in a stack)."""

from __future__ import annotations

import functools

import pytest
import torch

import pyroflows as pf
from pyroflows import testing

DIM, CONTEXT = 3, 2
#: name -> (constructor, plain layer, K)
FAMILIES = {
    "planar": (pf.transforms.conditional_planar, pf.transforms.Planar, 1),
    "radial": (pf.transforms.conditional_radial, pf.transforms.Radial, 1),
    "planar K=3": (functools.partial(pf.transforms.conditional_planar, num_layers=3),
                   pf.transforms.Planar, 3),
    "radial K=3": (functools.partial(pf.transforms.conditional_radial, num_layers=3),
                   pf.transforms.Radial, 3),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def _layer(family, device, dtype, hidden_dims=(8,), scale=0.3, seed=0):
    layer = FAMILIES[family][0](DIM, CONTEXT, hidden_dims=hidden_dims).to(device, dtype)
    if scale:
        testing.randomize_parameters_(layer, scale=scale, seed=seed)
    return layer


def test_conformance(family, device, dtype):
    testing.check_conditional_transform(
        lambda: FAMILIES[family][0](DIM, CONTEXT, hidden_dims=(8,)), DIM, CONTEXT,
        device=device, dtype=dtype)


def _draw(shape, device, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)


def test_rows_equal_the_plain_layer_with_their_parameters(family, device, dtype):
    """Row b of the conditioned map (forward, inverse, both log-dets) is the plain layer whose
    raw parameters are the network's output for context b."""
    layer = _layer(family, device, dtype)
    c = _draw((5, CONTEXT), device, dtype, 1)
    x = _draw((2, 5, DIM), device, dtype, 2)
    t = layer.condition(c)
    y, ladj = t(x), t.log_abs_det_jacobian(x, t(x))
    back = t.inv(x)
    back_ladj = t.inv.log_abs_det_jacobian(x, back)
    tol = testing.tolerances(dtype)
    for b in range(5):
        plain = _plain_layers(family, layer, c[b], device, dtype)
        with torch.no_grad():
            for got, want in ((y[:, b], plain(x[:, b])),
                              (ladj[:, b], plain.log_abs_det_jacobian(x[:, b], plain(x[:, b]))),
                              (back[:, b], plain.inv(x[:, b].clone())),
                              (back_ladj[:, b], plain.inv.log_abs_det_jacobian(
                                  x[:, b].clone(), plain.inv(x[:, b].clone())))):
                torch.testing.assert_close(got.detach(), want, **tol)


def _plain_layers(family, layer, context, device, dtype):
    """The K plain layers holding the raw parameters that ``layer`` computes for one context
    row, composed in order."""
    plain_type, k = FAMILIES[family][1:]
    layers = []
    for i in range(k):
        plain = plain_type(DIM).to(device, dtype)
        plain.load_state_dict({name: value.detach()
                               for name, value in layer.layer_parameters(context, i).items()})
        layers.append(plain)
    return torch.distributions.ComposeTransform(layers)


def test_starts_as_the_plain_layer_at_its_initialization(family, device, dtype):
    """Untrained, every context maps as K plain layers at the plain initialization (u, w
    within 1/sqrt(D), b = 0; x0, alpha', beta' within 1/sqrt(D)), each a draw of its own:
    near the identity."""
    torch.manual_seed(3)
    layer = FAMILIES[family][0](DIM, CONTEXT).to(device, dtype)
    c = _draw((6, CONTEXT), device, dtype, 3, scale=5.0)
    bound = DIM ** -0.5
    firsts = []
    for i in range(layer.num_layers):
        raw = {name: value.detach() for name, value in layer.layer_parameters(c, i).items()}
        for name, value in raw.items():
            torch.testing.assert_close(value, value[:1].expand_as(value), rtol=0, atol=0)
            assert float(value.abs().max()) <= bound, name
        if family.startswith("planar"):
            assert float(raw["bias"].abs().max()) == 0
        firsts.append(torch.cat([value[0].reshape(-1) for value in raw.values()]))
    assert len({tuple(f.tolist()) for f in firsts}) == layer.num_layers  # K draws, not one
    x = _draw((4, 6, DIM), device, dtype, 4)
    t = layer.condition(c)
    y = t(x)
    assert float((y - x).detach().abs().max()) < 1.5, "the untrained map is far from the identity"
    plain = _plain_layers(family, layer, c[0], device, dtype)
    torch.testing.assert_close(y, plain(x.clone()), **testing.tolerances(dtype))
    # the network's output layer learns from the first step, and through it the context
    loss = y.square().sum() + t.log_abs_det_jacobian(x, y).sum()
    grads = torch.autograd.grad(loss, list(layer.network.layers[-1].parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


class _Condition(torch.nn.Module):
    """``layer.condition`` as a module's forward, for :func:`torch.func.functional_call`."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, context):
        return self.layer.condition(context)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradcheck_network_and_context(family, inverse, device):
    """Float64 finite differences of the forward (or inverse) map and log-det w.r.t. every
    network parameter, the context and the input."""
    layer = _layer(family, device, torch.float64, hidden_dims=(4,), scale=0.5)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    c = _draw((2, CONTEXT), device, torch.float64, 5).requires_grad_(True)
    x = _draw((2, DIM), device, torch.float64, 6).requires_grad_(True)

    def loss(x_, c_, *params_):
        state = {f"layer.{n}": p for n, p in zip(names, params_, strict=True)}
        t = torch.func.functional_call(_Condition(layer), state, (c_,), strict=True)
        out = t.inv(x_) if inverse else t(x_)
        ladj = (t.inv if inverse else t).log_abs_det_jacobian(x_, out)
        return torch.cat([out.reshape(-1), ladj.reshape(-1)])

    assert torch.autograd.gradcheck(loss, (x, c, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_broadcasting(family, device, dtype):
    """c (B, C) with x (B, D), (S, B, D), (S, 1, D) and (D,); c (C,) with x (S, B, D); c (A, B, C)
    with x (B, D); batch dims that do not broadcast get a ValueError, both directions."""
    layer = _layer(family, device, dtype)
    tol = testing.tolerances(dtype)
    c = _draw((4, CONTEXT), device, dtype, 7)
    t = layer.condition(c)
    x = _draw((3, 4, DIM), device, dtype, 8)
    y = t(x)
    for shape, value, want in (((4, DIM), x[0], y[0]), ((3, 1, DIM), x[:, :1], None),
                               ((DIM,), x[0, 0], None)):
        out = t(value.clone())
        expected = torch.broadcast_shapes(value.shape[:-1], (4,)) + (DIM,)
        assert out.shape == expected, (shape, out.shape)
        assert t.log_abs_det_jacobian(value, out).shape == expected[:-1]
        if want is not None:
            torch.testing.assert_close(out, want, **tol)
    one = layer.condition(c[2])
    torch.testing.assert_close(one(x.clone())[:, 2], y[:, 2], **tol)
    outer = layer.condition(torch.stack([c, c.flip(0)]))  # (2, 4, C)
    out = outer(x[0].clone())
    assert out.shape == (2, 4, DIM)
    torch.testing.assert_close(out[0], y[0], **tol)
    for bad in (_draw((3, DIM), device, dtype, 9), _draw((2, 3, DIM), device, dtype, 10)):
        with pytest.raises(ValueError, match="does not broadcast"):
            t(bad)
        with pytest.raises(ValueError, match="does not broadcast"):
            t.inv(bad)


def test_in_pyro_conditional_transformed_distribution(family, device, dtype):
    """Pyro's ConditionalTransformedDistribution: draws (S, B, D) for contexts (B, C), each
    scored by the change of variables through the inverse."""
    import pyro.distributions as dist

    layer = _layer(family, device, dtype)
    base = dist.Normal(torch.zeros(DIM, device=device, dtype=dtype), 1.0).to_event(1)
    c = _draw((4, CONTEXT), device, dtype, 11)
    q = dist.ConditionalTransformedDistribution(base, [layer]).condition(c)
    z = q.rsample((3, 4))
    assert z.shape == (3, 4, DIM)
    lp = q.log_prob(z)
    t = layer.condition(c)
    x = t.inv(z.clone())
    expected = base.log_prob(x) - t.log_abs_det_jacobian(x.clone(), z.clone())
    torch.testing.assert_close(lp, expected, **testing.tolerances(dtype))
    lp.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# the network's output at its extremes: each row's raw parameters at a saturating value plus a
# context-dependent part (planar: w.u far below 0, |w| and |u| huge, tanh saturated; radial:
# softplus of alpha' or beta' underflowing, huge alpha', beta', centre)
EXTREMES = {
    "planar": {"w.u=-100": (1.0, -100.0, 0.0), "w.u=-1e4, |w|=100": (100.0, -1.0, 0.0),
               "tanh saturated": (1.0, 1.0, 50.0), "huge": (1e4, 1.0, 1e3)},
    "radial": {"alpha'=-800": (0.0, -800.0, 0.0), "beta'=-100": (0.0, 0.5, -100.0),
               "both=-100": (0.0, -100.0, -100.0), "huge": (1e4, 1e4, 1e4)},
}


def _extreme_layer(family, case, device, dtype):
    layer = _layer(family, device, dtype, hidden_dims=(8,), scale=0.5, seed=4)
    a, b, d = EXTREMES[family.split()[0]][case]
    last = layer.network.layers[-1]
    gen = torch.Generator().manual_seed(12)
    direction = torch.randn(DIM, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm()
    with torch.no_grad():
        if family.startswith("planar"):  # u, w, b: w = a e, u = b e (w.u = a b), bias d
            bias = torch.cat([b * direction, a * direction, torch.tensor([d], dtype=torch.float64)])
        else:  # x0 = a e, alpha' = b, beta' = d
            bias = torch.cat([a * direction, torch.tensor([b, d], dtype=torch.float64)])
        last.bias.copy_(bias.repeat(layer.num_layers))  # every layer at the extreme
        if case == "huge":
            last.weight.mul_(1e3)
    return layer


@pytest.mark.parametrize("case", ["0", "1", "2", "3"])
def test_extremes_of_the_network_output(family, case, device, dtype):
    """Where the network's output saturates a constraint or is huge, the conditioned map, its
    inverse, both log-dets and the gradients to the network and the context stay finite."""
    case = list(EXTREMES[family.split()[0]])[int(case)]
    layer = _extreme_layer(family, case, device, dtype)
    c = _draw((6, CONTEXT), device, dtype, 13).requires_grad_(True)
    x = _draw((3, 6, DIM), device, dtype, 14).requires_grad_(True)
    params = list(layer.parameters())
    t = layer.condition(c)
    for inverse in (False, True):
        out = t.inv(x) if inverse else t(x)
        ladj = (t.inv if inverse else t).log_abs_det_jacobian(x, out)
        assert torch.isfinite(out).all() and torch.isfinite(ladj).all(), (case, inverse)
        grads = torch.autograd.grad(out.square().mean() + ladj.mean(), [x, c, *params],
                                    retain_graph=True)
        assert all(torch.isfinite(g).all() for g in grads), (case, inverse)


def test_checks_catch_broken_conditional_layers(family):
    """check_conditional_transform's checks fail a layer that reuses one context's transform
    for the next, one whose log-det is off, and one whose rows leak into each other."""
    make = FAMILIES[family][0]

    class Reused(type(make(DIM, CONTEXT))):
        def condition(self, context):
            if "_t" not in self.__dict__:
                self.__dict__["_t"] = super().condition(context)
            return self.__dict__["_t"]

    class WrongLogDet(type(make(DIM, CONTEXT))):
        def conditioned(self, context):
            t = super().conditioned(context)
            forward = t.forward_and_log_det
            t.forward_and_log_det = lambda x: (forward(x)[0], 1.01 * forward(x)[1])
            return t

    class Leaky(type(make(DIM, CONTEXT))):
        def conditioned(self, context):
            return super().conditioned(context + context.mean(0))

    for cls, check in ((Reused, testing.check_conditional_stale_cache),
                       (WrongLogDet, testing.check_conditional_log_det),
                       (Leaky, testing.check_conditional_shapes)):
        layer = cls(DIM, CONTEXT, hidden_dims=(8,), num_layers=FAMILIES[family][2]).double()
        testing.randomize_parameters_(layer, scale=0.3, seed=1)
        with pytest.raises(AssertionError):
            check(layer, DIM, CONTEXT)


def test_bad_construction(family):
    make = FAMILIES[family][0]
    for args, kwargs in (((0, CONTEXT), {}), ((DIM, 0), {}),
                         ((DIM, CONTEXT), {"hidden_dims": (0,)}),
                         ((DIM, CONTEXT), {"num_layers": 0})):
        with pytest.raises(ValueError):
            make(*args, **kwargs)


@pytest.mark.parametrize("sample_shape", [(), (4,)])
@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_fused_maps_match_the_plain_ones(kind, sample_shape, device, dtype):
    """In a stack, runs of conditioned planar (radial) maps (one K = 3 network next to two
    single layers, and a row-less map of a (C,) context) run as one fused node: its map,
    log-det and the gradients to the input, the context and every network parameter equal
    the plain per-layer operations'."""
    torch.manual_seed(0)
    make = FAMILIES[kind][0]
    parts = [make(DIM, CONTEXT, hidden_dims=(8,), num_layers=3),
             make(DIM, CONTEXT, hidden_dims=(8,)), make(DIM, CONTEXT, hidden_dims=(8,))]
    cflow = pf.flows.ConditionalFlowStack(parts).to(device, dtype)
    testing.randomize_parameters_(cflow, scale=0.5, seed=2)
    tol = testing.tolerances(dtype)
    for c in (_draw((5, CONTEXT), device, dtype, 20), _draw((CONTEXT,), device, dtype, 21)):
        results = []
        for fused in (True, False):
            cflow.zero_grad()
            context = c.clone().requires_grad_(True)
            x = _draw(sample_shape + (5, DIM), device, dtype, 22).requires_grad_(True)
            flow = cflow.condition(context)
            assert [type(p).__name__ for p in flow.parts] == [
                f"Conditioned{kind.capitalize()}"] * 3
            y, ld = flow._chain(x, inverse=False, fused=fused)
            (y.sin().sum() + (ld * ld.detach().exp()).sum()).backward()
            results.append([y, ld, x.grad, context.grad]
                           + [p.grad for p in cflow.parameters()])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, **tol)
    # maps of different rows' shapes in one run: chained one after the other
    flow = pf.flows.FlowStack([parts[1].condition(c.detach()) for c in (
        _draw((5, CONTEXT), device, dtype, 23), _draw((CONTEXT,), device, dtype, 24))])
    x = _draw((5, DIM), device, dtype, 25)
    for got, want in zip(flow._chain(x, False), flow._chain(x, False, fused=False),
                         strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_dense_network(device, dtype):
    net = pf.nn.DenseNetwork(4, 5, hidden_dims=(6, 7), activation=torch.nn.Tanh).to(device, dtype)
    x = _draw((2, 3, 4), device, dtype, 15)
    h = x
    for k, layer in enumerate(net.layers):
        h = h @ layer.weight.T + layer.bias
        if k < 2:
            h = torch.tanh(h)
    torch.testing.assert_close(net(x), h, **testing.tolerances(dtype))
    value = torch.arange(5, dtype=dtype, device=device)
    net.constant_output_(value)
    torch.testing.assert_close(net(x), value.expand(2, 3, 5), rtol=0, atol=0)
