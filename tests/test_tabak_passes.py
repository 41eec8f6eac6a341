"""Tabak's fitted passes against the plain step-by-step maps."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from tabak_reference import plain_passes

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- Tabak's rewritten passes against the plain 1-D maps -------------------------------------
def _tabak_state(dim, k, steps, seed):
    gen = torch.Generator().manual_seed(seed)

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    frames = torch.linalg.qr(torch.randn(steps, dim, dim, generator=gen,
                                         dtype=torch.float64))[0][..., :k]
    gammas = u(steps, k, lo=-0.95, hi=0.95)
    gammas[::3, 0] = 0.0  # identity coordinates, as the fit stores a rejected step
    return {
        "fitted": torch.ones((), dtype=torch.bool), "loc": u(dim, lo=-1, hi=1),
        "scale_tril": torch.tril(u(dim, dim, lo=-0.3, hi=0.3)) + torch.diag(u(dim, lo=0.5,
                                                                             hi=2.0)),
        "frames": frames, "sigmas": u(steps, k, lo=-1.0, hi=0.5),
        "shifts": u(steps, k, lo=-0.5, hi=0.5), "gammas": gammas,
        "centers": u(steps, k, lo=-1.0, hi=1.0), "widths": u(steps, k, lo=0.05, hi=0.5),
    }


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 7)], ids=["point", "empty", "row",
                                                                 "batch"])
@pytest.mark.parametrize("chunked", [False, True])
def test_tabak_passes_shapes_chunks_and_forward_value(shape, chunked, device, dtype,
                                                      monkeypatch):
    """log_prob, forward_and_log_det and forward_value against the plain step-by-step maps on
    a single point, an empty batch, one row and a (2, 7) batch, the rows in one chunk or in
    chunks of 3 (a remainder chunk); forward_value gives forward's points exactly, with the
    same input gradient; the forward map inverts the Gaussianizing one."""
    tabak_module = importlib.import_module("pyroflows.transforms.tabak")

    if chunked:
        monkeypatch.setattr(tabak_module, "_CHUNK_NUMEL", 3 * 2)  # 3 rows of K = 2 per chunk
    dim, k = 3, 2
    state = _tabak_state(dim, k, steps=9, seed=4)
    t = tabak_module.Tabak(dim, subspace_dim=k).double()
    t.load_state_dict(state)
    t = t.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(6)
    x64 = 1.5 * torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
    x = x64.to(device, dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    z_ref, ld_ref = plain_passes(state, x64, inverse=False)
    want_lp = ld_ref - 0.5 * z_ref.square().sum(-1) - 0.5 * dim * math.log(2 * math.pi)
    lp = t.log_prob(x)
    assert lp.shape == x.shape[:-1]
    torch.testing.assert_close(lp.cpu().double(), want_lp, **tol)
    y_ref, yld_ref = plain_passes(state, x64, inverse=True)
    xg = x.clone().requires_grad_(True)
    y, yld = t.forward_and_log_det(xg)
    torch.testing.assert_close(y.detach().cpu().double(), y_ref, **tol)
    torch.testing.assert_close(yld.detach().cpu().double(), yld_ref, **tol)
    xv = x.clone().requires_grad_(True)
    yv = t.forward_value(xv)
    assert yv.shape == x.shape
    assert torch.equal(yv.detach(), y.detach())
    weights = torch.linspace(-1, 1, dim, device=device, dtype=dtype)
    if x.numel():
        (g,) = torch.autograd.grad((y * weights).sum(), xg)
        (gv,) = torch.autograd.grad((yv * weights).sum(), xv)
        x64g = x64.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad((plain_passes(state, x64g, True)[0]
                                        * weights.cpu().double()).sum(), x64g)
        torch.testing.assert_close(gv, g, rtol=0, atol=0)
        torch.testing.assert_close(g.cpu().double(), g_ref, **tol)
    back, _ = t.inverse_and_log_det(y.detach())
    torch.testing.assert_close(back.cpu().double(), x64, **tol)


def test_tabak_gaussianizing_kink_gradient_and_second_order(device, dtype):
    """At a point exactly on a step's center (w = 0: both lerp weights 1/2) and on an identity
    coordinate, log_prob's gradient and a Hessian-vector product (double backward through the
    lerp-selected branches) equal the plain map's."""
    tabak_module = importlib.import_module("pyroflows.transforms.tabak")

    dim = k = 2
    state = _tabak_state(dim, k, steps=1, seed=9)
    state["frames"] = torch.eye(dim, dtype=torch.float64).unsqueeze(0)
    state["scale_tril"] = torch.eye(dim, dtype=torch.float64)
    state["loc"] = torch.zeros(dim, dtype=torch.float64)
    state["gammas"][0] = torch.tensor([0.6, 0.0], dtype=torch.float64)
    state["centers"][0] = torch.tensor([0.0, 0.25], dtype=torch.float64)
    t = tabak_module.Tabak(dim).double()
    t.load_state_dict(state)
    t = t.to(device=device, dtype=dtype)
    x64 = torch.tensor([[0.0, 0.25], [0.0, -0.4], [0.3, 0.25]], dtype=torch.float64)
    v = torch.tensor([0.7, -0.3], dtype=torch.float64)

    def grad_and_hvp(fn, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v.to(x)).sum(), x)
        return g.detach(), h

    def plain_lp(x):
        z, ld = plain_passes(state, x, inverse=False)
        return ld - 0.5 * z.square().sum(-1)

    g, h = grad_and_hvp(t.log_prob, x64.to(device, dtype))
    g_ref, h_ref = grad_and_hvp(plain_lp, x64)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    torch.testing.assert_close(g.cpu().double(), g_ref, **tol)
    torch.testing.assert_close(h.cpu().double(), h_ref, **tol)
