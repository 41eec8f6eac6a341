"""The private Pyro and PyTorch names of ``pyroflows._private``: each still exists and still
means what the package relies on. A failure here means an upgrade moved one of them."""

import logging

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from pyroflows import _private


def test_param_capture_is_the_only_handler_inside_svi_step():
    seen = []

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    def guide():
        seen.append(_private.only_param_capture_active())
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    assert _private.only_param_capture_active()
    SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO()).step()
    with poutine.scale(scale=2.0):
        assert not _private.only_param_capture_active()
    with poutine.trace():
        assert not _private.only_param_capture_active()
    assert seen and seen[0] is False  # Trace_ELBO traces the guide: a full trace is active


def test_functorch_active_inside_torch_func_only():
    seen = []

    def f(x):
        seen.append(_private.functorch_active())
        return (x * x).sum()

    assert not _private.functorch_active()
    torch.func.grad(f)(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [True, True]


def test_global_module_hooks_are_seen():
    assert not _private.global_module_hooks()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert _private.global_module_hooks()
    finally:
        handle.remove()
    assert not _private.global_module_hooks()


def test_inverse_transform_is_what_inv_returns():
    t = torch.distributions.transforms.ExpTransform()
    assert type(t.inv) is _private.InverseTransform
    inv = _private.InverseTransform(t)
    assert torch.allclose(inv(torch.tensor([1.0])), torch.tensor([0.0]))


def test_guess_max_plate_nesting_reads_the_deepest_plate_of_model_and_guide(fresh_param_store):
    def model():
        with pyro.plate("rows", 3, dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, 1.0))

    def guide():  # a guide may use a deeper plate than the model, for an auxiliary site
        with pyro.plate("rows", 3, dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("blocks", 2, dim=-2):
            pyro.sample("aux", dist.Normal(0.0, 1.0).expand([2, 1]))
        pyro.sample("y", dist.Normal(0.0, 1.0))

    def flat():
        pyro.sample("y", dist.Normal(0.0, 1.0))

    logger = logging.getLogger("pyro.infer.elbo")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert _private.guess_max_plate_nesting(model, model, (), {}) == 1
    finally:
        logger.removeHandler(handler)
    assert records == [] and not logger.filters  # Pyro's INFO line held back, only here
    assert _private.guess_max_plate_nesting(model, guide, (), {}) == 2
    assert _private.guess_max_plate_nesting(flat, flat, (), {}) == 0
    autoguide = AutoNormal(model)
    assert _private.guess_max_plate_nesting(model, autoguide, (), {}) == 1
    assert autoguide.prototype_trace is not None  # the run set the autoguide up


def test_load_state_dict_pre_hook_gets_the_module_first():
    """Both routes of ``register_load_state_dict_pre_hook``: the public method (torch >= 2.5)
    and the private one it wraps (older torch) call ``hook(module, state_dict, prefix, ...)``."""
    calls = []

    def hook(module, state_dict, prefix, *args):
        calls.append((module, prefix, sorted(state_dict)))

    for register in (
        _private.register_load_state_dict_pre_hook,
        lambda m, hook: m._register_load_state_dict_pre_hook(hook, with_module=True),
    ):
        calls.clear()
        outer = nn.Sequential(nn.Linear(2, 2))
        register(outer[0], hook)
        outer.load_state_dict(outer.state_dict())
        assert calls == [(outer[0], "0.", ["0.bias", "0.weight"])]


def test_site_is_traced_as_poutine_trace_records_it():
    seen = {}

    class Record(poutine.messenger.Messenger):
        def _pyro_post_sample(self, msg):
            seen[msg["name"]] = _private.site_is_traced(msg)

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("aux", dist.Normal(0.0, 1.0),
                    infer={"is_auxiliary": True, "_do_not_trace": True})

    with Record():
        trace = poutine.trace(model).get_trace()
    assert seen == {"x": True, "aux": False}
    assert [name for name, site in trace.nodes.items() if site["type"] == "sample"] == ["x"]


def test_enumerated_log_factors_split_a_mixture():
    """The sites that depend on an enumerated site go to the contraction, unscaled; the rest are
    costs: a plate of 3 rows, one Bernoulli assignment per row, a global Normal."""

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 3):
            k = pyro.sample("k", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z + k, 1.0), obs=torch.zeros(3))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(poutine.enum(model, first_available_dim=-2),
                                               trace=guide_trace)).get_trace()
    model_trace = prune_subsample_sites(model_trace)  # (the plate's site: a cost of 0)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    costs, log_factors, sum_dims, scale = _private.enumerated_log_factors(model_trace,
                                                                           guide_trace)
    assert sum(len(terms) for terms in costs.values()) == 1  # z
    assert sum(len(terms) for terms in log_factors.values()) == 2  # k and x
    assert len(sum_dims) == 1 and float(scale) == 1.0
