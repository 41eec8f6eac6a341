"""The built-in data sets draw from the distributions they return."""

import pytest
import torch

from pyroflows import datasets


def test_student_t_draws_have_the_distributions_covariance_and_tails():
    """Covariance df / (df - 2) times the shape matrix (df = 6: finite fourth moments, so the
    sample covariance converges), and heavier tails than the Gaussian of that covariance."""
    x, t = datasets.student_t(200_000, dim=3, df=6.0, seed=1)
    assert x.dtype == torch.float64 and x.shape == (200_000, 3)
    shape = t.scale_tril @ t.scale_tril.T
    torch.testing.assert_close(torch.cov(x.T), shape * 6.0 / 4.0, atol=0.03, rtol=0.03)
    torch.testing.assert_close(x.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.02, rtol=0)
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(torch.cov(x.T)), x.T, upper=False).T
    far = float((z.square().sum(-1) > 25).double().mean())  # chi2(3) puts 1.5e-5 beyond 25
    assert far > 1e-3
    assert torch.equal(datasets.student_t(10, seed=4)[0], datasets.student_t(10, seed=4)[0])


@pytest.mark.parametrize("make", [datasets.gaussian_mixture, datasets.student_t])
def test_draws_without_a_seed_follow_torchs_generator(make):
    """Without a seed every call drew the same rows (a fresh ``torch.Generator()``): a train
    and a test set of two calls were one set."""
    torch.manual_seed(3)
    first, second = make(50)[0], make(50)[0]
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(make(50)[0], first)
