"""Every fast path against the plain path it stands for: the fused stack and its runs, the
affine chain (single layers, mixes of banks and own networks, the compact coupling network),
the level-by-level solve, the planar chain and the radial run on stacked banks, the blocked
MADE products, and the compiled stack. The plain path is each layer's plain differentiable
operations (``fused = False``, ``plain_map``) or Pyro's ``ComposeTransformModule`` over the
same layers, differentiated by autograd, or ``torch.func`` (under which the kernels step
aside) and finite differences.

The compiled path is traced with the ``aot_eager`` backend: the same Dynamo capture and
AOT-Autograd graphs as the default Inductor backend, without its C++ code generation.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows import testing
from pyroflows._fast import Linearization, affine_chain, broadcast_batch, keeping_linearizations
from pyroflows._fast import made as fast_made
from pyroflows._fast.planar import _PlanarChain
from pyroflows._fast.radial import _RadialChain
from pyroflows.flows import FlowStack
from pyroflows.flows.banks import stacked_mades
from pyroflows.nn import MADE
from pyroflows.testing import randomize_parameters_, tolerances
from pyroflows.transforms.planar import planar_constraint

FAMILIES = [("maf", 4), ("iaf", 3), ("realnvp", 4), ("planar", 3)]


def _stack(family: str, dim: int, device, dtype, **kwargs) -> FlowStack:
    hidden = {} if family == "planar" else {"hidden_dims": (8,)}
    flow = pf.flows.build(family, dim, num_layers=3, affine=True, **hidden, **kwargs)
    testing.randomize_parameters_(flow, scale=0.3, seed=3)
    return flow.to(device=device, dtype=dtype)


def _base(dim: int, device, dtype) -> Independent:
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(module)
    for m in plain.modules():
        if hasattr(m, "fused"):
            m.fused = False
    return plain


def _value_and_grads(t, x, inverse: bool):
    """Map, log-det, and the gradients of a loss that uses both, w.r.t. x and parameters."""
    t.zero_grad()
    x = x.clone().requires_grad_(True)
    if isinstance(t, FlowStack):
        v, ld = t._chain(x, inverse)
    else:
        v, ld = t.inverse_and_log_det(x) if inverse else t.forward_and_log_det(x)
    weights = torch.linspace(0.5, 2.0, ld.numel(), dtype=x.dtype, device=x.device)
    loss = v.sin().sum() + (ld * weights.view(ld.shape)).sum()
    loss.backward()
    return [v.detach(), ld.detach(), x.grad] + [p.grad for p in t.parameters()]

# ---- the fused stack: runs of layers on their kernels ------------------------------------

@pytest.mark.parametrize("family,dim", FAMILIES)
def test_fused_stack_matches_plain_composition(family, dim, device, dtype):
    fused = _stack(family, dim, device, dtype)
    assert isinstance(fused, FlowStack) and fused.all_flow_transforms
    plain = ComposeTransformModule(list(fused.parts))  # the same layers, composed by torch
    tol = testing.tolerances(dtype)
    y = torch.randn(16, dim, device=device, dtype=dtype)
    losses, grads = [], []
    for flow in (fused, plain):
        flow.zero_grad()
        d = TransformedDistribution(_base(dim, device, dtype), flow)
        loss = -d.log_prob(y.clone()).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    # forward direction and its log-det, scored from the stack's cache
    z = torch.randn(16, dim, device=device, dtype=dtype)
    x_fused, x_plain = fused(z), plain(z.clone())
    torch.testing.assert_close(x_fused, x_plain, **tol)
    torch.testing.assert_close(fused.log_abs_det_jacobian(z, x_fused),
                               plain.log_abs_det_jacobian(z.clone(), x_plain), **tol)


def _fused_and_plain(flow: FlowStack, x: Tensor, inverse: bool) -> list[list[Tensor]]:
    """``[values, log-dets, input gradient, parameter gradients...]`` of ``flow`` in one
    direction through the fused kernels, then through every layer's plain operations."""
    results = []
    for fused in (True, False):
        flow.fused = fused
        for part in flow.parts:
            part.fused = fused
        flow.zero_grad()
        xv = x.clone().requires_grad_(True)
        y, ld = flow.inverse_and_log_det(xv) if inverse else flow.forward_and_log_det(xv)
        (y.sin().sum() + (ld * torch.linspace(0.5, 2.0, ld.numel(), dtype=ld.dtype,
                                              device=ld.device).view(ld.shape)).sum()).backward()
        params = list(flow.parameters())
        assert all(p.grad is not None for p in params), "a parameter got no gradient"
        results.append([y.detach(), ld.detach(), xv.grad] + [p.grad.clone() for p in params])
    return results


def _stack_around(family: str, extra) -> FlowStack:
    """Rows of a built 3-layer stack, out of order, around a layer with a network of its own."""
    flow = pf.flows.build(family, 4, num_layers=3, hidden_dims=(8,))
    return FlowStack([flow.parts[0], extra, flow.parts[2], flow.parts[1]])


MIXED_STACKS = {
    # runs of affine layers and of planar layers, broken by other layers
    "planar-maf-radial-realnvp-affine": lambda: FlowStack([
        pf.transforms.planar(4), pf.transforms.planar(4),
        pf.transforms.maf(4, hidden_dims=(8,)),
        pf.transforms.maf(4, hidden_dims=(8,), order=[3, 2, 1, 0]), pf.transforms.radial(4),
        pf.transforms.realnvp(4, hidden_dims=(8,)), pf.transforms.ElementwiseAffine(4)]),
    # gated layers, which the fused chain does not take, between bank rows
    "maf-gated": lambda: _stack_around("maf", pf.transforms.maf(4, (8,), gated=True)),
    "iaf-gated": lambda: _stack_around("iaf", pf.transforms.iaf(4, (8,), gated=True)),
    "realnvp-own": lambda: _stack_around("realnvp", pf.transforms.realnvp(4, (8,))),
}


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("name", sorted(MIXED_STACKS))
def test_mixed_stack_fused_equals_plain(name, inverse, device, dtype):
    """Stacks whose runs of layers go to different kernels, or to none, in both directions:
    the values and gradients of every layer's plain operations."""
    flow = MIXED_STACKS[name]()
    testing.randomize_parameters_(flow, scale=0.3, seed=6)
    flow = flow.to(device, dtype)
    fused, plain = _fused_and_plain(flow, torch.randn(5, 4, device=device, dtype=dtype), inverse)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))


@pytest.mark.parametrize("family", ["maf", "realnvp", "planar"])
def test_torch_func_transforms_see_the_plain_operations(family, device, dtype):
    """Under torch.func (jacrev here) the fused kernels step aside: the Jacobian of the stack
    equals the one computed through autograd.functional on the plain operations."""
    flow = _stack(family, 3, device, dtype)
    plain = _plain_copy(flow)
    plain.fused = False
    x = torch.randn(3, device=device, dtype=dtype)
    if family == "maf":  # one-pass direction: the inverse
        jac = torch.func.jacrev(lambda v: flow._chain(v, True)[0])(x)
        want = torch.autograd.functional.jacobian(lambda v: plain._chain(v, True)[0], x)
    else:
        jac = torch.func.jacrev(lambda v: flow._chain(v, False)[0])(x)
        want = torch.autograd.functional.jacobian(lambda v: plain._chain(v, False)[0], x)
    torch.testing.assert_close(jac, want, **testing.tolerances(dtype))


@pytest.mark.parametrize("family,dim", [("maf", 4), ("realnvp", 4)])
def test_compiled_stack_passes_conformance(family, dim, device, dtype):
    flow = _stack(family, dim, device, dtype, compile="aot_eager")
    plain = copy.deepcopy(flow)
    plain.compile_backend = None
    y = torch.randn(6, dim, device=device, dtype=dtype)
    torch.testing.assert_close(flow.inv(y), plain.inv(y.clone()), **testing.tolerances(dtype))
    for check in (testing.check_round_trips, testing.check_log_det, testing.check_gradients,
                  testing.check_stale_cache, testing.check_deepcopy, testing.check_bad_input,
                  testing.check_transformed_distribution):
        check(flow, dim, device=device, dtype=dtype)

# ---- the affine chain: single layers -----------------------------------------------------

AFFINE_LAYERS = {
    "maf": lambda: pf.transforms.maf(5, hidden_dims=(16, 16)),
    "iaf": lambda: pf.transforms.iaf(5, hidden_dims=(16, 16)),
    "realnvp": lambda: pf.transforms.realnvp(5, hidden_dims=(16, 16)),
    "maf-tanh-narrow": lambda: pf.transforms.maf(5, hidden_dims=(3,), activation=torch.nn.Tanh,
                                                 order=[2, 0, 4, 1, 3]),
    "maf-linear": lambda: pf.transforms.maf(5, hidden_dims=()),
}


@pytest.mark.parametrize("shape", [(7,), (2, 3), ()])
@pytest.mark.parametrize("name", sorted(AFFINE_LAYERS))
def test_fused_affine_layer_matches_plain(name, shape, device, dtype):
    """Both directions of each layer: the fused path computes the forward values with the plain
    path's operations in its order, so on CPU they are bitwise equal; the hand-written
    gradients agree with autograd's through the plain operations."""
    t = AFFINE_LAYERS[name]()
    testing.randomize_parameters_(t, scale=0.3, seed=1)
    t = t.to(device, dtype)
    plain = _plain_copy(t)
    x = torch.randn(*shape, 5, device=device, dtype=dtype)
    fused_directions = 0
    for inverse in (False, True):
        fused_directions += t.fused_kind(inverse) is not None
        got, want = _value_and_grads(t, x, inverse), _value_and_grads(plain, x, inverse)
        if torch.device(device).type == "cpu":
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **testing.tolerances(dtype))
    assert fused_directions == (2 if name == "realnvp" else 1)
    assert plain.fused_kind(False) is None and plain.fused_kind(True) is None


@pytest.mark.parametrize("kinds", [[(True, -1.0), (True, 1.0)], [(True, 1.0), (False, 1.0)]])
def test_affine_chain_gradcheck(kinds, device):
    """Finite differences (torch.autograd.gradcheck, float64) for every input of the fused node:
    the chain's input, the incoming log-det and each layer's flat parameters, with the
    parallel map v = mu + e^s u and the single-pass inverse v = (u - mu) e^{-s}."""
    layers = [pf.transforms.maf(3, hidden_dims=(4,), order=[1, 0, 2]),
              pf.transforms.realnvp(3, hidden_dims=(4, 4))]
    for t in layers:
        testing.randomize_parameters_(t, scale=0.5, seed=2)
    layers = [t.to(device, torch.float64) for t in layers]
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    log_det = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    flats = [t.conditioner.flat_parameters for t in layers]
    assert torch.autograd.gradcheck(
        lambda x, ld, *f: affine_chain(x, layers, kinds, ld),  # reads f from the layers
        (x, log_det, *flats))


def test_fused_masked_entries_get_zero_gradients(device, dtype):
    t = pf.transforms.maf(4, hidden_dims=(8, 8)).to(device, dtype)
    testing.randomize_parameters_(t, scale=0.3)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    t.inverse_and_log_det(x)[1].sum().backward()
    grad, mask = t.conditioner.flat_parameters.grad, t.conditioner.mask
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    assert (grad[mask == 1] != 0).any()


def test_fused_paths_refuse_what_they_cannot_do(device):
    """Second derivatives raise instead of coming out wrong; an input edited in place after
    the call is an error at backward time, as with autograd; a conditioner hook turns the
    layer back to the plain path, which runs the hook."""
    t = pf.transforms.iaf(3, hidden_dims=(8,)).to(device)
    testing.randomize_parameters_(t, scale=0.3)
    x = torch.randn(5, 3, device=device, requires_grad=True)
    y, _ = t.forward_and_log_det(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    z = torch.randn(5, 3, device=device)
    y, _ = t.forward_and_log_det(z)  # a parameter needs grad, so the fused node saves z
    z.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()
    calls = []
    t.conditioner.register_forward_hook(lambda *a: calls.append(1))
    assert t.fused_kind(False) is None
    t.forward_and_log_det(x)
    assert calls == [1]


def _jacobian_log_det(fn, x: Tensor) -> Tensor:
    """``log|det d fn / dx|`` of a map of one (D,) point, from autograd."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.slogdet(jac)[1]


def test_layer_whose_activation_is_a_plain_function(device, dtype):
    """A MADE built with an activation that makes a plain function (``lambda: torch.tanh``,
    not a module: it is kept as an attribute, outside ``_modules``) runs the plain operations,
    with the log-det of its autograd Jacobian."""
    layer = pf.transforms.maf(3, hidden_dims=(8,), activation=lambda: torch.tanh)
    testing.randomize_parameters_(layer, scale=0.4, seed=1)
    layer = layer.to(device, dtype)
    assert not fast_made.supports_fused(layer.conditioner) and layer.fused_kind(True) is None
    x = torch.randn(4, 3, device=device, dtype=dtype)
    z, log_det = layer.inverse_and_log_det(x)
    for i in range(4):
        want = -_jacobian_log_det(lambda v: layer.inverse_and_log_det(v)[0], x[i])
        torch.testing.assert_close(log_det[i], want, **testing.tolerances(dtype))

# ---- the affine chain: mixes of banks, rows and networks of their own --------------------

class _SubMADE(MADE):
    """A MADE subclass: the chain reads it through its attributes, not its dictionaries."""


def _layers(device, dtype) -> dict[str, list]:
    """Layers of several kinds, randomized: a MAF bank of 3 rows, a RealNVP bank of 2 rows,
    an IAF bank of 2 rows, a MAF and an IAF layer with networks of their own, and a MAF layer
    whose network is a MADE subclass."""
    out = {}
    for name, family, num in [("maf", "maf", 3), ("realnvp", "realnvp", 2), ("iaf", "iaf", 2),
                              ("realnvp_full", "realnvp", 2)]:
        stack = pf.flows.build(family, 4, num_layers=num, hidden_dims=(8, 8))
        out[name] = list(stack.parts)
    for layer in out["realnvp"]:  # the compact coupling path (conditioning half only) at D = 4
        layer.compact_min_dim = 1
        assert layer.coupling_halves is not None
    # one bank whose rows are a coupling layer's network and a MAF layer's network
    mixed = [pf.transforms.realnvp(4, hidden_dims=(8, 8)), pf.transforms.maf(4, hidden_dims=(8, 8))]
    mixed[0].compact_min_dim = 1
    for layer, row in zip(mixed, stacked_mades([m.conditioner for m in mixed]), strict=True):
        layer.conditioner = row
    assert mixed[0].coupling_halves is not None
    out["mixed_bank"] = mixed
    out["maf_own"] = [pf.transforms.maf(4, hidden_dims=(8, 8), order=[2, 0, 3, 1])]
    out["iaf_own"] = [pf.transforms.iaf(4, hidden_dims=(8, 8))]
    sub = pf.transforms.maf(4, hidden_dims=(8, 8))
    sub.conditioner = _SubMADE(4, (8, 8), order=sub.conditioner.degrees.tolist())
    out["maf_sub"] = [sub]
    for seed, layers in enumerate(out.values()):
        for layer in layers:
            testing.randomize_parameters_(layer, scale=0.4, seed=10 + seed)
            layer.to(device=device, dtype=dtype)
    return out


def _params(layers) -> list[Tensor]:
    seen, out = set(), []
    for layer in layers:
        for p in layer.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out


def _plain_chain(x, layers, inverse, log_det=None):
    for layer in layers:
        x, ld = layer.plain_map(x, inverse)
        log_det = ld if log_det is None else log_det + ld
    return x, log_det


def _grads(fn, x, log_det, layers, inverse, weights):
    """Values and the gradients of a fixed scalar of (image, log-det) with respect to the
    inputs that require grad and every parameter (zeros where unused)."""
    y, ld = fn(x, layers, inverse, log_det)
    loss = (y.sin() * weights[0]).sum() + (ld * weights[1]).sum()
    inputs = [t for t in (x, log_det) if t is not None and t.requires_grad] + _params(layers)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else []
    return [y.detach(), ld.detach()] + [
        torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]


def _fused(x, layers, inverse, log_det=None):
    kinds = [layer.fused_kind(inverse) for layer in layers]
    assert None not in kinds, "a layer the fused chain does not take"
    return affine_chain(x, layers, kinds, log_det)


def _plain(x, layers, inverse, log_det=None):
    return _plain_chain(x, layers, inverse, log_det)


def _assert_chain_matches(layers, inverse, device, dtype, x_grad=True, log_det=None, batch=(5,)):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*batch, 4, generator=gen, dtype=torch.float64).to(device, dtype)
    x.requires_grad_(x_grad)
    weights = (torch.rand(*batch, 4, generator=gen, dtype=torch.float64).to(device, dtype),
               torch.rand(batch, generator=gen, dtype=torch.float64).to(device, dtype))
    got = _grads(_fused, x, log_det, layers, inverse, weights)
    want = _grads(_plain, x, log_det, layers, inverse, weights)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))
    return got


CHAINS = {
    # name: (layer picks as (group, index), inverse)
    "maf-bank-then-realnvp-bank": ([("maf", 0), ("maf", 1), ("maf", 2), ("realnvp", 0),
                                    ("realnvp", 1)], True),
    "realnvp-rows-reversed-between-maf-rows": ([("maf", 2), ("realnvp", 1), ("realnvp", 0),
                                                ("maf", 0)], True),
    "bank-rows-shuffled-and-repeated": ([("maf", 1), ("maf", 2), ("maf", 0), ("maf", 2),
                                         ("maf", 1)], True),
    "one-row-alone-among-own-networks": ([("maf_own", 0), ("maf", 1), ("maf_sub", 0),
                                          ("realnvp", 1)], True),
    "partial-bank-and-subclass": ([("maf", 2), ("maf", 0), ("maf_sub", 0)], True),
    "iaf-forward-mixed": ([("iaf", 1), ("realnvp", 0), ("iaf_own", 0), ("iaf", 0),
                           ("realnvp", 1)], False),
    "realnvp-forward-alone": ([("realnvp", 0), ("realnvp", 1)], False),
    "realnvp-full-width-and-compact": ([("realnvp_full", 1), ("realnvp", 0), ("realnvp_full", 0),
                                        ("realnvp", 1)], True),
    "coupling-and-maf-rows-of-one-bank": ([("maf", 0), ("mixed_bank", 1), ("mixed_bank", 0),
                                           ("maf", 1)], True),
    "coupling-row-first-in-mixed-bank": ([("mixed_bank", 0), ("mixed_bank", 1)], True),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain_of_mixed_layers_matches_plain_operations(name, device, dtype):
    """Values, log-dets and every gradient (input, each bank, each own network) of the fused
    chain over mixes of banks, rows in any order (repeated, partial, alone), own networks and
    a MADE subclass, equal those of the plain operations of the same layers."""
    layers = _layers(device, dtype)
    picks, inverse = CHAINS[name]
    _assert_chain_matches([layers[g][i] for g, i in picks], inverse, device, dtype)


@pytest.mark.parametrize("case", ["bank-frozen", "own-frozen", "x-no-grad", "log-det-given",
                                  "log-det-given-no-grad", "nothing-needs-grad", "batch-2d",
                                  "one-point"])
def test_fused_chain_gradients_of_what_requires_grad(case, device, dtype):
    """The hand-written backward returns gradients for exactly the inputs that need them
    (``needs_input_grad``): a frozen bank or network, an input without grad, a given log-det
    with or without grad (broadcast over a batch), one unbatched point, and a chain where
    nothing needs grad (no autograd node)."""
    layers = _layers(device, dtype)
    chain = [layers["maf"][1], layers["maf"][0], layers["maf_own"][0], layers["realnvp"][0],
             layers["realnvp"][1]]
    x_grad, log_det, batch = True, None, (5,)
    if case == "bank-frozen":
        layers["maf"][0].conditioner.stacked.flat_parameters.requires_grad_(False)
    elif case == "own-frozen":
        layers["maf_own"][0].conditioner.flat_parameters.requires_grad_(False)
        layers["realnvp"][0].conditioner.stacked.flat_parameters.requires_grad_(False)
    elif case == "x-no-grad":
        x_grad = False
    elif case.startswith("log-det-given"):
        log_det = torch.linspace(-1.0, 1.0, 5, device=device, dtype=dtype)
        log_det.requires_grad_(case == "log-det-given")
    elif case == "nothing-needs-grad":
        x_grad = False
        for layer in chain:
            for p in layer.parameters():
                p.requires_grad_(False)
        x = torch.randn(5, 4, device=device, dtype=dtype)
        y, ld = _fused(x, chain, True)
        assert y.grad_fn is None and ld.grad_fn is None
        want = _plain(x, chain, True)
        torch.testing.assert_close(y, want[0], **testing.tolerances(dtype))
        torch.testing.assert_close(ld, want[1], **testing.tolerances(dtype))
    elif case == "batch-2d":
        batch = (2, 3)
        log_det = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)  # broadcast
    elif case == "one-point":  # x of shape (D,): a log-det of shape ()
        batch = ()
        log_det = torch.tensor(0.5, device=device, dtype=dtype, requires_grad=True)
    if case != "nothing-needs-grad":
        _assert_chain_matches(chain, True, device, dtype, x_grad=x_grad, log_det=log_det,
                              batch=batch)


def test_fused_chain_non_contiguous_bank_with_a_row_alone(device, dtype):
    """A bank stored column by column, read whole (a run of its rows), by a partial run and
    by a row alone, in one chain: the plain operations' values and gradients."""
    layers = _layers(device, dtype)
    bank = layers["maf"][0].conditioner.stacked
    with torch.no_grad():
        bank.flat_parameters = torch.nn.Parameter(bank.flat_parameters.t().contiguous().t())
    assert not bank.flat_parameters.is_contiguous()
    chain = [layers["maf"][2], layers["maf"][1], layers["maf_own"][0], layers["maf"][0],
             layers["realnvp"][1], layers["maf"][1]]
    _assert_chain_matches(chain, True, device, dtype)


def test_fused_chain_against_torch_func_vjp(device, dtype):
    """``torch.func.vjp`` (the chain steps aside for the plain operations under it) gives the
    vector-Jacobian products that the fused backward gives, for the input and the banks."""
    layers = _layers(device, dtype)
    chain = [layers["maf"][0], layers["maf"][2], layers["realnvp"][1], layers["maf_own"][0]]
    params = {id(p): p for p in _params(chain)}
    names = list(params)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    gy = torch.randn(6, 4, device=device, dtype=dtype)
    gld = torch.randn(6, device=device, dtype=dtype)

    def fn(x, *flat):
        swapped = dict(zip(names, flat, strict=True))
        with torch.nn.utils.stateless._reparametrize_module(
                torch.nn.ModuleList(chain),
                {name: swapped[id(p)] for name, p in
                 torch.nn.ModuleList(chain).named_parameters(remove_duplicate=False)}):
            return _fused(x, chain, True)

    primals = [params[n].detach() for n in names]
    (y, ld), vjp = torch.func.vjp(fn, x, *primals)
    want = vjp((gy, gld))
    xr = x.clone().requires_grad_(True)
    y2, ld2 = _fused(xr, chain, True)
    got = torch.autograd.grad((y2 * gy).sum() + (ld2 * gld).sum(), [xr, *params.values()])
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(y2.detach(), y, **tol)
    torch.testing.assert_close(ld2.detach(), ld, **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_chain_reads_parameters_kept_as_plain_tensors(device, dtype):
    """Networks and banks whose ``flat_parameters`` is a plain tensor attribute computed from
    another tensor (a hypernetwork's output, a hand-made reparametrization: not in
    ``_parameters``) run through the fused chain with the values and gradients (into the
    tensor they come from) of the plain operations."""
    layers = _layers(device, dtype)
    own = layers["maf_own"][0].conditioner
    bank = layers["maf"][0].conditioner.stacked
    sources = []
    for module in (own, bank):
        source = module.flat_parameters.detach().clone().requires_grad_(True)
        del module.flat_parameters
        module.flat_parameters = source * 1.5  # not a Parameter: an attribute
        sources.append(source)
    chain = [layers["maf"][0], layers["maf"][2], layers["maf_own"][0], layers["maf"][1]]
    x = torch.randn(5, 4, device=device, dtype=dtype)
    results = []
    for fn in (_fused, _plain):
        for module, source in zip((own, bank), sources, strict=True):
            module.flat_parameters = source * 1.5  # a fresh graph for each run
        y, ld = fn(x, chain, True)
        grads = torch.autograd.grad(y.sin().sum() + ld.sum(), sources)
        results.append([y.detach(), ld.detach(), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))

# ---- the affine chain on stacked MADE banks ----------------------------------------------

def _per_layer_and_stacked(family: str, dim: int, device, dtype, monkeypatch):
    """The same 3-layer flow twice: with every MADE its own flat parameter
    (``stacked_conditioners`` off) and as ``build`` makes it (rows of one bank), with the
    per-layer one's randomized values copied into the bank's rows."""
    with monkeypatch.context() as m:
        m.setitem(pf.flows.FAMILIES, family, dataclasses.replace(
            pf.flows.FAMILIES[family], stacked_conditioners=False))
        old = pf.flows.build(family, dim, num_layers=3, hidden_dims=(8,), affine=True)
    testing.randomize_parameters_(old, scale=0.3, seed=5)
    new = pf.flows.build(family, dim, num_layers=3, hidden_dims=(8,), affine=True)
    with torch.no_grad():
        for a, b in zip(new.parts[:3], old.parts[:3], strict=True):
            a.conditioner.flat_parameters.copy_(b.conditioner.flat_parameters)  # a row view
    new.parts[3].load_state_dict(old.parts[3].state_dict())  # the affine layer
    return old.to(device, dtype), new.to(device, dtype)


@pytest.mark.parametrize("family,dim", [("maf", 4), ("iaf", 3), ("realnvp", 4),
                                        ("realnvp", 32)])  # 32: the compact coupling network
def test_stacked_conditioners_match_per_layer_parameters(family, dim, device, dtype,
                                                         monkeypatch):
    """Against the same layers with per-layer parameters: the same
    values both directions, the same gradients (the bank's row k is layer k's gradient),
    masked entries exactly 0, and the plain (non-fused) path's gradients too."""
    old, new = _per_layer_and_stacked(family, dim, device, dtype, monkeypatch)
    bank = new.parts[0].conditioner.stacked.flat_parameters
    assert bank.shape[0] == 3 and len(list(new.parameters())) == len(list(old.parameters())) - 2
    if family == "realnvp" and dim == 32:
        assert all(p.coupling_halves is not None for p in new.parts[:3])
    tol = testing.tolerances(dtype)
    x = torch.randn(7, dim, device=device, dtype=dtype)
    weights = torch.rand(7, device=device, dtype=dtype)
    for inverse in (True, False):
        results = []
        for flow in (old, new):
            flow.zero_grad()
            xv = x.clone().requires_grad_(True)
            if inverse:
                y, ld = flow.inverse_and_log_det(xv)
            else:
                y = flow(xv)
                ld = flow.log_abs_det_jacobian(xv, y)
            (y.sin().sum() + (ld * weights).sum()).backward()
            results.append((y.detach(), ld.detach(), xv.grad))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **tol)
        grads_old = torch.stack([p.conditioner.flat_parameters.grad for p in old.parts[:3]])
        torch.testing.assert_close(bank.grad, grads_old, **tol)
        masked = new.parts[0].conditioner.stacked.mask == 0
        assert torch.equal(bank.grad[masked], torch.zeros_like(bank.grad[masked]))
    # the plain operations on the stacked rows (row views, autograd) give the same gradient
    fused_grad = bank.grad.clone()
    plain = copy.deepcopy(new)
    plain.fused = False
    plain_bank = plain.parts[0].conditioner.stacked.flat_parameters
    xv = x.clone()
    y = plain(xv)
    (y.sin().sum() + (plain.log_abs_det_jacobian(xv, y) * weights).sum()).backward()
    torch.testing.assert_close(plain_bank.grad, fused_grad, **tol)


def test_stacked_chain_gradcheck_partial_and_mixed_runs(device):
    """Finite differences through affine_chain over rows of one bank in the orders a stack
    runs them (last first), a partial run that skips a row (whose gradient must be 0), one
    row alone, and rows around a layer with parameters of its own."""
    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(4,))
    testing.randomize_parameters_(flow, scale=0.5, seed=6)
    flow = flow.to(device, torch.float64)
    lone = pf.transforms.maf(3, hidden_dims=(4,), order=[1, 2, 0])
    testing.randomize_parameters_(lone, scale=0.5, seed=7)
    lone = lone.to(device, torch.float64)
    a, b, c = flow.parts
    bank = a.conditioner.stacked.flat_parameters
    kind = (True, -1.0)  # MAF's inverse: the parallel map, log-det of the forward map
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    ld = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    for layers in ([c, b, a], [c, a], [b], [c, lone, a]):
        kinds = [kind] * len(layers)
        assert torch.autograd.gradcheck(
            lambda x, ld, *p, layers=layers, kinds=kinds: affine_chain(x, layers, kinds, ld),
            (x, ld, bank, lone.conditioner.flat_parameters))
    bank.grad = None
    affine_chain(x, [c, a], [kind] * 2)[1].sum().backward()
    assert torch.equal(bank.grad[1], torch.zeros_like(bank.grad[1]))  # row b is not in the run
    assert (bank.grad[0] != 0).any() and (bank.grad[2] != 0).any()


@pytest.mark.parametrize("family", ["iaf", "maf"])
def test_fused_chain_reads_its_layers_as_they_are_now(family, device, dtype):
    """The fused chain derives what it reads of its layers (the stacked bank, its rows and
    their order, the tensors, the activation, the bound) on every call: after each change
    between calls (a replaced parameter, another activation, another bound, another dtype,
    a loaded state, a layer whose network is replaced, layers run in another order) its
    values and gradients are still those of the plain operations on the layers as they
    are. A plan kept from an earlier call would read the old tensors or rows."""
    flow = pf.flows.build(family, 4, num_layers=3, hidden_dims=(8, 8))
    testing.randomize_parameters_(flow, scale=0.4, seed=4)
    flow = flow.to(device, dtype)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    inverse = family == "maf"  # the one-pass direction of each family

    def check(flow: FlowStack, dtype: torch.dtype) -> None:
        fused, plain = _fused_and_plain(flow, x.to(dtype), inverse)
        assert len(fused) == len(plain)
        for a, b in zip(fused, plain, strict=True):
            torch.testing.assert_close(a, b, **testing.tolerances(dtype))

    check(flow, dtype)
    bank = flow.parts[0].conditioner.stacked
    assert bank.num_layers == 3
    with torch.no_grad():  # a new tensor object: the chain must read (and grad) this one
        bank.flat_parameters = torch.nn.Parameter(bank.flat_parameters * 0.7 + 0.05)
    check(flow, dtype)
    with torch.no_grad():  # stored column by column (not contiguous): the same map
        bank.flat_parameters = torch.nn.Parameter(bank.flat_parameters.t().contiguous().t())
    assert not bank.flat_parameters.is_contiguous()
    check(flow, dtype)
    for part in flow.parts[:3]:
        part.conditioner.activation = torch.nn.Tanh()
        part.log_scale_bound = 1.5
    check(flow, dtype)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    flow = flow.to(other)
    check(flow, other)
    flow = flow.to(dtype)
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    with torch.no_grad():
        state["0.conditioner.stacked.flat_parameters"].mul_(-1.3)
    flow.load_state_dict(state)
    check(flow, dtype)
    # layer 1 gets a network of its own: the bank's run is split around it
    own = MADE(4, (8, 8), order=flow.parts[1].conditioner.degrees.tolist())
    testing.randomize_parameters_(own, scale=0.4, seed=5)
    flow.parts[1].conditioner = own.to(device, dtype)
    check(flow, dtype)
    # the same layers in another order: the bank's rows run in that order
    reordered = FlowStack([flow.parts[2], flow.parts[0], flow.parts[1]])
    check(reordered, dtype)

def test_split_rows_are_the_views_of_each_rows_own_split():
    """The whole bank split at once gives, for each row (all rows, or some in another order),
    the views that splitting that row alone gives: the same values, strides and storage."""
    rows = stacked_mades([MADE(4, (8, 8), order=order) for order in ([0, 1, 2, 3], [3, 1, 0, 2])])
    bank = rows[0].stacked
    # all rows split at once: the views of each row's own split (values and strides)
    for k, (weights, biases) in enumerate(fast_made.split_rows(rows[0], bank.flat_parameters)):
        ref_w, ref_b = fast_made.split_weights(rows[k], bank.flat_parameters[k])
        for a, b in zip([*weights, *biases], [*ref_w, *ref_b], strict=True):
            assert torch.equal(a, b) and a.stride() == b.stride()
            assert a.data_ptr() == b.data_ptr()
    # some rows, in another order: those rows' views, in that order
    picked = fast_made.split_rows(rows[0], bank.flat_parameters, rows=[1, 0])
    assert len(picked) == 2
    for (weights, biases), k in zip(picked, [1, 0], strict=True):
        ref_w, ref_b = fast_made.split_weights(rows[k], bank.flat_parameters[k])
        for a, b in zip([*weights, *biases], [*ref_w, *ref_b], strict=True):
            assert a.shape == b.shape and a.stride() == b.stride()
            assert a.data_ptr() == b.data_ptr()


# ---- the affine chain: the compact coupling network --------------------------------------

@pytest.mark.parametrize("kinds", [[(True, 1.0), (False, -1.0)]])
def test_compact_fused_chain_gradcheck(kinds, device):
    """Finite differences through two compact coupling layers in one fused node (conditioning
    half first, then last), both directions, every input of the node."""
    layers = [pf.transforms.realnvp(4, hidden_dims=(3, 3)),
              pf.transforms.realnvp(4, hidden_dims=(3,), mask=[False, True, True, True])]
    for t in layers:
        randomize_parameters_(t, scale=0.5, seed=9)
        t.compact_min_dim = 0
    layers = [t.to(device, torch.float64) for t in layers]
    assert all(t.coupling_halves is not None for t in layers)
    x = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
    log_det = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    flats = [t.conditioner.flat_parameters for t in layers]
    assert torch.autograd.gradcheck(
        lambda x, ld, *f: affine_chain(x, layers, kinds, ld),  # reads f from the layers
        (x, log_det, *flats))


def test_compact_backward_follows_its_forward_pass(device, dtype):
    """Turning the compact path off between a fused forward and its backward (here by
    compact_min_dim; a conditioner hook does the same) changes nothing: the gradients are
    those of the full masked network through autograd."""
    t = pf.transforms.realnvp(4, hidden_dims=(8,))
    randomize_parameters_(t, scale=0.4, seed=10)
    t = t.to(device, dtype)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    xr = x.clone().requires_grad_(True)
    shift, log_scale = t.shift_and_log_scale(xr)
    y_ref = torch.where(t.mask, xr, xr * log_scale.exp() + shift)
    (y_ref.sin().sum() + log_scale.sum()).backward()
    want = [xr.grad, t.conditioner.flat_parameters.grad.clone()]
    t.zero_grad()
    t.compact_min_dim = 0
    xv = x.clone().requires_grad_(True)
    y, ld = t.forward_and_log_det(xv)
    t.compact_min_dim = 99
    (y.sin().sum() + ld.sum()).backward()
    for a, b in zip([xv.grad, t.conditioner.flat_parameters.grad], want, strict=True):
        torch.testing.assert_close(a, b, **tolerances(dtype))

# ---- the level-by-level solve ------------------------------------------------------------

SOLVE_LAYERS = {**AFFINE_LAYERS, "maf-ties": lambda: pf.transforms.maf(7, hidden_dims=(16,),
                                                     order=[3, 3, 1, 0, 2, 5, 4])}


@pytest.mark.parametrize("name", ["maf", "iaf", "maf-tanh-narrow", "maf-linear", "maf-ties"])
def test_no_grad_sequential_passes_match_plain(name, device, dtype):
    """The D-pass direction (MAF sampling, IAF inverse) without autograd goes level by level,
    computing each hidden unit once, against the plain fixed-point passes; then back with the
    one-pass direction."""
    t = SOLVE_LAYERS[name]()
    testing.randomize_parameters_(t, scale=0.3, seed=7)
    t = t.to(device, dtype)
    plain = _plain_copy(t)
    inverse = name.startswith("iaf")
    x = torch.randn(4, 6, t.dim, device=device, dtype=dtype)
    with torch.no_grad():
        got = t.inverse_and_log_det(x) if inverse else t.forward_and_log_det(x)
        want = plain.inverse_and_log_det(x) if inverse else plain.forward_and_log_det(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))
    back = t.forward_and_log_det(got[0]) if inverse else t.inverse_and_log_det(got[0])
    torch.testing.assert_close(back[0], x, **testing.tolerances(dtype))

# ---- an IAF layer linearized at a point (sticking the landing, layer by layer) -------------

def _autograd_jacobians(layer, u: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``u`` (N, D): the Jacobian (N, D, D) of the layer's plain forward map and the
    gradient (N, D) of its log-det, by autograd (the rows are mapped independently, each with
    its own context's parameters for a conditioned layer: the Jacobian of the rows' sum holds
    each row's)."""
    def summed(x):
        return layer.plain_map(x, inverse=False)[0].sum(0)

    jac = torch.autograd.functional.jacobian(summed, u).permute(1, 0, 2)
    x = u.clone().requires_grad_(True)
    (grad_ld,) = torch.autograd.grad(layer.plain_map(x, inverse=False)[1].sum(), x)
    return jac, grad_ld


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 6), scale=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**16), ties=st.booleans(), conditioned=st.booleans())
def test_linearization_is_the_layers_jacobian(dim, scale, seed, ties, conditioned, device,
                                              dtype):
    """``Linearization`` of an IAF layer (any order, ties included; from the identity to
    saturated log-scales; conditioned on one context per row or not) against autograd through
    the layer's plain operations: its output, the diagonal of J, ``pullback`` = J^T g + l grad
    log|det J|, and ``solve_transposed`` with no tolerance = the solve of J^T u = v, and of
    J^T u = v - grad log|det J|, each in at most levels - 1 pullbacks (the error propagator is
    nilpotent and the first error is zero at the order's top level)."""
    gen = torch.Generator().manual_seed(seed)
    order = (torch.randint(0, max(dim - 1, 1), (dim,), generator=gen) if ties
             else torch.randperm(dim, generator=gen))
    if conditioned:
        layer = pf.transforms.conditional_iaf(dim, context_dim=3, hidden_dims=(12, 12),
                                              order=order)
    else:
        layer = pf.transforms.iaf(dim, hidden_dims=(12, 12), order=order)
    testing.randomize_parameters_(layer, scale=scale, seed=seed)
    layer = layer.to(device, dtype)
    if conditioned:
        context = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(device, dtype)
        layer = layer.condition(context)
    u, g, v = torch.randn(3, 5, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    ell = torch.randn(5, generator=gen, dtype=torch.float64).to(device, dtype)
    lin = Linearization(layer, u)
    jac, grad_ld = _autograd_jacobians(layer, u)
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(lin.output, layer.plain_map(u, inverse=False)[0], **tol)
    torch.testing.assert_close(lin.diagonal, jac.diagonal(dim1=-2, dim2=-1), **tol)
    want = (jac.transpose(-1, -2) @ g.unsqueeze(-1)).squeeze(-1) + ell.unsqueeze(-1) * grad_ld
    torch.testing.assert_close(lin.pullback(g, ell), want, **tol)
    assert lin.levels == len(set(order.tolist()))
    pullback = lin.pullback
    for with_log_det in (False, True):
        calls = []
        lin.pullback = lambda *args, calls=calls: calls.append(1) or pullback(*args)
        got = lin.solve_transposed(v, tol=0.0, with_log_det=with_log_det)
        assert len(calls) <= lin.levels - 1
        # the residual against the rounding of J^T u (saturated scales: J^-T reaches 1e13)
        rhs = v - grad_ld if with_log_det else v
        jac_t = jac.transpose(-1, -2)
        residual = (jac_t @ got.unsqueeze(-1)).squeeze(-1) - rhs
        rounding = (jac_t.abs() @ got.abs().unsqueeze(-1)).squeeze(-1) + rhs.abs()
        assert (residual.abs() <= 1e3 * torch.finfo(dtype).eps * rounding).all()


def test_linearization_solve_stops_at_a_non_finite_step(device, dtype):
    """A non-finite right-hand side gives a non-finite solution after one pullback, not after
    the levels - 1 that an exact solve of this layer may take; no rows, no solve."""
    layer = pf.transforms.iaf(40, hidden_dims=(16,))
    testing.randomize_parameters_(layer, scale=0.5, seed=1)
    layer = layer.to(device, dtype)
    lin = Linearization(layer, torch.randn(3, 40, device=device, dtype=dtype))
    calls = []
    pullback = lin.pullback
    lin.pullback = lambda *args: calls.append(1) or pullback(*args)
    v = torch.randn(3, 40, device=device, dtype=dtype)
    v[1, 0] = float("nan")
    assert not torch.isfinite(lin.solve_transposed(v, tol=1e-8)).all()
    assert len(calls) == 1
    empty = Linearization(layer, torch.zeros(0, 40, device=device, dtype=dtype))
    assert empty.solve_transposed(v[:0], tol=1e-8, with_log_det=True).shape == (0, 40)


def test_kept_linearizations_are_the_layers_own(device, dtype):
    """A fused run with autograd inside keeping_linearizations hands out, in order, each IAF
    layer's linearization at the input it saw: output, diagonal and pullbacks equal those of a
    linearization computed afresh there; a MAF (its forward is the D-pass direction, its
    one-pass map the inverse) and runs without autograd hand out none, and outside the
    context nothing is kept."""
    flow = pf.flows.build("iaf", 4, num_layers=3, hidden_dims=(8,))
    testing.randomize_parameters_(flow, scale=0.3, seed=2)
    flow = flow.to(device, dtype)
    x = torch.randn(5, 4, device=device, dtype=dtype)
    g = torch.randn(5, 4, device=device, dtype=dtype)
    ell = torch.randn(5, device=device, dtype=dtype)
    y, log_det, kept = flow.run_linearized(x)
    iafs = [t for t in flow.parts if isinstance(t, pf.transforms.IAF)]
    assert [lin.layer for lin in kept] == iafs and len(iafs) == 3
    tol = testing.tolerances(dtype)
    u = x
    for lin in kept:
        fresh = Linearization(lin.layer, u)
        for a, b in ((lin.output, fresh.output), (lin.diagonal, fresh.diagonal),
                     (lin.pullback(g, ell), fresh.pullback(g, ell))):
            torch.testing.assert_close(a, b, **tol)
        u = fresh.output
    torch.testing.assert_close(y, flow.forward_and_log_det(x)[0], **tol)
    with torch.no_grad():
        assert flow.run_linearized(x)[2] == []
    maf = pf.flows.build("maf", 4, num_layers=2, hidden_dims=(8,)).to(device, dtype)
    assert maf.run_linearized(x)[2] == []
    with keeping_linearizations() as kept_maf:  # MAF's one-pass map is its inverse
        maf.run(x, inverse=True)
    assert kept_maf == []
    flow(x)  # outside the context: kept lists stay as they were
    assert [lin.layer for lin in kept] == iafs


def test_linearization_takes_one_pass_maps_of_all_coordinates_only(device, dtype):
    """IAF layers, conditioned or not, and small RealNVP layers (a MADE of two levels) are
    taken; a gated IAF (no fused kernel), a MAF (its forward is the D-pass direction) and a
    RealNVP layer whose network runs on the conditioning half (D >= 32) are refused, with a
    ValueError on construction."""
    refused = {
        "gated": pf.transforms.iaf(3, gated=True),
        "maf": pf.transforms.maf(3),
        "realnvp-compact": pf.transforms.realnvp(32),
    }
    context = torch.zeros(2, device=device, dtype=dtype)
    assert Linearization.takes(pf.transforms.iaf(3))
    assert Linearization.takes(pf.transforms.realnvp(4))
    assert Linearization.takes(pf.transforms.conditional_iaf(3, context_dim=2).to(device, dtype)
                               .condition(context))
    for name, layer in refused.items():
        assert not Linearization.takes(layer), name
        with pytest.raises(ValueError, match="one-pass"):
            Linearization(layer.to(device, dtype), torch.zeros(2, layer.dim, device=device,
                                                               dtype=dtype))


# ---- the planar and radial chains on stacked banks --------------------------------

def _assert_fused_is_plain(family: str, num_layers: int, seed: int, x: Tensor) -> None:
    """A built planar or radial stack with randomized parameters: map, log-det and every
    gradient through its fused node equal those of its layers' plain operations, finite."""
    flow = pf.flows.build(family, 3, num_layers=num_layers)
    testing.randomize_parameters_(flow, scale=1.0, seed=seed)
    flow = flow.to(x.device, x.dtype)
    fused, plain = _fused_and_plain(flow, x, inverse=False)
    for a, b in zip(fused, plain, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **testing.tolerances(x.dtype))


@pytest.mark.parametrize("shape", [(9,), (2, 4), ()])
@pytest.mark.parametrize("family", ["planar", "radial"])
def test_fused_chain_matches_plain(family, shape, device, dtype):
    """A planar (radial) stack run as one node against the same layers run one by one, for
    batched and unbatched inputs."""
    _assert_fused_is_plain(family, 6, 4, torch.randn(*shape, 3, device=device, dtype=dtype))


def test_planar_constraint_of_stacked_rows(device, dtype):
    """The constraint of K layers stacked (K, D) at once, against Rezende & Mohamed's
    definition row by row: u_hat = u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 +
    softplus(a), and the slack 1 + w.u_hat."""
    gen = torch.Generator().manual_seed(7)
    w, u = (3 * torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    u_hat, slack = planar_constraint(w.to(device, dtype), u.to(device, dtype))
    for k in range(6):
        wu = w[k] @ u[k]
        want = u[k] + (torch.nn.functional.softplus(wu) - 1 - wu) * w[k] / (w[k] @ w[k])
        torch.testing.assert_close(u_hat[k].double().cpu(), want, **testing.tolerances(dtype))
        torch.testing.assert_close(slack[k].double().cpu(), 1 + w[k] @ want,
                                   **testing.tolerances(dtype))


@pytest.mark.parametrize("rows", [(), (3,)], ids=["one-set", "per-row"])
def test_planar_chain_gradcheck(rows, device):
    """Finite differences of the fused node, with one parameter set for every input (K, D)
    and with one per row (K, B, D) against inputs (S, B, D)."""
    gen = torch.Generator().manual_seed(5)
    k, n, d = 4, 3, 2
    batch = (n,) if not rows else (2, n)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
            for s in (batch + (d,), (k, *rows, d), (k, *rows, d), (k, *rows), (k, *rows),
                      batch)]
    args[4] = (0.5 * args[4]).exp().detach().requires_grad_(True)  # slack = 1 + w.u_hat > 0
    assert torch.autograd.gradcheck(_PlanarChain.apply, tuple(args))


@pytest.mark.parametrize("rows", [(), (3,)], ids=["one-set", "per-row"])
def test_radial_chain_gradcheck(rows, device):
    """Finite differences of the fused radial node, with one parameter set for every input
    (K, D) and with one per row (K, B, D) against inputs (S, B, D)."""
    gen = torch.Generator().manual_seed(6)
    k, n, d = 4, 3, 2
    batch = (n,) if not rows else (2, n)
    x, x0, log_det = (torch.randn(*s, generator=gen, dtype=torch.float64)
                      for s in (batch + (d,), (k, *rows, d), batch))
    alpha = 0.2 + torch.rand(k, *rows, generator=gen, dtype=torch.float64)
    apb = 0.1 + torch.rand(k, *rows, generator=gen, dtype=torch.float64)  # beta < 0 too
    args = tuple(t.to(device).requires_grad_(True) for t in (x, x0, alpha, apb, log_det))
    assert torch.autograd.gradcheck(_RadialChain.apply, args)


def test_radial_chain_at_a_centre(device, dtype):
    """An input at a layer's centre (r = 0): the fused node's map, log-det and gradients equal
    the plain layers' (the norm's subgradient 0 there), all finite."""
    flow = pf.flows.build("radial", 3, num_layers=3)
    testing.randomize_parameters_(flow, scale=1.0, seed=3)
    centre = flow.parts[0].x0.detach().to(device, dtype)
    x = torch.cat([centre[None], torch.randn(4, 3, device=device, dtype=dtype)])
    _assert_fused_is_plain("radial", 3, 3, x)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from([1, 2, 3]), max_size=4), min_size=1, max_size=4))
def test_broadcast_batch_is_torchs_broadcast_shapes(shapes):
    """The written-out broadcast gives torch.broadcast_shapes' shape, and fails where it
    fails."""
    try:
        want = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="do not broadcast"):
            broadcast_batch(*shapes)
    else:
        assert broadcast_batch(*shapes) == want


FIELDS = {"planar": ("w", "u", "bias"), "radial": ("x0", "alpha_prime", "beta_prime")}


def _stack_and_layers(family, dim, num_layers, device, dtype, seed=0):
    """A built (stacked) stack with randomized parameters, and per-layer layers holding the
    same values, each in its own parameters."""
    flow = pf.flows.build(family, dim, num_layers=num_layers)
    randomize_parameters_(flow, scale=0.7, seed=seed)
    flow = flow.to(device, dtype)
    layers = []
    for row in flow.parts:
        layer = getattr(pf.transforms, family)(dim).to(device, dtype)
        with torch.no_grad():
            for name in FIELDS[family]:
                getattr(layer, name).copy_(getattr(row, name))
        layers.append(layer)
    return flow, layers


def _run(flow, x, inverse):
    """Map, log-det and the gradients of a loss using both (w.r.t. x and the parameters)."""
    x = x.clone().requires_grad_(True)
    y = flow.inv(x) if inverse else flow(x)
    ld = (-flow.inv.log_abs_det_jacobian(x, y) if inverse
          else flow.log_abs_det_jacobian(x, y))
    loss = y.sin().sum() + (ld * torch.linspace(0.5, 2, ld.numel(), dtype=x.dtype,
                                                device=x.device)).sum()
    grads = torch.autograd.grad(loss, [x, *flow.parameters()])
    return y.detach(), ld.detach(), grads


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_stack_equals_per_layer_layers(family, inverse, device, dtype):
    """The stacked stack (fused kernels on its stacked tensors) against the same parameters in
    per-layer layers composed by torch.distributions' ComposeTransform: map, log-det and
    every gradient (the stacked gradient's row k is layer k's), both directions."""
    from torch.distributions.transforms import ComposeTransform

    flow, layers = _stack_and_layers(family, 3, 5, device, dtype)
    plain = ComposeTransform(layers)
    x = torch.randn(16, 3, device=device, dtype=dtype)
    y, ld, grads = _run(flow, x, inverse)
    xv = x.clone().requires_grad_(True)
    y_ref = plain.inv(xv) if inverse else plain(xv)
    ld_ref = (-plain.inv.log_abs_det_jacobian(xv, y_ref) if inverse
              else plain.log_abs_det_jacobian(xv, y_ref))
    loss = y_ref.sin().sum() + (ld_ref * torch.linspace(0.5, 2, 16, dtype=dtype,
                                                        device=device)).sum()
    per_layer = [getattr(layer, n) for n in FIELDS[family] for layer in layers]
    ref = torch.autograd.grad(loss, [xv, *per_layer])
    tol = tolerances(dtype)
    torch.testing.assert_close(y, y_ref.detach(), **tol)
    torch.testing.assert_close(ld, ld_ref.detach(), **tol)
    torch.testing.assert_close(grads[0], ref[0], **tol)
    stacked = dict(zip([n for n, _ in flow[0].stacked.named_parameters()], grads[1:],
                       strict=True))
    for i, name in enumerate(FIELDS[family]):
        want = torch.stack(ref[1 + 5 * i: 1 + 5 * (i + 1)]).reshape(stacked[name].shape)
        torch.testing.assert_close(stacked[name], want, **tol)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_a_layer_of_a_stack_alone_and_in_sub_stacks(family, device, dtype):
    """``flow[i]`` maps as layer i alone; stacks made of some of the layers (a slice of the
    rows, rows out of order) equal the same per-layer layers."""
    flow, layers = _stack_and_layers(family, 3, 5, device, dtype, seed=2)
    tol = tolerances(dtype)
    x = torch.randn(7, 3, device=device, dtype=dtype)
    for i in (0, 3):
        for a, b in zip(flow[i].forward_and_log_det(x), layers[i].forward_and_log_det(x),
                        strict=True):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(flow[i].inverse_and_log_det(x), layers[i].inverse_and_log_det(x),
                        strict=True):
            torch.testing.assert_close(a, b, **tol)
    for order in ([1, 2, 3], [3, 0, 2]):
        sub = pf.flows.FlowStack([flow.parts[k] for k in order])
        ref = pf.flows.FlowStack([layers[k] for k in order])
        ref.fused = False
        for inverse in (False, True):
            got = sub._chain(x, inverse)
            want = ref._chain(x, inverse)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **tol)

# ---- blocked MADE products ---------------------------------------------------------------

@pytest.fixture
def small_blocks(monkeypatch, blocks_at_any_rows):
    """Plans for small networks too (blocks of 8 units, any width of 16 or more, any saving,
    any number of rows), so that the tests exercise many plan shapes at a small cost. Only
    plans built inside the test see these values."""
    monkeypatch.setattr(fast_made, "_BLOCK_MIN_WIDTH", 16)
    monkeypatch.setattr(fast_made, "_BLOCK_SIZE", 8)
    monkeypatch.setattr(fast_made, "_BLOCK_MAX_FRACTION", 1.0)


def _weight_masks(net: MADE) -> list[torch.Tensor]:
    masks = net.mask.split(net._sizes)
    return [masks[2 * k].view(shape) != 0 for k, shape in enumerate(net._shapes)]


def _random_order(dim: int, seed: int) -> list[int]:
    return torch.randperm(dim, generator=torch.Generator().manual_seed(seed)).tolist()


CASES = {
    "identity": (12, (40, 40), 2, None),
    "reversed": (12, (40, 40), 2, list(range(11, -1, -1))),
    "random": (12, (37, 45), 2, _random_order(12, 3)),
    "random-p3": (10, (43, 29, 35), 3, _random_order(10, 5)),
    "p1-uneven": (20, (50, 21), 1, None),
    "narrow": (24, (17, 19), 2, list(range(23, -1, -1))),  # hidden widths below D
    "two-level": (18, (32, 32), 2, [0] * 7 + [1] * 11),
    "ties-random": (16, (30, 36), 2, [k // 3 for k in _random_order(16, 7)]),
    # ten features of rank 0 with zero_first: head row blocks that see nothing, a masked bias
    "ten-first-zero": (20, (33, 27), 2, [0] * 10 + list(range(1, 11))),
    "ties-narrow": (30, (18, 21), 3, [k // 4 for k in range(30)][::-1]),
    "no-hidden": (24, (), 2, None),
}
ZERO_FIRST = {"identity", "ten-first-zero"}
ALL_LAYERS_BLOCKED = {"ten-first-zero", "ties-narrow", "no-hidden"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_plans_partition_and_cover_the_masks(name, small_blocks):
    """Row blocks partition the rows and column blocks the columns; outside its blocks every
    mask is 0 (checked against the mask itself), so skipping those products skips zeros."""
    features, hidden, num_params, order = CASES[name]
    net = MADE(features, hidden, num_params=num_params, order=order,
               zero_first=name in ZERO_FIRST)
    plans = fast_made.block_plans(net, fast_made.masked_weights(net)[0])
    assert any(p is not None for p in plans)
    if name in ALL_LAYERS_BLOCKED:
        assert all(p is not None for p in plans)
    if name == "ten-first-zero":
        assert any(c0 == c1 for r0, r1, c0, c1 in plans[-1].rows)
    for mask, plan in zip(_weight_masks(net), plans, strict=True):
        if plan is None:
            continue
        num_rows, num_cols = mask.shape
        starts = [r0 for r0, _, _, _ in plan.rows]
        stops = [r1 for _, r1, _, _ in plan.rows]
        assert starts[0] == 0 and stops[-1] == num_rows and starts[1:] == stops[:-1]
        starts = [c0 for c0, _, _, _ in plan.cols]
        stops = [c1 for _, c1, _, _ in plan.cols]
        assert starts[0] == 0 and stops[-1] == num_cols and starts[1:] == stops[:-1]
        inside_rows = torch.zeros_like(mask)
        for r0, r1, c0, c1 in plan.rows:
            inside_rows[r0:r1, c0:c1] = True
        inside_cols = torch.zeros_like(mask)
        for c0, c1, s0, s1 in plan.cols:
            inside_cols[s0:s1, c0:c1] = True
        assert not (mask & ~inside_rows).any() and not (mask & ~inside_cols).any()


def test_plans_where_blocking_pays():
    """With the measured thresholds: the 256 x 256 hidden-to-hidden layer of the D=64 MAF is
    blocked (4 row blocks, covering about 5/8 of it), the first layer (64 inputs), the output
    head and every layer at D=8 (hidden 64) are dense; a random order leaves the
    hidden-to-hidden layer's staircase as it is (hidden degrees do not depend on the order)."""
    for order in (None, list(range(63, -1, -1)), _random_order(64, 0)):
        net = MADE(64, (256, 256), num_params=2, order=order)
        first, middle, head = fast_made.block_plans(net, fast_made.masked_weights(net)[0])
        assert first is None and head is None and middle is not None
        assert len(middle.rows) == 4 and len(middle.cols) == 4
        covered = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in middle.rows)
        assert 0.6 < covered / 256**2 < 0.67
    net = MADE(8, (64, 64), num_params=2)
    assert fast_made.block_plans(net, fast_made.masked_weights(net)[0]) == (None, None, None)
    # a sub-block of a weight (a caller's compact network) and weights off the CPU: dense
    net = MADE(64, (256, 256), num_params=2)
    weights = fast_made.masked_weights(net)[0]
    assert fast_made.block_plans(net, [weights[0], weights[1][:, :128], weights[2]])[1] is None
    assert fast_made.block_plans(net, [w.to("meta") for w in weights]) == (None,) * 3  # not CPU
    # few rows (a guide's particles): dense; from _BLOCK_MIN_ROWS on, blocked
    rows = fast_made._BLOCK_MIN_ROWS
    assert fast_made.block_plans(net, weights, rows - 1) == (None, None, None)
    assert fast_made.block_plans(net, weights, rows)[1] is not None
    del net._blockable  # a network pickled before the plans existed: dense products
    assert fast_made.block_plans(net, weights) == (None, None, None)


def test_fused_kernels_block_by_the_rows_of_the_product(monkeypatch):
    """The fused forward and backward pass of a network with a blocked layer run its blocked
    products for a batch of _BLOCK_MIN_ROWS rows and the dense ones for fewer, with the same
    values either way."""
    net = MADE(64, (256, 256), num_params=2)
    randomize_parameters_(net, scale=0.1, seed=0)
    weights, biases = fast_made.masked_weights(net)
    calls = []
    for name in ("_blocked_linear", "_blocked_input_grad", "_blocked_weight_grad"):
        real = getattr(fast_made, name)
        monkeypatch.setattr(fast_made, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x = torch.randn(fast_made._BLOCK_MIN_ROWS, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for rows in (len(x), len(x) - 1):
        calls.clear()
        with torch.no_grad():
            out, inputs = fast_made.fused_forward(net, x[:rows], weights, biases)
            grad_flat = torch.empty_like(net.flat_parameters)
            grad_x = fast_made.fused_backward(net, out.cos(), inputs, weights, grad_flat, True)
        results[rows] = (out, grad_x, grad_flat, sorted(set(calls)))
    blocked, dense = results[len(x)], results[len(x) - 1]
    assert blocked[3] == ["_blocked_input_grad", "_blocked_linear", "_blocked_weight_grad"]
    assert dense[3] == []
    torch.testing.assert_close(blocked[0][:-1], dense[0])
    torch.testing.assert_close(blocked[1][:-1], dense[1])


def _dense_reference(net: MADE, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, input gradient and (masked) parameter gradient of the dense masked network,
    by autograd through ``MADE.forward``."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    grad_x, grad_flat = torch.autograd.grad(out, (x, net.flat_parameters), grad_out)
    return out.detach(), grad_x, grad_flat


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_kernels_match_the_dense_network(name, activation, small_blocks, device,
                                                 dtype):
    """fused_forward / fused_backward with the blocked products against autograd through the
    dense masked network: the same sums of the same products, so equal to rounding. The
    parameter gradient is checked both ways the kernels write it: into ``flat_parameters``'
    layout (masked there), and into caller buffers pre-filled with NaN (so every entry the
    blocks skip must be written: zeros, which the mask keeps at 0)."""
    features, hidden, num_params, order = CASES[name]
    net = MADE(features, hidden, num_params=num_params, order=order, activation=activation,
               zero_first=name in ZERO_FIRST)
    randomize_parameters_(net, scale=0.4, seed=2)
    net = net.to(device, dtype)
    x = torch.randn(33, features, device=device, dtype=dtype)
    grad_out = torch.randn(33, num_params * features, device=device, dtype=dtype)
    want_out, want_x, want_flat = _dense_reference(net, x, grad_out)

    weights, biases = fast_made.masked_weights(net)
    plans = fast_made.block_plans(net, weights)
    assert any(p is not None for p in plans) == (torch.device(device).type == "cpu")
    with torch.no_grad():
        out, inputs = fast_made.fused_forward(net, x, weights, biases)
        grad_flat = torch.full_like(net.flat_parameters, float("nan"))
        grad_x = fast_made.fused_backward(net, grad_out, inputs, weights, grad_flat, True)
        buffers = [(torch.full_like(w, float("nan")), torch.full_like(b, float("nan")))
                   for w, b in zip(weights, biases, strict=True)]
        no_grad_x = fast_made.fused_backward(net, grad_out, inputs, weights, None, False,
                                             buffers)
    tol = tolerances(dtype)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(grad_x, want_x, **tol)
    torch.testing.assert_close(grad_flat, want_flat, **tol)
    assert no_grad_x is None
    written = torch.cat([t.flatten() for pair in buffers for t in pair]) * net.mask
    torch.testing.assert_close(written, want_flat, **tol)


@pytest.mark.parametrize("family", ["maf", "iaf"])
def test_stack_at_blocking_widths_matches_plain_path(family, blocks_at_any_rows, device,
                                                     dtype):
    """A built stack at the widths where blocking is on by default (D=64, hidden (256, 256),
    reversed orders between layers): the fused chain's values, log-det and gradients (input
    and parameters) against the plain differentiable path (``fused = False``, dense products,
    autograd)."""
    flow = pf.flows.build(family, 64, num_layers=2, hidden_dims=(256, 256))
    randomize_parameters_(flow, scale=0.05, seed=4)
    flow = flow.to(device, dtype)
    for layer in flow.parts:  # bank rows (StackedMADE) have their network's plans
        net = layer.conditioner
        blocked = fast_made.block_plans(net, fast_made.masked_weights(net)[0])[1] is not None
        assert blocked == (torch.device(device).type == "cpu")
    plain = _plain_copy(flow)
    x = torch.randn(16, 64, device=device, dtype=dtype)
    weights = torch.linspace(0.5, 2.0, 16, device=device, dtype=dtype)
    results = []
    for t in (flow, plain):
        xr = x.clone().requires_grad_(True)
        # the parallel direction: MAF's inverse (log_prob), IAF's forward (sampling)
        v, ld = t.inverse_and_log_det(xr) if family == "maf" else t.forward_and_log_det(xr)
        (v.sin().sum() + (ld * weights).sum()).backward()
        results.append([v.detach(), ld.detach(), xr.grad]
                       + [p.grad.clone() for p in t.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tolerances(dtype))


def test_a_loaded_stack_with_other_orders_runs_its_blocks_from_the_loaded_masks(
        blocks_at_any_rows):
    """Block plans follow the mask buffers: a stack built with reversed orders that loads the
    state of one built with random permutations (all keys match, the masks differ) computes
    the loaded flow, fused as plain, and the source flow's log-det (real thresholds: D = 300,
    hidden 320, so the order-dependent first layer and head are blocked)."""
    torch.manual_seed(0)
    source = pf.flows.build("maf", 300, num_layers=2, hidden_dims=(320, 320),
                            permutation="random")
    randomize_parameters_(source, scale=0.02)
    target = pf.flows.build("maf", 300, num_layers=2, hidden_dims=(320, 320))
    net = target[0].conditioner
    assert fast_made.block_plans(net, fast_made.masked_weights(net)[0])[0]
    target.load_state_dict(source.state_dict())
    y = torch.randn(5, 300)
    got = target.inverse_and_log_det(y)
    want = source.inverse_and_log_det(y)
    target.fused = False
    plain = target.inverse_and_log_det(y)
    for a, b, c in zip(got, want, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


class _HalfPlanar(pf.transforms.Planar):
    """A planar layer whose subclass redefines its constrained direction (half of Planar's)."""

    def constrained(self):
        u_hat, slack = super().constrained()
        return 0.5 * u_hat, 0.5 * (1 + slack)  # 1 + w.(u_hat / 2) = (1 + slack) / 2


class _ShiftedRadial(pf.transforms.Radial):
    """A radial layer whose subclass redefines its parameter transform."""

    def _alpha_beta(self):
        alpha, alpha_plus_beta = super()._alpha_beta()
        return alpha + 0.5, alpha_plus_beta + 0.5


@pytest.mark.parametrize("cls", [_HalfPlanar, _ShiftedRadial])
def test_a_subclass_that_redefines_the_map_runs_its_own(cls, device, dtype):
    """In a stack, between layers of its parent class (which run on their kernel), a subclass
    that redefines the map runs its own operations: the stack equals the layers one by one."""
    base = cls.__mro__[1]
    parts = [base(3), cls(3), base(3)]
    flow = FlowStack(parts)
    randomize_parameters_(flow, scale=0.5, seed=8)
    flow = flow.to(device, dtype)
    assert parts[1].fused_kind(False) is None and parts[0].fused_kind(False) is not None
    x = torch.randn(5, 3, device=device, dtype=dtype)
    y, log_det = flow.forward_and_log_det(x)
    want, total = x, 0
    for part in parts:
        want, ld = part.forward_and_log_det(want)
        total = total + ld
    torch.testing.assert_close(y, want, **tolerances(dtype))
    torch.testing.assert_close(log_det, total, **tolerances(dtype))
