"""The conformance suite: every registered transform against independent truth."""

from __future__ import annotations

import pytest
import torch
from transform_registry import TRANSFORMS

from pyroflows import testing

CHECKS = {
    "shapes": testing.check_shapes,
    "round_trips": testing.check_round_trips,
    "log_det": testing.check_log_det,
    "gradients": testing.check_gradients,
    "stale_cache": testing.check_stale_cache,
    "deepcopy": testing.check_deepcopy,
    "bad_input": testing.check_bad_input,
    "transformed_distribution": testing.check_transformed_distribution,
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_conformance(name, check, device, dtype):
    factory, dim = TRANSFORMS[name]
    t = factory().to(device=device, dtype=dtype)
    CHECKS[check](t, dim, device=device, dtype=dtype)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_save_load(name, device, dtype):
    factory, dim = TRANSFORMS[name]
    testing.check_save_load(factory().to(device=device, dtype=dtype), dim, factory, device, dtype)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_float32_use(name, device):
    """Whatever the suite's dtype, every transform also works end to end in float32."""
    factory, dim = TRANSFORMS[name]
    t = factory().to(device=device, dtype=torch.float32)
    x = torch.randn(7, dim, device=device)
    y = t(x)
    assert y.dtype == torch.float32 and y.device == x.device
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.dtype == torch.float32 and torch.isfinite(ladj).all()
    torch.testing.assert_close(t.inv(y.clone()), x, rtol=1e-3, atol=1e-3)
