"""flows.build: the layer sequence, permutations that make every coordinate move, use in
TransformedDistribution, errors, and a 5-layer MAF that beats a Gaussian on two moons."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)

import pyroflows as pf
from pyroflows import _legacy
from pyroflows.testing import randomize_parameters_, tolerances


@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
@pytest.mark.parametrize("permutation", ["reverse", "random"])
def test_layer_sequence_and_folded_permutations(name, permutation):
    """Layer k acts as if the coordinates were first permuted by c_k = p_1 o ... o p_k (the
    permutations between layers); the permutation is folded into its MADE order or coupling
    mask instead of a Permute layer: order_k = argsort(c_k), mask_k = mask[argsort(c_k)],
    except that RealNVP's odd-numbered layers take the complement of the previous mask."""
    dim = 5
    flow = pf.flows.build(name, dim, num_layers=4, hidden_dims=(8,), permutation=permutation,
                          affine=True)
    layer = {"iaf": "IAF", "maf": "MAF", "realnvp": "RealNVP"}[name]
    assert [type(p).__name__ for p in flow.parts] == [layer] * 4 + ["ElementwiseAffine"]
    assert all(p.conditioner.hidden_dims == (8,) for p in flow.parts[:4])
    cumulative = list(range(dim))
    for k, part in enumerate(flow.parts[:4]):
        if k > 0:
            step = (list(range(dim - 1, -1, -1)) if permutation == "reverse"
                    else pf.transforms.Permute.random(dim, seed=k).permutation.tolist())
            cumulative = [cumulative[j] for j in step]
        rank = [cumulative.index(j) for j in range(dim)]  # argsort
        if name == "realnvp" and k % 2 == 1:
            assert part.mask.tolist() == [not m for m in flow.parts[k - 1].mask.tolist()]
        elif name == "realnvp":
            first = [j < dim // 2 for j in range(dim)]
            assert part.mask.tolist() == [first[r] for r in rank]
        else:
            assert part.conditioner.degrees.tolist() == [r + 1 for r in rank]
    again = pf.flows.build(name, dim, num_layers=4, hidden_dims=(8,), permutation=permutation)
    assert all(torch.equal(a, b) for a, b in zip(again.buffers(), flow.buffers(), strict=True))


def test_families_without_a_fold_get_permute_layers():
    pf.flows.register_family("maf-unfolded",
                             pf.flows.Family(pf.transforms.MAF, needs_permutation=True))
    try:
        flow = pf.flows.build("maf-unfolded", 3, num_layers=3, hidden_dims=(8,))
        kinds = [type(p).__name__ for p in flow.parts]
        assert kinds == ["MAF", "Permute", "MAF", "Permute", "MAF"]
        assert all(p.conditioner.degrees.tolist() == [1, 2, 3] for p in flow.parts[::2])
    finally:
        pf.flows.FAMILIES.pop("maf-unfolded")


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
def test_every_coordinate_depends_on_every_other(name, dim, device, dtype):
    """One autoregressive/coupling layer leaves zeros in its Jacobian; with permutations in
    between, a short stack mixes every coordinate into every other (for an odd D too)."""
    num_layers = 3 if name == "realnvp" else 2
    flow = pf.flows.build(name, dim, num_layers=num_layers, hidden_dims=(16,),
                          activation=torch.nn.Tanh)  # no dead units to hide a dependency
    randomize_parameters_(flow, scale=0.3)
    flow = flow.to(device, dtype)
    x = torch.randn(dim, device=device, dtype=dtype)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], x)
    assert (jac != 0).all()
    single = flow.parts[0]
    jac1 = torch.autograd.functional.jacobian(lambda v: single(v[None])[0], x)
    assert (jac1 == 0).any()


@pytest.mark.parametrize("permutation", ["reverse", "random"])
@pytest.mark.parametrize("dim", [3, 4, 5, 7])
def test_realnvp_coordinates_take_both_roles(dim, permutation, device, dtype):
    """Read each coupling layer's roles off its autograd Jacobian: coordinate i is transformed
    when row i differs from the identity's, and conditions the layer when column i has a
    nonzero off the diagonal. In each pair of layers (0, 1), (2, 3) every coordinate must be
    transformed once and condition once (reversing an odd D maps the middle coordinate onto
    itself: with folded reversals it was transformed by every layer and conditioned none)."""
    flow = pf.flows.build("realnvp", dim, num_layers=4, hidden_dims=(16,),
                          permutation=permutation, activation=torch.nn.Tanh)
    randomize_parameters_(flow, scale=0.3)
    flow = flow.to(device, dtype)
    eye = torch.eye(dim, device=device, dtype=dtype)
    x = torch.randn(dim, device=device, dtype=dtype)
    roles = []
    for layer in flow.parts:
        jac = torch.autograd.functional.jacobian(lambda v, t=layer: t(v[None])[0], x)
        transformed = (jac != eye).any(1)
        conditions = ((jac - torch.diag(jac.diagonal())) != 0).any(0)
        assert not (transformed & conditions).any()  # a coupling: one role per layer
        assert transformed.any() and conditions.any()
        roles.append((transformed, conditions))
        x = layer(x[None])[0].detach()
    for (t1, c1), (t2, c2) in zip(roles[0::2], roles[1::2], strict=True):
        assert (t1 | t2).all() and (c1 | c2).all()


@pytest.mark.parametrize("name", ["planar", "radial", "iaf", "maf", "realnvp"])
def test_stack_in_transformed_distribution(name, device, dtype):
    dim = 3
    flow = pf.flows.build(name, dim, num_layers=3)
    randomize_parameters_(flow, scale=0.2)
    flow = flow.to(device, dtype)
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    base = Independent(Normal(zeros, 1.0), 1)
    q_whole = TransformedDistribution(base, flow)
    q_parts = TransformedDistribution(base, list(flow.parts))
    z = q_whole.rsample((11,))
    assert z.shape == (11, dim) and z.dtype == dtype
    lp = q_whole.log_prob(z)
    torch.testing.assert_close(lp, q_parts.log_prob(z.clone()), **tolerances(dtype))
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], flow.inv(z[:1].clone())[0])
    expected = base.log_prob(flow.inv(z[:1].clone())) - torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(lp[:1], expected, **tolerances(dtype))
    lp.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_state_dict_round_trip_of_a_stack(device, dtype):
    flow = pf.flows.build("maf", 3, num_layers=3, permutation="random", affine=True)
    randomize_parameters_(flow, scale=0.3)
    flow = flow.to(device, dtype)
    other = pf.flows.build("maf", 3, num_layers=3, permutation="random", affine=True)
    other.load_state_dict(flow.state_dict())
    other = other.to(device, dtype)
    y = torch.randn(5, 3, device=device, dtype=dtype)
    torch.testing.assert_close(other.inv(y), flow.inv(y.clone()), **tolerances(dtype))


def test_build_errors():
    with pytest.raises(ValueError, match="unknown flow family"):
        pf.flows.build("glow", 3)
    with pytest.raises(ValueError, match="permutation"):
        pf.flows.build("maf", 3, permutation="sideways")
    with pytest.raises(ValueError, match="num_layers"):
        pf.flows.build("maf", 3, num_layers=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.flows.build("planar", 3, hidden_dims=(8,))


def test_one_dimensional_stacks_need_no_permutation():
    flow = pf.flows.build("maf", 1, num_layers=3)
    assert [type(p).__name__ for p in flow.parts] == ["MAF"] * 3
    flow = pf.flows.build("realnvp", 4, num_layers=1, mask=[False, True, True, False])
    assert flow.parts[0].mask.tolist() == [False, True, True, False]
    flow = pf.flows.build("realnvp", 4, num_layers=2, mask=[False, True, True, False])
    # the complement, not the reversal (which is this symmetric mask itself)
    assert flow.parts[1].mask.tolist() == [True, False, False, True]


def test_maf_fits_two_moons_better_than_a_gaussian(one_thread):
    """Default 5-layer MAF, 300 Adam steps: held-out log-likelihood clearly above the best
    Gaussian's (its maximum-likelihood fit, in closed form)."""
    torch.manual_seed(0)
    x = pf.datasets.two_moons(2000, seed=1, dtype=torch.float32)
    x_test = pf.datasets.two_moons(2000, seed=2, dtype=torch.float32)
    gaussian = MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    flow = pf.flows.build("maf", 2, num_layers=5)
    p = TransformedDistribution(Independent(Normal(torch.zeros(2), 1.0), 1), flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(300):
        loss = -p.log_prob(x[torch.randint(0, len(x), (256,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        flow_ll = p.log_prob(x_test).mean().item()
        gauss_ll = gaussian.log_prob(x_test).mean().item()
    assert flow_ll > gauss_ll + 0.5, (flow_ll, gauss_ll)


def test_speed_benchmark_runs(capsys, one_thread):
    """Smoke test of ``python -m benchmarks.speed`` on a tiny setting (it never asserts times)."""
    from benchmarks import speed
    speed.main(["--items", "1", "3", "5", "--sizes", "D=8", "--libraries", "pyroflows", "pyro",
                "alt: Permute layers between", speed.ESTIMATOR, "--rounds", "1", "--steps", "1",
                "--warmup", "1", "--slow-rounds", "1", "--samples", "3"])
    out = capsys.readouterr().out
    assert "| 1 | maf, D=8 | pyroflows |" in out and "| 1 | maf, D=8 | pyro |" in out
    assert f"| 1 | maf, D=8 | {speed.ESTIMATOR} |" in out
    assert "| 3 | german credit" in out and "| 5 | maf sampling" in out and "| 2 |" not in out


def test_stack_inverse_and_log_det_is_the_inverse_and_its_log_det(device, dtype):
    """The public pairs of a stack: z = f^{-1}(y) and log|det df/dz| at z, against the layers
    run one by one (their own inverses and log-dets), from the cache right after a forward
    call; y = f(z) with the same log-det; both refused for a stack with a foreign part."""
    torch.manual_seed(0)
    stack = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,)).to(device, dtype)
    randomize_parameters_(stack, scale=0.3)
    y = torch.randn(6, 3, device=device, dtype=dtype)
    z, log_det = stack.inverse_and_log_det(y)
    assert log_det.abs().min() > 1e-3  # a non-trivial map
    x, total = y, torch.zeros(6, device=device, dtype=dtype)
    for part in reversed(stack.parts):
        x, ld = part.inverse_and_log_det(x)
        total = total + ld
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(log_det, total)
    y2 = stack(z)  # fills the cache: the pair comes back without an inverse run
    z2, log_det2 = stack.inverse_and_log_det(y2)
    assert z2 is z or torch.equal(z2, z)
    torch.testing.assert_close(log_det2, stack.log_abs_det_jacobian(z, y2))
    # and the forward pair: y = f(z) with the same log-det, run or from the cache
    y3, log_det3 = stack.forward_and_log_det(z.clone())
    torch.testing.assert_close(y3, y)
    torch.testing.assert_close(log_det3, total)
    y4, log_det4 = stack.forward_and_log_det(z)
    assert y4 is y2 and torch.equal(log_det4, log_det2)
    foreign = pf.flows.FlowStack([torch.distributions.transforms.ExpTransform()])
    assert not foreign.all_flow_transforms
    with pytest.raises(TypeError, match="FlowTransform"):
        foreign.inverse_and_log_det(y)
    with pytest.raises(TypeError, match="FlowTransform"):
        foreign.forward_and_log_det(y)


# ---- stacked MADE conditioners (issue 9) -------------------------------------------------

def _per_layer(monkeypatch, *args, **kwargs) -> pf.flows.FlowStack:
    """``build`` as before the conditioners were stacked: every MADE its own parameter."""
    with monkeypatch.context() as m:
        name = args[0]
        m.setitem(pf.flows.FAMILIES, name,
                  dataclasses.replace(pf.flows.FAMILIES[name], stacked_conditioners=False))
        return pf.flows.build(*args, **kwargs)


@pytest.mark.parametrize("name", ["iaf", "maf", "realnvp"])
def test_built_stack_keeps_its_conditioners_in_one_bank(name, monkeypatch):
    """One (L, P) parameter and one (L, P) mask for the L networks; layer k's
    ``flat_parameters`` and ``mask`` are row k (views); under one seed the values are those
    the per-layer build draws, and the masks those of the layers' own orders."""
    torch.manual_seed(3)
    old = _per_layer(monkeypatch, name, 4, num_layers=3, hidden_dims=(8,))
    torch.manual_seed(3)
    flow = pf.flows.build(name, 4, num_layers=3, hidden_dims=(8,))
    (bank,) = flow.parameters()
    nets = [part.conditioner for part in flow.parts]
    assert all(type(n) is pf.nn.made.StackedMADE and n.stacked is nets[0].stacked for n in nets)
    assert bank.shape == (3, sum(nets[0]._sizes)) and [n.index for n in nets] == [0, 1, 2]
    for k, (net, ref) in enumerate(zip(nets, (p.conditioner for p in old.parts), strict=True)):
        assert torch.equal(net.flat_parameters, ref.flat_parameters)
        assert torch.equal(net.mask, ref.mask) and torch.equal(net.degrees, ref.degrees)
        assert net.flat_parameters._base is bank and torch.equal(bank[k], ref.flat_parameters)
    # a layer's parameters are the whole bank; gradients through a row reach it
    assert list(flow.parts[1].parameters()) == [bank]
    flow.parts[1].conditioner.flat_parameters.sum().backward()
    assert bank.grad[1].eq(1).all() and bank.grad[[0, 2]].eq(0).all()


def test_stacks_that_cannot_share_keep_per_layer_parameters():
    """A lone layer and a family without ``stacked_conditioners`` (here one
    registered by the user) keep per-layer parameters; layer keywords such as ``gated``
    leave a run of same-size networks stacked."""
    assert len(list(pf.flows.build("maf", 3, num_layers=1, hidden_dims=(8,)).parameters())) == 1
    assert type(pf.flows.build("maf", 3, num_layers=1).parts[0].conditioner) is pf.nn.MADE
    pf.flows.register_family("maf-plain", pf.flows.Family(
        pf.transforms.MAF, needs_permutation=True, fold=pf.flows.fold_order))
    try:
        flow = pf.flows.build("maf-plain", 3, num_layers=3, hidden_dims=(8,))
        assert len(list(flow.parameters())) == 3
    finally:
        pf.flows.FAMILIES.pop("maf-plain")
    gated = pf.flows.build("iaf", 3, num_layers=3, hidden_dims=(8,), gated=True)
    assert len(list(gated.parameters())) == 1  # still one run of same-size networks


@pytest.mark.parametrize("name,dim", [("maf", 3), ("iaf", 3), ("realnvp", 4)])
def test_old_per_layer_state_dicts_load(name, dim, monkeypatch, device, dtype):
    """A state_dict of a stack built the old way (keys ``{i}.conditioner.flat_parameters``
    and ``{i}.conditioner.mask``) loads into the stacked build, also inside another module
    and with the layers shifted by a leading layer (the estimator's whitened stack); the
    loaded flow maps as the old one."""
    old = _per_layer(monkeypatch, name, dim, num_layers=3, hidden_dims=(8,))
    randomize_parameters_(old, scale=0.3, seed=4)
    lead = pf.transforms.ElementwiseAffine(dim)
    randomize_parameters_(lead, scale=0.3, seed=5)
    old_shifted = pf.flows.FlowStack([lead, *old.parts])
    assert "1.conditioner.flat_parameters" in old_shifted.state_dict()
    x = torch.randn(6, dim, device=device, dtype=dtype)
    for stack, make in ((old, lambda flow: flow),
                        (old_shifted, lambda flow: pf.flows.FlowStack(
                            [pf.transforms.ElementwiseAffine(dim), *flow.parts]))):
        new = make(pf.flows.build(name, dim, num_layers=3, hidden_dims=(8,)))
        wrapper = torch.nn.Module()
        wrapper.flow = new
        wrapper.load_state_dict({f"flow.{k}": v for k, v in stack.state_dict().items()})
        stack, new = stack.to(device, dtype), new.to(device, dtype)
        torch.testing.assert_close(new.inv(x.clone()), stack.inv(x.clone()), **tolerances(dtype))
        assert len(list(new.parameters())) == len(list(stack.parameters())) - 2


def test_per_layer_param_store_entries_convert(monkeypatch):
    """What a guide does with a param store of an older version: the per-layer parameter
    names of the stack's banked layers, and those entries alone (no masks: a param store
    holds parameters only) turned into the stacked entry."""
    flow = pf.flows.build("iaf", 3, num_layers=2, hidden_dims=(8,), affine=True)
    names = _legacy.per_layer_parameter_names(flow)
    assert names == ["0.conditioner.flat_parameters", "1.conditioner.flat_parameters"]
    planar = pf.flows.build("planar", 3, num_layers=2)
    assert sorted(_legacy.per_layer_parameter_names(planar)) == sorted(
        f"{i}.{n}" for i in range(2) for n in ("u", "w", "bias"))
    old = _per_layer(monkeypatch, "iaf", 3, num_layers=2, hidden_dims=(8,))
    randomize_parameters_(old, scale=0.3, seed=1)
    entries = {name: p.detach() for name, p in old.named_parameters()}
    assert sorted(entries) == names
    _legacy.per_layer_keys_to_stacked(flow, entries, "")
    stacked = entries.pop("0.conditioner.stacked.flat_parameters")
    assert torch.equal(stacked, torch.stack([p.conditioner.flat_parameters for p in old.parts]))
    assert set(entries) == {"1.conditioner.stacked.flat_parameters"}  # nothing else left


def test_stacked_conditioners_stay_shared_through_to_copy_and_pickle(device):
    """``.to()``, ``copy.deepcopy`` and pickling keep one bank for all layers (a copy gets
    its own), so the copy's layers still train together."""
    import copy
    import io

    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,)).to(device, torch.float64)
    buf = io.BytesIO()
    torch.save(flow, buf)
    buf.seek(0)
    for other in (flow, copy.deepcopy(flow), torch.load(buf, weights_only=False)):
        banks = {id(p.conditioner.stacked) for p in other.parts}
        assert len(banks) == 1 and len(list(other.parameters())) == 1
        assert other.parts[2].conditioner.flat_parameters.dtype == torch.float64
        assert other.parts[2].conditioner.mask.device.type == torch.device(device).type
    assert copy.deepcopy(flow).parts[0].conditioner.stacked is not flow.parts[0].conditioner.stacked


class _Holder(torch.nn.Module):
    """A module that holds a flow (as a guide or an estimator's model does)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow(x)


@pytest.mark.parametrize("name", ["planar", "radial", "maf", "realnvp"])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_functional_call_uses_and_restores_the_banks(name, tie_weights, device, dtype):
    """torch.func.functional_call runs a built stack, alone or inside another module, with the
    given tensors (zero MAF/RealNVP networks: the identity) and leaves its own shared
    parameters in place afterwards, with torch's default tie_weights=True (which swaps a
    tensor under every name it has) as with False."""
    kw = {"hidden_dims": (8,)} if name in ("maf", "realnvp") else {}
    stack = pf.flows.build(name, 4, num_layers=3, **kw).to(device, dtype)
    randomize_parameters_(stack, scale=0.3)
    own = list(stack.parameters())
    x = torch.randn(4, 4, device=device, dtype=dtype)
    before = stack(x.clone()).detach()
    for module, prefix in ((stack, ""), (_Holder(stack), "flow.")):
        zeros = {prefix + k: torch.zeros_like(v) for k, v in stack.named_parameters()}
        y = torch.func.functional_call(module, zeros, (x.clone(),), tie_weights=tie_weights)
        if name in ("maf", "realnvp"):
            torch.testing.assert_close(y, x)  # zero networks: shift 0, scale 1
        after = list(stack.parameters())
        assert all(a is b for a, b in zip(own, after, strict=True))
        assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in after)
        torch.testing.assert_close(stack(x.clone()), before)  # its own weights again
