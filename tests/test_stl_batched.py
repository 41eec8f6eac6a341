"""Sticking the landing: the draw's Jacobian from a batched backward against the copies."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.guides import landing

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- sticking the landing: batched backward against the copies ------------------------------
@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp", "planar", "radial"])
def test_stl_batched_backward_equals_copies(flow, device, dtype, monkeypatch):
    """_path_log_density with its Jacobian from the batched backward (above the row threshold,
    as the guide runs it) against the copies' pass (threshold raised past the rows), and both
    against autograd through the flow's inverse: values and gradients in z; no vmap warnings
    (a batching-rule fallback would warn and crawl); no parameter gradient."""
    zeros = torch.zeros(4, device=device, dtype=dtype)
    y = torch.tensor([0.5, -1.0, 0.3, 1.2], device=device, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(zeros, 1.5).to_event(1))
        pyro.sample("y", dist.Normal(z.tanh(), 0.5).to_event(1), obs=y)

    guide = pf.guides.AutoFlowGuide(model, flow=flow, num_layers=2, laplace_init=False,
                                    **({} if flow in ("planar", "radial") else
                                       {"hidden_dims": (8,)}))
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    posterior = guide.get_posterior()
    stack = posterior.transforms[0]
    n, d = 96, 4  # n (d + 1) = 480 rows: above STL_BATCHED_BACKWARD_MIN_ROWS
    assert n * (d + 1) >= landing.STL_BATCHED_BACKWARD_MIN_ROWS
    eps = torch.randn(n, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-0.5 * eps.square().sum(-1) - 0.5 * d * math.log(2 * math.pi) - log_det).detach()
    results = []
    for threshold in (landing.STL_BATCHED_BACKWARD_MIN_ROWS, 10**9):
        monkeypatch.setattr(landing, "STL_BATCHED_BACKWARD_MIN_ROWS", threshold)
        leaf = z.detach().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = landing.path_log_density(stack, eps, leaf, log_q)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        results.append((value, grad))
    leaf = z.detach().requires_grad_(True)
    want = posterior.log_prob_detached(leaf)
    (grad_want,) = torch.autograd.grad(want.sum(), leaf)
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for value, grad in results:
        torch.testing.assert_close(value, want, **tol)
        torch.testing.assert_close(grad, grad_want, **tol)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10 if dtype ==
                               torch.float64 else 1e-4, atol=1e-10 if dtype == torch.float64
                               else 1e-4)
    assert all(p.grad is None for p in guide.parameters())


def test_stl_refused_batched_backward_is_not_retried(device, dtype, monkeypatch):
    """Planar's backward does not run batched (an in-place copy under vmap): the first call
    tries it and falls back to the copies; later calls on the same stack go to the copies
    directly (they paid a forward pass and a failed backward every step), with the same
    result."""
    zeros = torch.zeros(4, device=device, dtype=dtype)

    def model():
        pyro.sample("z", dist.Normal(zeros, 1.5).to_event(1))

    guide = pf.guides.AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    stack = guide.get_posterior().transforms[0]
    n, d = 96, 4
    eps = torch.randn(n, d, device=device, dtype=dtype)
    z, log_det = stack.forward_and_log_det(eps)
    log_q = (-log_det).detach()
    rows: list[int] = []
    forward = landing._Call.forward

    def counted(self, value):
        rows.append(value.shape[0])
        return forward(self, value)

    monkeypatch.setattr(landing._Call, "forward", counted)
    first = landing.path_log_density(stack, eps, z.detach(), log_q)
    refused = rows == [n, n * (d + 1)]
    assert refused or (device.type != "cpu" and rows == [n])  # (CPU: it refuses)
    rows.clear()
    second = landing.path_log_density(stack, eps, z.detach(), log_q)
    assert rows == ([n * (d + 1)] if refused else [n])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
