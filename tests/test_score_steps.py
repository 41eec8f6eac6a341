"""Closed-form score steps (``FlowTransform.score_step``, the layer-by-layer
sticking-the-landing route for planar and radial layers, their conditioned maps, a
conditional flow's Gaussian start, affine layers and permutations): the output is the
layer's forward map, and the returned vector u' solves J^T u' = g - grad log|det J| with J
and the log-det's gradient from autograd, held to its residual (a backward-error check that
stays meaningful where J is nearly singular), over parameters from the identity to the
constraints' edges, per row and shared, in both dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyroflows as pf
from pyroflows.flows.conditional import ConditionalElementwiseAffine
from pyroflows.transforms.conditional_planar_radial import ConditionedPlanar, ConditionedRadial


def _check(t, x: torch.Tensor, g: torch.Tensor, step=None) -> None:
    """``t.score_step(x, g)`` (or ``step(x, g)``) against autograd: ``y`` the forward map, u'
    by its residual."""
    if step is None:
        assert t.has_score_step()
        step = t.score_step
    y, got = step(x, g)
    leaf = x.detach().clone().requires_grad_(True)
    want_y, log_det = t.forward_and_log_det(leaf)
    grad_ld = (torch.autograd.grad(log_det.sum(), leaf, allow_unused=True)[0]
               if log_det.requires_grad else None)
    grad_ld = torch.zeros_like(leaf) if grad_ld is None else grad_ld  # (a constant log-det)
    # rows are mapped independently: the Jacobian of the summed outputs holds each row's
    d = x.shape[-1]
    jac = torch.autograd.functional.jacobian(
        lambda z: t.forward_and_log_det(z)[0].reshape(-1, d).sum(0), leaf.detach())
    jac = jac.reshape(d, -1, d).transpose(0, 1)  # (rows, out, in)
    rhs = (g - grad_ld).reshape(-1, d)
    residual = (jac.transpose(-1, -2) @ got.reshape(-1, d, 1)).squeeze(-1) - rhs
    eps = torch.finfo(x.dtype).eps
    # the identity plus a rank-one term: the terms of J are about 1 + |J| each (rounding
    # cancels in J itself, not in the closed form, where J nears singular)
    scale = ((1 + jac.abs().amax((-1, -2))) * got.reshape(-1, d).abs().amax(-1)
             + rhs.abs().amax(-1) + 1.0)
    assert torch.isfinite(got).all()
    assert (residual.abs().amax(-1) <= 1e3 * eps * scale).all(), (residual, scale)
    torch.testing.assert_close(y, want_y.detach(), rtol=10 * eps, atol=10 * eps)
    assert y.shape == x.shape and got.shape == g.shape


def _draws(shape, seed: int, device, dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 6), rows=st.integers(1, 5), scale=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
       squeeze=st.sampled_from([None, -30.0, -3.0, 4.0]), seed=st.integers(0, 2**16))
def test_planar_score_step(dim, rows, scale, squeeze, seed, device, dtype):
    """Planar layers, one shared parameter set and one per row: random raw parameters, or
    u = c w with w^T u = c (c = -30 puts the slack delta = softplus(c) at 1e-13, the map
    nearly singular where tanh' = 1)."""
    layer = pf.transforms.planar(dim)
    pf.testing.randomize_parameters_(layer, scale=scale, seed=seed)
    if squeeze is not None:
        with torch.no_grad():
            w = layer.w + 0.5
            layer.w.copy_(w)
            layer.u.copy_(squeeze * w / (w * w).sum())
    layer = layer.to(device, dtype)
    x = _draws((rows, dim), seed + 1, device, dtype, 2.0)
    g = _draws((rows, dim), seed + 2, device, dtype)
    _check(layer, x, g)
    # one set per row: K = 2 maps of (rows, D) parameters, inputs (2, rows, D) broadcast
    u = _draws((2, rows, dim), seed + 3, device, dtype, max(scale, 0.1))
    w = _draws((2, rows, dim), seed + 4, device, dtype, max(scale, 0.1))
    if squeeze is not None:
        u = squeeze * w / (w * w).sum(-1, keepdim=True)
    bias = _draws((2, rows, 1), seed + 5, device, dtype)
    conditioned = ConditionedPlanar(u, w, bias)
    _check(conditioned, _draws((2, rows, dim), seed + 6, device, dtype, 2.0),
           _draws((2, rows, dim), seed + 7, device, dtype))


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 6), rows=st.integers(1, 5), scale=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
       edge=st.sampled_from([None, "tiny-alpha", "collapse", "at-centre"]),
       seed=st.integers(0, 2**16))
def test_radial_score_step(dim, rows, scale, edge, seed, device, dtype):
    """Radial layers, shared and per row: random raw parameters; alpha at its floor
    (alpha' = -30); alpha + beta at its floor (beta' = -30: the map contracts towards its
    centre); inputs at the centre itself (r = 0, where the log-det's gradient is taken as 0)."""
    layer = pf.transforms.radial(dim)
    pf.testing.randomize_parameters_(layer, scale=scale, seed=seed)
    with torch.no_grad():
        if edge == "tiny-alpha":
            layer.alpha_prime.fill_(-30.0)
        elif edge == "collapse":
            layer.beta_prime.fill_(-30.0)
    layer = layer.to(device, dtype)
    x = _draws((rows, dim), seed + 1, device, dtype, 2.0)
    if edge == "at-centre":
        x[0] = layer.x0.detach()
    g = _draws((rows, dim), seed + 2, device, dtype)
    if edge != "at-centre":  # (the log-det is not differentiable at the centre)
        _check(layer, x, g)
    else:
        y, got = layer.score_step(x, g)
        alpha, alpha_plus_beta = layer._alpha_beta()
        # at the centre J = (alpha + beta) / alpha I and the gradient is taken as 0
        torch.testing.assert_close(got[0], g[0] * alpha / alpha_plus_beta)
        assert torch.isfinite(got).all() and torch.equal(y[0], x[0])
    x0 = _draws((2, rows, dim), seed + 3, device, dtype)
    alpha_prime = _draws((2, rows, 1), seed + 4, device, dtype, max(scale, 0.1))
    beta_prime = _draws((2, rows, 1), seed + 5, device, dtype, max(scale, 0.1))
    if edge == "tiny-alpha":
        alpha_prime = torch.full_like(alpha_prime, -30.0)
    elif edge == "collapse":
        beta_prime = torch.full_like(beta_prime, -30.0)
    conditioned = ConditionedRadial(x0, alpha_prime, beta_prime)
    _check(conditioned, _draws((3, rows, dim), seed + 6, device, dtype, 2.0),
           _draws((3, rows, dim), seed + 7, device, dtype))


def test_row_affine_score_step(device, dtype):
    """A conditional flow's per-row Gaussian start: u' = g / sigma."""
    start = ConditionalElementwiseAffine(3, 4).to(device, dtype)
    pf.testing.randomize_parameters_(start, scale=0.5, seed=0)
    t = start.condition(_draws((5, 4), 1, device, dtype))
    _check(t, _draws((2, 5, 3), 2, device, dtype), _draws((2, 5, 3), 3, device, dtype))


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(["maf", "nsf", "realnvp-compact"]), conditioned=st.booleans(),
       scale=st.sampled_from([0.0, 0.3, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_one_pass_inverse_step(family, conditioned, scale, seed, device, dtype):
    """The step of a layer with a one-pass inverse (MAF, NSF, a compact coupling layer;
    ``landing._inverse_step``: one vector-Jacobian product of the inverse), conditioned on a
    batch of contexts or not, from the identity to saturated weights: held to its residual."""
    from pyroflows.guides import landing

    name = family.split("-")[0]
    dim = 32 if family == "realnvp-compact" else 4
    build = {"maf": (pf.transforms.maf, pf.transforms.conditional_maf),
             "nsf": (pf.transforms.nsf, pf.transforms.conditional_nsf),
             "realnvp": (pf.transforms.realnvp, pf.transforms.conditional_realnvp)}[name]
    layer = build[1](dim, 3, hidden_dims=(10,)) if conditioned else build[0](dim, (10,))
    pf.testing.randomize_parameters_(layer, scale=scale, seed=seed)
    layer = layer.to(device, dtype)
    if conditioned:
        layer = layer.condition(_draws((5, 3), seed + 1, device, dtype))
    assert landing._one_pass_inverse(layer) and not landing._linearizes(layer)
    x, g = _draws((2, 5, dim), seed + 2, device, dtype), _draws((2, 5, dim), seed + 3, device,
                                                                dtype)
    _check(layer, x, g, step=lambda x, g: landing._inverse_step(layer, x, g))


def test_permute_score_step(device, dtype):
    """A permutation: u' = g permuted as x is (J is the permutation matrix, orthogonal)."""
    t = pf.transforms.Permute([2, 0, 3, 1]).to(device)
    _check(t, _draws((2, 5, 4), 1, device, dtype), _draws((2, 5, 4), 2, device, dtype))


@pytest.mark.parametrize("kind", ["elementwise", "triangular", "fixed"])
def test_affine_score_step(kind, device, dtype):
    """Affine layers (a guide's last layer and its Laplace start): u' = L^{-T} g, the log-det
    constant, over draws with two batch dims."""
    from pyroflows.transforms import ElementwiseAffine, FixedTriangularAffine, TriangularAffine

    tril = torch.tril(_draws((4, 4), 1, device, dtype, 0.5)) + 1.5 * torch.eye(
        4, device=device, dtype=dtype)
    if kind == "fixed":
        t = FixedTriangularAffine(_draws((4,), 2, device, dtype), tril)
    else:
        t = (ElementwiseAffine if kind == "elementwise" else TriangularAffine)(4, scale=0.7)
        pf.testing.randomize_parameters_(t, scale=0.5, seed=3)
        t = t.to(device, dtype)
    _check(t, _draws((2, 5, 4), 4, device, dtype), _draws((2, 5, 4), 5, device, dtype))


@pytest.mark.parametrize("flow", ["planar", "radial", "permute", "elementwise",
                                  "triangular"])
def test_a_subclass_that_changes_the_map_has_no_score_step(flow):
    """A subclass that redefines the map does not inherit the closed form."""
    base = {"planar": pf.transforms.Planar, "radial": pf.transforms.Radial,
            "permute": pf.transforms.Permute, "elementwise": pf.transforms.ElementwiseAffine,
            "triangular": pf.transforms.TriangularAffine}[flow]

    class Doubled(base):
        def forward_and_log_det(self, x):
            y, ld = super().forward_and_log_det(x)
            return 2 * y, ld + x.shape[-1] * math.log(2.0)

    arg = [2, 0, 1] if flow == "permute" else 3
    assert base(arg).has_score_step() and not Doubled(arg).has_score_step()
