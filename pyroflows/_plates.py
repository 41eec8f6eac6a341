r"""Every row of a model's subsampled plate, from runs over windows of its rows.

A model that subsamples a plate (``pyro.plate(name, N, subsample_size=M)``) gives a random
estimate of its log density at every run. Run instead :math:`L = \lceil N/M \rceil` times, the
subsample of run :math:`k` the window :math:`S_k = \{kM, \dots, kM + M - 1\} \bmod N` (the last
window's rows seen before masked out) and the plate's sites weighted :math:`L` in place of the
plate's :math:`N/M`: the mean over the runs is :math:`\log p(z) + \sum_{i=1}^N \ell_i` exactly.
That holds where the latent sites' values are the same in every run: none inside the plate.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = ["WHOLE_DATA_MAX_RUNS", "Window", "describe", "subsampled", "windows"]

#: The most runs :func:`windows` takes to see every row of a subsampled plate.
WHOLE_DATA_MAX_RUNS = 64


class Window(Messenger):
    """One run over a subsampled plate ``name`` of ``size`` rows: the plate's subsample is
    ``positions`` modulo ``size``, its sites weighted ``num_runs`` in place of the plate's
    ``size / M``, and a position past the end (a row an earlier window had) masked out.
    ``window(model)`` is the model under this run."""

    def __init__(self, name: str, positions: Tensor, size: int, num_runs: int) -> None:
        super().__init__()
        self.name, self.indices = name, positions % size
        seen = positions >= size
        self.keep = ~seen if bool(seen.any()) else None  # (decided once, not per site)
        self.weight = num_runs * positions.numel() / size

    def __call__(self, model: Callable) -> Callable:
        return super().__call__(poutine.condition(model, data={self.name: self.indices}))

    def _process_message(self, msg: dict) -> None:
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.name), None)
        if msg["type"] != "sample" or frame is None:
            return
        msg["scale"] = msg["scale"] * self.weight
        if self.keep is not None:
            keep = self.keep.reshape((-1,) + (1,) * (-frame.dim - 1))
            msg["mask"] = keep if msg["mask"] is None else msg["mask"] & keep


def subsampled(trace: Trace) -> list[dict]:
    """The subsample sites of ``trace``'s plates that see fewer rows than they have."""
    return [site for site in trace.nodes.values() if site["type"] == "sample"
            and site_is_subsample(site) and site["fn"].subsample_size is not None
            and site["fn"].subsample_size < site["fn"].size]


def describe(site: dict) -> str:
    """A subsampled plate as ``"'name' (M of N)"``."""
    return f"{site['name']!r} ({site['fn'].subsample_size} of {site['fn'].size})"


def windows(trace: Trace, latent: Container[str]) -> list[Window] | None:
    """The runs that see every row of ``trace``'s subsampled plate: ``[]`` where no plate
    subsamples, ``None`` where no runs do (several subsampled plates, a site named in
    ``latent`` inside one, whose values would be one subsample's, or more than
    :data:`WHOLE_DATA_MAX_RUNS` runs)."""
    sites = subsampled(trace)
    if not sites:
        return []
    names = {site["name"] for site in sites}
    local = any(frame.name in names for name, site in trace.nodes.items()
                if site["type"] == "sample" and name in latent
                for frame in site["cond_indep_stack"])
    if len(sites) > 1 or local:
        return None
    site = sites[0]
    size, part = site["fn"].size, site["fn"].subsample_size
    num_runs = -(-size // part)
    if num_runs > WHOLE_DATA_MAX_RUNS:
        return None
    rows = torch.arange(part, device=site["value"].device)
    return [Window(site["name"], k * part + rows, size, num_runs) for k in range(num_runs)]
