"""The flow families: one record per name, read by :func:`~pyroflows.flows.build` and the guides."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import transforms as T
from .banks import planar_layers, radial_layers

__all__ = ["Family", "FAMILIES", "register_family", "fold_order", "fold_mask",
           "guide_hidden_dims"]

#: ``fold(dim, inverse, kwargs) -> kwargs``: "permute by ``c``, then the layer" as the keyword
#: arguments of one layer on the unpermuted coordinates (``inverse = argsort(c)``)
Fold = Callable[[int, Tensor, dict], dict]


@dataclass(frozen=True)
class Family:
    """Everything pyroflows knows about one family of flow layers.

    Arguments:
        layer: the layer constructor ``(dim, **kwargs) -> TransformModule``.
        conditional_layer: the conditional layer constructor ``(dim, context_dim, **kwargs) ->
            ConditionalTransformModule`` (seed eq. 27), which ``build(..., context_dim=C)``
            stacks; ``None``: the family has none.
        needs_permutation: :func:`~pyroflows.flows.build` puts a fixed permutation between
            layers (each sees part of the coordinates at a time).
        fold: fold it into the next layer's keyword arguments (:data:`Fold`).
        complementary_masks: odd-numbered layers take the complement of the previous layer's
            mask (Dinh et al.; with odd D a reversal alone fixes the middle coordinate).
        bank: ``(dim, num_layers) -> layers`` sharing one bank (no layer keyword arguments).
        stacked_conditioners: the MADE networks of a run of same-size layers share one bank.
        shared_network: the conditional layer takes ``num_layers`` = K and computes the
            parameters of K layers with one network, which ``build(..., context_dim=C)``
            then makes (``shared_network=False``: K layers with a network each).
        num_layers: a flow guide's default number of layers.
        init_scale: a flow guide's default initial scale of its affine layer.
        lr: a flow guide's default Adam step sizes ``(affine layer, flow layers)``.
        stick_the_landing: :class:`~pyroflows.guides.FlowELBO` sticks the landing by default.
        hidden_dims: ``dim -> widths``, a flow guide's default conditioner widths
            (:func:`guide_hidden_dims` for the network families); ``None``: the layer's own.

    The guide defaults are measured choices (``benchmarks/results/vi.md``; sticking the
    landing: ``vi-stl-planar-radial.md`` and ``vi-stl-families.md``).
    """

    layer: Callable[..., nn.Module] | None = None
    conditional_layer: Callable[..., nn.Module] | None = None
    needs_permutation: bool = False
    fold: Fold | None = None
    complementary_masks: bool = False
    bank: Callable[[int, int], list[nn.Module]] | None = None
    stacked_conditioners: bool = False
    shared_network: bool = False
    num_layers: int = 4
    init_scale: float = 0.1
    lr: tuple[float, float] = (5e-2, 3e-3)
    stick_the_landing: bool = False
    hidden_dims: Callable[[int], tuple[int, ...]] | None = None


def guide_hidden_dims(dim: int) -> tuple[int, int]:
    r"""A flow guide's default conditioner widths for a latent vector of size ``dim`` = D: two
    layers of :math:`\max(64, \mathrm{round}(16 \sqrt{D}))` units.

    Up to D = 16 this is the layers' own default (64 units); above it the width grows as
    :math:`\sqrt{D}`, not as the layers' :math:`4D`: a guide's conditioner parameters then grow
    as :math:`D^{3/2}` instead of :math:`D^2` (IAF, 4 layers, D = 100: 160 units, about 0.3
    million parameters instead of 1.1 million), and the sticking-the-landing Jacobian, whose
    cost is D + 1 passes of the conditioners, as :math:`D^{5/2}` instead of :math:`D^3`. A guide
    starts at the Laplace approximation (exact for a Gaussian posterior) and its flow layers
    learn the departures from it, which need fewer units than a density estimator's flow
    learning a whole density from data. Pass ``hidden_dims`` to a guide for other widths.

    Example:
        >>> guide_hidden_dims(10), guide_hidden_dims(100), guide_hidden_dims(300)
        ((64, 64), (160, 160), (277, 277))
    """
    width = max(64, int(round(16 * math.sqrt(int(dim)))))
    return (width, width)


def fold_order(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    """:data:`Fold` for layers with an autoregressive ``order`` (IAF, MAF)."""
    order = kwargs.get("order")
    order = torch.arange(dim) if order is None else torch.as_tensor(order).flatten()
    if order.numel() != dim:
        return kwargs  # the layer's own check reports it
    return {**kwargs, "order": order[inverse]}


def fold_mask(dim: int, inverse: Tensor, kwargs: dict) -> dict:
    """:data:`Fold` for coupling layers with a ``mask`` (RealNVP)."""
    mask = kwargs.get("mask")
    mask = T.RealNVP.default_mask(dim) if mask is None else torch.as_tensor(mask).flatten()
    if mask.numel() != dim:
        return kwargs
    return {**kwargs, "mask": mask.bool()[inverse]}


_NETWORK_FAMILY = {"needs_permutation": True, "stacked_conditioners": True, "init_scale": 1.0,
                   "hidden_dims": guide_hidden_dims}

#: The families :func:`~pyroflows.flows.build` and the guides know, by name.
FAMILIES: dict[str, Family] = {
    "planar": Family(T.Planar, T.conditional_planar, bank=planar_layers, num_layers=16,
                     lr=(5e-2, 1e-2), shared_network=True),
    "radial": Family(T.Radial, T.conditional_radial, bank=radial_layers, num_layers=16,
                     lr=(5e-2, 1e-2), shared_network=True),
    "iaf": Family(T.IAF, T.conditional_iaf, fold=fold_order, stick_the_landing=True,
                  **_NETWORK_FAMILY),
    "maf": Family(T.MAF, T.conditional_maf, fold=fold_order, stick_the_landing=True,
                  **_NETWORK_FAMILY),
    "realnvp": Family(T.RealNVP, T.conditional_realnvp, fold=fold_mask, complementary_masks=True,
                      stick_the_landing=True, **_NETWORK_FAMILY),
    "nsf": Family(T.NSF, T.conditional_nsf, fold=fold_order, stick_the_landing=True,
                  **{**_NETWORK_FAMILY, "stacked_conditioners": False}),
}


def register_family(name: str, family: Family) -> None:
    """Make ``build(name, ...)`` and ``AutoFlowGuide(model, flow=name)`` available for a new
    family (or replace one).

    Example:
        >>> import pyroflows as pf
        >>> pf.flows.register_family("tanh-maf", pf.flows.Family(
        ...     lambda dim, **kw: pf.transforms.MAF(dim, activation=torch.nn.Tanh, **kw),
        ...     needs_permutation=True, fold=pf.flows.fold_order))
        >>> len(pf.flows.build("tanh-maf", 3, num_layers=2).parts)
        2
        >>> del pf.flows.FAMILIES["tanh-maf"]
    """
    if not isinstance(family, Family) or (family.layer is None
                                          and family.conditional_layer is None):
        raise TypeError("register_family: expected a Family with a layer or a "
                        f"conditional_layer, got {family!r}")
    FAMILIES[name] = family
