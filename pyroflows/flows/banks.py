"""The layers of built stacks whose parameters live in one bank per run of layers: each is a
row of its bank (:mod:`pyroflows._fast.banks`), the plain layer's map on views of its rows.

Example:
    >>> import torch
    >>> from pyroflows.flows.banks import planar_layers
    >>> layers = planar_layers(3, num_layers=4)
    >>> layers[1].w.shape, layers[1].stacked.w.shape
    (torch.Size([3]), torch.Size([4, 3]))
    >>> layers[1](torch.randn(5, 3)).shape
    torch.Size([5, 3])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .._fast.banks import BankRow, ParameterBank, RowView
from .._memo import Memoized
from ..nn.made import MADE, load_mask, save_mask_as_bool
from ..transforms.base import FlowTransform
from ..transforms.planar import Planar
from ..transforms.radial import Radial

__all__ = [
    "PlanarParameters", "StackedPlanar", "planar_layers", "RadialParameters", "StackedRadial",
    "radial_layers", "MADEParameters", "StackedMADE", "stacked_mades",
]


class _LayerRow(BankRow):
    """A flow layer as a row of a bank, without parameters of its own."""

    def __init__(self, stacked: ParameterBank, index: int) -> None:
        FlowTransform.__init__(self, stacked.dim)
        self.attach_row(stacked, index)


def _rows(row_type: type, stacked: ParameterBank) -> list:
    """Every row of ``stacked`` as a ``row_type`` layer, initialized in turn by the plain
    layer's ``reset_parameters`` (under one seed, the values of L plain layers)."""
    rows = [row_type(stacked, k) for k in range(stacked.num_layers)]
    for row in rows:
        row.reset_parameters()
    return rows


class PlanarParameters(ParameterBank):
    """The ``bias`` (L,), ``u`` and ``w`` (L, D) of ``num_layers`` L
    :class:`~pyroflows.transforms.Planar` layers of event size ``dim`` D, row k layer k's."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__(num_layers, dim)
        self.bias = nn.Parameter(torch.empty(self.num_layers))
        self.u = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.w = nn.Parameter(torch.empty(self.num_layers, self.dim))


class StackedPlanar(_LayerRow, Planar):
    """Row ``index`` of a :class:`PlanarParameters`: a :class:`~pyroflows.transforms.Planar`
    layer in every respect (see the module's example)."""

    w = RowView()
    u = RowView()
    bias = RowView(keep_dim=True)  # shape (1,), as Planar's


def planar_layers(dim: int, num_layers: int) -> list[StackedPlanar]:
    """``num_layers`` planar layers over one new :class:`PlanarParameters`."""
    return _rows(StackedPlanar, PlanarParameters(dim, num_layers))


class RadialParameters(ParameterBank):
    """The ``x0`` (L, D), ``alpha_prime`` and ``beta_prime`` (L,) of ``num_layers`` L
    :class:`~pyroflows.transforms.Radial` layers of event size ``dim`` D, row k layer k's."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__(num_layers, dim)
        self.x0 = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.alpha_prime = nn.Parameter(torch.empty(self.num_layers))
        self.beta_prime = nn.Parameter(torch.empty(self.num_layers))


class StackedRadial(_LayerRow, Radial):
    """Row ``index`` of a :class:`RadialParameters`: a :class:`~pyroflows.transforms.Radial`."""

    x0 = RowView()
    alpha_prime = RowView(keep_dim=True)  # shape (1,), as Radial's
    beta_prime = RowView(keep_dim=True)


def radial_layers(dim: int, num_layers: int) -> list[StackedRadial]:
    """``num_layers`` radial layers over one new :class:`RadialParameters`."""
    return _rows(StackedRadial, RadialParameters(dim, num_layers))


class MADEParameters(Memoized, ParameterBank):
    """The ``flat_parameters`` and ``mask`` (L, P) of L :class:`~pyroflows.nn.MADE` networks of
    one size P, row k network k's; the mask is saved in state dicts as bool, as a MADE's.

    Arguments:
        flats: the (P,) flat parameters of the L networks (copied).
        masks: their (P,) masks.
    """

    def __init__(self, flats: Iterable[Tensor], masks: Iterable[Tensor]) -> None:
        flats, masks = [f.detach() for f in flats], list(masks)
        if not flats or len(flats) != len(masks) or any(
                f.shape != flats[0].shape or m.shape != f.shape
                for f, m in zip(flats, masks, strict=True)):
            raise ValueError("MADEParameters: needs one or more flat parameter vectors of one "
                             "size, each with a mask of that size")
        super().__init__(len(flats))
        self.flat_parameters = nn.Parameter(torch.stack(flats))
        self.register_buffer("mask", torch.stack(masks).to(self.flat_parameters.dtype))
        self.register_state_dict_post_hook(save_mask_as_bool)  # saved as bool

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        load_mask(self, state_dict, prefix)  # bool, or the floating masks of older states
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, size={self.flat_parameters.shape[-1]}"


# what a StackedMADE takes from its MADE besides `degrees` and `activation`
_LAYOUT = ("features", "hidden_dims", "num_params", "residual", "num_levels", "_shapes",
           "_sizes", "_blockable")


class StackedMADE(BankRow, MADE):
    """Row ``index`` of a :class:`MADEParameters`: a :class:`~pyroflows.nn.MADE` in every
    respect, its ``flat_parameters`` and ``mask`` views of the row.

    Arguments:
        made: the network whose layout (widths, orders, activation) this row takes.
        stacked: the shared :class:`MADEParameters`.
        index: the row.

    Example:
        >>> import torch
        >>> from pyroflows.nn import MADE
        >>> from pyroflows.flows.banks import stacked_mades
        >>> nets = stacked_mades([MADE(3, (8,)), MADE(3, (8,), order=[2, 1, 0])])
        >>> nets[1].flat_parameters.shape, nets[1].stacked.flat_parameters.shape
        (torch.Size([86]), torch.Size([2, 86]))
        >>> nets[1](torch.randn(4, 3)).shape
        torch.Size([4, 6])
    """

    flat_parameters = RowView()
    mask = RowView()

    def __init__(self, made: MADE, stacked: MADEParameters, index: int) -> None:
        nn.Module.__init__(self)  # the layout of `made`, without parameters of its own
        if sum(made._sizes) != stacked.flat_parameters.shape[-1]:
            raise ValueError("StackedMADE: the network's size differs from the stacked rows'")
        for name in _LAYOUT:
            setattr(self, name, getattr(made, name, None))
        self.register_buffer("degrees", made.degrees)
        self.activation = made.activation
        self.attach_row(stacked, index)


def stacked_mades(nets: Sequence[MADE]) -> list[StackedMADE]:
    """The networks ``nets`` (of one size) as :class:`StackedMADE` rows of one new
    :class:`MADEParameters` holding their parameters and masks: the same maps."""
    stacked = MADEParameters([n.flat_parameters for n in nets], [n.mask for n in nets])
    stacked = stacked.to(device=nets[0].flat_parameters.device)
    return [StackedMADE(n, stacked, k) for k, n in enumerate(nets)]
