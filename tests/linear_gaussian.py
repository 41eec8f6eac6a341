"""A linear-Gaussian model with a plate, a vector site and a positive site, whose posterior and
log evidence are known in closed form: the reference for the diagnostics' tests.

theta = (loc_1, loc_2, log lam) has a Gaussian prior and y_n = loc + COUPLING * log(lam) + noise,
so the posterior of theta is Gaussian and the evidence is a Gaussian density of y.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal
from scipy import stats

PRIOR_MEAN = np.array([0.0, 0.0, 0.5])
PRIOR_SD = np.array([2.0, 2.0, 0.8])
COUPLING = np.array([1.0, -0.5])  # y_n = loc + COUPLING * log(lam) + noise
NOISE_SD = 0.7


def log_tol(dtype: torch.dtype) -> float:
    """Absolute tolerance for a log density of size ~50 summed in ``dtype``."""
    return 1e-8 if dtype == torch.float64 else 2e-3


def linear_gaussian(y):
    zero = y.new_zeros(())
    loc = pyro.sample("loc", dist.Normal(zero.expand(2), zero + PRIOR_SD[0]).to_event(1))
    lam = pyro.sample("lam", dist.LogNormal(zero + PRIOR_MEAN[2], zero + PRIOR_SD[2]))
    coupling = y.new_tensor(COUPLING)
    with pyro.plate("data", y.shape[0]):
        mean = loc + torch.log(lam).unsqueeze(-1) * coupling
        pyro.sample("obs", dist.Normal(mean, zero + NOISE_SD).to_event(1), obs=y)


def _design(n: int) -> np.ndarray:
    a = np.column_stack([np.eye(2), COUPLING])  # (2, 3): y_n = A theta + noise
    return np.tile(a, (n, 1))


def exact(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Posterior mean, covariance of theta and log evidence, by Gaussian algebra."""
    b = _design(len(y))
    prior_cov = np.diag(PRIOR_SD**2)
    precision = np.linalg.inv(prior_cov) + b.T @ b / NOISE_SD**2
    cov = np.linalg.inv(precision)
    mean = cov @ (np.linalg.solve(prior_cov, PRIOR_MEAN) + b.T @ y.reshape(-1) / NOISE_SD**2)
    marginal = stats.multivariate_normal(b @ PRIOR_MEAN, NOISE_SD**2 * np.eye(b.shape[0])
                                         + b @ prior_cov @ b.T)
    return mean, cov, marginal.logpdf(y.reshape(-1))


def data(device, dtype, n: int = 12) -> torch.Tensor:
    """``n`` observations drawn at theta = (0.8, -1.2, 0.3), shape ``(n, 2)``."""
    gen = np.random.default_rng(1)
    theta = np.array([0.8, -1.2, 0.3])
    y = (_design(n) @ theta + NOISE_SD * gen.standard_normal(2 * n)).reshape(n, 2)
    return torch.tensor(y, device=device, dtype=dtype)


def mvn_guide(y: torch.Tensor, mean: np.ndarray, cov: np.ndarray) -> AutoMultivariateNormal:
    """An AutoMultivariateNormal guide of the model set to N(mean, cov) on the latent vector
    (loc_1, loc_2, log lam)."""
    guide = AutoMultivariateNormal(linear_gaussian)
    guide(y)  # set up the prototype
    chol = np.linalg.cholesky(cov)
    with torch.no_grad():
        guide.loc.copy_(guide.loc.new_tensor(mean))
        guide.scale = guide.loc.new_tensor(np.diag(chol))
        guide.scale_tril = guide.loc.new_tensor(chol / np.diag(chol)[:, None])
    return guide


def exact_guide(y: torch.Tensor) -> AutoMultivariateNormal:
    """The exact posterior as an AutoMultivariateNormal guide."""
    mean, cov, _ = exact(y.cpu().double().numpy())
    return mvn_guide(y, mean, cov)
