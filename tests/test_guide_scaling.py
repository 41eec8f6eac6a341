"""A flow guide's size at large latent dimension (issue 24, item 3): the network families'
default conditioner widths follow ``guide_hidden_dims`` (64 units up to D = 16, then
``round(16 sqrt(D))``), which the built conditioners have, an explicit ``hidden_dims`` wins, and
a guide at the new widths still starts as its exact Laplace start on a Gaussian posterior."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.flows.families import guide_hidden_dims
from pyroflows.nn import MADE

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store", "exact_stl")


def _normal_model(dim: int, device, dtype):
    loc = torch.linspace(-1.0, 1.0, dim, device=device, dtype=dtype)

    def model():
        pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))

    return model


def _conditioner_widths(guide) -> set[tuple[int, ...]]:
    return {m.hidden_dims for m in guide.flow.modules() if isinstance(m, MADE)}


@pytest.mark.parametrize("dim", [1, 16, 17, 100, 300])
def test_rule_values(dim):
    width = max(64, round(16 * math.sqrt(dim)))  # the rule as the docs state it
    assert guide_hidden_dims(dim) == (width, width)
    assert guide_hidden_dims(dim)[0] <= max(64, 4 * dim)  # never wider than the layers' own


@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp"])
def test_guide_builds_the_rule_widths(flow, device, dtype):
    dim = 40
    guide = pf.guides.AutoFlowGuide(_normal_model(dim, device, dtype), flow=flow,
                                    num_layers=2, laplace_init=False)
    guide()
    assert _conditioner_widths(guide) == {(101, 101)}  # round(16 sqrt(40)) = 101


def test_explicit_hidden_dims_win(device, dtype):
    guide = pf.guides.AutoIAF(_normal_model(40, device, dtype), num_layers=2,
                              hidden_dims=(32, 48), laplace_init=False)
    guide()
    assert _conditioner_widths(guide) == {(32, 48)}


def test_d100_parameter_count_and_exact_start(device, dtype):
    """At D = 100 the default IAF guide has a quarter of the old default's conditioner
    parameters (two layers of 4D units) and starts at its Laplace Gaussian, which is exact here:
    its log density equals the posterior's at the guide's draws."""
    dim = 100
    model = _normal_model(dim, device, dtype)
    guide = pf.guides.AutoIAF(model)
    guide()
    assert guide.laplace_info["used"]
    new = sum(p.numel() for p in guide.flow.parameters())
    old = pf.flows.build("iaf", dim, num_layers=4, affine=False)
    assert new < 0.3 * sum(p.numel() for p in old.parameters())
    with torch.no_grad(), pf.validation(False):
        z = guide._draw_latent(64, seed=0)
        log_q = guide.get_posterior().log_prob(z)
        loc = torch.linspace(-1.0, 1.0, dim, device=device, dtype=dtype)
        log_p = dist.Normal(loc, 0.5).to_event(1).log_prob(z)
    tol = 1e-8 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(log_q, log_p, atol=tol * dim, rtol=0.0)


ROUTES = {  # (STL_LAYERWISE, STL_JACOBIAN_MAX_DIM) of each route of sticking the landing
    "layerwise": (True, 1024), "jacobian": (False, 1024), "inverse": (False, 0)}


def test_stl_at_large_dim_takes_every_route_to_one_answer(monkeypatch, device, dtype):
    """At D = 300 (above the Jacobian's old limit of 256) sticking the landing takes the
    layer-by-layer route by default; its loss and gradients equal those of the draw's whole
    Jacobian (STL_LAYERWISE off) and of the flow's inverse (both off: an independent
    computation of grad_z log q, D sequential passes a layer)."""
    from pyroflows.guides import FlowELBO, landing

    dim = 300
    assert landing.STL_JACOBIAN_MAX_DIM >= dim
    model = _normal_model(dim, device, dtype)
    taken = []
    for name in ("layerwise_score", "_jacobian_score"):
        real = getattr(landing, name)

        def counted(*args, real=real, name=name, **kwargs):
            taken.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(landing, name, counted)
    results, calls = {}, {}
    for route, (layerwise, max_dim) in ROUTES.items():
        taken.clear()
        monkeypatch.setattr(landing, "STL_LAYERWISE", layerwise)
        monkeypatch.setattr(landing, "STL_JACOBIAN_MAX_DIM", max_dim)
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = pf.guides.AutoIAF(model, num_layers=2, hidden_dims=(16,))
        guide()
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.05 * torch.randn_like(p))
        elbo = FlowELBO(stick_the_landing=True, num_particles=2, vectorize_particles=True,
                        max_plate_nesting=0)
        torch.manual_seed(1)
        with pf.validation(False):
            loss = elbo.differentiable_loss(model, guide)
        results[route] = (loss.detach(), torch.autograd.grad(loss, list(guide.parameters())))
        calls[route] = list(taken)
    assert calls == {"layerwise": ["layerwise_score"], "jacobian": ["_jacobian_score"],
                     "inverse": []}
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    want, want_g = results["inverse"]
    for route in ("layerwise", "jacobian"):
        got, got_g = results[route]
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(a, b, **tol)
