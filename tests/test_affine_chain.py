"""The fused affine chain against the layers' plain operations and torch.func, on layer mixes that
built stacks never make."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import pyroflows as pf
from pyroflows import testing
from pyroflows.flows import FlowStack
from pyroflows.nn import MADE
from pyroflows.nn.made import stacked_mades
from pyroflows.transforms.autoregressive import affine_chain


# ---- the fused affine chain ---------------------------------------------------------------------
class _SubMADE(MADE):
    """A MADE subclass: the chain reads it through its attributes, not its dictionaries."""


def _layers(device, dtype) -> dict[str, list]:
    """Layers of several kinds, randomized: a MAF bank of 3 rows, a RealNVP bank of 2 rows,
    an IAF bank of 2 rows, a MAF and an IAF layer with networks of their own, and a MAF layer
    whose network is a MADE subclass."""
    out = {}
    for name, family, num in [("maf", "maf", 3), ("realnvp", "realnvp", 2), ("iaf", "iaf", 2),
                              ("realnvp_full", "realnvp", 2)]:
        stack = pf.flows.build(family, 4, num_layers=num, hidden_dims=(8, 8))
        out[name] = list(stack.parts)
    for layer in out["realnvp"]:  # the compact coupling path (conditioning half only) at D = 4
        layer.compact_min_dim = 1
        assert layer.coupling_halves is not None
    # one bank whose rows are a coupling layer's network and a MAF layer's network
    mixed = [pf.transforms.realnvp(4, hidden_dims=(8, 8)), pf.transforms.maf(4, hidden_dims=(8, 8))]
    mixed[0].compact_min_dim = 1
    for layer, row in zip(mixed, stacked_mades([m.conditioner for m in mixed]), strict=True):
        layer.conditioner = row
    assert mixed[0].coupling_halves is not None
    out["mixed_bank"] = mixed
    out["maf_own"] = [pf.transforms.maf(4, hidden_dims=(8, 8), order=[2, 0, 3, 1])]
    out["iaf_own"] = [pf.transforms.iaf(4, hidden_dims=(8, 8))]
    sub = pf.transforms.maf(4, hidden_dims=(8, 8))
    sub.conditioner = _SubMADE(4, (8, 8), order=sub.conditioner.degrees.tolist())
    out["maf_sub"] = [sub]
    for seed, layers in enumerate(out.values()):
        for layer in layers:
            testing.randomize_parameters_(layer, scale=0.4, seed=10 + seed)
            layer.to(device=device, dtype=dtype)
    return out


def _params(layers) -> list[Tensor]:
    seen, out = set(), []
    for layer in layers:
        for p in layer.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out


def _plain_chain(x, layers, inverse, log_det=None):
    for layer in layers:
        x, ld = layer.plain_map(x, inverse)
        log_det = ld if log_det is None else log_det + ld
    return x, log_det


def _grads(fn, x, log_det, layers, inverse, weights):
    """Values and the gradients of a fixed scalar of (image, log-det) with respect to the
    inputs that require grad and every parameter (zeros where unused)."""
    y, ld = fn(x, layers, inverse, log_det)
    loss = (y.sin() * weights[0]).sum() + (ld * weights[1]).sum()
    inputs = [t for t in (x, log_det) if t is not None and t.requires_grad] + _params(layers)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else []
    return [y.detach(), ld.detach()] + [
        torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]


def _fused(x, layers, inverse, log_det=None):
    kinds = [layer.fused_kind(inverse) for layer in layers]
    assert None not in kinds, "a layer the fused chain does not take"
    return affine_chain(x, layers, kinds, log_det)


def _plain(x, layers, inverse, log_det=None):
    return _plain_chain(x, layers, inverse, log_det)


def _assert_chain_matches(layers, inverse, device, dtype, x_grad=True, log_det=None, batch=(5,)):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*batch, 4, generator=gen, dtype=torch.float64).to(device, dtype)
    x.requires_grad_(x_grad)
    weights = (torch.rand(*batch, 4, generator=gen, dtype=torch.float64).to(device, dtype),
               torch.rand(batch, generator=gen, dtype=torch.float64).to(device, dtype))
    got = _grads(_fused, x, log_det, layers, inverse, weights)
    want = _grads(_plain, x, log_det, layers, inverse, weights)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))
    return got


CHAINS = {
    # name: (layer picks as (group, index), inverse)
    "maf-bank-then-realnvp-bank": ([("maf", 0), ("maf", 1), ("maf", 2), ("realnvp", 0),
                                    ("realnvp", 1)], True),
    "realnvp-rows-reversed-between-maf-rows": ([("maf", 2), ("realnvp", 1), ("realnvp", 0),
                                                ("maf", 0)], True),
    "bank-rows-shuffled-and-repeated": ([("maf", 1), ("maf", 2), ("maf", 0), ("maf", 2),
                                         ("maf", 1)], True),
    "one-row-alone-among-own-networks": ([("maf_own", 0), ("maf", 1), ("maf_sub", 0),
                                          ("realnvp", 1)], True),
    "partial-bank-and-subclass": ([("maf", 2), ("maf", 0), ("maf_sub", 0)], True),
    "iaf-forward-mixed": ([("iaf", 1), ("realnvp", 0), ("iaf_own", 0), ("iaf", 0),
                           ("realnvp", 1)], False),
    "realnvp-forward-alone": ([("realnvp", 0), ("realnvp", 1)], False),
    "realnvp-full-width-and-compact": ([("realnvp_full", 1), ("realnvp", 0), ("realnvp_full", 0),
                                        ("realnvp", 1)], True),
    "coupling-and-maf-rows-of-one-bank": ([("maf", 0), ("mixed_bank", 1), ("mixed_bank", 0),
                                           ("maf", 1)], True),
    "coupling-row-first-in-mixed-bank": ([("mixed_bank", 0), ("mixed_bank", 1)], True),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain_of_mixed_layers_matches_plain_operations(name, device, dtype):
    """Values, log-dets and every gradient (input, each bank, each own network) of the fused
    chain over mixes of banks, rows in any order (repeated, partial, alone), own networks and
    a MADE subclass, equal those of the plain operations of the same layers."""
    layers = _layers(device, dtype)
    picks, inverse = CHAINS[name]
    _assert_chain_matches([layers[g][i] for g, i in picks], inverse, device, dtype)


@pytest.mark.parametrize("case", ["bank-frozen", "own-frozen", "x-no-grad", "log-det-given",
                                  "log-det-given-no-grad", "nothing-needs-grad", "batch-2d",
                                  "one-point"])
def test_fused_chain_gradients_of_what_requires_grad(case, device, dtype):
    """The hand-written backward returns gradients for exactly the inputs that need them
    (``needs_input_grad``): a frozen bank or network, an input without grad, a given log-det
    with or without grad (broadcast over a batch), one unbatched point, and a chain where
    nothing needs grad (no autograd node)."""
    layers = _layers(device, dtype)
    chain = [layers["maf"][1], layers["maf"][0], layers["maf_own"][0], layers["realnvp"][0],
             layers["realnvp"][1]]
    x_grad, log_det, batch = True, None, (5,)
    if case == "bank-frozen":
        layers["maf"][0].conditioner.stacked.flat_parameters.requires_grad_(False)
    elif case == "own-frozen":
        layers["maf_own"][0].conditioner.flat_parameters.requires_grad_(False)
        layers["realnvp"][0].conditioner.stacked.flat_parameters.requires_grad_(False)
    elif case == "x-no-grad":
        x_grad = False
    elif case.startswith("log-det-given"):
        log_det = torch.linspace(-1.0, 1.0, 5, device=device, dtype=dtype)
        log_det.requires_grad_(case == "log-det-given")
    elif case == "nothing-needs-grad":
        x_grad = False
        for layer in chain:
            for p in layer.parameters():
                p.requires_grad_(False)
        x = torch.randn(5, 4, device=device, dtype=dtype)
        y, ld = _fused(x, chain, True)
        assert y.grad_fn is None and ld.grad_fn is None
        want = _plain(x, chain, True)
        torch.testing.assert_close(y, want[0], **testing.tolerances(dtype))
        torch.testing.assert_close(ld, want[1], **testing.tolerances(dtype))
    elif case == "batch-2d":
        batch = (2, 3)
        log_det = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)  # broadcast
    elif case == "one-point":  # x of shape (D,): a log-det of shape ()
        batch = ()
        log_det = torch.tensor(0.5, device=device, dtype=dtype, requires_grad=True)
    if case != "nothing-needs-grad":
        _assert_chain_matches(chain, True, device, dtype, x_grad=x_grad, log_det=log_det,
                              batch=batch)


def test_fused_chain_non_contiguous_bank_with_a_row_alone(device, dtype):
    """A bank stored column by column, read whole (a run of its rows), by a partial run and
    by a row alone, in one chain: the plain operations' values and gradients."""
    layers = _layers(device, dtype)
    bank = layers["maf"][0].conditioner.stacked
    with torch.no_grad():
        bank.flat_parameters = torch.nn.Parameter(bank.flat_parameters.t().contiguous().t())
    assert not bank.flat_parameters.is_contiguous()
    chain = [layers["maf"][2], layers["maf"][1], layers["maf_own"][0], layers["maf"][0],
             layers["realnvp"][1], layers["maf"][1]]
    _assert_chain_matches(chain, True, device, dtype)


def test_fused_chain_against_torch_func_vjp(device, dtype):
    """``torch.func.vjp`` (the chain steps aside for the plain operations under it) gives the
    vector-Jacobian products that the fused backward gives, for the input and the banks."""
    layers = _layers(device, dtype)
    chain = [layers["maf"][0], layers["maf"][2], layers["realnvp"][1], layers["maf_own"][0]]
    params = {id(p): p for p in _params(chain)}
    names = list(params)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    gy = torch.randn(6, 4, device=device, dtype=dtype)
    gld = torch.randn(6, device=device, dtype=dtype)

    def fn(x, *flat):
        swapped = dict(zip(names, flat, strict=True))
        with torch.nn.utils.stateless._reparametrize_module(
                torch.nn.ModuleList(chain),
                {name: swapped[id(p)] for name, p in
                 torch.nn.ModuleList(chain).named_parameters(remove_duplicate=False)}):
            return _fused(x, chain, True)

    primals = [params[n].detach() for n in names]
    (y, ld), vjp = torch.func.vjp(fn, x, *primals)
    want = vjp((gy, gld))
    xr = x.clone().requires_grad_(True)
    y2, ld2 = _fused(xr, chain, True)
    got = torch.autograd.grad((y2 * gy).sum() + (ld2 * gld).sum(), [xr, *params.values()])
    tol = testing.tolerances(dtype)
    torch.testing.assert_close(y2.detach(), y, **tol)
    torch.testing.assert_close(ld2.detach(), ld, **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_chain_refuses_double_backward(device, dtype):
    """Second derivatives through the fused chain raise instead of returning wrong values."""
    layers = _layers(device, dtype)
    chain = [layers["maf"][0], layers["maf"][1]]
    x = torch.randn(3, 4, device=device, dtype=dtype, requires_grad=True)
    y, ld = _fused(x, chain, True)
    (gx,) = torch.autograd.grad(ld.sum() + y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("family", ["maf", "iaf", "realnvp"])
def test_stack_with_gated_layers_fused_equals_plain(family, device, dtype):
    """A stack mixing gated layers (which the fused chain does not take) with bank rows and a
    network of its own: the fused stack's values and gradients are the plain stack's."""
    flow = pf.flows.build(family, 4, num_layers=3, hidden_dims=(8,))
    make = {"maf": pf.transforms.maf, "iaf": pf.transforms.iaf}.get(family)
    extra = (make(4, hidden_dims=(8,), gated=True) if make is not None
             else pf.transforms.realnvp(4, hidden_dims=(8,)))
    parts = [flow.parts[0], extra, flow.parts[2], flow.parts[1]]
    stack = FlowStack(parts)
    testing.randomize_parameters_(stack, scale=0.4, seed=3)
    stack = stack.to(device, dtype)
    inverse = family == "maf"
    x = torch.randn(5, 4, device=device, dtype=dtype)
    results = []
    for fused in (True, False):
        stack.fused = fused
        stack.clear_cache()
        xv = x.clone().requires_grad_(True)
        y, ld = stack.inverse_and_log_det(xv) if inverse else stack.forward_and_log_det(xv)
        params = list(stack.parameters())
        grads = torch.autograd.grad(y.sin().sum() + ld.sum(), [xv, *params])
        results.append([y.detach(), ld.detach(), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))


def _jacobian_log_det(fn, x: Tensor) -> Tensor:
    """``log|det d fn / dx|`` of a map of one (D,) point, from autograd."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.slogdet(jac)[1]


def test_layer_whose_activation_is_a_plain_function(device, dtype):
    """A MADE built with an activation that makes a plain function (``lambda: torch.tanh``,
    not a module: it is kept as an attribute, outside ``_modules``) runs the plain operations,
    as before the fused kernels read the activation from ``_modules``, with the log-det of
    its autograd Jacobian."""
    layer = pf.transforms.maf(3, hidden_dims=(8,), activation=lambda: torch.tanh)
    testing.randomize_parameters_(layer, scale=0.4, seed=1)
    layer = layer.to(device, dtype)
    assert not layer.conditioner.supports_fused and layer.fused_kind(True) is None
    x = torch.randn(4, 3, device=device, dtype=dtype)
    z, log_det = layer.inverse_and_log_det(x)
    for i in range(4):
        want = -_jacobian_log_det(lambda v: layer.inverse_and_log_det(v)[0], x[i])
        torch.testing.assert_close(log_det[i], want, **testing.tolerances(dtype))


def test_fused_chain_reads_parameters_kept_as_plain_tensors(device, dtype):
    """Networks and banks whose ``flat_parameters`` is a plain tensor attribute computed from
    another tensor (a hypernetwork's output, a hand-made reparametrization: not in
    ``_parameters``) run through the fused chain with the values and gradients (into the
    tensor they come from) of the plain operations."""
    layers = _layers(device, dtype)
    own = layers["maf_own"][0].conditioner
    bank = layers["maf"][0].conditioner.stacked
    sources = []
    for module in (own, bank):
        source = module.flat_parameters.detach().clone().requires_grad_(True)
        del module.flat_parameters
        module.flat_parameters = source * 1.5  # not a Parameter: an attribute
        sources.append(source)
    chain = [layers["maf"][0], layers["maf"][2], layers["maf_own"][0], layers["maf"][1]]
    x = torch.randn(5, 4, device=device, dtype=dtype)
    results = []
    for fn in (_fused, _plain):
        for module, source in zip((own, bank), sources, strict=True):
            module.flat_parameters = source * 1.5  # a fresh graph for each run
        y, ld = fn(x, chain, True)
        grads = torch.autograd.grad(y.sin().sum() + ld.sum(), sources)
        results.append([y.detach(), ld.detach(), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **testing.tolerances(dtype))
