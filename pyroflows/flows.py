"""Stack builders: one function turns a family name into a ready-to-train flow."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn

from . import transforms as T

__all__ = ["build", "FAMILIES", "FOLDED_PERMUTATIONS", "register_family"]

# name -> (layer constructor (dim, **kwargs) -> Transform, whether layers need permutations
# between them so that every coordinate gets transformed)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "planar": (lambda dim, **kw: T.Planar(dim, **kw), False),
    "radial": (lambda dim, **kw: T.Radial(dim, **kw), False),
    "iaf": (lambda dim, **kw: T.IAF(dim, **kw), True),
    "maf": (lambda dim, **kw: T.MAF(dim, **kw), True),
    "realnvp": (lambda dim, **kw: T.RealNVP(dim, **kw), True),
}

Fold = Callable[[int, Tensor, dict], dict]


def _fold_order(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    order = kwargs.get("order")
    order = torch.arange(dim) if order is None else torch.as_tensor(order).flatten()
    if order.numel() != dim:
        return kwargs  # the layer's own check reports it
    return {**kwargs, "order": order[inverse]}


def _fold_mask(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    mask = kwargs.get("mask")
    mask = T.RealNVP.default_mask(dim) if mask is None else torch.as_tensor(mask).flatten()
    if mask.numel() != dim:
        return kwargs
    return {**kwargs, "mask": mask.bool()[inverse]}


# Families whose layers take the permutation themselves: name -> fold(dim, inverse, kwargs),
# which turns "permute the coordinates by c, then apply the layer" into the keyword arguments
# of one layer acting on the unpermuted coordinates (``inverse`` = argsort(c)). No permutation
# layer runs at all: a stack of such layers is the permuted stack up to a fixed reordering of
# its output, with four fewer transforms per five layers.
FOLDED_PERMUTATIONS: dict[str, Fold] = {
    "iaf": _fold_order,
    "maf": _fold_order,
    "realnvp": _fold_mask,
}


def register_family(
    name: str,
    layer: Callable[..., nn.Module],
    needs_permutation: bool,
    fold: Fold | None = None,
) -> None:
    """Make ``build(name, ...)`` available for a new layer family.

    ``needs_permutation``: put a fixed permutation between layers. ``fold`` (optional): fold
    that permutation into the layers' keyword arguments instead of inserting
    :class:`~pyroflows.transforms.Permute` layers (see ``FOLDED_PERMUTATIONS``).
    """
    FAMILIES[name] = (layer, needs_permutation)
    if fold is not None:
        FOLDED_PERMUTATIONS[name] = fold
    else:
        FOLDED_PERMUTATIONS.pop(name, None)


def build(
    name: str,
    dim: int,
    num_layers: int = 5,
    hidden_dims=None,
    permutation: str = "reverse",
    affine: bool = False,
    **layer_kwargs,
) -> ComposeTransformModule:
    """Build a stack of ``num_layers`` layers of one family as a ``ComposeTransformModule``.

    Families whose layers see only part of the coordinates at a time (IAF, MAF, RealNVP) are
    stacked with a fixed permutation between layers, so every coordinate is transformed and
    depends on every other. For IAF and MAF it becomes the next layer's MADE order, for RealNVP
    its coupling mask (as in Dinh et al.'s alternating masks), so no permutation layer runs;
    a family registered without ``fold`` gets :class:`~pyroflows.transforms.Permute` layers.

    Arguments:
        name: one of ``pyroflows.flows.FAMILIES``: planar, radial, iaf, maf, realnvp, and any
            family registered with :func:`register_family`.
        dim: the event size D.
        num_layers: the number of flow layers.
        hidden_dims: conditioner hidden sizes, for families that have a network.
        permutation: ``"reverse"`` (reverse the order between layers) or ``"random"``
            (a fixed random permutation between layers, seeded by the layer's index, so
            building twice gives the same flow).
        affine: append a learnable :class:`~pyroflows.transforms.ElementwiseAffine` last.
        layer_kwargs: passed to every layer's constructor.

    The result works directly in ``TransformedDistribution(base, flow)``.

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("planar", 2, num_layers=4)
        >>> flow(torch.randn(5, 2)).shape
        torch.Size([5, 2])
        >>> maf = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(16, 16))
        >>> [layer.conditioner.degrees.tolist() for layer in maf.parts]
        [[1, 2, 3], [3, 2, 1], [1, 2, 3]]
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown flow family {name!r}; choose one of {sorted(FAMILIES)}")
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if permutation not in ("reverse", "random"):
        raise ValueError(f"permutation must be 'reverse' or 'random', got {permutation!r}")
    layer, needs_permutation = FAMILIES[name]
    fold = FOLDED_PERMUTATIONS.get(name)
    if hidden_dims is not None:
        layer_kwargs["hidden_dims"] = tuple(hidden_dims)
    parts: list[nn.Module] = []
    cumulative = torch.arange(dim)  # layer i acts on x[cumulative]
    for i in range(num_layers):
        kwargs = layer_kwargs
        if needs_permutation and i > 0 and dim > 1:
            step = _permutation(dim, permutation, seed=i)
            if fold is None:
                parts.append(step)
            else:
                cumulative = cumulative[step.permutation]
                kwargs = fold(dim, torch.argsort(cumulative), layer_kwargs)
        try:
            parts.append(layer(dim, **kwargs))
        except TypeError as e:  # e.g. hidden_dims for a family without a network
            raise ValueError(f"flow family {name!r} does not take these arguments: {e}") from e
    if affine:
        parts.append(T.ElementwiseAffine(dim))
    return ComposeTransformModule(parts)


def _permutation(dim: int, kind: str, seed: int) -> T.Permute:
    if kind == "reverse":
        return T.Permute.reverse(dim)
    return T.Permute.random(dim, seed=seed)
