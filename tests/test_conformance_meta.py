"""The conformance suite must catch broken transforms: a wrong log-det, a broken inverse, a
stale cache. Each broken transform below must fail the matching check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyroflows import testing
from pyroflows.transforms import FlowTransform, Planar


class WrongLogDet(Planar):
    def forward_and_log_det(self, x):
        y, ld = super().forward_and_log_det(x)
        return y, 1.01 * ld


class BrokenInverse(Planar):
    def inverse_and_log_det(self, y):
        x, ld = super().inverse_and_log_det(y)
        return x + 1e-3, ld


class StaleCache(FlowTransform):
    """Caches by input identity only, like Pyro's transforms (Pyro issue #2564)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.shift = nn.Parameter(torch.zeros(dim))
        self._ident = None

    def forward_and_log_det(self, x):
        return x + self.shift, x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y):
        return y - self.shift, y.new_zeros(y.shape[:-1])

    def __call__(self, x):
        if self._ident is not None and self._ident[0] is x:
            return self._ident[1]
        y = super().__call__(x)
        self._ident = (x, y)
        return y


def _make(cls, dim=3):
    t = cls(dim).double()
    testing.randomize_parameters_(t, scale=1.0)
    return t


@pytest.mark.parametrize(
    "cls, check",
    [
        (WrongLogDet, testing.check_log_det),
        (BrokenInverse, testing.check_round_trips),
        (StaleCache, testing.check_stale_cache),
    ],
)
def test_suite_catches_broken_transforms(cls, check):
    with pytest.raises(AssertionError):
        check(_make(cls), 3)


def test_suite_passes_the_unbroken_planar():
    testing.check_transform(lambda: _make(Planar), 3)
