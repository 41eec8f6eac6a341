"""Stack builders: one function turns a family name into a ready-to-train flow."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import transforms as T
from .._checks import whole_number
from ..nn.made import MADE
from ..transforms.autoregressive import AffineAutoregressiveCore
from .banks import stacked_mades
from .conditional import ConditionalFlowStack
from .families import FAMILIES
from .stack import FlowStack

__all__ = ["build"]


def build(name: str, dim: int, num_layers: int = 5, hidden_dims: Sequence[int] | None = None,
          permutation: str = "reverse", affine: bool = False, compile: bool | str = False,
          context_dim: int | None = None, shared_network: bool | None = None,
          **layer_kwargs) -> FlowStack | ConditionalFlowStack:
    """Build a :class:`FlowStack` of ``num_layers`` layers of one family, or with
    ``context_dim`` a :class:`ConditionalFlowStack` of its conditional layers.

    Families whose layers see part of the coordinates at a time (IAF, MAF, RealNVP) get a fixed
    permutation between layers, folded into the next layer's order or mask (a family without
    ``fold``: :class:`~pyroflows.transforms.Permute` layers); RealNVP alternates complementary
    masks. Planar and radial layers share one bank of parameters, and runs of same-size MADE
    networks one (:mod:`pyroflows.flows.banks`); state dicts with per-layer keys load too.

    With ``context_dim = C`` the layers are the family's ``conditional_layer`` (seed eq. 27:
    each layer's parameters, or its conditioner's input, a network of the context), with the
    same permutations, folds and complementary masks; ``cflow.condition(c)`` (``c`` of shape
    (..., C)) is a :class:`FlowStack`; ``compile`` is not available for it. Conditional IAF,
    MAF, RealNVP and NSF layers keep their own networks (no banks). Planar and radial stacks
    (the families with ``Family.shared_network``) get one network of the context that outputs
    all K layers' parameters, unless ``shared_network=False``: Rezende & Mohamed's inference
    network (:class:`~pyroflows.transforms.ConditionalPlanar` with ``num_layers``). For
    K = 16 it has about a sixth of the parameters of K networks, it runs the K maps as one
    fused node, and it fitted the amortized benchmark's VAE as well as K networks did
    (``benchmarks/results/amortized.md``).

    Arguments:
        name: one of ``pyroflows.flows.FAMILIES``: planar, radial, iaf, maf, realnvp, and any
            family registered with :func:`register_family`.
        dim: the event size D.
        num_layers: the number of flow layers.
        hidden_dims: conditioner hidden sizes, for families that have a network.
        permutation: ``"reverse"`` or ``"random"`` (seeded by the layer's index: reproducible).
        affine: append a learnable :class:`~pyroflows.transforms.ElementwiseAffine` last.
        compile: run the stack through :func:`torch.compile` (see :class:`FlowStack`).
        context_dim: the context size C: a conditional stack (a :class:`ValueError` for a
            family without a conditional layer).
        shared_network: with ``context_dim``, one network for every layer's parameters
            (default: the family's ``shared_network``; ``True`` for a family whose
            conditional layer cannot share one is a :class:`ValueError`); ``False``: one
            network per layer, as Pyro's conditional layers.
        layer_kwargs: passed to every layer's constructor.

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("planar", 2, num_layers=4)
        >>> flow(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> maf = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(16, 16))
        >>> [layer.conditioner.degrees.tolist() for layer in maf.parts]
        [[1, 2, 3], [3, 2, 1], [1, 2, 3]]
        >>> from pyro.distributions.transforms import conditional_planar
        >>> pf.flows.register_family("pyro-planar", pf.flows.Family(
        ...     conditional_layer=conditional_planar))
        >>> cflow = pf.flows.build("pyro-planar", 2, num_layers=3, context_dim=4)
        >>> cflow.condition(torch.randn(5, 4))(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> del pf.flows.FAMILIES["pyro-planar"]
    """
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"unknown flow family {name!r}; choose one of {sorted(FAMILIES)}")
    dim = whole_number(dim, "dim", low=1)
    num_layers = whole_number(num_layers, "num_layers", low=1)
    if context_dim is not None:
        context_dim = whole_number(context_dim, "context_dim", low=1)
    if hidden_dims is not None:
        hidden_dims = [whole_number(h, "each of hidden_dims", low=1) for h in hidden_dims]
    if permutation not in ("reverse", "random"):
        raise ValueError(f"permutation must be 'reverse' or 'random', got {permutation!r}")
    if hidden_dims is not None:
        layer_kwargs["hidden_dims"] = tuple(hidden_dims)
    if context_dim is not None:
        shared = family.shared_network if shared_network is None else bool(shared_network)
        return _conditional(name, dim, num_layers, permutation, affine, compile,
                            context_dim, shared, layer_kwargs)
    if shared_network:
        raise ValueError("shared_network is a conditional stack's option; pass context_dim=")
    if family.layer is None:
        raise ValueError(f"flow family {name!r} has only a conditional layer; pass "
                         "context_dim=")
    parts: list[nn.Module] = []
    if family.bank is not None and not layer_kwargs:  # (families without permutations)
        parts.extend(family.bank(dim, num_layers))
    else:
        parts.extend(_layer_by_layer(name, dim, num_layers, permutation, layer_kwargs))
        if family.stacked_conditioners:
            _stack_conditioners(parts)
    if affine:
        parts.append(T.ElementwiseAffine(dim))
    return FlowStack(parts, compile=compile)


def _conditional(name: str, dim: int, num_layers: int, permutation: str, affine: bool,
                 compile: bool | str, context_dim: int, shared_network: bool,
                 layer_kwargs: dict) -> ConditionalFlowStack:
    """:func:`build` with a context: the family's conditional layers in a
    :class:`ConditionalFlowStack`."""
    family = FAMILIES[name]
    if family.conditional_layer is None:
        have = sorted(n for n, f in FAMILIES.items() if f.conditional_layer is not None)
        raise ValueError(f"flow family {name!r} has no conditional layer, so it cannot take "
                         f"context_dim; families with one: {have}")
    if int(context_dim) < 1:
        raise ValueError(f"context_dim must be a positive integer, got {context_dim}")
    if compile:
        raise ValueError("compile is not available for a conditional stack")
    def layer(d: int, **kwargs) -> nn.Module:
        return family.conditional_layer(d, context_dim, **kwargs)
    if shared_network:
        if not family.shared_network:
            have = sorted(n for n, f in FAMILIES.items() if f.shared_network)
            raise ValueError(f"flow family {name!r} cannot share one network between its "
                             f"layers; families that can: {have}")
        parts = _layer_by_layer(name, dim, 1, permutation, {**layer_kwargs,
                                                            "num_layers": num_layers}, layer)
    else:
        parts = _layer_by_layer(name, dim, num_layers, permutation, layer_kwargs, layer)
    if affine:
        parts.append(T.ElementwiseAffine(dim))
    return ConditionalFlowStack(parts, dim=dim, context_dim=context_dim)


def _layer_by_layer(name: str, dim: int, num_layers: int, permutation: str,
                    layer_kwargs: dict, layer=None) -> list[nn.Module]:
    """The layers of :func:`build` made one by one (by ``layer``, default the family's), with
    the permutations between them."""
    family = FAMILIES[name]
    layer = family.layer if layer is None else layer
    fold = family.fold
    parts: list[nn.Module] = []
    cumulative = torch.arange(dim)  # layer i acts on x[cumulative]
    for i in range(num_layers):
        kwargs = layer_kwargs
        if family.needs_permutation and i > 0 and dim > 1:
            step = (T.Permute.reverse(dim) if permutation == "reverse"
                    else T.Permute.random(dim, seed=i))
            if fold is None:
                parts.append(step)
            else:
                cumulative = cumulative[step.permutation]
                kwargs = fold(dim, torch.argsort(cumulative), layer_kwargs)
            if fold is not None and family.complementary_masks and i % 2 == 1:
                kwargs = {**kwargs, "mask": ~parts[-1].mask.cpu()}
        try:
            parts.append(layer(dim, **kwargs))
        except TypeError as e:  # e.g. hidden_dims for a family without a network
            raise ValueError(f"flow family {name!r} does not take these arguments: {e}") from e
    return parts


def _stack_conditioners(parts: list[nn.Module]) -> None:
    """Make the :class:`~pyroflows.nn.MADE` conditioners of every run of consecutive layers of
    one size rows of one new bank, holding the same parameters."""
    runs: list[list[AffineAutoregressiveCore]] = [[]]
    for part in parts:
        net = getattr(part, "conditioner", None)
        if not (isinstance(part, AffineAutoregressiveCore) and type(net) is MADE):
            runs.append([])
        elif runs[-1] and runs[-1][-1].conditioner._shapes == net._shapes:
            runs[-1].append(part)
        else:
            runs.append([part])
    for run in runs:
        if len(run) > 1:
            rows = stacked_mades([layer.conditioner for layer in run])
            for layer, row in zip(run, rows, strict=True):
                layer.conditioner = row

