"""The triangular solve behind the affine layers' inverses, against the explicit inverse."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


# ---- the flattened triangular solve against the explicit inverse -----------------------------
@pytest.mark.parametrize("case", ["point", "empty", "rows", "batch", "batched_loc", "expanded",
                                  "batched_factor"])
def test_tril_affine_solve_against_explicit_inverse(case, device, dtype):
    """x = L^{-1}(y - mu) against (y - mu) @ inv(L)^T, values and gradients in y, mu and L,
    for a (D,) point, an empty batch, rows, a (2, 3) batch, a batched loc, an expanded
    (stride-0) y and a batched factor."""
    from pyroflows.transforms.affine import tril_affine_solve

    d = 4
    gen = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    lead = {"point": (), "empty": (0,), "rows": (5,), "batch": (2, 3), "batched_loc": (5,),
            "expanded": (5,), "batched_factor": (5, 3)}[case]
    factor = torch.tril(0.3 * randn(d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    if case == "batched_factor":
        factor = torch.tril(0.3 * randn(3, d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    loc = randn(5, d) if case == "batched_loc" else randn(d)
    y = randn(d) if case == "expanded" else randn(*lead, d)
    y, loc, factor = (v.clone().requires_grad_(True) for v in (y, loc, factor))
    rhs = y.expand(*lead, d) if case == "expanded" else y  # stride 0 over the rows
    got = tril_affine_solve(loc, factor, rhs)
    want = ((rhs - loc).unsqueeze(-2) @ torch.linalg.inv(factor).mT).squeeze(-2)
    assert got.shape == want.shape
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    weights = randn(*got.shape)
    grads = torch.autograd.grad((got * weights).sum(), (y, loc, factor), allow_unused=True)
    grads_want = torch.autograd.grad((want * weights).sum(), (y, loc, factor),
                                     allow_unused=True)
    for g, w in zip(grads, grads_want, strict=True):
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(torch.tril(g) if g.shape == factor.shape else g,
                                   torch.tril(w) if w.shape == factor.shape else w, **tol)
