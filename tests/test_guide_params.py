"""The flow guides' parameters and latent layout against Pyro's: the param statements against
``pyro.module``'s, the param store through store changes, casts, pickles, saved stores and
layouts of earlier versions, and the latent unpacking against
``AutoContinuous._unpack_latent``."""

from __future__ import annotations

import copy
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from guide_models import eight_schools, gaussian_problem, seeded_draw
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor

import pyroflows as pf
from pyroflows import testing
from pyroflows.guides import (
    AutoFlowGuide,
    AutoIAF,
    AutoPlanar,
    AutoRadial,
    FlowELBO,
    autoguide,
    direct,
)

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- param statements against pyro.module's --------------------------------------------------

def _model_for(device, dtype):
    zero = torch.zeros((), device=device, dtype=dtype)
    data = torch.tensor([0.3, -1.2, 2.0, 0.7], device=device, dtype=dtype)

    def model():
        loc = pyro.sample("loc", dist.Normal(zero.expand(2), 1.0).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(zero, 0.5))
        with pyro.plate("groups", 3):
            offset = pyro.sample("offset", dist.Normal(zero, 0.3))
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(loc.sum(-1, keepdim=True) + offset.mean(-1, True),
                                         scale.unsqueeze(-1)), obs=data)

    return model


def _pyro_iaf(dim: int):
    import pyro.distributions.transforms as T

    return T.affine_autoregressive(dim, hidden_dims=[8])


GUIDES = {
    "iaf-laplace": dict(flow="iaf", num_layers=2, hidden_dims=(8,), laplace_init=True),
    "iaf-diagonal": dict(flow="iaf", num_layers=2, hidden_dims=(8,), full_rank=False,
                         laplace_init=False),
    "realnvp-full-rank": dict(flow="realnvp", num_layers=2, hidden_dims=(8,), full_rank=True,
                              laplace_init=False),
    "planar": dict(flow="planar", num_layers=3, laplace_init=False),
    "radial": dict(flow="radial", num_layers=3),
    "no-flow": dict(flow="iaf", num_layers=0, laplace_init=False),
    "callable-planar-layer": dict(flow=pf.transforms.planar, laplace_init=False),
    "callable-pyro-iaf": dict(flow=_pyro_iaf, laplace_init=False),
}


def _param_sites(fn) -> list[tuple[str, Tensor]]:
    with poutine.trace(param_only=True) as tr:
        fn()
    return [(name, site["value"]) for name, site in tr.trace.nodes.items()]


@pytest.mark.parametrize("name", list(GUIDES))
def test_param_statements_are_pyros_module_statements(name, monkeypatch, device, dtype):
    """The guide's own param statements (one walk of its modules) are the statements that
    PyroModule's attribute access makes through ``pyro.module`` (the reference: the same
    guide with its own statements switched off): the same names in the same order, each
    value the param store's tensor and the module's own parameter, for the traced call and
    the direct draw alike, for every flow kind (none, planar, radial, IAF, RealNVP, a user
    callable, Pyro's own IAF) and affine layer (diagonal, full rank, after a Laplace start)."""
    model = _model_for(device, dtype)
    guide = AutoFlowGuide(model, **GUIDES[name])
    guide()
    store = pyro.get_param_store()
    modules = {name: p for name, p in guide.named_parameters()}

    def run_both():
        return [_param_sites(guide), _param_sites(lambda: direct.draw(guide, (4, 1), False))]

    got = run_both()
    sync = autoguide.sync_param_store
    monkeypatch.setattr(autoguide, "sync_param_store",  # Pyro's pyro.module statements
                        lambda owner, names, at_setup=False, register=False:
                        sync(owner, names, at_setup) and False)
    want = run_both()
    assert want[0], "the reference made no param statements"
    module_tensors = {id(p) for p in modules.values()}
    for sites in got:
        assert [n for n, _ in sites] == [n for n, _ in want[0]]
        for (n, value), (_, ref) in zip(sites, want[0], strict=True):
            assert value is store[n] and value is ref and id(value) in module_tensors


@pytest.mark.parametrize("training", [True, False])
def test_frozen_parameter_warns_as_pyro_module_does(training, monkeypatch, device, dtype):
    """A flow parameter with ``requires_grad=False`` gets no param statement, and the guide's
    own statements warn about it as ``pyro.module`` (the reference: the guide with its own
    statements switched off) does: once per call while the module is in training mode,
    never in eval mode; in the traced call and the direct draw alike."""
    model = _model_for(device, dtype)
    guide = AutoFlowGuide(model, flow="iaf", num_layers=2, hidden_dims=(8,), laplace_init=False)
    guide()
    guide.flow.parts[0].conditioner.stacked.flat_parameters.requires_grad_(False)
    guide.train(training)

    def run_both():
        out = []
        for fn in (guide, lambda: direct.draw(guide, (4, 1), False)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                names = [n for n, _ in _param_sites(fn)]
            out.append((names, [str(w.message) for w in caught]))
        return out

    got = run_both()
    sync = autoguide.sync_param_store
    monkeypatch.setattr(autoguide, "sync_param_store",  # Pyro's pyro.module statements
                        lambda owner, names, at_setup=False, register=False:
                        sync(owner, names, at_setup) and False)
    want = run_both()
    assert want[0][0] == ["AutoFlowGuide.affine$$$packed"]
    assert len(want[0][1]) == (1 if training else 0)
    assert got == want


# ---- the param store: the guide's own tensors, across store changes, saved stores, old layouts ---

def _steps(model, guide, elbo, actions) -> tuple[list[float], dict[str, Tensor]]:
    """Run SVI steps with ``actions`` between them; the losses and the guide's parameters."""
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), elbo)
    losses = []
    torch.manual_seed(1)
    for action in actions:
        action(guide)
        before = [p.detach().clone() for p in guide.parameters()]
        losses.append(svi.step())
        # every parameter was stepped, and the store holds the guide's own tensors
        assert all(not torch.equal(p.detach(), b)
                   for p, b in zip(guide.parameters(), before, strict=True))
        stored = {id(v) for _, v in pyro.get_param_store().named_parameters()}
        assert all(id(p) in stored for p in guide.parameters())
    return losses, {n: p.detach().clone() for n, p in guide.named_parameters()}


def _clear(guide):
    pyro.clear_param_store()


def _reload_store(guide):
    store = pyro.get_param_store()
    state = store.get_state()
    store.set_state({"params": {k: v.detach().clone() for k, v in state["params"].items()},
                     "constraints": dict(state["constraints"])})


def _nothing(guide):
    pass


@pytest.mark.parametrize("name", ["iaf-laplace", "planar", "no-flow", "callable-pyro-iaf"])
def test_direct_steps_equal_pyros_trace_elbo_through_store_changes(name, device, dtype):
    """FlowELBO's direct draw (the guide's own param statements, cached layout, unchecked
    N(0, I) draw) steps exactly as Pyro's own ``Trace_ELBO`` on the traced guide, through a
    cleared param store and a ``set_state`` of the store between steps: the same losses, the
    same parameters, every parameter stepped."""
    model = _model_for(device, dtype)
    actions = [_nothing, _nothing, _clear, _nothing, _reload_store, _nothing]
    runs = []
    for elbo in (FlowELBO(direct=True, num_particles=4, vectorize_particles=True,
                          max_plate_nesting=1, stick_the_landing=False),
                 Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)):
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = AutoFlowGuide(model, stick_the_landing=False, **GUIDES[name])
        guide()
        start = {n: p.detach().clone() for n, p in guide.named_parameters()}
        runs.append(_steps(model, guide, elbo, actions))
        assert all(not torch.equal(p, start[n]) for n, p in runs[-1][1].items())
    (got_losses, got), (want_losses, want) = runs
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    assert got_losses == pytest.approx(want_losses, rel=rel)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **testing.tolerances(dtype))


def test_direct_steps_after_a_cast_and_a_pickle_equal_pyros(device):
    """After steps in float32, ``guide.to(float64)`` and a pickle round trip (the layout cache
    keyed by the prototype trace is rebuilt for the copy): the direct draw's latent unpacking
    is Pyro's, and the copy steps exactly as Pyro's ``Trace_ELBO`` steps another copy."""
    dtype = [torch.float32]

    def model():
        zero = torch.zeros((), device=device, dtype=dtype[0])
        _model_for(device, dtype[0])()
        pyro.sample("extra", dist.Gamma(zero + 2.0, 1.0))

    torch.manual_seed(0)
    guide = AutoFlowGuide(model, flow="iaf", num_layers=2, hidden_dims=(8,), laplace_init=False,
                          stick_the_landing=False)
    guide()
    elbo = FlowELBO(direct=True, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    _steps(model, guide, elbo, [_nothing] * 2)
    dtype[0] = torch.float64
    guide.to(torch.float64)
    blob = pickle.dumps(guide)
    runs = []
    for elbo in (FlowELBO(direct=True, num_particles=4, vectorize_particles=True,
                          max_plate_nesting=1),
                 Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)):
        pyro.clear_param_store()
        copy_ = pickle.loads(blob)
        latent = torch.randn(4, 1, copy_.latent_dim, device=device, dtype=torch.float64)
        got = list(copy_._unpack_latent(latent))
        want = list(AutoContinuous._unpack_latent(copy_, latent))
        assert [s["name"] for s, _ in got] == [s["name"] for s, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a.shape == b.shape and a.data_ptr() == b.data_ptr()
        runs.append(_steps(model, copy_, elbo, [_nothing] * 2))
    (got_losses, got_params), (want_losses, want_params) = runs
    assert got_losses == pytest.approx(want_losses, rel=1e-9)
    for n in want_params:
        assert got_params[n].dtype == torch.float64
        torch.testing.assert_close(got_params[n], want_params[n], rtol=1e-9, atol=1e-9)


def test_param_store_state_initializes_a_new_guide(device, dtype):
    """Pyro's param-store round trip still works: entries present when the flow is built are
    copied in, as Pyro's own autoguides do."""
    model = eight_schools(device, dtype)
    guide = AutoIAF(model, num_layers=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step()
    state = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    fresh = AutoIAF(model, num_layers=2)
    fresh()
    for (name, p), q in zip(fresh.named_parameters(), guide.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_saved_param_store_rebuilds_the_guide_on_its_own_laplace_start(device, dtype):
    """A store saved after training and loaded into a new session rebuilds the same guide,
    its fixed Laplace layer included (the learned layers sit on top of it): on a two-mode
    posterior each new search may find the other mode, the store's start is the one used.
    ``load_state_dict`` updates the store's copy; a store without a Laplace layer holds
    nothing of one."""
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        theta = pyro.sample("theta", dist.Normal(zero, 5.0))
        pyro.sample("y", dist.Normal(theta ** 2, 1.0), obs=zero + 9.0)  # modes at +-3

    for seed in range(3):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        guide = AutoIAF(model, hidden_dims=(8,))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        for _ in range(3):
            svi.step()
        state = pyro.get_param_store().get_state()
        pyro.clear_param_store()
        pyro.get_param_store().set_state(state)
        torch.manual_seed(100 + seed)  # another search could find the other mode
        fresh = AutoIAF(model, hidden_dims=(8,))
        fresh()
        assert fresh.laplace_info["reason"] == "restored from the param store"
        assert torch.equal(fresh.laplace.loc, guide.laplace.loc)
        assert torch.equal(fresh.laplace.scale_tril, guide.laplace.scale_tril)
        torch.testing.assert_close(fresh._draw_latent(50, seed=0), guide._draw_latent(50, seed=0))
    # a guide loaded by state_dict: the store's copy follows
    other = copy.deepcopy(guide.state_dict())
    other["laplace.loc"] = -other["laplace.loc"]
    guide.load_state_dict(other)
    name = f"{guide._pyro_get_fullname('laplace')}$$$loc"
    assert torch.equal(pyro.get_param_store()[name], guide.laplace.loc)
    # a store without a Laplace layer (a guide built without one, or an earlier version's
    # store): nothing of it in the store, and a guide set up there searches as a new one does
    pyro.clear_param_store()
    plain = AutoIAF(model, hidden_dims=(8,), laplace_init=False)
    plain()
    state = pyro.get_param_store().get_state()
    assert not any("laplace" in name for name in state["params"])
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    fresh = AutoIAF(model, hidden_dims=(8,), laplace_init=False)
    fresh()
    assert fresh._modules.get("laplace") is None
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    again = AutoIAF(model, hidden_dims=(8,))
    again()
    assert again.laplace_info["used"] and "restored" not in again.laplace_info["reason"]


def test_unpickled_guide_trains_and_says_what_keep_best_needs(device, dtype):
    """A pickled guide drops its model, as Pyro's autoguides do: SVI still trains it (the
    model is SVI's), and keep_best, which needs the model, says so."""
    model = gaussian_problem(device, dtype)[0]
    guide = AutoIAF(model, hidden_dims=(8,))
    guide()
    copy_ = pickle.loads(pickle.dumps(guide))
    SVI(model, copy_, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step()
    with pytest.raises(ValueError, match="unpickled guide no longer has"):
        copy_.keep_best()


@pytest.mark.parametrize("cls", [AutoPlanar, AutoRadial])
def test_planar_and_radial_guides_train_three_stacked_tensors(cls, device, dtype):
    """The flow of a planar/radial guide holds three (L, ...) tensors; SVI through Pyro's param
    store trains exactly these; a state_dict with the per-layer keys of earlier versions
    (rebuilt here from the rows) loads and gives the same draws, and so does a param store
    with those names. (Plain start: a param store holds no Laplace layer.)"""
    model = gaussian_problem(device, dtype)[0]
    guide = cls(model, num_layers=6, laplace_init=False)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
              Trace_ELBO(num_particles=4, vectorize_particles=True))
    guide()
    start = [p.detach().clone() for p in guide.flow.parameters()]
    for _ in range(3):
        svi.step()
    flow_params = list(guide.flow.parameters())
    assert len(flow_params) == 3 and all(p.shape[0] == 6 for p in flow_params)
    assert all(not torch.equal(a, b) for a, b in zip(start, flow_params, strict=True))
    store = pyro.get_param_store()
    assert len(list(store.keys())) == len(list(guide.parameters())) == 3 + len(
        list(guide.affine.parameters()))
    assert {id(store[k]) for k in store.keys()} == {id(p) for p in guide.parameters()}
    before = seeded_draw(guide)
    old = {}
    for key, value in guide.state_dict().items():
        if ".stacked." not in key:
            old[key] = value
            continue
        layer, name = int(key.split(".")[1]), key.rsplit(".", 1)[1]
        old[f"flow.{layer}.{name}"] = value[layer] if value.dim() == 2 else value[layer:layer + 1]
    pyro.clear_param_store()
    fresh = cls(model, num_layers=6, laplace_init=False)
    fresh()
    fresh.load_state_dict(old)
    after = seeded_draw(fresh)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    # a param store saved with the per-layer names initializes a new guide (as Pyro's own
    # autoguides take matching entries at set-up)
    pyro.clear_param_store()
    name = cls.__name__
    for key, value in old.items():
        module, _, rest = key.partition(".")
        pyro.param(f"{name}.{module}$$${rest}", value.detach().clone())
    from_store = cls(model, num_layers=6, laplace_init=False)
    from_store()
    for k, v in seeded_draw(from_store).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not any(".stacked." not in k and k.startswith(f"{name}.flow")
                   for k in pyro.get_param_store().keys())


def test_iaf_guide_param_store_with_per_layer_names_initializes_a_new_guide(device, dtype):
    """A param store saved when every IAF layer kept its own network parameters
    (``AutoIAF.flow$$${i}.conditioner.flat_parameters``) fills the new guide's one bank of
    them, row by row, and leaves no per-layer entry behind."""
    model = gaussian_problem(device, dtype)[0]
    guide = AutoIAF(model, num_layers=3, hidden_dims=(8,), laplace_init=False)
    guide()
    (bank,) = guide.flow.parameters()
    with torch.no_grad():
        bank.normal_()  # distinct rows (masked entries too: the store keeps what it had)
    pyro.clear_param_store()
    for i in range(3):
        pyro.param(f"AutoIAF.flow$$${i}.conditioner.flat_parameters", bank[i].detach().clone())
    fresh = AutoIAF(model, num_layers=3, hidden_dims=(8,), laplace_init=False)
    fresh()
    (got,) = fresh.flow.parameters()
    torch.testing.assert_close(got, bank, rtol=0, atol=0)
    assert not any("conditioner.flat_parameters" in k and ".stacked." not in k
                   for k in pyro.get_param_store().keys())


# ---- the latent layout against Pyro's --------------------------------------------------------

def test_layout_follows_a_new_prototype_trace(device, dtype):
    """A guide whose prototype trace is replaced (here by a copy: new site objects, the same
    layout) unpacks with the new trace's sites, as Pyro does, not with the cached ones."""
    model = _model_for(device, dtype)
    guide = AutoFlowGuide(model, flow="iaf", num_layers=1, hidden_dims=(8,), laplace_init=False)
    guide()
    for _ in range(2):
        for batch in [(), (6, 1)]:
            latent = torch.randn(*batch, guide.latent_dim, device=device, dtype=dtype)
            got = list(guide._unpack_latent(latent))
            want = list(AutoContinuous._unpack_latent(guide, latent))
            assert len(got) == len(want) == 3
            for (site, a), (ref_site, b) in zip(got, want, strict=True):
                assert site is ref_site and a.shape == b.shape and a.data_ptr() == b.data_ptr()
        guide.prototype_trace = copy.deepcopy(guide.prototype_trace)


@pytest.mark.parametrize("parallel", [True, False])
def test_predictive_draws_equal_those_with_pyros_unpacking(parallel, monkeypatch, device, dtype):
    """``Predictive`` over the guide (its cached-layout unpacking, batched by the particle
    plate when ``parallel``) draws what it draws with Pyro's own ``_unpack_latent``."""
    model = _model_for(device, dtype)
    guide = AutoFlowGuide(model, flow="iaf", num_layers=2, hidden_dims=(8,))
    guide()
    testing.randomize_parameters_(guide.flow, scale=0.2, seed=2)

    def draw():
        torch.manual_seed(3)
        return Predictive(model, guide=guide, num_samples=7, parallel=parallel)()

    got = draw()
    monkeypatch.setattr(AutoFlowGuide, "_unpack_latent", AutoContinuous._unpack_latent)
    want = draw()
    assert set(got) == set(want) == {"loc", "scale", "offset", "y"}
    for k in want:
        assert got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_unpack_latent_gives_pyros_views():
    """The guide's latent unpacking (slices and shapes worked out once) yields the views of
    Pyro's own ``AutoContinuous._unpack_latent`` for sites with event dims, plates and
    constrained supports, unbatched and under extra batch dims; a batch that does not fit
    a plate is refused, as Pyro refuses it."""
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3, 2), 1.0).to_event(2))
        with pyro.plate("p", 4):
            pyro.sample("b", dist.LogNormal(0.0, 1.0))
        pyro.sample("c", dist.Dirichlet(torch.ones(5)))
        pyro.sample("d", dist.LKJCholesky(3, 1.0))

    guide = AutoIAF(model, num_layers=1)
    guide()
    for shape in [(), (8, 1), (2, 3, 1)]:
        latent = torch.randn(*shape, guide.latent_dim)
        got = list(guide._unpack_latent(latent))
        want = list(AutoContinuous._unpack_latent(guide, latent))
        assert [site["name"] for site, _ in got] == ["a", "b", "c", "d"]
        for (site, value), (ref_site, ref) in zip(got, want, strict=True):
            assert site is ref_site and value.shape == ref.shape
            assert value.data_ptr() == ref.data_ptr() and value.stride() == ref.stride()
    with pytest.raises(RuntimeError):
        list(AutoContinuous._unpack_latent(guide, torch.randn(7, guide.latent_dim)))
    with pytest.raises(ValueError, match="site 'b' of shape"):
        list(guide._unpack_latent(torch.randn(7, guide.latent_dim)))
    with pytest.raises(ValueError, match="latent vector of size"):
        list(guide._unpack_latent(torch.randn(3, guide.latent_dim + 1)))
