"""The fast paths (issue 9) against the plain ones: same values, same gradients, same checks.

The fused :class:`~pyroflows.flows.FlowStack` is compared with Pyro's plain
``ComposeTransformModule`` over the very same layers (the composition rule of
``torch.distributions``, which the conformance suite checks against autograd Jacobians), and the
compiled stack runs the conformance checks themselves. The compiled path is traced with the
``aot_eager`` backend: the same Dynamo capture and AOT-Autograd graphs as the default Inductor
backend, without its C++ code generation (minutes on a small shared CPU).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf
from pyroflows import testing
from pyroflows.flows import FlowStack
from pyroflows.nn import MADE
from pyroflows.transforms.base import module_stamp
from pyroflows.transforms.planar import planar_u_hat

FAMILIES = [("maf", 4), ("iaf", 3), ("realnvp", 4), ("planar", 3)]


def _stack(family: str, dim: int, device, dtype, **kwargs) -> FlowStack:
    hidden = {} if family == "planar" else {"hidden_dims": (8,)}
    flow = pf.flows.build(family, dim, num_layers=3, affine=True, **hidden, **kwargs)
    testing.randomize_parameters_(flow, scale=0.3, seed=3)
    return flow.to(device=device, dtype=dtype)


def _base(dim: int, device, dtype) -> Independent:
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


@pytest.mark.parametrize("family,dim", FAMILIES)
def test_fused_stack_matches_plain_composition(family, dim, device, dtype):
    fused = _stack(family, dim, device, dtype)
    assert isinstance(fused, FlowStack) and fused._fused
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


def test_fused_stack_cache_is_one_pass(device, dtype):
    """Scoring the stack's own samples runs no inverse: IAF's inverse would take D passes."""
    flow = _stack("iaf", 3, device, dtype)
    z = torch.randn(5, 3, device=device, dtype=dtype)
    x = flow(z)
    calls = []
    for part in flow.parts:
        part.register_forward_pre_hook(lambda *a: calls.append(1))  # never fires: no forward()
        part.inverse_and_log_det = lambda y, _f=part.inverse_and_log_det: calls.append(1) or _f(y)
    assert flow.inv(x) is z
    flow.log_abs_det_jacobian(z, x)
    assert calls == []


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


def test_compile_needs_flow_transforms():
    with pytest.raises(ValueError, match="compile"):
        FlowStack([torch.distributions.transforms.ExpTransform()], compile=True)


def test_module_stamp_sees_every_change(device, dtype):
    flow = _stack("maf", 3, device, dtype)
    stamp = module_stamp(flow)
    assert module_stamp(flow) == stamp
    with torch.no_grad():
        flow.parts[1].conditioner.flat_parameters.add_(0.0)  # an in-place edit bumps the version
    assert module_stamp(flow) != stamp
    stamp = module_stamp(flow)
    flow.load_state_dict(flow.state_dict())
    assert module_stamp(flow) != stamp
    with torch.no_grad():
        assert module_stamp(flow) != module_stamp(flow.parts[0])  # grad mode, and fewer tensors


def test_validation_overflowing_sum_is_not_an_error(device):
    """Finite inputs whose sum overflows must pass the one-reduction finiteness check."""
    t = pf.transforms.ElementwiseAffine(4).to(device=device, dtype=torch.float32)
    x = torch.full((3, 4), 3e38, device=device, dtype=torch.float32)
    with pf.validation(True):
        assert torch.isfinite(t(x)).all()  # the identity at initialization
        bad = x.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            t(bad)


# ---- the fused kernels (affine_chain, planar_chain) against the plain operations ----------

AFFINE_LAYERS = {
    "maf": lambda: pf.transforms.maf(5, hidden_dims=(16, 16)),
    "iaf": lambda: pf.transforms.iaf(5, hidden_dims=(16, 16)),
    "realnvp": lambda: pf.transforms.realnvp(5, hidden_dims=(16, 16)),
    "maf-tanh-narrow": lambda: pf.transforms.maf(5, hidden_dims=(3,), activation=torch.nn.Tanh,
                                                 order=[2, 0, 4, 1, 3]),
    "maf-linear": lambda: pf.transforms.maf(5, hidden_dims=()),
}


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
    from pyroflows.transforms.autoregressive import affine_chain

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


@pytest.mark.parametrize("shape", [(9,), (2, 4), ()])
def test_fused_planar_chain_matches_plain(shape, device, dtype):
    """A planar stack run as one node against the same layers run one by one."""
    flow = pf.flows.build("planar", 3, num_layers=6)
    testing.randomize_parameters_(flow, scale=1.0, seed=4)
    flow = flow.to(device, dtype)
    plain = copy.deepcopy(flow)
    plain.fused = False
    x = torch.randn(*shape, 3, device=device, dtype=dtype)
    got, want = (_value_and_grads(f, x, inverse=False) for f in (flow, plain))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))
    layer = flow.parts[0]
    torch.testing.assert_close(planar_u_hat(layer.w[None], layer.u[None])[0],
                               layer.u_hat(), **testing.tolerances(dtype))


def test_planar_chain_gradcheck(device):
    from pyroflows.flows.stack import _PlanarChain

    gen = torch.Generator().manual_seed(5)
    k, n, d = 4, 3, 2
    args = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
            for s in ((n, d), (k, d), (k, d), (k,), (k,), (n,))]
    args[4] = (0.5 * args[4]).detach().requires_grad_(True)  # c = w.u_hat > -1
    assert torch.autograd.gradcheck(_PlanarChain.apply, tuple(args))


def test_mixed_stack_runs_fused_groups(device, dtype):
    """Runs of affine layers and of planar layers, broken by other layers, in both directions:
    the same values and gradients as every layer's plain operations."""
    T = pf.transforms  # noqa: N806
    parts = [T.planar(3), T.planar(3), T.maf(3, hidden_dims=(8,)),
             T.maf(3, hidden_dims=(8,), order=[2, 1, 0]), T.radial(3),
             T.realnvp(3, hidden_dims=(8,)), T.ElementwiseAffine(3)]
    flow = FlowStack(parts)
    testing.randomize_parameters_(flow, scale=0.3, seed=6)
    flow = flow.to(device, dtype)
    plain = _plain_copy(flow)
    plain.fused = False
    x = torch.randn(5, 3, device=device, dtype=dtype)
    for inverse in (False, True):
        results = []
        for f in (flow, plain):
            f.zero_grad()
            xv = x.clone().requires_grad_(True)
            y, ld = f._chain(xv, inverse)
            (y.sin().sum() + ld.sum()).backward()
            results.append([y.detach(), ld.detach(), xv.grad]
                           + [p.grad for p in f.parameters() if p.grad is not None])
        assert len(results[0]) == len(results[1])
        for a, b in zip(*results, strict=True):
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


AFFINE_LAYERS["maf-ties"] = lambda: pf.transforms.maf(7, hidden_dims=(16,),
                                                     order=[3, 3, 1, 0, 2, 5, 4])


@pytest.mark.parametrize("name", ["maf", "iaf", "maf-tanh-narrow", "maf-linear", "maf-ties"])
def test_no_grad_sequential_passes_match_plain(name, device, dtype):
    """The D-pass direction (MAF sampling, IAF inverse) without autograd goes level by level,
    computing each hidden unit once, against the plain fixed-point passes; then back with the
    one-pass direction."""
    t = AFFINE_LAYERS[name]()
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


# ---- stacked MADE conditioners (issue 9): one parameter tensor for a run of layers --------

def _per_layer_and_stacked(family: str, dim: int, device, dtype, monkeypatch):
    """The same 3-layer flow twice: built the old way (every MADE its own flat parameter,
    ``stacked_conditioners`` off) and as ``build`` makes it now (rows of one
    bank), with the per-layer one's randomized values copied into the bank's rows."""
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
    """Against the layers with per-layer parameters (the previous implementation): the same
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
    from pyroflows.transforms.autoregressive import affine_chain

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
                                              device=ld.device)).sum()).backward()
        params = list(flow.parameters())
        assert all(p.grad is not None for p in params), "a parameter got no gradient"
        results.append([y.detach(), ld.detach(), xv.grad] + [p.grad.clone() for p in params])
    return results


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
