"""The fitted Tabak map written out step by step with the plain formulas of seed eq. 25, written
here and not taken from the package: the reference that the fitted transform's passes (chunked
rows, fused branches, fewer logarithms) are checked against in test_tabak.py."""

from __future__ import annotations

import torch


def plain_map(x, sigma, shift, gamma, center, width):
    """phi(x) = (1 - sigma) x + phi_0 + gamma sqrt(eps^2 + w^2), w = (1 - sigma) x - x_0, and
    log phi'(x) = log(1 - sigma) + log(1 + gamma w / r), r = sqrt(eps^2 + w^2)."""
    w = (1 - sigma) * x - center
    r = torch.sqrt(width**2 + w**2)
    return (1 - sigma) * x + shift + gamma * r, torch.log(1 - sigma) + torch.log1p(gamma * w / r)


def plain_map_inverse(y, sigma, shift, gamma, center, width):
    """phi^{-1}(y) from the root w = (c - gamma S) / (1 - gamma^2) of w + gamma sqrt(eps^2 +
    w^2) = c, c = y - phi_0 - x_0, S = sqrt(c^2 + (1 - gamma^2) eps^2), and log phi' there."""
    c = y - shift - center
    s = torch.sqrt(c**2 + (1 - gamma**2) * width**2)
    w = (c - gamma * s) / (1 - gamma**2)
    r = torch.sqrt(width**2 + w**2)
    return (w + center) / (1 - sigma), torch.log(1 - sigma) + torch.log1p(gamma * w / r)


def plain_passes(state, x, inverse):
    """The fitted map written out with the plain 1-D maps, step by step (float64): the
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
            c_new, log_slope = plain_map(c, *(p[t] for p in params))
            z = z + (c_new - c) @ frames[t].mT
            log_det = log_det + log_slope.sum(-1)
        return z, log_det + whiten_ld
    z = x
    for t in reversed(range(frames.shape[0])):
        c = z @ frames[t]
        c_new, log_slope = plain_map_inverse(c, *(p[t] for p in params))
        z = z + (c_new - c) @ frames[t].mT
        log_det = log_det - log_slope.sum(-1)
    return state["loc"] + z @ tril.mT, log_det - whiten_ld
