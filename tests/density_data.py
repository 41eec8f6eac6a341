"""Data with known densities, and helpers, for the DensityEstimator tests (test_density.py,
test_density_files.py)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import multivariate_normal

#: A small network for the estimator tests.
SMALL = {"num_layers": 2, "hidden_dims": (16, 16)}


def gaussian_data(n: int, seed: int):
    """Rows of N(mean, cov) with a scaled, shifted, correlated covariance, in float64 numpy."""
    rng = np.random.default_rng(seed)
    mean = np.array([5.0, -2.0, 0.5])
    a = np.array([[3.0, 0.0, 0.0], [1.2, 0.5, 0.0], [-0.4, 0.3, 0.8]])
    return rng.standard_normal((n, 3)) @ a.T + mean, mean, a @ a.T


def mixture_2d(n: int, seed: int):
    """A two-component 2-D Gaussian mixture far from N(0, I) (scales 3 and 0.5, shifted), and its
    exact log-density."""
    means = np.array([[2.0, -3.0], [8.0, -1.0]])
    covs = [np.array([[2.0, 0.6], [0.6, 0.3]]), np.array([[1.0, -0.3], [-0.3, 0.25]])]
    weights = np.array([0.4, 0.6])
    rng = np.random.default_rng(seed)
    comp = rng.choice(2, size=n, p=weights)
    x = np.empty((n, 2))
    for k in range(2):
        idx = comp == k
        x[idx] = rng.multivariate_normal(means[k], covs[k], size=int(idx.sum()))

    def log_prob(points: np.ndarray) -> np.ndarray:
        parts = [
            np.log(w) + multivariate_normal(m, c).logpdf(points)
            for w, m, c in zip(weights, means, covs, strict=True)
        ]
        return np.logaddexp(*parts)

    return x, log_prob


def as_tensor(x: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.as_tensor(x, device=device, dtype=dtype)


def log_scale_bounds(est) -> set[float]:
    """The log-scale bounds of a fitted estimator's layers."""
    return {m.log_scale_bound for m in est._model.modules() if hasattr(m, "log_scale_bound")}
