"""Conditional planar and radial layers (seed eq. 27-31) over a batch of contexts, against
independent truth: the conformance suite of :mod:`pyroflows.testing` (round trips, log-det
against the autograd Jacobian per row, gradients, save/load, stale cache across contexts, a
bad context), per-row equality with the plain layer holding that row's parameters, finite
difference gradients to the network and the context, broadcasting, saturating outputs."""

from __future__ import annotations

import pytest
import torch

import pyroflows as pf
from pyroflows import testing

DIM, CONTEXT = 3, 2
FAMILIES = {
    "planar": (pf.transforms.conditional_planar, pf.transforms.Planar),
    "radial": (pf.transforms.conditional_radial, pf.transforms.Radial),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def _layer(family, device, dtype, hidden_dims=(8,), scale=0.3, seed=0):
    layer = FAMILIES[family][0](DIM, CONTEXT, hidden_dims=hidden_dims).to(device, dtype)
    if scale:
        testing.randomize_parameters_(layer, scale=scale, seed=seed)
    return layer


def test_conformance(family, device, dtype):
    testing.check_conditional_transform(
        lambda: FAMILIES[family][0](DIM, CONTEXT, hidden_dims=(8,)), DIM, CONTEXT,
        device=device, dtype=dtype)
