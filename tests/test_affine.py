"""The learnable affine layers keep all their parameters in one tensor: closed forms, views and
gradients; the triangular solve behind the affine layers' inverses against the explicit
inverse."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import ElementwiseAffine, TriangularAffine
from pyroflows.transforms.affine import tril_affine_solve


def _values(dim, device, dtype):
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(dim, generator=gen, dtype=torch.float64)
    log_scale = 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    lower = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (loc, log_scale, lower)]


def test_one_parameter_whose_rows_are_the_named_views(device, dtype):
    """``loc``, ``log_scale`` (and ``lower``) are views of the one parameter ``packed``:
    editing them in place edits it, gradients through them land in it, and the maps are the
    closed forms y = loc + exp(s) * x and y = loc + L x with L = tril(lower, -1) + diag(e^s)."""
    dim = 3
    loc, log_scale, lower = _values(dim, device, dtype)
    x = torch.randn(5, dim, device=device, dtype=dtype)
    for layer in (ElementwiseAffine(dim), TriangularAffine(dim)):
        layer = layer.to(device, dtype)
        assert [name for name, _ in layer.named_parameters()] == ["packed"]
        with torch.no_grad():
            layer.loc.copy_(loc)
            layer.log_scale.copy_(log_scale)
            if isinstance(layer, TriangularAffine):
                layer.lower.copy_(lower)
        if isinstance(layer, TriangularAffine):
            tril = torch.tril(lower, -1) + torch.diag(log_scale.exp())
            want = loc + x @ tril.T
            torch.testing.assert_close(layer.scale_tril, tril)
        else:
            want = loc + log_scale.exp() * x
        y, log_det = layer.forward_and_log_det(x)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(log_det, log_scale.sum().expand(5))
        torch.testing.assert_close(layer.inverse_and_log_det(y)[0], x)
        # the gradient of sum(y) + sum(log_det), by hand, in the rows of ``packed``
        (y.sum() + log_det.sum()).backward()
        col_sums = x.sum(0)
        want_grad = {"loc": torch.full_like(loc, 5.0),
                     "log_scale": log_scale.exp() * col_sums + 5.0,
                     "lower": torch.tril(col_sums.expand(dim, dim), -1)}
        rows = ({"lower": slice(0, dim), "loc": dim, "log_scale": dim + 1}
                if isinstance(layer, TriangularAffine) else {"loc": 0, "log_scale": 1})
        for name, row in rows.items():
            torch.testing.assert_close(layer.packed.grad[row], want_grad[name], msg=name)


@pytest.mark.parametrize("case", ["point", "empty", "one_row", "rows", "batch", "batched_loc",
                                  "expanded", "transposed", "batched_factor"])
def test_tril_affine_solve_against_explicit_inverse(case, device, dtype):
    """x = L^{-1}(y - mu) against (y - mu) @ inv(L)^T, values and gradients in y, mu and L (of
    which only the lower triangle is the factor), whatever the batch shape (one flattened solve
    for a single factor): a (D,) point, an empty batch, one row, rows, a (2, 3) batch, a loc
    with a batch dimension of its own, an expanded (stride-0) y, a transposed
    (non-contiguous) y and a batched factor."""
    d = 4
    gen = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    lead = {"point": (), "empty": (0,), "one_row": (1,), "rows": (5,), "batch": (2, 3),
            "batched_loc": (5,), "expanded": (5,), "transposed": (6,),
            "batched_factor": (5, 3)}[case]
    factor = torch.tril(0.3 * randn(d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    if case == "batched_factor":
        factor = torch.tril(0.3 * randn(3, d, d)) + 2 * torch.eye(d, device=device, dtype=dtype)
    loc = randn(4, 1, d) if case == "batched_loc" else randn(d)
    if case == "expanded":
        y = randn(d)
    elif case == "transposed":
        y = randn(d, *lead)  # the columns of a (D, N) matrix
    else:
        y = randn(*lead, d)
    y, loc, factor = (v.clone().requires_grad_(True) for v in (y, loc, factor))
    if case == "expanded":
        rhs = y.expand(*lead, d)  # stride 0 over the rows
    elif case == "transposed":
        rhs = y.T
    else:
        rhs = y
    got = tril_affine_solve(loc, factor, rhs)
    want = ((rhs - loc).unsqueeze(-2) @ torch.linalg.inv(torch.tril(factor)).mT).squeeze(-2)
    assert got.shape == want.shape
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    weights = randn(*got.shape)
    grads = torch.autograd.grad((got * weights).sum(), (y, loc, factor), allow_unused=True)
    grads_want = torch.autograd.grad((want * weights).sum(), (y, loc, factor),
                                     allow_unused=True)
    for g, w in zip(grads, grads_want, strict=True):  # the factor's upper part gets 0
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, **tol)
