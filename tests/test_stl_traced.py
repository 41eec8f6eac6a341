"""Sticking the landing on the traced path against the flow's inverse."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows.guides import AutoIAF, AutoPlanar
from pyroflows.guides.landing import path_entropy as _path_entropy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (see conftest)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---- sticking the landing on the traced path -------------------------------------------------
def _posterior(make, device, dtype, dim=3):
    zero = torch.zeros(dim, device=device, dtype=dtype)

    def model():
        pyro.sample("x", dist.Normal(zero, 1.0).to_event(1))

    guide = make(model)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return guide, guide.get_posterior()


MAKERS = {"iaf": lambda m: AutoIAF(m, num_layers=2, hidden_dims=(8,), laplace_init=False),
          "planar": lambda m: AutoPlanar(m, num_layers=3, laplace_init=False)}


def _check_entropy(guide, posterior, z, got, dtype):
    """The value and the path gradient (in the guide's parameters, through the draw; the
    parameters themselves are detached in both) of the inverse route."""
    want = posterior.log_prob_detached(z)
    params = list(guide.parameters())
    tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)
    g_got = torch.autograd.grad(got.sum(), params, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want.sum(), params, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_want)
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(g_got, g_want, strict=True):
        a = torch.zeros_like(b) if a is None and b is not None else a
        if b is not None:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("make", sorted(MAKERS))
def test_path_entropy_only_answers_for_the_draw_it_cached(make, device, dtype):
    """Two draws of one posterior before scoring: the first is no longer in the stack's cache,
    so _path_entropy declines (the caller runs the inverse); the second gets the inverse's
    value and z-gradient. An in-place edit of the draw, a parameter update, a draw under
    no_grad and a draw of another posterior object of the same guide all decline too."""
    guide, posterior = _posterior(MAKERS[make], device, dtype)
    z1 = posterior.rsample((4,))
    z2 = posterior.rsample((4,))
    assert _path_entropy(posterior, z1) is None
    got = _path_entropy(posterior, z2)
    assert got is not None and got.shape == (4,)
    _check_entropy(guide, posterior, z2, got, dtype)
    z4 = posterior.rsample((4,)).detach()
    z4.mul_(1.0)
    assert _path_entropy(posterior, z4) is None
    z5 = posterior.rsample((4,))
    with torch.no_grad():
        next(iter(guide.parameters())).add_(0.01)
    assert _path_entropy(posterior, z5) is None
    with torch.no_grad():
        z6 = posterior.rsample((4,))
    assert _path_entropy(posterior, z6) is None
    other = guide.get_posterior()
    z7 = other.rsample((4,))
    got7 = _path_entropy(posterior, z7)  # the same stack: the cache holds z7's base point
    if got7 is not None:
        _check_entropy(guide, posterior, z7, got7, dtype)


@pytest.mark.parametrize("make", sorted(MAKERS))
def test_path_entropy_of_expanded_and_unbatched_draws_is_the_inverse(make, device, dtype):
    """An expanded posterior (what a plate does to the guide's site) and an unbatched draw
    (one particle): the Jacobian route's value and z-gradient are the inverse route's."""
    guide, posterior = _posterior(MAKERS[make], device, dtype)
    expanded = posterior.expand((2, 3))
    z = expanded.rsample()
    got = _path_entropy(expanded, z)
    assert got is not None and got.shape == (2, 3)
    _check_entropy(guide, expanded, z, got, dtype)
    z = posterior.rsample()
    got = _path_entropy(posterior, z)
    assert got is not None and got.shape == ()
    _check_entropy(guide, posterior, z, got, dtype)
    z = posterior.rsample((2,))[0]  # an unbatched tensor that is not the remembered draw
    assert _path_entropy(posterior, z) is None
