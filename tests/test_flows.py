"""flows: build (the layer sequence, permutations that make every coordinate move, errors), the
family records, FlowStack (use in TransformedDistribution, its public pairs, its cache), the
parameter banks of built stacks, and a 5-layer MAF that beats a Gaussian on two moons."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)

import pyroflows as pf
from pyroflows.flows.banks import MADEParameters, StackedMADE, stacked_mades
from pyroflows.nn import MADE
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

# ---- FlowStack ---------------------------------------------------------------------------

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


def test_stack_inverse_and_log_det_is_the_inverse_and_its_log_det(device, dtype):
    """The public pairs of a stack: z = f^{-1}(y) and log|det df/dz| at z, against the layers
    run one by one (their own inverses and log-dets), from the cache right after a forward
    call; y = f(z) with the same log-det, from the cache right after an inverse call; both
    refused for a stack with a foreign part."""
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
    y4, log_det4 = stack.forward_and_log_det(z)  # z was an input: computed, never cached
    assert y4 is not y2
    torch.testing.assert_close(y4, y2)
    torch.testing.assert_close(log_det4, log_det2)
    z5 = stack.inv(y)  # an inverse's output: the forward pair comes from the cache
    y5, log_det5 = stack.forward_and_log_det(z5)
    assert y5 is y and torch.equal(log_det5, stack.log_abs_det_jacobian(z5, y))
    foreign = pf.flows.FlowStack([torch.distributions.transforms.ExpTransform()])
    assert not foreign.all_flow_transforms
    with pytest.raises(TypeError, match="FlowTransform"):
        foreign.inverse_and_log_det(y)
    with pytest.raises(TypeError, match="FlowTransform"):
        foreign.forward_and_log_det(y)


def test_stack_scores_its_own_samples_from_its_cache(device, dtype):
    """Scoring the stack's own samples runs no inverse: IAF's inverse would take D passes."""
    flow = pf.flows.build("iaf", 3, num_layers=3, hidden_dims=(8,), affine=True)
    randomize_parameters_(flow, scale=0.3, seed=3)
    flow = flow.to(device, dtype)
    z = torch.randn(5, 3, device=device, dtype=dtype)
    x = flow(z)
    calls = []
    for part in flow.parts:
        part.register_forward_pre_hook(lambda *a: calls.append(1))  # never fires: no forward()
        part.inverse_and_log_det = lambda y, _f=part.inverse_and_log_det: calls.append(1) or _f(y)
    assert flow.inv(x) is z
    flow.log_abs_det_jacobian(z, x)
    assert calls == []


def test_compile_needs_flow_transforms():
    with pytest.raises(ValueError, match="compile"):
        pf.flows.FlowStack([torch.distributions.transforms.ExpTransform()], compile=True)

# ---- parameter banks of built stacks -----------------------------------------------------

FIELDS = {"planar": ("w", "u", "bias"), "radial": ("x0", "alpha_prime", "beta_prime")}


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_parameters_are_three_tensors_and_init_like_per_layer(family):
    torch.manual_seed(3)
    flow = pf.flows.build(family, 4, num_layers=5)
    torch.manual_seed(3)
    layers = [getattr(pf.transforms, family)(4) for _ in range(5)]
    params = list(flow.parameters())
    assert len(params) == 3 and params[0].shape[0] == 5
    for row, layer in zip(flow.parts, layers, strict=True):  # same draws, same order
        assert all(torch.equal(getattr(row, n), getattr(layer, n)) for n in FIELDS[family])
    assert [type(p).__name__ for p in flow.parts] == ["Stacked" + family.title()] * 5
    assert isinstance(flow[2], getattr(pf.transforms, family.title()))
    # an argument a layer does not take still fails clearly (the per-layer path)
    with pytest.raises(ValueError, match="hidden_dims"):
        pf.flows.build(family, 3, hidden_dims=(8,))


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_stacked_stack_moves_copies_and_loads(family, device, dtype):
    """The layers share one set of stacked tensors through .to(), deepcopy and pickling, and a
    state_dict round trip works."""
    flow = pf.flows.build(family, 3, num_layers=4)
    randomize_parameters_(flow, scale=0.7, seed=4)
    flow = flow.to(device, dtype)
    assert all(p.device.type == torch.device(device).type and p.dtype == dtype
               for p in flow.parameters())
    copied = copy.deepcopy(flow)
    assert all(part.stacked is copied[0].stacked for part in copied.parts)
    assert copied[0].stacked is not flow[0].stacked
    buf = io.BytesIO()
    torch.save(flow, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(part.stacked is loaded[0].stacked for part in loaded.parts)
    x = torch.randn(5, 3, device=device, dtype=dtype)
    tol = tolerances(dtype)
    fresh = pf.flows.build(family, 3, num_layers=4).to(device, dtype)
    fresh.load_state_dict(flow.state_dict())
    for other in (copied, loaded, fresh):
        torch.testing.assert_close(other(x.clone()), flow(x.clone()), **tol)
    # one layer moved alone moves the tensors it shares with the others
    if dtype == torch.float64:
        flow[1].float()
        assert all(p.dtype == torch.float32 for p in flow.parameters())


def _per_layer(monkeypatch, *args, **kwargs) -> pf.flows.FlowStack:
    """``build`` with every MADE its own parameter (the per-layer layout)."""
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
    assert all(type(n) is StackedMADE and n.stacked is nets[0].stacked for n in nets)
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


def test_stacked_made_rows_are_made_networks(device, dtype):
    """StackedMADE rows of one MADEParameters: each the map of the MADE it was made from
    (checked against that MADE, with its own parameters), autoregressive (autograd: output
    i never depends on inputs ranked at or after i), layer views and re-initialization
    write into the row only, and the checks of the bank."""
    nets = [MADE(4, (8, 8), order=order) for order in ([0, 1, 2, 3], [3, 1, 0, 2])]
    for net in nets:
        randomize_parameters_(net, scale=0.5)
    rows = stacked_mades(nets)
    nets = [n.to(device, dtype) for n in nets]
    bank = rows[0].stacked.to(device, dtype)  # moves the rows' tensors with it
    x = torch.randn(5, 4, device=device, dtype=dtype, requires_grad=True)
    for row, net in zip(rows, nets, strict=True):
        assert type(row) is StackedMADE and row.stacked is bank
        torch.testing.assert_close(row(x), net(x), **tolerances(dtype))
        jac = torch.autograd.functional.jacobian(lambda v, row=row: row(v).sum(0), x)  # (8,5,4)
        for i, rank in enumerate(row.degrees.tolist()):
            later = [j for j, r in enumerate(row.degrees.tolist()) if r >= rank]
            assert jac[[i, i + 4]][..., later].abs().max() == 0
    with torch.no_grad():
        rows[1].layer_parameters(-1)[1].fill_(2.0)  # the head bias of row 1, in place
    assert bank.flat_parameters[1, -8:].eq(2.0).all()
    before = bank.flat_parameters[0].clone()
    rows[1].reset_parameters()  # row 1 only: its head back to 0, row 0 untouched
    assert bank.flat_parameters[1, -8:].eq(0.0).all()
    assert torch.equal(bank.flat_parameters[0], before)
    with pytest.raises(ValueError, match="one size"):
        MADEParameters([nets[0].flat_parameters, torch.zeros(3)], [nets[0].mask, torch.ones(3)])
    with pytest.raises(ValueError, match="index"):
        StackedMADE(nets[0], bank, 2)
    with pytest.raises(ValueError, match="size"):
        StackedMADE(MADE(4, (7,)), bank, 0)


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

# ---- training and the speed benchmark ----------------------------------------------------

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
    assert "| 5 | nsf sampling, D=64, 1 draws | pyroflows |" in out
