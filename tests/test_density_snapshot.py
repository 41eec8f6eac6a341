"""DensityEstimator's snapshot of its best state."""

from __future__ import annotations

import math

import torch

from pyroflows.density import _snapshot


# ---- DensityEstimator snapshot -----------------------------------------------------------------
def test_snapshot_clones_shared_tensors_once_and_keeps_distinct_views_apart():
    """Keys holding the same tensor share one clone; two different views of one storage
    (other offset or stride) stay distinct and keep their own values; the snapshot does not
    follow later edits of the module."""
    module = torch.nn.Module()
    base = torch.arange(12.0)
    module.register_buffer("a", base.view(3, 4))
    module.register_buffer("a_again", base.view(3, 4))
    module.register_buffer("row", base[4:8])
    module.register_buffer("col", base.view(3, 4)[:, 1])
    module.register_buffer("empty1", torch.zeros(0))
    module.register_buffer("empty2", torch.zeros(0, dtype=torch.float64))
    snap = _snapshot(module)
    assert snap["a"] is snap["a_again"]
    assert snap["row"] is not snap["a"] and snap["col"] is not snap["a"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(snap[key], value)
        assert snap[key].dtype == value.dtype
    base.add_(100.0)
    assert float(snap["a"][0, 0]) == 0.0 and float(snap["col"][2]) == 9.0
    assert math.isclose(float(snap["row"][0]), 4.0)
