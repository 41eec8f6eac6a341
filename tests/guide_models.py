"""Models with known answers for the flow guides' tests (test_guides, test_laplace,
test_flow_elbo, test_guide_params)."""

from __future__ import annotations

import os
import sys

import pyro
import pyro.distributions as dist
import torch

# benchmarks/ is a sibling package of tests/ (not installed): make it importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.targets import OrderedNormal, load_target  # noqa: E402

__all__ = ["gaussian_problem", "eight_schools", "seeded_draw", "load_target", "OrderedNormal"]


def gaussian_problem(device, dtype):
    """z ~ N(0, 2^2 I_3), y ~ N(B z, 0.5^2 I_4): a correlated Gaussian posterior. Returns
    ``(model, posterior mean, posterior covariance, log evidence)``, the last three in float64
    on the CPU, from the closed form."""
    b = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, -0.7], [0.5, 0.0, 1.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    y = torch.tensor([1.5, -0.5, 0.8, 2.0], dtype=torch.float64)
    s0, sigma = 2.0, 0.5
    precision = torch.eye(3, dtype=torch.float64) / s0**2 + b.T @ b / sigma**2
    cov = torch.linalg.inv(precision)
    mean = cov @ b.T @ y / sigma**2
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(4, dtype=torch.float64),
        s0**2 * b @ b.T + sigma**2 * torch.eye(4, dtype=torch.float64))
    log_z = float(evidence.log_prob(y))
    bd, yd = b.to(device, dtype), y.to(device, dtype)
    zeros = torch.zeros(3, device=device, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(zeros, s0).to_event(1))
        pyro.sample("y", dist.Normal(z @ bd.T, sigma).to_event(1), obs=yd)

    return model, mean, cov, log_z


def eight_schools(device, dtype):
    """Centered eight schools: a positive scale, a plate of local latents, a data plate."""
    return load_target("eight_schools_centered", device=device, dtype=dtype).model


def seeded_draw(guide, seed=1):
    """One draw of every site of ``guide`` at a fixed seed."""
    pyro.set_rng_seed(seed)
    return guide()
