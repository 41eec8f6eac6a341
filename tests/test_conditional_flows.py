"""Conditional flow stacks and their distribution (seed eq. 27) over a batch of contexts:
change of variables against autograd Jacobians layer by layer, shapes, gradients to the
context, contexts never sharing a cache, the builder with ``context_dim``, save/load."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.distributions import transforms as PT
from pyro.distributions.conditional import ConditionalComposeTransformModule

import pyroflows as pf
from pyroflows import testing
from pyroflows.distributions import ConditionalFlowDistribution, FlowDistribution
from pyroflows.flows import (
    FAMILIES,
    ConditionalElementwiseAffine,
    ConditionalFlowStack,
    Family,
    FlowStack,
)

D, C, B = 3, 4, 5


def _normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)


def _mixed_parts() -> list:
    """Pyro's conditional layers, pyroflows' conditional affine start and plain layers."""
    return [ConditionalElementwiseAffine(D, C, init_scale=0.7), PT.conditional_planar(D, C),
            pf.transforms.Permute.reverse(D), PT.conditional_radial(D, C),
            PT.conditional_affine_autoregressive(D, C, hidden_dims=[8]),
            pf.transforms.ElementwiseAffine(D, scale=1.3),
            PT.conditional_affine_coupling(D, C, hidden_dims=[8])]


def _invertible_parts() -> list:
    """Parts whose conditioned maps all have an inverse (so any point can be scored)."""
    return [ConditionalElementwiseAffine(D, C, init_scale=0.7),
            PT.conditional_affine_autoregressive(D, C, hidden_dims=[8]),
            pf.transforms.Permute.reverse(D),
            PT.conditional_affine_coupling(D, C, hidden_dims=[8])]


def _pyroflows_families() -> list[str]:
    return sorted(n for n, f in FAMILIES.items() if f.conditional_layer is not None)


@pytest.fixture
def pyro_families():
    """Pyro's conditional layers registered as flow families for the builder."""
    names = {"pyro-planar": Family(conditional_layer=PT.conditional_planar),
             "pyro-iaf": Family(conditional_layer=PT.conditional_affine_autoregressive,
                                needs_permutation=True)}
    FAMILIES.update(names)
    yield names
    for name in names:
        del FAMILIES[name]


def _block_log_dets(t, z: torch.Tensor) -> torch.Tensor:
    """log|det| of each row's (D, D) block of the autograd Jacobian of the batched map ``t``;
    the blocks between different rows must be zero (rows do not mix)."""
    jac = torch.autograd.functional.jacobian(lambda v: t(v), z)  # (B, D, B, D)
    rows = torch.arange(z.shape[0])
    blocks = jac[rows, :, rows, :]
    off = jac.clone()
    off[rows, :, rows, :] = 0
    assert off.abs().max() == 0
    return torch.linalg.slogdet(blocks)[1]


def test_log_prob_is_the_change_of_variables_layer_by_layer(device, dtype):
    stack = ConditionalFlowStack(_mixed_parts()).to(device, dtype)
    c = torch.randn(B, C, device=device, dtype=dtype)
    q = ConditionalFlowDistribution(stack).condition(c)
    z = torch.randn(B, D, device=device, dtype=dtype)
    x, expected = z, _normal_log_prob(z)
    for part in stack.sequence:  # each part conditioned on its own
        t = part.condition(c) if hasattr(part, "condition") else part
        expected = expected - _block_log_dets(t, x)
        x = t(x)
    t = stack.condition(c)
    x_stack = t(z)
    tol = {"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(x_stack, x, **tol)
    qx = FlowDistribution(t, pf.distributions.StandardNormal(D, (B,), device, dtype))
    torch.testing.assert_close(qx.log_prob(x_stack), expected, **tol)
    draw = q.rsample()
    assert draw.shape == (B, D) and q.log_prob(draw).shape == (B,)


def test_same_maps_as_pyros_conditional_compose(device, dtype):
    parts = _mixed_parts()
    ours = ConditionalFlowStack(parts).to(device, dtype)
    theirs = ConditionalComposeTransformModule(parts)
    c = torch.randn(B, C, device=device, dtype=dtype)
    z = torch.randn(2, B, D, device=device, dtype=dtype)
    t1, t2 = ours.condition(c), theirs.condition(c)
    y1, y2 = t1(z), t2(z)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(t1.log_abs_det_jacobian(z, y1), t2.log_abs_det_jacobian(z, y2))


def test_shapes_over_a_batch_of_contexts(device, dtype):
    q = ConditionalFlowDistribution(ConditionalFlowStack(_invertible_parts()).to(device, dtype))
    c = torch.randn(B, C, device=device, dtype=dtype)
    qc = q.condition(c)
    assert qc.batch_shape == (B,) and qc.event_shape == (D,) and qc.has_rsample
    x = qc.rsample()
    assert x.shape == (B, D) and x.device.type == device.type and x.dtype == dtype
    assert qc.log_prob(x).shape == (B,)
    xs = qc.sample((7,))
    assert xs.shape == (7, B, D) and not xs.requires_grad
    assert qc.log_prob(xs).shape == (7, B)
    assert qc.expand((2, B)).sample().shape == (2, B, D)
    # one context for every row
    one = q.condition(c[0])
    assert one.batch_shape == () and one.log_prob(xs).shape == (7, B)
    torch.testing.assert_close(one.log_prob(xs)[:, 0], qc.log_prob(xs)[:, 0])
    # inside a plate of the contexts' rows, and a plate broadcasting over them
    with pyro.plate("rows", B):
        assert pyro.sample("x", qc).shape == (B, D)
    with pyro.plate("outer", 2, dim=-2), pyro.plate("rows", B, dim=-1):
        assert pyro.sample("y", qc).shape == (2, B, D)


def test_log_prob_of_any_point_against_the_inverse(device, dtype):
    """A point not drawn from the flow is scored through the inverse, row by row equal to
    the stack conditioned on that row alone."""
    stack = ConditionalFlowStack(_invertible_parts()).to(device, dtype)
    q = ConditionalFlowDistribution(stack)
    c = torch.randn(B, C, device=device, dtype=dtype)
    x = torch.randn(3, B, D, device=device, dtype=dtype)
    lp = q.condition(c).log_prob(x)
    for b in range(B):
        torch.testing.assert_close(lp[:, b], q.condition(c[b]).log_prob(x[:, b]))
    t = stack.condition(c)
    z = t.inv(x)
    torch.testing.assert_close(t(z), x)
    expected = _normal_log_prob(z) - t.log_abs_det_jacobian(z, t(z.clone()))
    torch.testing.assert_close(lp, expected)


def test_gradients_reach_the_context_and_the_parameters(device):
    stack = ConditionalFlowStack(_invertible_parts()).to(device, torch.float64)
    q = ConditionalFlowDistribution(stack)
    x = torch.randn(B, D, device=device, dtype=torch.float64)
    c = torch.randn(B, C, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: q.condition(c).log_prob(x), (c,))
    torch.manual_seed(1)
    draw = q.condition(c).rsample()
    (draw.sum() + q.condition(c).log_prob(draw).sum()).backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
    for name, p in stack.named_parameters():
        if "head" in name or "nn" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_rsample_gradient_to_the_context_against_finite_differences(device):
    stack = ConditionalFlowStack(_mixed_parts()).to(device, torch.float64)
    z = torch.randn(B, D, device=device, dtype=torch.float64)
    c = torch.randn(B, C, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: stack.condition(c)(z), (c,))


def test_no_cache_is_shared_between_contexts(device, dtype):
    stack = ConditionalFlowStack(_invertible_parts()).to(device, dtype)
    q = ConditionalFlowDistribution(stack)
    c1 = torch.randn(B, C, device=device, dtype=dtype)
    c2 = c1 + 1.0
    z = torch.randn(B, D, device=device, dtype=dtype)
    t1 = stack.condition(c1)
    y1 = t1(z)
    t2 = stack.condition(c2)
    y2 = t2(z)
    assert not torch.allclose(y1, y2)
    # a draw of c1, scored under c2: through the inverse for c2, not from c1's cache
    q1 = q.condition(c1)
    x = q1.rsample()
    lp1 = q1.log_prob(x)
    lp2 = q.condition(c2).log_prob(x)
    fresh = q.condition(c2).log_prob(x.clone())
    torch.testing.assert_close(lp2, fresh)
    assert not torch.allclose(lp1, lp2)
    assert stack.condition(c1) is not stack.condition(c1)


@pytest.mark.parametrize("context", [
    torch.randn(B, C + 1), torch.randn(()), torch.ones(B, C, dtype=torch.long),
    torch.full((B, C), float("nan")), torch.randn(B, C, dtype=torch.float64)],
    ids=["size", "scalar", "integer", "nan", "dtype"])
def test_bad_context_gets_a_value_error(context):
    stack = ConditionalFlowStack(_mixed_parts())
    with pytest.raises(ValueError, match="ConditionalFlowStack: the context"):
        stack.condition(context)
    with pytest.raises(ValueError, match="ConditionalFlowStack: the context"):
        ConditionalFlowDistribution(stack).condition(context)


@pytest.mark.parametrize("name", _pyroflows_families())
def test_every_conditional_layer_names_a_context_of_another_dtype(name):
    """A float64 context for a float32 layer: each conditional layer's ValueError, not
    PyTorch's matrix-product error (planar, radial and the Gaussian start gave that)."""
    layer = pf.flows.build(name, D, num_layers=2, context_dim=C).sequence[-1]
    with pytest.raises(ValueError, match="the context must have the layer's dtype"):
        layer.condition(torch.randn(B, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="the context must have the layer's dtype"):
        ConditionalElementwiseAffine(D, C).condition(torch.randn(B, C, dtype=torch.float64))


def test_stack_of_pyroflows_layers_is_one_fused_flow_stack(device, dtype):
    """Nested conditional stacks flatten: the conditioned stack is one FlowStack of
    pyroflows layers (its cache and fused runs)."""
    inner = ConditionalFlowStack([ConditionalElementwiseAffine(D, C),
                                  pf.transforms.Permute.reverse(D)])
    stack = ConditionalFlowStack([inner, pf.flows.build("maf", D, num_layers=2),
                                  ConditionalElementwiseAffine(D, C)]).to(device, dtype)
    t = stack.condition(torch.randn(B, C, device=device, dtype=dtype))
    assert type(t) is FlowStack and t.all_flow_transforms and len(t.parts) == 5
    q = ConditionalFlowDistribution(stack).condition(torch.randn(B, C, device=device,
                                                                  dtype=dtype))
    x = q.rsample((2,))
    assert q.transforms[0].lookup(y=x) is not None  # scored from the cache
    torch.testing.assert_close(q.log_prob(x), q.log_prob(x.clone()))


def test_constructor_errors():
    with pytest.raises(ValueError, match="disagree on context_dim"):
        ConditionalFlowStack([ConditionalElementwiseAffine(D, C),
                              ConditionalElementwiseAffine(D, C + 1)])
    with pytest.raises(ValueError, match="cannot tell dim"):
        ConditionalFlowStack([PT.conditional_planar(D, C)], context_dim=C)
    with pytest.raises(TypeError, match="parts must be"):
        ConditionalFlowStack([torch.nn.Linear(2, 2)], dim=2, context_dim=2)
    with pytest.raises(TypeError, match="conditional transform"):
        ConditionalFlowDistribution(pf.flows.build("maf", D))
    with pytest.raises(ValueError, match="init_scale"):
        ConditionalElementwiseAffine(D, C, init_scale=0.0)


def test_build_with_a_context(pyro_families, device, dtype):
    cflow = pf.flows.build("pyro-iaf", D, num_layers=3, hidden_dims=(8,), context_dim=C,
                           affine=True)
    assert isinstance(cflow, ConditionalFlowStack) and cflow.context_dim == C
    kinds = [type(p).__name__ for p in cflow.sequence]
    assert kinds == ["ConditionalAffineAutoregressive", "Permute",
                     "ConditionalAffineAutoregressive", "Permute",
                     "ConditionalAffineAutoregressive", "ElementwiseAffine"]
    planar = pf.flows.build("pyro-planar", D, num_layers=2, context_dim=C).to(device, dtype)
    assert len(planar.sequence) == 2  # no permutations for a family without them
    c = torch.randn(B, C, device=device, dtype=dtype)
    assert ConditionalFlowDistribution(planar).condition(c).rsample((4,)).shape == (4, B, D)
    with pytest.raises(ValueError, match="only a conditional layer"):
        pf.flows.build("pyro-planar", D)


def test_build_without_a_conditional_layer_names_those_with_one(pyro_families):
    pf.flows.register_family("plain-only", Family(pf.transforms.Planar))
    try:
        with pytest.raises(ValueError, match="has no conditional layer.*pyro-planar"):
            pf.flows.build("plain-only", D, context_dim=C)
    finally:
        del FAMILIES["plain-only"]
    with pytest.raises(ValueError, match="context_dim must be"):
        pf.flows.build("pyro-planar", D, context_dim=0)
    with pytest.raises(TypeError, match="layer or a conditional_layer"):
        pf.flows.register_family("empty", Family())


@pytest.mark.parametrize("name, shared", [(n, None) for n in _pyroflows_families()]
                         + [("planar", False), ("radial", False)])
def test_built_pyroflows_conditional_stack(name, shared, device, dtype):
    """Every family with a pyroflows conditional layer builds a stack whose conditioned map is
    a FlowStack of pyroflows layers, with the change of variables of its autograd Jacobian and
    an inverse that undoes it (planar and radial also as one conditional layer per map, whose
    inverses must run last first), away from the identity."""
    options = {} if shared is None else {"shared_network": shared}
    cflow = pf.flows.build(name, D, num_layers=3, context_dim=C, **options).to(device, dtype)
    testing.randomize_parameters_(cflow, scale=0.3, seed=1)
    c = torch.randn(B, C, device=device, dtype=dtype)
    t = cflow.condition(c)
    assert type(t) is FlowStack and t.all_flow_transforms
    z = torch.randn(B, D, device=device, dtype=dtype)
    x = t(z)
    tol = {"atol": 1e-7, "rtol": 1e-6} if dtype == torch.float64 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(t.log_abs_det_jacobian(z, x), _block_log_dets(t, z), **tol)
    torch.testing.assert_close(t.inv(x.clone()), z, **tol)
    q = ConditionalFlowDistribution(cflow).condition(c)
    assert q.sample((2,)).shape == (2, B, D)


@pytest.mark.parametrize("name", _pyroflows_families())
def test_a_conditioned_flow_keeps_the_context_it_was_given(name, device, dtype):
    """Changing the context in place after ``condition(c)`` changes nothing in the conditioned
    flow (every layer holds c as it was, as planar and radial layers hold the parameters
    computed from it): its maps, cached and recomputed, stay c's, and gradients still reach
    the context."""
    flow = pf.flows.build(name, D, num_layers=2, context_dim=C).to(device, dtype)
    testing.randomize_parameters_(flow, scale=0.3, seed=2)
    c = torch.randn(B, C, device=device, dtype=dtype, requires_grad=True)
    context = c.detach().clone()
    t = flow.condition(context)
    z = torch.randn(B, D, device=device, dtype=dtype)
    x = t(z)
    context.mul_(3.0)
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(t(z.clone()), x, **tol)
    torch.testing.assert_close(t.inv(x.clone()), z, **tol)
    torch.testing.assert_close(flow.condition(c.detach())(z), x, **tol)
    grad, = torch.autograd.grad(flow.condition(c)(z).sum(), c)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", _pyroflows_families())
def test_a_batch_of_no_contexts_gives_empty_results(name, device, dtype):
    """Zero context rows: empty draws and scores, as a distribution with a batch of 0 gives."""
    flow = pf.flows.build(name, D, num_layers=2, context_dim=C).to(device, dtype)
    qc = ConditionalFlowDistribution(flow).condition(torch.randn(0, C, device=device, dtype=dtype))
    assert qc.batch_shape == (0,)
    assert qc.rsample((2,)).shape == (2, 0, D)
    assert qc.log_prob(torch.randn(0, D, device=device, dtype=dtype)).shape == (0,)


@pytest.mark.parametrize("name", ["planar", "radial"])
def test_build_with_one_shared_network(name, device, dtype):
    """``shared_network``: one conditional layer whose network outputs all K layers'
    parameters, mapping as the K plain layers holding them (per context row), with the
    change of variables of its autograd Jacobian; a family that cannot share one, and a
    stack without a context, get a ValueError."""
    cflow = pf.flows.build(name, D, num_layers=4, context_dim=C, hidden_dims=(8,),
                           shared_network=True).to(device, dtype)
    assert len(cflow.sequence) == 1 and cflow.sequence[0].num_layers == 4
    testing.randomize_parameters_(cflow, scale=0.3, seed=1)
    c = torch.randn(B, C, device=device, dtype=dtype)
    t = cflow.condition(c)
    z = torch.randn(B, D, device=device, dtype=dtype)
    x = t(z)
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(t.log_abs_det_jacobian(z, x), _block_log_dets(t, z), **tol)
    torch.testing.assert_close(t.inv(x.clone()), z, **tol)
    layer, plain_type = cflow.sequence[0], getattr(pf.transforms, name.capitalize())
    for b in range(B):
        want = z[b]
        for k in range(4):
            plain = plain_type(D).to(device, dtype)
            plain.load_state_dict(layer.layer_parameters(c[b], k))
            want = plain(want)
        torch.testing.assert_close(x[b], want, **tol)
    with pytest.raises(ValueError, match="cannot share one network.*planar"):
        pf.flows.build("iaf", D, context_dim=C, shared_network=True)
    with pytest.raises(ValueError, match="conditional stack's option"):
        pf.flows.build(name, D, shared_network=True)


def test_state_dict_round_trip(tmp_path, device, dtype):
    torch.manual_seed(0)
    first = ConditionalFlowStack(_invertible_parts()).to(device, dtype)
    torch.manual_seed(1)
    second = ConditionalFlowStack(_invertible_parts()).to(device, dtype)
    c = torch.randn(B, C, device=device, dtype=dtype)
    x = torch.randn(B, D, device=device, dtype=dtype)
    lp = ConditionalFlowDistribution(first).condition(c).log_prob(x)
    assert not torch.allclose(lp, ConditionalFlowDistribution(second).condition(c).log_prob(x))
    torch.save(first.state_dict(), tmp_path / "flow.pt")
    second.load_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True))
    torch.testing.assert_close(ConditionalFlowDistribution(second).condition(c).log_prob(x), lp,
                               rtol=0, atol=0)


def test_base_distribution_choices(device, dtype):
    stack = ConditionalFlowStack(_invertible_parts()).to(device, dtype)
    c = torch.randn(B, C, device=device, dtype=dtype)
    base = pyro.distributions.Normal(torch.zeros(D, device=device, dtype=dtype),
                                     2.0).to_event(1)
    q = ConditionalFlowDistribution(stack, base=base).condition(c)
    assert q.batch_shape == (B,)
    x = torch.randn(B, D, device=device, dtype=dtype)
    t = stack.condition(c)
    z = t.inv(x)
    torch.testing.assert_close(q.log_prob(x), base.log_prob(z) - t.log_abs_det_jacobian(z, x))


@pytest.mark.parametrize("permutation", ["reverse", "random"])
@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
def test_build_folds_permutations_as_the_plain_build(name, permutation):
    """The conditional stack's layers see the coordinates in the plain stack's orders and
    masks (permutations folded, complementary RealNVP masks)."""
    kwargs = {"num_layers": 4, "hidden_dims": (8,), "permutation": permutation}
    plain = pf.flows.build(name, 5, **kwargs)
    cond = pf.flows.build(name, 5, context_dim=C, **kwargs)
    assert len(cond.sequence) == len(plain.parts)
    for p, q in zip(plain.parts, cond.sequence, strict=True):
        assert torch.equal(p.conditioner.degrees[:5], q.conditioner.degrees[:5])
        if name == "realnvp":
            assert torch.equal(p.mask, q.mask)


def test_gaussian_start_keeps_a_finite_log_det_when_its_scale_underflows(device, dtype):
    """The head's scale output far below 0 (softplus underflows to 0): sigma is floored at the
    dtype's smallest normal number, so log|det| stays finite, as do the gradients."""
    layer = ConditionalElementwiseAffine(2, 3).to(device, dtype)
    with torch.no_grad():
        layer.head.bias[2:].fill_(-1e4)
    context = torch.randn(4, 3, device=device, dtype=dtype, requires_grad=True)
    t = layer.condition(context)
    x = torch.randn(4, 2, device=device, dtype=dtype)
    log_det = t.log_abs_det_jacobian(x, t(x))
    tiny = torch.finfo(dtype).tiny
    torch.testing.assert_close(log_det, torch.full_like(log_det, 2 * math.log(tiny)))
    log_det.sum().backward()
    assert torch.isfinite(context.grad).all()
