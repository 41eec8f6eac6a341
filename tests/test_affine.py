"""The learnable affine layers keep all their parameters in one tensor: closed forms, views,
gradients, and state dicts / param stores from before the packing."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.params.param_store import param_with_module_name

import pyroflows as pf
from pyroflows.guides import AutoIAF, FlowELBO
from pyroflows.transforms import ElementwiseAffine, TriangularAffine

pytestmark = pytest.mark.usefixtures("fresh_param_store")


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

@pytest.mark.parametrize("cls", [ElementwiseAffine, TriangularAffine])
def test_state_dicts_with_separate_entries_still_load(cls, device, dtype):
    """A state dict saved before the parameters were packed (``loc``, ``log_scale``,
    ``lower`` entries) loads into the packed layer, alone and inside a stack."""
    dim = 4
    loc, log_scale, lower = _values(dim, device, dtype)
    old = {"loc": loc, "log_scale": log_scale}
    if cls is TriangularAffine:
        old["lower"] = lower
    layer = cls(dim).to(device, dtype)
    layer.load_state_dict(old)
    torch.testing.assert_close(layer.loc, loc, rtol=0, atol=0)
    torch.testing.assert_close(layer.log_scale, log_scale, rtol=0, atol=0)
    if cls is TriangularAffine:
        torch.testing.assert_close(layer.lower, lower, rtol=0, atol=0)
    stack = pf.flows.FlowStack([pf.transforms.planar(dim), cls(dim)]).to(device, dtype)
    state = {k: v for k, v in stack.state_dict().items() if not k.startswith("1.")}
    state.update({f"1.{k}": v for k, v in old.items()})
    stack.load_state_dict(state)
    torch.testing.assert_close(stack.parts[1].packed, layer.packed, rtol=0, atol=0)


def _model():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=torch.tensor(1.0))


@pytest.mark.parametrize("full_rank", [False, True])
def test_old_guide_param_stores_and_state_dicts_initialize_new_guides(full_rank):
    """Param-store entries and guide state dicts under the separate names of the affine
    layer (``AutoIAF.affine.loc``, ...) initialize a new guide, and SVI then trains one
    affine tensor."""
    torch.manual_seed(0)
    guide = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 5e-2}), FlowELBO(num_particles=4,
              vectorize_particles=True))
    for _ in range(3):
        svi.step()
    rows = type(guide.affine)._ROWS
    separate = {name: getattr(guide.affine, name).detach().clone() for name in rows}
    state = pyro.get_param_store().get_state()
    key = lambda name: param_with_module_name("AutoIAF.affine", name)  # noqa: E731
    del state["params"][key("packed")], state["constraints"][key("packed")]
    for name, value in separate.items():
        state["params"][key(name)] = value
        state["constraints"][key(name)] = dist.constraints.real
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    fresh = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    fresh()
    torch.testing.assert_close(fresh.affine.packed, guide.affine.packed, rtol=0, atol=0)
    assert [k for k in pyro.get_param_store().keys() if k.startswith("AutoIAF.affine")] == [
        key("packed")]

    old_state = {k: v for k, v in guide.state_dict().items() if k != "affine.packed"}
    old_state.update({f"affine.{name}": value for name, value in separate.items()})
    pyro.clear_param_store()
    other = AutoIAF(_model, num_layers=1, hidden_dims=(8,), full_rank=full_rank,
                    laplace_init=False)
    other()
    other.load_state_dict(old_state)
    torch.testing.assert_close(other.affine.packed, guide.affine.packed, rtol=0, atol=0)
    with pyro.poutine.trace(param_only=True) as params:
        FlowELBO(num_particles=2, vectorize_particles=True).loss_and_grads(_model, other)
    assert [name for name in params.trace.nodes if "affine" in name] == [key("packed")]


@pytest.mark.parametrize("shape", [(7,), (1, 7), (40, 7), (3, 5, 7)])
def test_tril_affine_solve_matches_the_inverse_and_its_gradients(shape, device, dtype):
    """x = L^{-1} (y - mu) for every row of y, whatever its batch shape (one flattened solve
    for a single factor), against the explicit inverse; gradients against the same formula
    through autograd; a transposed (non-contiguous) y, a loc with its own batch dimension
    and a batched factor broadcast like the formula does."""
    from pyroflows.transforms.affine import tril_affine_solve

    dim = shape[-1]
    loc, log_scale, lower = _values(dim, device, dtype)
    tril = torch.tril(lower, -1) * 0.3 + torch.diag(log_scale.exp())
    y = torch.randn(shape, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (loc, tril, y)]
    got = tril_affine_solve(*leaves)
    assert got.shape == y.shape
    refs = [t.clone().requires_grad_() for t in (loc, tril, y)]
    # only the lower triangle is the factor: its upper part gets no gradient
    want = (refs[2] - refs[0]) @ torch.linalg.inv(torch.tril(refs[1])).T
    torch.testing.assert_close(got, want)
    weights = torch.randn(shape, device=device, dtype=dtype)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), leaves),
                    torch.autograd.grad((want * weights).sum(), refs), strict=True):
        torch.testing.assert_close(a, b)

    # a non-contiguous right-hand side: the columns of a (D, N) matrix
    cols = torch.randn(dim, 6, device=device, dtype=dtype)
    torch.testing.assert_close(tril_affine_solve(loc, tril, cols.T),
                               (cols.T - loc) @ torch.linalg.inv(tril).T)
    # loc with a batch dimension of its own broadcasts against y
    locs = torch.randn(4, 1, dim, device=device, dtype=dtype)
    torch.testing.assert_close(tril_affine_solve(locs, tril, y.reshape(-1, dim)),
                               (y.reshape(-1, dim) - locs) @ torch.linalg.inv(tril).T)
    # a batch of factors: one solve per factor
    trils = torch.stack([tril, 2.0 * tril])
    torch.testing.assert_close(
        tril_affine_solve(loc, trils, y.reshape(-1, 1, dim)),
        ((y.reshape(-1, 1, dim) - loc).unsqueeze(-2) @ torch.linalg.inv(trils).mT).squeeze(-2))
