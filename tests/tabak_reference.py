"""The fitted Tabak map written out step by step with the public 1-D maps: the reference that the
fast passes (chunked rows, fused branches, fewer logarithms) are checked against in
test_tabak.py and test_session_review.py."""

from __future__ import annotations

import torch

from pyroflows.transforms.tabak import map_1d, map_1d_inverse


def plain_passes(state, x, inverse):
    """The fitted map written out with the public 1-D maps, step by step (float64): the
    Gaussianizing G and log|det dG/dx| (``inverse=False``, ``x`` in data space), or G^{-1} and
    log|det dG^{-1}/dz| (``inverse=True``, ``x`` in the Gaussian space)."""
    frames = state["frames"]
    params = [state[name] for name in ("sigmas", "shifts", "gammas", "centers", "widths")]
    tril = state["scale_tril"]
    whiten_ld = -torch.log(torch.diagonal(tril)).sum()
    log_det = torch.zeros(x.shape[:-1], dtype=torch.float64)
    if not inverse:
        z = (x - state["loc"]) @ torch.linalg.inv(tril).mT
        for t in range(frames.shape[0]):
            c = z @ frames[t]
            c_new, log_slope = map_1d(c, *(p[t] for p in params))
            z = z + (c_new - c) @ frames[t].mT
            log_det = log_det + log_slope.sum(-1)
        return z, log_det + whiten_ld
    z = x
    for t in reversed(range(frames.shape[0])):
        c = z @ frames[t]
        c_new, log_slope = map_1d_inverse(c, *(p[t] for p in params))
        z = z + (c_new - c) @ frames[t].mT
        log_det = log_det - log_slope.sum(-1)
    return state["loc"] + z @ tril.mT, log_det - whiten_ld
