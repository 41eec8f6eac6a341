"""Every transform of the package, registered once for the conformance suite.

Each entry maps a name to ``(factory, dim)``: ``factory()`` returns a fresh transform with
non-trivial (randomized) parameters in the default dtype; the suite moves it to the device and
dtype under test. Add new transforms here and they are checked by ``test_conformance.py``.
"""

from __future__ import annotations

import pyroflows as pf
from pyroflows.testing import randomize_parameters_

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
    import torch

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


# ---- autoregressive, coupling and permutation layers (issue 3) -------------------------------
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
    from torch import nn

    t = pf.transforms.maf(3, hidden_dims=(8, 8), residual=True, activation=nn.Tanh)
    return _randomized(t, scale=0.3)


@register("maf-1d", 1)
def _maf_1d():
    return _randomized(pf.transforms.maf(1, hidden_dims=(4,)), scale=0.3)


@register("realnvp", 5)
def _realnvp():
    return _randomized(pf.transforms.realnvp(5, hidden_dims=(8, 8)), scale=0.3)


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


# Wide MADE layers skip their masked-out blocks in the fused kernels (CPU; MADE.block_plans):
# stacks whose 256 x 256 hidden layers run blocked. The factories check that they do, so the
# entries cannot quietly turn into dense ones if the thresholds move.
def _blocked(flow):
    net = flow[0].conditioner
    plans = net.block_plans(net.masked_weights()[0])
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
    import torch

    gen = torch.Generator().manual_seed(11)
    g = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    x = torch.sinh(0.7 * g) + 0.4 * g[:, :1] * g.roll(1, dims=1)
    t = pf.transforms.Tabak(3, max_steps=50, check_every=10, patience=50, seed=0)
    return t.fit(x, progress=False).to(torch.get_default_dtype())
