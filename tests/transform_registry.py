"""Every transform of the package, registered once for the conformance suite.

Each entry maps a name to ``(factory, dim)``: ``factory()`` returns a fresh transform with
non-trivial (randomized) parameters in the default dtype; the suite moves it to the device and
dtype under test. Add new transforms here and they are checked by ``test_conformance.py``.
"""

from __future__ import annotations

import pyroflows as pf
from pyroflows.testing import randomize_parameters_

TRANSFORMS: dict = {}


def register(name: str, dim: int):
    def deco(factory):
        TRANSFORMS[name] = (factory, dim)
        return factory

    return deco


def _randomized(t, scale: float = 0.5):
    randomize_parameters_(t, scale=scale, seed=len(TRANSFORMS))
    return t


@register("planar", 4)
def _planar():
    return _randomized(pf.transforms.planar(4), scale=1.0)


@register("planar-1d", 1)
def _planar_1d():
    return _randomized(pf.transforms.planar(1), scale=1.0)


@register("radial", 4)
def _radial():
    return _randomized(pf.transforms.radial(4), scale=1.0)


@register("elementwise-affine", 3)
def _affine():
    return _randomized(pf.transforms.ElementwiseAffine(3))


@register("planar-stack", 3)
def _planar_stack():
    return _randomized(pf.flows.build("planar", 3, num_layers=3, affine=True))
