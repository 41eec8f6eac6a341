"""State dicts and param stores of earlier layouts load into today's modules
(:mod:`pyroflows._legacy`): per-layer keys of stacks whose layers now share banks, separate
entries of the packed affine layers; the loaded modules map as the old ones did."""

from __future__ import annotations

import dataclasses

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.params.param_store import param_with_module_name

import pyroflows as pf
from pyroflows import _legacy
from pyroflows.guides import AutoIAF, FlowELBO
from pyroflows.testing import randomize_parameters_, tolerances
from pyroflows.transforms import ElementwiseAffine, TriangularAffine


def _per_layer(monkeypatch, *args, **kwargs) -> pf.flows.FlowStack:
    """``build`` with every MADE its own parameter (the per-layer layout)."""
    with monkeypatch.context() as m:
        name = args[0]
        m.setitem(pf.flows.FAMILIES, name,
                  dataclasses.replace(pf.flows.FAMILIES[name], stacked_conditioners=False))
        return pf.flows.build(*args, **kwargs)


@pytest.mark.parametrize("name,dim", [("maf", 3), ("iaf", 3), ("realnvp", 4)])
def test_old_per_layer_state_dicts_load(name, dim, monkeypatch, device, dtype):
    """A state_dict of a stack with per-layer networks (keys ``{i}.conditioner.flat_parameters``
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
    """What a guide does with a param store of the per-layer layout: the per-layer parameter
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


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_per_layer_planar_and_radial_state_dicts_load(family, device, dtype):
    """A state_dict of a stack of per-layer planar or radial layers (keys ``{i}.u`` etc.)
    loads into the stacked build, with no missing or unexpected key, and maps as before."""
    layers = [getattr(pf.transforms, family)(3) for _ in range(4)]
    old = pf.flows.FlowStack(layers)
    randomize_parameters_(old, scale=0.7, seed=4)
    old = old.to(device, dtype)
    fresh = pf.flows.build(family, 3, num_layers=4).to(device, dtype)
    keys = fresh.load_state_dict(old.state_dict())
    assert not keys.missing_keys and not keys.unexpected_keys
    x = torch.randn(5, 3, device=device, dtype=dtype)
    torch.testing.assert_close(fresh(x.clone()), old(x.clone()), **tolerances(dtype))


def _values(dim, device, dtype):
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(dim, generator=gen, dtype=torch.float64)
    log_scale = 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    lower = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (loc, log_scale, lower)]


@pytest.mark.parametrize("cls", [ElementwiseAffine, TriangularAffine])
def test_state_dicts_with_separate_entries_still_load(cls, device, dtype):
    """A state dict with separate entries (``loc``, ``log_scale``, ``lower``) loads into the
    packed layer, alone and inside a stack."""
    dim = 4
    loc, log_scale, lower = _values(dim, device, dtype)
    old = {"loc": loc, "log_scale": log_scale}
    if cls is TriangularAffine:
        old["lower"] = lower
    layer = cls(dim).to(device, dtype)
    layer.load_state_dict(old)
    torch.testing.assert_close(layer.loc, loc, rtol=0, atol=0)
    torch.testing.assert_close(layer.log_scale, log_scale, rtol=0, atol=0)
    if cls is TriangularAffine:
        torch.testing.assert_close(layer.lower, lower, rtol=0, atol=0)
    stack = pf.flows.FlowStack([pf.transforms.planar(dim), cls(dim)]).to(device, dtype)
    state = {k: v for k, v in stack.state_dict().items() if not k.startswith("1.")}
    state.update({f"1.{k}": v for k, v in old.items()})
    stack.load_state_dict(state)
    torch.testing.assert_close(stack.parts[1].packed, layer.packed, rtol=0, atol=0)


def _model():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=torch.tensor(1.0))


@pytest.mark.parametrize("full_rank", [False, True])
def test_old_guide_param_stores_and_state_dicts_initialize_new_guides(full_rank,
                                                                     fresh_param_store):
    """Param-store entries and guide state dicts under the separate names of the affine
    layer (``AutoIAF.affine.loc``, ...) initialize a new guide, and SVI then trains one
    affine tensor."""
    torch.manual_seed(0)
    guide = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 5e-2}), FlowELBO(num_particles=4,
              vectorize_particles=True))
    for _ in range(3):
        svi.step()
    rows = type(guide.affine)._ROWS
    separate = {name: getattr(guide.affine, name).detach().clone() for name in rows}
    state = pyro.get_param_store().get_state()
    key = lambda name: param_with_module_name("AutoIAF.affine", name)  # noqa: E731
    del state["params"][key("packed")], state["constraints"][key("packed")]
    for name, value in separate.items():
        state["params"][key(name)] = value
        state["constraints"][key(name)] = dist.constraints.real
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    fresh = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    fresh()
    torch.testing.assert_close(fresh.affine.packed, guide.affine.packed, rtol=0, atol=0)
    assert [k for k in pyro.get_param_store().keys() if k.startswith("AutoIAF.affine")] == [
        key("packed")]

    old_state = {k: v for k, v in guide.state_dict().items() if k != "affine.packed"}
    old_state.update({f"affine.{name}": value for name, value in separate.items()})
    pyro.clear_param_store()
    other = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    other()
    other.load_state_dict(old_state)
    torch.testing.assert_close(other.affine.packed, guide.affine.packed, rtol=0, atol=0)
    with pyro.poutine.trace(param_only=True) as params:
        FlowELBO(num_particles=2, vectorize_particles=True).loss_and_grads(_model, other)
    assert [name for name in params.trace.nodes if "affine" in name] == [key("packed")]


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_masks_are_saved_as_bool_and_older_floating_masks_load(name, device, dtype):
    """Issue 19, 14: MADE masks are kept floating for the products but saved as bool (one
    tensor per bank however many keys name it); state dicts with the floating masks of older
    versions load (also with assign=True) and map as before."""
    dim = 4
    flow = pf.flows.build(name, dim, num_layers=3, hidden_dims=(8,)).to(device, dtype)
    randomize_parameters_(flow, scale=0.3, seed=1)
    state = flow.state_dict()
    masks = {k: v for k, v in state.items() if k.endswith("mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    bank_masks = [v for k, v in masks.items() if k.endswith("stacked.mask")]
    assert all(v is bank_masks[0] for v in bank_masks)  # saved once
    x = torch.randn(5, dim, device=device, dtype=dtype)
    old_state = {k: (v.to(dtype) if k.endswith("conditioner.stacked.mask") else v)
                 for k, v in state.items()}
    single = pf.nn.MADE(3, (8,)).to(device, dtype)
    assert single.state_dict()["mask"].dtype == torch.bool
    for source in (state, old_state):
        for assign in (False, True):
            new = pf.flows.build(name, dim, num_layers=3, hidden_dims=(8,)).to(device, dtype)
            new.load_state_dict(source, assign=assign)
            for net in (p.conditioner for p in new.parts):
                assert net.mask.dtype == dtype
            torch.testing.assert_close(new.inv(x.clone()), flow.inv(x.clone()))
    old_single = {k: (v.to(dtype) if k == "mask" else v) for k, v in single.state_dict().items()}
    copy = pf.nn.MADE(3, (8,)).to(device, dtype)
    copy.load_state_dict(old_single)
    assert copy.mask.dtype == dtype and torch.equal(copy.mask, single.mask)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_per_layer_network_state_dicts_name_the_layout_that_loads_them(family, device, dtype):
    """A conditional planar/radial stack saved with one network per layer (pyroflows 0.2.0's
    only layout) gets a ValueError naming shared_network=False from the default (one network)
    stack, and loads exactly into a stack built with shared_network=False."""
    shared = pf.flows.build(family, 3, num_layers=4, context_dim=2).to(device, dtype)
    per_layer = pf.flows.build(family, 3, num_layers=4, context_dim=2,
                               shared_network=False).to(device, dtype)
    randomize_parameters_(per_layer, scale=0.3, seed=0)
    with pytest.raises(ValueError, match="shared_network=False"):
        shared.load_state_dict(per_layer.state_dict())
    again = pf.flows.build(family, 3, num_layers=4, context_dim=2,
                           shared_network=False).to(device, dtype)
    again.load_state_dict(per_layer.state_dict())
    c, z = torch.randn(5, 2, device=device, dtype=dtype), torch.randn(5, 3, device=device,
                                                                       dtype=dtype)
    torch.testing.assert_close(again.condition(c)(z), per_layer.condition(c)(z), rtol=0, atol=0)
