"""What a PyTorch or Pyro user may do with a layer, each found broken once (an audit of the plain
layers, stop 37): the cache after a step of Pyro's own optimizers or a dtype change, planar at
w = 0, a batched base's log density, a loaded RealNVP mask, torch.func.vmap, with_cache, and
clear errors for arguments that used to give NaN, a wrong map or a PyTorch error."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.reparam import UnitJacobianReparam
from pyro.optim.adagrad_rmsprop import AdagradRMSProp
from pyro.optim.clipped_adam import ClippedAdam
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import pyroflows as pf


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("optimizer", ["ClippedAdam", "AdagradRMSProp"])
def test_a_held_draw_is_scored_afresh_after_a_pyro_optimizer_step(device, dtype, optimizer):
    """Pyro's ClippedAdam and AdagradRMSProp write through ``p.data``, which leaves the version
    counters as they were: the cache answered with the density before the step."""
    torch.manual_seed(0)
    flow = pf.flows.build("iaf", 3, num_layers=2, hidden_dims=(8,)).to(device, dtype)
    q = pf.distributions.FlowDistribution(flow)
    x = q.rsample((5,))
    opt = {"ClippedAdam": ClippedAdam, "AdagradRMSProp": AdagradRMSProp}[optimizer](
        flow.parameters(), **({"lr": 0.5} if optimizer == "ClippedAdam" else {"eta": 0.5}))
    (-q.log_prob(x).sum()).backward()
    opt.step()
    held, fresh = q.log_prob(x), q.log_prob(x.detach().clone())
    assert torch.allclose(held, fresh, atol=_tol(dtype))


def test_a_cached_pair_is_not_answered_after_to_or_vector_to_parameters(device, dtype):
    """``module.double()`` and ``vector_to_parameters`` assign ``p.data``: same identity, same
    version counter, new values (and dtype)."""
    torch.manual_seed(0)
    t = pf.transforms.radial(3).to(device, dtype)
    x = torch.randn(4, 3, device=device, dtype=dtype)
    y = t(x)
    vector_to_parameters(parameters_to_vector(t.parameters()) + 0.5, t.parameters())
    assert torch.allclose(t.inv(y), t.inv(y.detach().clone()), atol=_tol(dtype))
    assert not torch.equal(t.inv(y), x)
    t = pf.transforms.planar(3).to(device, torch.float32)
    x = torch.randn(4, 3, device=device)
    y = t(x)
    t.double()
    with pytest.raises(ValueError, match="float32 .* the layer is torch.float64"):
        t.inv(y)  # (the cache used to hand back the float32 x)
    assert t.inv(y.double()).dtype == torch.float64


def test_planar_at_w_zero_is_a_translation(device, dtype):
    """w = 0: the map is z + u tanh(b), log-det 0; the slack was softplus(0) = log 2 and both
    the log-det and the inverse were wrong by about 0.2 and 0.06."""
    torch.manual_seed(0)
    t = pf.transforms.planar(3).to(device, dtype)
    with torch.no_grad():
        t.w.zero_()
        t.u.copy_(torch.tensor([0.3, -0.7, 1.1]))
        t.bias.fill_(0.4)
    z = torch.randn(6, 3, device=device, dtype=dtype)
    y = t(z)
    assert torch.allclose(y, z + t.u * torch.tanh(t.bias), atol=_tol(dtype))
    assert torch.allclose(t.log_abs_det_jacobian(z, y), torch.zeros(6, device=device,
                                                                    dtype=dtype))
    assert torch.allclose(t.inv(y.detach().clone()), z, atol=10 * _tol(dtype))


def test_a_batched_base_scores_a_value_without_its_batch_dims(device, dtype):
    """StandardNormal and FlowDistribution broadcast log_prob against their batch shape, as
    every torch distribution does: in a plate of 4 a broadcast observation was scored once."""
    flow = pf.flows.build("realnvp", 2, num_layers=2, hidden_dims=(8,)).to(device, dtype)
    q = pf.distributions.FlowDistribution(flow)
    v = torch.zeros(2, device=device, dtype=dtype)
    base = pf.distributions.StandardNormal(2, (4,), device, dtype)
    assert base.log_prob(v).shape == (4,)
    assert q.expand([4]).log_prob(v).shape == (4,)

    def model():
        with pyro.plate("rows", 4):
            pyro.sample("x", q, obs=v)

    expected = 4 * q.log_prob(v)
    assert torch.allclose(poutine.trace(model).get_trace().log_prob_sum(), expected)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("dim", [8, 32])
def test_realnvp_computes_the_mask_it_loaded(device, dtype, dim, conditional):
    """At D >= 32 the compact path kept the halves of the mask the layer was built with (the
    conditional layer too: its conditioned maps copy them)."""
    torch.manual_seed(0)

    def make(**mask):
        if conditional:
            return pf.transforms.conditional_realnvp(dim, 2, hidden_dims=(16,), **mask)
        return pf.transforms.realnvp(dim, hidden_dims=(16,), **mask)

    src = make(mask=torch.arange(dim) % 2 == 0)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.3)
    dst = make()
    dst.load_state_dict(src.state_dict())
    src, dst = src.to(device, dtype), dst.to(device, dtype)
    x = torch.randn(5, dim, device=device, dtype=dtype)
    if conditional:
        c = torch.randn(5, 2, device=device, dtype=dtype)
        src, dst = src.condition(c), dst.condition(c)
    assert torch.allclose(src(x), dst(x.clone()), atol=_tol(dtype))


@pytest.mark.parametrize("name", ["maf", "planar"])
def test_vmap_runs_the_maps_both_ways(device, dtype, name):
    """The finiteness check and planar's solver exit were data-dependent control flow, which
    torch.func.vmap refuses."""
    torch.manual_seed(0)
    t = (pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,)) if name == "maf"
         else pf.transforms.planar(3)).to(device, dtype)
    x = torch.randn(5, 3, device=device, dtype=dtype)
    for fn in (t, t.inv):
        assert torch.allclose(torch.func.vmap(fn)(x.clone()), fn(x.clone()),
                              atol=10 * _tol(dtype))


def test_with_cache_is_the_layer_itself():
    """Pyro's reparameterizers call ``with_cache``; it raised NotImplementedError."""
    perm = pf.transforms.Permute.reverse(3)
    stack = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,))
    assert perm.with_cache(1) is perm and stack.with_cache(1) is stack

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    reparam = poutine.reparam(model, config={"x": UnitJacobianReparam(perm)})
    assert poutine.trace(reparam).get_trace().nodes["x"]["value"].shape == (3,)


@pytest.mark.parametrize("build,match", [
    (lambda: pf.transforms.iaf(3, hidden_dims=(8,), log_scale_bound=float("inf")),
     "log_scale_bound must be positive and at most"),
    (lambda: pf.transforms.realnvp(3, hidden_dims=(8,), log_scale_bound=1e300),
     "log_scale_bound must be positive and at most"),
    (lambda: pf.transforms.FixedTriangularAffine(torch.zeros(2),
                                                 torch.tensor([[1.0, 0.5], [0.0, 1.0]])),
     "lower-triangular"),
    (lambda: pf.transforms.FixedTriangularAffine(torch.zeros(2), -torch.eye(2)),
     "diagonal must be positive"),
    (lambda: pf.transforms.FixedTriangularAffine(torch.zeros(3), torch.eye(2)),
     r"shape \(D,\)"),
    (lambda: pf.transforms.maf(2.5), "MAF: dim must be a whole number"),
    (lambda: pf.transforms.planar(2.5), "Planar: dim must be a whole number"),
    (lambda: pf.flows.build("iaf", 3, num_layers=2.5), "num_layers must be a whole number"),
    (lambda: pf.flows.build("maf", 3, hidden_dims=(8.5,)), "hidden_dims must be a whole"),
    (lambda: pf.transforms.maf(3, hidden_dims=(8.9,)), "each hidden width must be a whole"),
    (lambda: pf.transforms.conditional_maf(2.5, 2), "ConditionalMAF: dim must be a whole"),
    (lambda: pf.transforms.elementwise_affine(3, scale=torch.ones(2)),
     r"scale must be a number or of shape \(1,\) or \(3,\)"),
])
def test_bad_arguments_are_named(build, match):
    """Each used to build (a NaN map, a wrong map, a smaller flow) or give PyTorch's error."""
    with pytest.raises(ValueError, match=match):
        build()


def test_a_scale_of_one_entry_still_broadcasts():
    t = pf.transforms.elementwise_affine(3, scale=torch.full((1,), 2.0))
    assert torch.allclose(t(torch.ones(1, 3)), torch.full((1, 3), 2.0))


def test_an_input_of_another_dtype_is_named(device):
    t = pf.transforms.planar(3).to(device, torch.float64)
    with pytest.raises(ValueError, match="Planar: input is torch.float32"):
        t(torch.randn(2, 3, device=device))


@pytest.mark.parametrize("name", ["iaf", "maf", "nsf"])
def test_a_conditional_flow_scores_and_draws_no_rows_without_autograd(device, dtype, name):
    """The level-by-level pass (MAF's and NSF's sampling, IAF's inverse) could not view a block
    of 0 rows per context: a RuntimeError under no_grad."""
    flow = pf.flows.build(name, 2, num_layers=2, hidden_dims=(8,), context_dim=1)
    q = pf.distributions.ConditionalFlowDistribution(flow.to(device, dtype))
    c = torch.zeros(0, 1, device=device, dtype=dtype)
    with torch.no_grad():
        assert q.condition(c).log_prob(torch.zeros(0, 2, device=device, dtype=dtype)).shape == (0,)
        assert q.condition(c).sample().shape == (0, 2)


@pytest.mark.parametrize("name", ["planar", "maf", "realnvp"])
def test_torch_func_over_the_parameters(device, dtype, name):
    """``grad`` of ``functional_call`` and a ``vmap`` ensemble over stacked parameters: the
    cache key read the storage of torch.func's tensors, which have none."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    make = {"planar": lambda: pf.transforms.planar(4), "maf": lambda: pf.transforms.maf(4),
            "realnvp": lambda: pf.transforms.realnvp(4)}[name]
    layers = [make().to(device, dtype) for _ in range(3)]
    x = torch.randn(8, 4, device=device, dtype=dtype)
    params = dict(layers[0].named_parameters())
    grads = grad(lambda p: functional_call(layers[0], p, (x,)).sum())(params)
    assert set(grads) == set(params)
    stacked, buffers = stack_module_state(layers)
    ys = vmap(lambda p, b: functional_call(layers[0], (p, b), (x,)))(stacked, buffers)
    assert torch.allclose(ys[1], layers[1](x.clone()), atol=10 * _tol(dtype))


def test_a_compiled_realnvp_stack_is_one_graph():
    """The halves of the mask were worked out at each call (a storage address and a version,
    which Dynamo cannot trace: a graph break per layer)."""
    import torch._dynamo as dynamo

    flow = pf.flows.build("realnvp", 32, num_layers=2, compile="eager")
    x = torch.randn(16, 32)
    explained = dynamo.explain(flow._chain)(x, False, False)
    assert explained.graph_break_count == 0, explained.break_reasons
