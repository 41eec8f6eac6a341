"""The conformance suite: every transform of the package against independent truth (shapes,
round trips, log-dets against autograd Jacobians, gradients against the plain operations,
save/load, stale caches, deep copies, bad input, TransformedDistribution), and the behaviour
every FlowTransform shares: validation and the output cache.

Each registry entry maps a name to ``(factory, dim)``: ``factory()`` returns a fresh transform
with non-trivial (randomized) parameters in the default dtype; the suite moves it to the device
and dtype under test. Add a new transform here and it is checked.
"""

from __future__ import annotations

import pytest
import torch

import pyroflows as pf
from pyroflows import testing
from pyroflows._fast import made as fast_made
from pyroflows.testing import randomize_parameters_
from pyroflows.transforms.base import module_stamp

# the "-blocked" entries' wide layers run their blocked products at the suite's small batches
pytestmark = pytest.mark.usefixtures("blocks_at_any_rows")

TRANSFORMS: dict = {}


def register(name: str, dim: int):
    def deco(factory):
        TRANSFORMS[name] = (factory, dim)
        return factory

    return deco


def _randomized(t, scale: float = 0.5):
    randomize_parameters_(t, scale=scale, seed=len(TRANSFORMS))
    return t


@register("planar", 4)
def _planar():
    return _randomized(pf.transforms.planar(4), scale=1.0)


@register("planar-1d", 1)
def _planar_1d():
    return _randomized(pf.transforms.planar(1), scale=1.0)


@register("radial", 4)
def _radial():
    return _randomized(pf.transforms.radial(4), scale=1.0)


@register("elementwise-affine", 3)
def _affine():
    return _randomized(pf.transforms.ElementwiseAffine(3))


@register("triangular-affine", 4)
def _triangular_affine():
    return _randomized(pf.transforms.triangular_affine(4, loc=0.5, scale=0.7), scale=0.5)


@register("fixed-triangular-affine", 4)
def _fixed_triangular_affine():
    gen = torch.Generator().manual_seed(4)
    tril = torch.tril(torch.randn(4, 4, generator=gen), -1) + torch.diag(
        torch.rand(4, generator=gen) + 0.5)
    return pf.transforms.FixedTriangularAffine(torch.randn(4, generator=gen), tril)


@register("planar-stack", 3)
def _planar_stack():
    return _randomized(pf.flows.build("planar", 3, num_layers=3, affine=True))


# A built planar/radial stack keeps its layers' parameters in three shared tensors; its layer i
# must still pass the suite on its own (its parameters are the whole stacked tensors).
@register("planar-stack-layer", 3)
def _planar_stack_layer():
    return _randomized(pf.flows.build("planar", 3, num_layers=4), scale=1.0)[2]


@register("radial-stack", 3)
def _radial_stack():
    return _randomized(pf.flows.build("radial", 3, num_layers=3, affine=True))


@register("radial-stack-layer", 3)
def _radial_stack_layer():
    return _randomized(pf.flows.build("radial", 3, num_layers=4), scale=1.0)[1]


# ---- autoregressive, coupling and permutation layers ----------------------------------------
# Smaller random moves than the default for the networks: a MADE with weights far from its
# identity start, stacked, gets condition numbers that float32 cannot invert to 2e-3.


@register("iaf", 4)
def _iaf():
    return _randomized(pf.transforms.iaf(4, hidden_dims=(8, 8)), scale=0.3)


@register("iaf-gated", 3)
def _iaf_gated():
    return _randomized(pf.transforms.iaf(3, hidden_dims=(8,), gated=True), scale=0.3)


@register("maf-narrow-order", 4)
def _maf_narrow():  # hidden width below D and a custom order
    return _randomized(pf.transforms.maf(4, hidden_dims=(3,), order=[2, 0, 3, 1]), scale=0.3)


@register("maf-residual", 3)
def _maf_residual():
    t = pf.transforms.maf(3, hidden_dims=(8, 8), residual=True, activation=torch.nn.Tanh)
    return _randomized(t, scale=0.3)


@register("maf-1d", 1)
def _maf_1d():
    return _randomized(pf.transforms.maf(1, hidden_dims=(4,)), scale=0.3)


@register("realnvp", 5)
def _realnvp():
    return _randomized(pf.transforms.realnvp(5, hidden_dims=(8, 8)), scale=0.3)


@register("nsf", 3)
def _nsf():  # bound 2: the checks' normal inputs reach the identity tails too
    return _randomized(pf.transforms.nsf(3, hidden_dims=(8, 8), bins=5, bound=2.0), scale=0.3)


@register("nsf-1d", 1)
def _nsf_1d():
    return _randomized(pf.transforms.nsf(1, hidden_dims=(4,), bins=3), scale=0.3)


@register("nsf-stack", 3)
def _nsf_stack():
    flow = pf.flows.build("nsf", 3, num_layers=3, hidden_dims=(8,), bins=4, bound=2.5,
                          affine=True)
    return _randomized(flow, scale=0.2)


@register("permute-random", 5)
def _permute_random():
    return pf.transforms.Permute.random(5, seed=3)


@register("permute-reverse", 4)
def _permute_reverse():
    return pf.transforms.Permute.reverse(4)


@register("iaf-stack", 3)
def _iaf_stack():
    return _randomized(pf.flows.build("iaf", 3, num_layers=3, hidden_dims=(8,)), scale=0.3)


@register("maf-stack", 3)
def _maf_stack():
    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,), affine=True)
    # 0.3 leaves one float32 round trip at 1.4e-2: a conditioning limit of this draw, not a bug
    # (the plain composition of the same layers misses by the same amount)
    return _randomized(flow, scale=0.2)


# Built IAF/MAF/RealNVP stacks keep their networks' parameters in one shared (L, P) tensor; a
# layer taken out of one must still pass the suite on its own (its parameters are that tensor).
@register("iaf-stack-layer", 3)
def _iaf_stack_layer():
    return _randomized(pf.flows.build("iaf", 3, num_layers=3, hidden_dims=(8,)), scale=0.3)[1]


@register("maf-stack-layer", 3)
def _maf_stack_layer():
    return _randomized(pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,)), scale=0.2)[2]


# Wide MADE layers skip their masked-out blocks in the fused kernels (CPU; _fast.made):
# stacks whose 256 x 256 hidden layers run blocked. The factories check that they do, so the
# entries cannot quietly turn into dense ones if the thresholds move.
def _blocked(flow):
    net = flow[0].conditioner
    plans = fast_made.block_plans(net, fast_made.masked_weights(net)[0])
    assert any(plan is not None for plan in plans), "expected a blocked layer"
    return flow


@register("iaf-stack-blocked", 8)
def _iaf_stack_blocked():
    flow = pf.flows.build("iaf", 8, num_layers=2, hidden_dims=(256, 256))
    return _blocked(_randomized(flow, scale=0.05))


@register("maf-stack-blocked", 8)
def _maf_stack_blocked():
    flow = pf.flows.build("maf", 8, num_layers=2, hidden_dims=(256, 256), permutation="random")
    return _blocked(_randomized(flow, scale=0.05))


@register("realnvp-stack", 4)
def _realnvp_stack():
    flow = pf.flows.build("realnvp", 4, num_layers=3, hidden_dims=(8,), permutation="random")
    return _randomized(flow, scale=0.3)


@register("realnvp-stack-odd", 5)
def _realnvp_stack_odd():
    """Odd D with the default masks: alternate layers take the complement of the last mask."""
    return _randomized(pf.flows.build("realnvp", 5, num_layers=3, hidden_dims=(8,)), scale=0.3)


@register("tabak", 3)
def _tabak():
    """A small fitted Tabak transform (buffers only), deterministic: fixed data and seed."""
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    x = torch.sinh(0.7 * g) + 0.4 * g[:, :1] * g.roll(1, dims=1)
    t = pf.transforms.Tabak(3, max_steps=50, check_every=10, patience=50, seed=0)
    return t.fit(x, progress=False).to(torch.get_default_dtype())


CHECKS = {
    "shapes": testing.check_shapes,
    "round_trips": testing.check_round_trips,
    "log_det": testing.check_log_det,
    "gradients": testing.check_gradients,
    "stale_cache": testing.check_stale_cache,
    "in_place_edit": testing.check_in_place_edit,
    "deepcopy": testing.check_deepcopy,
    "bad_input": testing.check_bad_input,
    "transformed_distribution": testing.check_transformed_distribution,
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_conformance(name, check, device, dtype):
    factory, dim = TRANSFORMS[name]
    t = factory().to(device=device, dtype=dtype)
    CHECKS[check](t, dim, device=device, dtype=dtype)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_save_load(name, device, dtype):
    factory, dim = TRANSFORMS[name]
    testing.check_save_load(factory().to(device=device, dtype=dtype), dim, factory, device, dtype)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_float32_use(name, device):
    """Whatever the suite's dtype, every transform also works end to end in float32."""
    factory, dim = TRANSFORMS[name]
    t = factory().to(device=device, dtype=torch.float32)
    x = torch.randn(7, dim, device=device)
    y = t(x)
    assert y.dtype == torch.float32 and y.device == x.device
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.dtype == torch.float32 and torch.isfinite(ladj).all()
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-3, atol=1e-3)


# ---- validation and the output cache, shared by every FlowTransform -----------------------

def test_validation_switch(device, dtype):
    t = pf.transforms.planar(2).to(device, dtype)
    bad = torch.tensor([[float("nan"), 0.0]], device=device, dtype=dtype)
    with pytest.raises(ValueError, match="NaN"):
        t(bad)
    with pf.validation(False):
        assert torch.isnan(t(bad)).any()  # documented: no check, NaN flows through
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        t(torch.zeros(3, device=device, dtype=dtype))


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


def test_cache_answers_only_for_the_output_it_produced(device, dtype):
    """The rule of OutputCache: ``t.inv(y)`` and ``log_abs_det_jacobian(x, y)`` after
    ``y = t(x)`` (and ``t(x)`` after ``x = t.inv(y)``) come from the cache; ``t(x)`` on an input
    never does, and an in-place edit of either tensor or another grad mode recomputes."""
    t = pf.transforms.planar(2).to(device, dtype)
    calls = []
    orig_forward, orig_inverse = t.forward_and_log_det, t.inverse_and_log_det

    def counting(name, fn):
        def run(v):
            calls.append(name)
            return fn(v)
        return run

    t.forward_and_log_det = counting("f", orig_forward)
    t.inverse_and_log_det = counting("i", orig_inverse)
    x = torch.randn(5, 2, device=device, dtype=dtype)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    assert t.inv(y) is x
    assert calls == ["f"]
    t(x)  # the same input again: computed (a perturbed input must never get the old output)
    assert calls == ["f", "f"]
    y = t(x)
    y.add_(1.0)  # an in-place edit of the output invalidates the entry
    t.inv(y)
    assert calls == ["f", "f", "f", "i"]
    x2 = t.inv(y)  # an inverse call on its own output's partner: computed, then cached
    assert t(x2) is y and calls[-1] == "i" and len(calls) == 5
    with torch.no_grad():
        t(x2)  # a different grad mode must not hand back a graph-less or graph-ful stale result
    assert len(calls) == 6


def test_gradcheck_through_every_layer(device):
    """``torch.autograd.gradcheck`` perturbs its input in place (through ``.data``, unseen by
    version counters): with an input-identity cache it saw a zero Jacobian (issue 19, 7)."""
    for make in (lambda: pf.transforms.planar(3), lambda: pf.transforms.radial(3),
                 lambda: pf.transforms.iaf(3, hidden_dims=(8,)),
                 lambda: pf.transforms.iaf(3, hidden_dims=(8,), gated=True),
                 lambda: pf.transforms.maf(3, hidden_dims=(8,)),
                 lambda: pf.transforms.realnvp(3, hidden_dims=(8,)),
                 lambda: pf.transforms.Permute.reverse(3),
                 lambda: pf.transforms.elementwise_affine(3),
                 lambda: pf.transforms.triangular_affine(3),
                 lambda: pf.flows.build("iaf", 3, num_layers=2, hidden_dims=(8,))):
        t = make().to(device, torch.float64)
        testing.randomize_parameters_(t)
        x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(t, (x,)), type(t).__name__
        y = t(x).detach().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda v, t=t: t.inv(v), (y,)), type(t).__name__


def test_module_stamp_sees_every_change(device, dtype):
    """The cache key of a module's state changes with an in-place edit of a parameter, a
    loaded state and the grad mode."""
    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,), affine=True)
    flow = flow.to(device, dtype)
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


def test_random_permutation_follows_its_seed_or_torchs_generator():
    """``Permute.random``: the same order for one seed; without one, torch's global
    generator decides it, so ``torch.manual_seed`` makes it reproducible."""
    assert torch.equal(pf.transforms.Permute.random(50, seed=4).permutation,
                       pf.transforms.Permute.random(50, seed=4).permutation)
    orders = []
    for _ in range(2):
        torch.manual_seed(11)
        orders.append(pf.transforms.Permute.random(50).permutation)
    assert torch.equal(orders[0], orders[1])
    assert sorted(orders[0].tolist()) == list(range(50))
