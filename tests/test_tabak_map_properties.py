"""Property-based tests (Hypothesis) of the 1-D monotone map of seed eq. 25 and its inverse
(``pyroflows.transforms.tabak.map``) over its parameters up to the edges of its domain
(:math:`\\sigma < 1`, :math:`|\\gamma| < 1`, :math:`\\epsilon > 0`), in float32 and float64:
finite, monotone, an exact inverse, the log-slope of autograd's derivative, finite gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyroflows.transforms.tabak import map_1d, map_1d_inverse

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
DTYPES = [torch.float32, torch.float64]


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# (sigma, shift, gamma, center, width): the extremes of each, the fit's safe region inside.
PARAMS = st.tuples(
    st.one_of(_floats(-20.0, 0.99), st.sampled_from([-20.0, -1.0, 0.5, 0.99])),
    _floats(-50.0, 50.0),
    st.one_of(_floats(-0.99, 0.99), st.sampled_from([-0.99, -0.95, 0.0, 0.95, 0.99])),
    _floats(-50.0, 50.0),
    st.one_of(_floats(1e-3, 100.0), st.sampled_from([1e-3, 100.0])),
)


def _grid(params, dtype):
    """The parameters as (1,) tensors and points around the kink at x_0 / (1 - sigma), out to
    far in both tails."""
    sigma, shift, gamma, center, width = params
    kink = center / (1 - sigma)
    scale = width / (1 - sigma)
    offsets = torch.tensor([-1e3, -30.0, -3.0, -1.0, -0.1, 0.0, 0.1, 1.0, 3.0, 30.0, 1e3],
                           dtype=torch.float64)
    x = (kink + scale * offsets).unsqueeze(-1)
    x = torch.cat([x, torch.linspace(-100, 100, 41, dtype=torch.float64).unsqueeze(-1)])
    x = torch.sort(x.to(dtype), dim=0).values
    return x, [torch.tensor([p], dtype=dtype) for p in params]


def _slope_floor(params):
    """The smallest slope of the map, (1 - sigma)(1 - |gamma|)."""
    sigma, _, gamma, _, _ = params
    return (1 - sigma) * (1 - abs(gamma))


def _reference(x, params, dtype):
    """phi(x) in float64 as written in seed eq. 25, and its derivative from autograd, at the
    parameters as rounded to ``dtype``."""
    sigma, shift, gamma, center, width = (torch.tensor(p, dtype=dtype).double() for p in params)
    x = x.detach().to(torch.float64).requires_grad_(True)
    y = (1 - sigma) * x + shift + gamma * torch.sqrt(width**2 + ((1 - sigma) * x - center)**2)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), dy


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(params=PARAMS)
def test_map_is_finite_monotone_and_its_log_slope_is_autograds(params, dtype):
    x, p = _grid(params, dtype)
    y, log_slope = map_1d(x, *p)
    assert torch.isfinite(y).all() and torch.isfinite(log_slope).all()
    assert (y[1:] >= y[:-1]).all()  # x is sorted: monotone
    eps = torch.finfo(dtype).eps
    ref_y, ref_dy = _reference(x, params, dtype)
    size = ref_y.abs() + x.double().abs() * (1 + abs(params[0])) + abs(params[3]) + params[4]
    assert ((y.double() - ref_y).abs() <= 8 * eps * (size + 1)).all()
    # w = (1 - sigma) x - x_0 is rounded to ~eps ((1 - sigma)|x| + |x_0|), and the log-slope
    # changes by at most 1 / (epsilon (1 - |gamma|)) per unit of w. (autograd's derivative
    # cancels in 1 + gamma w / r near |gamma| = 1; the log-slope must not.)
    sigma, _, gamma, center, width = params
    w_error = ((1 - sigma) * x.double().abs() + abs(center)) / width
    tol = 16 * eps * (1 + w_error) / (1 - abs(gamma))
    assert ((log_slope.double() - ref_dy.log()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(params=PARAMS)
def test_inverse_round_trips_and_gives_the_slope_at_the_preimage(params, dtype):
    x, p = _grid(params, dtype)
    y, log_slope = map_1d(x, *p)
    x_back, log_slope_back = map_1d_inverse(y, *p)
    assert torch.isfinite(x_back).all() and torch.isfinite(log_slope_back).all()
    eps = torch.finfo(dtype).eps
    # y is known to ~eps |y|; the inverse divides that by the slope.
    size = y.double().abs() + abs(params[1]) + abs(params[3]) + params[4] + x.double().abs()
    tol = 16 * eps * size / _slope_floor(params)
    assert ((x_back.double() - x.double()).abs() <= tol).all()
    tol_log = 16 * eps / (1 - abs(params[2])) + 64 * eps * size / (_slope_floor(params) * params[4])
    assert ((log_slope_back.double() - log_slope.double()).abs() <= tol_log).all()


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(params=PARAMS)
def test_gradients_are_finite_in_both_directions(params, dtype):
    x, p = _grid(params, dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, *p)]
    for fn in (map_1d, map_1d_inverse):
        out, log_slope = fn(*leaves)
        grads = torch.autograd.grad((out.sum() + log_slope.sum()), leaves)
        for g in grads:
            assert torch.isfinite(g).all()
