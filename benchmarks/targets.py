"""Pyro models of the benchmark targets in ``benchmarks/data`` with their known answers.

Every target is a :class:`Target`: a Pyro model without arguments (its data are bound in), the
exact ``log Z`` where one is known (so ``KL(q || p) = log Z - ELBO``), the reference draws on the
constrained scale with their column names, and ``extract``, which turns the site values of a
batch of model traces into the same columns. The data and reference draws are read from
``benchmarks/data`` (its README names each file's source and licence), never copied into code.

Every model broadcasts over leading batch dimensions of its latent sites, so it works with
``Trace_ELBO(num_particles=P, vectorize_particles=True)``, ``Predictive(parallel=True)`` and
vectorized importance weights: global sites arrive shaped ``(..., 1, event)`` when the model has
a data plate, and products with a design matrix use :func:`_rowvec_matmul` for that reason (the
``w @ X.T`` trap: it would train on the wrong likelihood).

Example:
    >>> from benchmarks.targets import load_target
    >>> t = load_target("eight_schools_noncentered")
    >>> t.log_z, t.reference.shape
    (-31.3113, (5000, 10))
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

__all__ = ["Target", "TARGETS", "load_target", "bench_dir", "OrderedNormal", "rezende_u1"]

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def bench_dir() -> str:
    """The absolute path of ``benchmarks/data``: the repository's copy of the benchmark
    material."""
    return BENCH


@dataclass
class Target:
    """A benchmark posterior: a Pyro model with known answers.

    Attributes:
        name: the target's key in :data:`TARGETS`.
        model: a Pyro model taking no arguments.
        max_plate_nesting: the model's plate depth (for vectorized particles).
        log_z: the exact log evidence, or ``None`` where it is unknown or the prior is improper.
        reference: reference draws of shape (n, p) on the constrained scale, or ``None``.
        names: the p column names of ``reference``.
        sites: the sample or deterministic sites that ``extract`` reads, in column order.
    """

    name: str
    model: Callable[[], None]
    max_plate_nesting: int
    log_z: float | None
    reference: np.ndarray | None
    names: list[str]
    sites: list[str] = field(default_factory=list)

    def extract(self, values: dict[str, Tensor], num_draws: int) -> Tensor:
        """The reference columns from site values with ``num_draws`` leading draws, as
        a tensor of shape (num_draws, p)."""
        return torch.cat([values[s].reshape(num_draws, -1) for s in self.sites], dim=-1)


def _read_json(*parts: str) -> dict:
    with open(os.path.join(bench_dir(), *parts)) as f:
        return json.load(f)


def _reference(*parts: str) -> tuple[np.ndarray, list[str]]:
    data = np.load(os.path.join(bench_dir(), *parts))
    draws = data["draws"]
    draws = draws.reshape(-1, draws.shape[-1])
    names = [str(n) for n in data["names"]] if "names" in data else []
    return draws, names


def _rowvec_matmul(w: Tensor, matrix: Tensor) -> Tensor:
    """``matrix @ w`` for every draw of ``w``: ``w`` of shape (D,) or (..., 1, D), where the 1 is
    the data plate's slot; returns (N,) or (..., N). Plain ``w @ X.T`` on (..., 1, D) would leave
    the plate slot in place and misalign the batch dims."""
    if w.dim() == 1:
        return matrix @ w
    return (w @ matrix.T).squeeze(-2)


def _tensor(x, device, dtype) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


class OrderedNormal(dist.TorchDistribution):
    r"""``n`` i.i.d. :math:`N(\mu, \sigma^2)` draws sorted increasingly: the density
    :math:`n! \prod_i N(x_i; \mu, \sigma^2)` on :math:`x_1 < \dots < x_n`. It is Stan's
    ``ordered[n] x; x ~ normal(mu, sigma)`` made proper (the :math:`n!` is a constant)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector
    has_rsample = False

    def __init__(self, loc: Tensor, scale: Tensor, size: int, validate_args=None) -> None:
        self.loc, self.scale, self.size = loc, scale, int(size)
        batch_shape = torch.broadcast_shapes(loc.shape, scale.shape)
        super().__init__(batch_shape, torch.Size([self.size]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return OrderedNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape),
                             self.size)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + (self.size,)
        loc, scale = self.loc.unsqueeze(-1), self.scale.unsqueeze(-1)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (loc + scale * eps).sort(-1).values

    def log_prob(self, value: Tensor) -> Tensor:
        base = dist.Normal(self.loc.unsqueeze(-1), self.scale.unsqueeze(-1))
        return base.log_prob(value).sum(-1) + math.lgamma(self.size + 1)


def rezende_u1(z: Tensor) -> Tensor:
    """The U1 energy of Rezende & Mohamed (2015) (written here from that formula, so the
    benchmark does not depend on the package under test)."""
    z1 = z[..., 0]
    r = torch.linalg.vector_norm(z, dim=-1)
    bumps = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    return 0.5 * ((r - 2) / 0.4) ** 2 - bumps


# ---- the targets ------------------------------------------------------------------------------

def _u1(device, dtype) -> Target:
    zeros = torch.zeros(2, device=device, dtype=dtype)
    carrier = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def model():
        # ImproperUniform cannot be sampled, so autoguides cannot set up on it: a N(0, I)
        # carrier whose log density the factor cancels makes the joint exactly exp(-U1).
        z = pyro.sample("z", carrier)
        pyro.factor("energy", -rezende_u1(z) - carrier.log_prob(z))

    draws = np.load(os.path.join(bench_dir(), "rezende", "box_draws.npz"))["U1"]
    log_z = float(_read_json("synthetic", "targets.json")["rezende_U1"]["logZ_box"])
    return Target("rezende_u1", model, 0, log_z, draws, ["z[1]", "z[2]"], ["z"])


def _funnel(device, dtype) -> Target:
    zero = torch.zeros((), device=device, dtype=dtype)
    zeros9 = torch.zeros(9, device=device, dtype=dtype)

    def model():
        x0 = pyro.sample("x0", dist.Normal(zero, 3.0))
        pyro.sample("x", dist.Normal(zeros9, torch.exp(x0 / 2).unsqueeze(-1)).to_event(1))

    info = _read_json("synthetic", "targets.json")["funnel10"]
    draws, _ = _reference("synthetic", "funnel10_exact_draws.npz")
    names = ["x0"] + [f"x{i}" for i in range(1, 10)]
    return Target("funnel10", model, 0, float(info["logZ"]), draws, names, ["x0", "x"])


def _banana(device, dtype, b: float = 0.1) -> Target:
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        x0 = pyro.sample("x0", dist.Normal(zero, 10.0))
        pyro.sample("x1", dist.Normal(b * (x0.square() - 100.0), 1.0))

    key = f"banana2d_b{b}"
    info = _read_json("synthetic", "targets.json")[key]
    draws, _ = _reference("synthetic", f"{key}_exact_draws.npz")
    return Target(f"banana_b{b}", model, 0, float(info["logZ"]), draws, ["x0", "x1"],
                  ["x0", "x1"])


def _german_credit(device, dtype) -> Target:
    raw = np.loadtxt(os.path.join(bench_dir(), "german_credit_logreg", "german.data-numeric.gz"))
    features = raw[:, :-1]
    features = (features - features.mean(0)) / features.std(0)  # population std, as stated
    design = np.concatenate([features, np.ones((len(raw), 1))], axis=1)
    x = _tensor(design, device, dtype)
    y = _tensor(raw[:, -1] == 2, device, dtype)
    d = x.shape[1]
    zeros = torch.zeros(d, device=device, dtype=dtype)

    def model():
        w = pyro.sample("w", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=_rowvec_matmul(w, x)), obs=y)

    draws, names = _reference("german_credit_logreg", "reference_draws.npz")
    log_z = float(_read_json("german_credit_logreg", "reference_summary.json")["logZ_importance"])
    return Target("german_credit", model, 1, log_z, draws, names or [f"w[{i}]" for i in
                  range(1, d + 1)], ["w"])


def _eight_schools(device, dtype, centered: bool) -> Target:
    folder = f"eight_schools-eight_schools_{'centered' if centered else 'noncentered'}"
    data = _read_json("posteriordb", folder, "data.json")
    y = _tensor(data["y"], device, dtype)
    sigma = _tensor(data["sigma"], device, dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(zero + 5.0))
        with pyro.plate("schools", len(y)):
            if centered:
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            else:
                trans = pyro.sample("theta_trans", dist.Normal(zero, 1.0))
                theta = pyro.deterministic("theta", mu + tau * trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    draws, names = _reference("posteriordb", folder, "reference_draws.npz")
    name = f"eight_schools_{'centered' if centered else 'noncentered'}"
    # Exact log Z (from the benchmark material): theta and mu integrated in closed form, tau by
    # quadrature; the same for both parameterizations.
    return Target(name, model, 1, -31.3113, draws, names, ["theta", "mu", "tau"])


def _kidiq(device, dtype) -> Target:
    folder = "kidiq-kidscore_interaction"
    data = _read_json("posteriordb", folder, "data.json")
    hs = _tensor(data["mom_hs"], device, dtype)
    iq = _tensor(data["mom_iq"], device, dtype)
    score = _tensor(data["kid_score"], device, dtype)
    design = torch.stack([torch.ones_like(hs), hs, iq, hs * iq], dim=-1)
    zero = torch.zeros((), device=device, dtype=dtype)
    zeros4 = torch.zeros(4, device=device, dtype=dtype)
    carrier = dist.Normal(zeros4, torch.ones_like(zeros4)).to_event(1)

    def model():
        # Stan's flat prior on beta. ImproperUniform cannot be sampled, so autoguides cannot set
        # up on it: a N(0, I) carrier cancelled by the factor gives exactly the flat prior.
        beta = pyro.sample("beta", carrier)
        pyro.factor("flat_prior", -carrier.log_prob(beta))
        sigma = pyro.sample("sigma", dist.HalfCauchy(zero + 2.5))
        with pyro.plate("data", len(score)):
            pyro.sample("y", dist.Normal(_rowvec_matmul(beta, design), sigma), obs=score)

    draws, names = _reference("posteriordb", folder, "reference_draws.npz")
    return Target("kidiq", model, 1, None, draws, names, ["beta", "sigma"])


def _ark(device, dtype) -> Target:
    folder = "arK-arK"
    data = _read_json("posteriordb", folder, "data.json")
    k = int(data["K"])
    y = _tensor(data["y"], device, dtype)
    # lags[t, j] = y[t - j - 1] for the modelled times t = K .. T-1
    lags = torch.stack([y[k - j - 1: len(y) - j - 1] for j in range(k)], dim=-1)
    target = y[k:]
    zero = torch.zeros((), device=device, dtype=dtype)
    zeros_k = torch.zeros(k, device=device, dtype=dtype)

    def model():
        alpha = pyro.sample("alpha", dist.Normal(zero, 10.0))
        beta = pyro.sample("beta", dist.Normal(zeros_k, 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(zero + 2.5))
        with pyro.plate("data", len(target)):
            mean = alpha + _rowvec_matmul(beta, lags)
            pyro.sample("y", dist.Normal(mean, sigma), obs=target)

    draws, names = _reference("posteriordb", folder, "reference_draws.npz")
    return Target("arK", model, 1, None, draws, names, ["alpha", "beta", "sigma"])


def _gauss_mix(device, dtype) -> Target:
    folder = "low_dim_gauss_mix-low_dim_gauss_mix"
    data = _read_json("posteriordb", folder, "data.json")
    y = _tensor(data["y"], device, dtype)
    zero = torch.zeros((), device=device, dtype=dtype)

    def model():
        mu = pyro.sample("mu", OrderedNormal(zero, zero + 2.0, 2))
        sigma = pyro.sample("sigma", dist.HalfNormal(zero + 2.0).expand([2]).to_event(1))
        theta = pyro.sample("theta", dist.Beta(zero + 5.0, zero + 5.0))
        with pyro.plate("data", len(y)):
            # mu, sigma: (..., 1, 2) and theta: (..., 1), with the 1 in the data plate's slot.
            mix = torch.stack([theta, 1 - theta], dim=-1)
            pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=mix),
                                                    dist.Normal(mu, sigma)), obs=y)

    draws, names = _reference("posteriordb", folder, "reference_draws.npz")
    return Target("low_dim_gauss_mix", model, 1, None, draws, names, ["mu", "sigma", "theta"])


TARGETS: dict[str, Callable[..., Target]] = {
    "rezende_u1": _u1,
    "funnel10": _funnel,
    "banana_b0.1": _banana,
    "german_credit": _german_credit,
    "eight_schools_centered": lambda device, dtype: _eight_schools(device, dtype, True),
    "eight_schools_noncentered": lambda device, dtype: _eight_schools(device, dtype, False),
    "kidiq": _kidiq,
    "arK": _ark,
    "low_dim_gauss_mix": _gauss_mix,
}


def load_target(name: str, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float64) -> Target:
    """Build the target ``name`` (a key of :data:`TARGETS`) with its data on ``device`` in
    ``dtype``."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name](torch.device(device), dtype)
