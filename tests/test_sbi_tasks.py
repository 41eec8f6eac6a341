"""The SBI benchmark's tasks (``benchmarks/sbi.py``) against truth: the simulators against
their definitions, the written-out two_moons likelihood against the simulator, the shipped
reference posterior draws (``benchmarks/data/sbi/``) against the posteriors our simulators
imply (closed form for gaussian_linear, quadrature for two_moons), and the scores (C2ST, the
Bayes-classifier C2ST) on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from benchmarks import sbi

ROOT2 = math.sqrt(2.0)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("theta", [(0.0, 0.0), (0.3, 0.1), (-0.5, 0.8)])
def test_two_moons_simulator_draws_the_rotated_half_ring(theta, device, dtype):
    # By hand: R(-pi/4) theta = ((t1 + t2) / sqrt 2, (t2 - t1) / sqrt 2), and x minus
    # (0.25 - |z0|, z1) is (r cos a, r sin a), r ~ N(0.1, 0.01^2), a ~ U(-pi/2, pi/2).
    n = 20_000
    t = torch.tensor([theta], dtype=dtype, device=device).expand(n, 2)
    x = sbi.two_moons_simulator(t, _gen(device, 0))
    assert x.shape == (n, 2) and x.dtype == dtype and x.device.type == device.type
    z0, z1 = (theta[0] + theta[1]) / ROOT2, (theta[1] - theta[0]) / ROOT2
    v = (x - torch.tensor([0.25 - abs(z0), z1], dtype=dtype, device=device)).double().cpu()
    r, a = v.norm(dim=1), torch.atan2(v[:, 1], v[:, 0])
    se = 1 / math.sqrt(n)
    assert abs(r.mean() - 0.1) < 5 * 0.01 * se
    assert abs(r.std() / 0.01 - 1) < 5 * math.sqrt(0.5) * se + 1e-3
    assert a.abs().max() <= math.pi / 2
    half = math.pi / 2  # U(-h, h): mean 0, variance h^2 / 3
    assert abs(a.mean()) < 5 * half / math.sqrt(3) * se
    assert abs(a.var() / (half**2 / 3) - 1) < 5 * 0.9 * se


def test_two_moons_likelihood_is_the_simulators_density(device):
    # log p(x | theta) written out by the polar change of variables, integrated on a grid:
    # mass 1 and the simulator's mean and covariance.
    theta = torch.tensor([0.3, -0.6], dtype=torch.float64, device=device)
    z0, z1 = (theta[0] + theta[1]) / ROOT2, (theta[1] - theta[0]) / ROOT2
    g = torch.linspace(-0.2, 0.2, 1601, dtype=torch.float64, device=device)  # the ring's box
    grid = torch.cartesian_prod(g + 0.25 - z0.abs(), g + z1)
    w = torch.exp(sbi.two_moons_log_likelihood(theta, grid)) * float(g[1] - g[0]) ** 2
    assert abs(float(w.sum()) - 1) < 1e-3
    mean = (w[:, None] * grid).sum(0)
    cov = (w[:, None, None] * (grid - mean)[:, :, None] * (grid - mean)[:, None, :]).sum(0)
    n = 40_000
    x = sbi.two_moons_simulator(theta.expand(n, 2), _gen(device, 1))
    se = x.std(0) / math.sqrt(n)
    assert torch.all((x.mean(0) - mean).abs() < 5 * se)
    assert torch.allclose(torch.cov(x.T), cov, atol=5e-4)


@pytest.fixture(scope="module")
def two_moons():
    return sbi.load_task("two_moons")


@pytest.fixture(scope="module")
def gaussian_linear():
    return sbi.load_task("gaussian_linear")


def test_two_moons_reference_draws_follow_our_simulators_posterior(two_moons):
    # Posterior on the prior's box by quadrature of the likelihood, against the reference
    # draws' moments, for every observation; every reference draw is a possible theta.
    g = torch.linspace(-1, 1, 1601, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    for k in range(5):
        x_o = torch.as_tensor(two_moons["observations"][k], dtype=torch.float64)
        draws = torch.as_tensor(two_moons["reference_draws"][k], dtype=torch.float64)
        assert draws.shape == (10_000, 2) and draws.abs().max() <= 1
        assert torch.isfinite(sbi.two_moons_log_likelihood(draws, x_o)).all()
        log_w = sbi.two_moons_log_likelihood(grid, x_o)
        w = torch.softmax(log_w, 0)
        mean = (w[:, None] * grid).sum(0)
        sd = ((w[:, None] * (grid - mean) ** 2).sum(0)).sqrt()
        se = sd / math.sqrt(len(draws))
        assert torch.all((draws.mean(0) - mean).abs() < 5 * se), k
        assert torch.all((draws.std(0) / sd - 1).abs() < 0.05), k


def test_gaussian_linear_reference_draws_are_the_closed_form_posterior(gaussian_linear):
    for k in range(5):
        x_o = torch.as_tensor(gaussian_linear["observations"][k], dtype=torch.float64)
        draws = torch.as_tensor(gaussian_linear["reference_draws"][k], dtype=torch.float64)
        mean, var = sbi.gaussian_linear_posterior(x_o)
        n = len(draws)
        assert var == pytest.approx(0.05)
        assert torch.all((draws.mean(0) - mean).abs() < 5 * math.sqrt(var / n)), k
        cov = torch.cov(draws.T) / var  # the identity, up to draws' error sqrt(2 / n) and 1/sqrt(n)
        assert torch.all((cov.diagonal() - 1).abs() < 5 * math.sqrt(2 / n)), k
        assert (cov - torch.diag(cov.diagonal())).abs().max() < 5 / math.sqrt(n), k


def test_gaussian_linear_simulator_and_posterior_agree(device, dtype):
    # Simulated pairs: the prior's and the noise's covariance 0.1 I, and the regression of theta
    # on x (E[theta | x] = x / 2, residual variance 0.05) is the closed-form posterior.
    n = 40_000
    theta, x = sbi.simulate(sbi.TASK["gaussian_linear"], n, 0)
    gen = _gen(device, 2)
    t = sbi.gaussian_linear_prior(n, gen, dtype)
    assert t.dtype == dtype and t.device.type == device.type
    x_dev = sbi.gaussian_linear_simulator(t, gen)
    assert x_dev.dtype == dtype and x_dev.device.type == device.type
    for a in (t, x_dev - t, theta, x - theta):
        a = a.double().cpu()
        assert torch.allclose(torch.cov(a.T), 0.1 * torch.eye(10, dtype=torch.float64), atol=0.006)
    theta, x = theta.double(), x.double()
    slope = torch.linalg.lstsq(x, theta).solution
    mean, var = sbi.gaussian_linear_posterior(x)
    assert torch.allclose(slope, (mean / x)[0, 0] * torch.eye(10, dtype=torch.float64), atol=0.02)
    residual = theta - x @ slope
    assert abs(float(residual.var()) / var - 1) < 0.02


def test_two_moons_prior_is_the_box(device, dtype):
    theta = sbi.two_moons_prior(20_000, _gen(device, 3), dtype)
    assert theta.dtype == dtype and theta.device.type == device.type
    assert theta.abs().max() <= 1 and theta.abs().max() > 0.999
    assert torch.allclose(theta.double().var(0).cpu(), torch.full((2,), 1 / 3, dtype=torch.float64),
                          atol=0.02)


def test_simulations_repeat_with_the_seed():
    for task in sbi.TASK.values():
        a, b = sbi.simulate(task, 50, 7), sbi.simulate(task, 50, 7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], sbi.simulate(task, 50, 8)[1])


def test_c2st_tells_same_from_different(two_moons):
    draws = two_moons["reference_draws"]
    same = sbi.c2st(draws[0][:500], draws[0][500:1000])
    apart = sbi.c2st(draws[0][:500], draws[2][:500])
    assert abs(same - 0.5) < 0.08  # 5 standard errors of an accuracy on 1000 rows
    assert apart > 0.95


def test_bayes_c2st_is_half_the_total_variation_above_one_half():
    q = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    same, _ = sbi.bayes_c2st(q.log_prob(d), q.log_prob(d))
    assert same == 0.5
    p = torch.distributions.Normal(torch.tensor(1.5, dtype=torch.float64), 1.0)
    tv = 2 * float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(0.75))) - 1
    value, se = sbi.bayes_c2st(q.log_prob(d), p.log_prob(d))
    assert abs(value - (0.5 + tv / 2)) < 5 * se


def test_reference_files_hold_five_observations(two_moons, gaussian_linear):
    for data, dim in ((two_moons, 2), (gaussian_linear, 10)):
        assert data["observations"].shape == (5, dim)
        assert data["true_parameters"].shape == (5, dim)
        assert data["reference_draws"].shape == (5, 10_000, dim)
        assert np.isfinite(data["reference_draws"]).all()
        assert len(set(data["observation_seeds"].tolist())) == 5
