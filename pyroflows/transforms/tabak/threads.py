"""How many CPU threads Tabak's per-step tensor ops run on: the fit's steps and the fitted
transform's passes are many small elementwise ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["threads_for"]

# Below this many elements per step (n x K), CPU work runs on one thread: per-step ops are too
# small for threads to pay off, and on a loaded machine every threaded op waits for a core.
THREADED_NUMEL = 1 << 20


@contextlib.contextmanager
def threads_for(numel: int, device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread when its per-step ops have fewer than
    ``THREADED_NUMEL`` elements (``numel``); on other devices, or with enough work, as is."""
    old = torch.get_num_threads()
    if device.type != "cpu" or numel >= THREADED_NUMEL or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
