"""The flow guides' user-facing paths that were made faster keep their results: the Laplace
start's Gaussian ELBO from one vectorized run of the model (against the hand-written log joint,
and the per-draw loop where the model does not broadcast). The sticking-the-landing Jacobian's
batched backward is checked in tests/test_guides.py, next to the copies it replaces."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows.guides import AutoPlanar
from pyroflows.guides.laplace import LAPLACE_ELBO_DRAWS, LogDensity, gaussian_elbo

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


def _hierarchical(device, dtype, calls: list, broadcasts: bool = True):
    """A normal hierarchy with a positive scale, a plate of latents and a data plate; its log
    joint written by hand below. ``broadcasts=False`` sums a term over every dim (also the
    draws' dim of a vectorized run), the mistake a model that assumes unbatched latents
    makes: it runs batched, but mixes the draws."""
    y = torch.tensor([1.5, -0.3, 0.8, 2.1], device=device, dtype=dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        calls.append(1)
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        tau = pyro.sample("tau", dist.LogNormal(zero, 0.5))
        with pyro.plate("groups", 4):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
        if not broadcasts:
            pyro.factor("pull", -0.1 * mu.square().sum())

    def log_joint(u: torch.Tensor) -> torch.Tensor:
        """log p(y, T(u)) + log|det J_T(u)| for u = (mu, log tau, theta_1..4), rows of u."""
        mu, log_tau, theta = u[..., 0], u[..., 1], u[..., 2:]
        tau = log_tau.exp()
        normal = dist.Normal(zero, 1.0)
        lp = normal.log_prob(mu / 2.0) - math.log(2.0)
        lp = lp + normal.log_prob(log_tau / 0.5) - math.log(0.5) - log_tau  # LogNormal
        lp = lp + (normal.log_prob((theta - mu[..., None]) / tau[..., None])
                   - log_tau[..., None]).sum(-1)
        lp = lp + normal.log_prob(y - theta).sum(-1)
        if not broadcasts:
            lp = lp - 0.1 * mu.square()
        return lp + log_tau  # the Jacobian of tau = exp(u)

    return model, log_joint


def _draws(device, dtype):
    gen = torch.Generator().manual_seed(1)
    loc = torch.tensor([0.5, -0.2, 1.0, 0.1, 0.6, 1.2], dtype=torch.float64)
    a = 0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64))
    eps = torch.randn(LAPLACE_ELBO_DRAWS, 6, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (loc, scale_tril, eps)]


def _expected_elbo(log_joint, loc, scale_tril, eps) -> float:
    """The Gaussian ELBO estimate on the draws loc + L eps, from the hand-written log joint
    and the Gaussian's entropy."""
    u = (loc + eps @ scale_tril.T).double()
    entropy = (0.5 * eps.shape[-1] * math.log(2 * math.pi * math.e)
               + float(scale_tril.double().diagonal().log().sum()))
    return float(log_joint(u).mean()) + entropy


@pytest.mark.parametrize("broadcasts", [True, False])
def test_laplace_elbo_is_one_model_run_where_the_model_broadcasts(device, dtype, broadcasts):
    """The Laplace start's Gaussian ELBO (the decision whether the Laplace start is kept) equals
    the hand-computed estimate on the same draws. A model that broadcasts over the draws runs
    once for all of them (plus a plain run at the first and last draw that checks the batch):
    it ran once per draw (64 runs, most of the set-up's time on German credit). A model that
    runs batched but mixes the draws fails that check and is run per draw."""
    calls: list = []
    model, log_joint = _hierarchical(device, dtype, calls, broadcasts)
    guide = AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    loc, scale_tril, eps = _draws(device, dtype)
    calls.clear()
    with torch.no_grad(), pyro.validation_enabled(False):
        elbo = gaussian_elbo(LogDensity(model, guide._unpack_latent, (), {}), loc, scale_tril,
                            eps)
    expected = _expected_elbo(log_joint, loc, scale_tril, eps)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert elbo == pytest.approx(expected, rel=tol, abs=tol)
    if broadcasts:
        assert len(calls) <= 3
    else:  # the check caught the mixing (else the sum over all draws enters each draw)
        assert len(calls) >= LAPLACE_ELBO_DRAWS


def test_laplace_elbo_falls_back_for_models_that_do_not_broadcast(device, dtype):
    """A model written for one latent vector (``torch.dot`` refuses a batch) gets the per-draw
    ELBO, and a draw the model rejects still makes the ELBO -inf."""
    x = torch.tensor([0.5, -1.0, 2.0], device=device, dtype=dtype)
    zero = torch.zeros(3, device=device, dtype=dtype)

    def model(reject_above: float = math.inf):
        w = pyro.sample("w", dist.Normal(zero, 1.0).to_event(1))
        if bool((w.abs() > reject_above).any()):
            raise ValueError("out of range")
        pyro.sample("y", dist.Normal(torch.dot(w, x), 1.0), obs=x.new_tensor(0.7))

    def log_joint(u: torch.Tensor) -> torch.Tensor:
        normal = dist.Normal(torch.zeros((), dtype=u.dtype), 1.0)
        return normal.log_prob(u).sum(-1) + normal.log_prob(0.7 - u @ x.double())

    guide = AutoPlanar(model, num_layers=2, laplace_init=False)
    guide()
    loc, scale_tril, eps = _draws(device, dtype)
    loc, scale_tril, eps = loc[:3], scale_tril[:3, :3], eps[:, :3]
    with torch.no_grad(), pyro.validation_enabled(False):
        elbo = gaussian_elbo(LogDensity(model, guide._unpack_latent, (), {}), loc, scale_tril,
                            eps)
        rejected = gaussian_elbo(LogDensity(model, guide._unpack_latent, (1.5,), {}), loc,
                                scale_tril, eps)
    expected = _expected_elbo(log_joint, loc, scale_tril, eps)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert elbo == pytest.approx(expected, rel=tol, abs=tol)
    assert (loc + eps @ scale_tril.T).abs().max() > 1.5  # some draw is rejected
    assert rejected == -math.inf
