"""Stack builders: one function turns a family name into a ready-to-train flow."""

from __future__ import annotations

from collections.abc import Callable

from pyro.distributions.torch_transform import ComposeTransformModule
from torch import nn

from . import transforms as T

__all__ = ["build", "FAMILIES", "register_family"]

# name -> (layer constructor (dim, **kwargs) -> Transform, whether layers need permutations
# between them so that every coordinate gets transformed)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "planar": (lambda dim, **kw: T.Planar(dim, **kw), False),
    "radial": (lambda dim, **kw: T.Radial(dim, **kw), False),
    "iaf": (lambda dim, **kw: T.IAF(dim, **kw), True),
    "maf": (lambda dim, **kw: T.MAF(dim, **kw), True),
    "realnvp": (lambda dim, **kw: T.RealNVP(dim, **kw), True),
}


def register_family(name: str, layer: Callable[..., nn.Module], needs_permutation: bool) -> None:
    """Make ``build(name, ...)`` available for a new layer family."""
    FAMILIES[name] = (layer, needs_permutation)


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

    Arguments:
        name: one of ``pyroflows.flows.FAMILIES`` (planar, radial, and the autoregressive and
            coupling families where installed).
        dim: the event size D.
        num_layers: the number of flow layers.
        hidden_dims: conditioner hidden sizes, for families that have a network.
        permutation: ``"reverse"`` or ``"random"``: the fixed permutation put between layers of
            families that need one (autoregressive, coupling).
        affine: append a learnable :class:`~pyroflows.transforms.ElementwiseAffine` last.
        layer_kwargs: passed to every layer's constructor.

    The result works directly in ``TransformedDistribution(base, flow)``.

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("planar", 2, num_layers=4)
        >>> flow(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown flow family {name!r}; choose one of {sorted(FAMILIES)}")
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layer, needs_permutation = FAMILIES[name]
    if hidden_dims is not None:
        layer_kwargs["hidden_dims"] = tuple(hidden_dims)
    parts: list[nn.Module] = []
    for i in range(num_layers):
        if needs_permutation and i > 0 and dim > 1:
            parts.append(_permutation(dim, permutation, seed=i))
        try:
            parts.append(layer(dim, **layer_kwargs))
        except TypeError as e:  # e.g. hidden_dims for a family without a network
            raise ValueError(f"flow family {name!r} does not take these arguments: {e}") from e
    if affine:
        parts.append(T.ElementwiseAffine(dim))
    return ComposeTransformModule(parts)


def _permutation(dim: int, kind: str, seed: int) -> nn.Module:
    if not hasattr(T, "Permute"):
        raise RuntimeError("this family needs pyroflows.transforms.Permute")
    if kind == "reverse":
        return T.Permute.reverse(dim)
    if kind == "random":
        return T.Permute.random(dim, seed=seed)
    raise ValueError(f"permutation must be 'reverse' or 'random', got {kind!r}")
