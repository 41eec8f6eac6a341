r"""Built-in data: the Rezende & Mohamed (2015) energies and small toy data sets.

The energies are written from the formulas of Rezende & Mohamed (2015, table 1); each
returns ``U(z)`` for ``z`` of shape ``(..., 2)`` so that ``p(z) = exp(-U(z)) / Z``. With
:math:`w_1(z) = \sin(\pi z_1 / 2)`, :math:`w_2(z) = 3 \exp(-\tfrac12 ((z_1 - 1) / 0.6)^2)` and
:math:`w_3(z) = 3\, \sigma((z_1 - 1) / 0.3)`:

.. math::
    U_1(z) &= \tfrac12 \Big(\frac{\lVert z \rVert - 2}{0.4}\Big)^2
              - \log\Big(e^{-\frac12 (\frac{z_1 - 2}{0.6})^2}
              + e^{-\frac12 (\frac{z_1 + 2}{0.6})^2}\Big) \\
    U_2(z) &= \tfrac12 \Big(\frac{z_2 - w_1(z)}{0.4}\Big)^2 \\
    U_3(z) &= -\log\Big(e^{-\frac12 (\frac{z_2 - w_1(z)}{0.35})^2}
              + e^{-\frac12 (\frac{z_2 - w_1(z) + w_2(z)}{0.35})^2}\Big) \\
    U_4(z) &= -\log\Big(e^{-\frac12 (\frac{z_2 - w_1(z)}{0.4})^2}
              + e^{-\frac12 (\frac{z_2 - w_1(z) + w_3(z)}{0.35})^2}\Big)

References:
    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015, Table 1.
    https://arxiv.org/abs/1505.05770

Example:
    >>> import torch
    >>> from pyroflows.datasets import ENERGIES, two_moons
    >>> ENERGIES["U1"](torch.zeros(3, 2)).shape
    torch.Size([3])
    >>> two_moons(500, seed=0).shape
    torch.Size([500, 2])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._random import generator

__all__ = ["rezende_u1", "rezende_u2", "rezende_u3", "rezende_u4", "ENERGIES", "LOG_Z",
           "two_moons", "gaussian_mixture", "student_t"]


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(math.pi * z1 / 2)


def rezende_u1(z: Tensor) -> Tensor:
    """Ring with two modes; proper on R^2 with log Z = 1.877502."""
    z1 = z[..., 0]
    r = torch.linalg.vector_norm(z, dim=-1)
    a = -0.5 * ((z1 - 2) / 0.6) ** 2
    b = -0.5 * ((z1 + 2) / 0.6) ** 2
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(a, b)


def rezende_u2(z: Tensor) -> Tensor:
    """Sine wave; improper on R^2, log Z = 2.082089 on the box [-4, 4]^2."""
    return 0.5 * ((z[..., 1] - _w1(z[..., 0])) / 0.4) ** 2


def rezende_u3(z: Tensor) -> Tensor:
    """Split sine wave; log Z = 2.641705 on the box [-4, 4]^2."""
    d, w2 = z[..., 1] - _w1(z[..., 0]), 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)
    a = -0.5 * (d / 0.35) ** 2
    b = -0.5 * ((d + w2) / 0.35) ** 2
    return -torch.logaddexp(a, b)


def rezende_u4(z: Tensor) -> Tensor:
    """Sine wave with a sigmoid step; log Z = 2.684568 on the box [-4, 4]^2."""
    d, w3 = z[..., 1] - _w1(z[..., 0]), 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)
    a = -0.5 * (d / 0.4) ** 2
    b = -0.5 * ((d + w3) / 0.35) ** 2
    return -torch.logaddexp(a, b)


ENERGIES = {"U1": rezende_u1, "U2": rezende_u2, "U3": rezende_u3, "U4": rezende_u4}
LOG_Z = {"U1": 1.877502, "U2": 2.082089, "U3": 2.641705, "U4": 2.684568}


def two_moons(n: int, noise: float = 0.1, seed: int | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """``n`` draws of the two-moons data (as in scikit-learn's ``make_moons``), shape (n, 2)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dtype = dtype or torch.get_default_dtype()
    upper = torch.rand(n, generator=gen, dtype=torch.float64) < 0.5
    angle = math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    jitter = noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    pts = torch.stack([x, y], dim=-1) + jitter
    return pts.to(device=device, dtype=dtype)


def gaussian_mixture(n: int, dim: int = 2, num_components: int = 3, spread: float = 3.0,
                     seed: int | None = None) -> tuple[Tensor, torch.distributions.Distribution]:
    """``n`` draws of a random Gaussian mixture in ``dim`` dimensions, in float64, and the
    mixture itself (a ``torch.distributions.MixtureSameFamily``) so its exact ``log_prob`` is
    known. Component means are ``spread`` times standard normal draws.

    Example:
        >>> from pyroflows.datasets import gaussian_mixture
        >>> x, mixture = gaussian_mixture(100, dim=3, seed=0)
        >>> x.shape, mixture.log_prob(x).shape
        (torch.Size([100, 3]), torch.Size([100]))
    """
    gen = generator(seed)  # (without a seed: torch's global generator governs it)
    locs = spread * torch.randn(num_components, dim, generator=gen, dtype=torch.float64)
    raw = torch.randn(num_components, dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    cov = raw @ raw.transpose(-1, -2) + 0.3 * torch.eye(dim, dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(cov)
    weights = torch.softmax(torch.randn(num_components, generator=gen, dtype=torch.float64), -1)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=weights),
        torch.distributions.MultivariateNormal(locs, scale_tril=scale_tril))
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    eps = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x = locs[comp] + (scale_tril[comp] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, mix


def student_t(n: int, dim: int = 2, df: float = 3.0, seed: int | None = None
              ) -> tuple[Tensor, torch.distributions.Distribution]:
    r"""``n`` draws of a correlated multivariate Student t with ``df`` degrees of freedom (heavy
    tails: moments of order ``df`` and above are infinite), in float64, and the distribution
    itself (:class:`pyro.distributions.MultivariateStudentT`, centered, shape matrix
    :math:`A A^\top / D + 0.2 I` with :math:`A` standard normal), so its exact ``log_prob`` is
    known.

    Example:
        >>> from pyroflows.datasets import student_t
        >>> x, t = student_t(100, dim=3, seed=0)
        >>> x.shape, t.log_prob(x).shape
        (torch.Size([100, 3]), torch.Size([100]))
    """
    from pyro.distributions import MultivariateStudentT

    gen = generator(seed)  # (without a seed: torch's global generator governs it)
    raw = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    shape = raw @ raw.T / dim + 0.2 * torch.eye(dim, dtype=torch.float64)
    t = MultivariateStudentT(torch.tensor(float(df), dtype=torch.float64),
                             torch.zeros(dim, dtype=torch.float64), torch.linalg.cholesky(shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return t.sample((n,)), t
