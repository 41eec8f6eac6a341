"""The layers of built stacks whose parameters live in one bank per run of layers: each layer
is a row of its bank (:mod:`pyroflows._fast.banks`), the plain layer's map with its tensors
read as views of the bank's rows. Its parameters are the whole bank, submodule ``stacked`` of
every layer of the run, so ``.to()`` or a copy of one layer moves or copies all of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .._fast.banks import BankRow, ParameterBank, RowView
from ..nn.made import MADE
from ..transforms.base import FlowTransform
from ..transforms.planar import Planar
from ..transforms.radial import Radial

__all__ = [
    "PlanarParameters", "StackedPlanar", "planar_layers", "RadialParameters", "StackedRadial",
    "radial_layers", "MADEParameters", "StackedMADE", "stacked_mades",
]


class _LayerRow(BankRow):
    """A flow layer made as a row of a bank of its family, without parameters of its own; its
    ``reset_parameters`` (the plain layer's) writes into its rows of the bank."""

    def __init__(self, stacked: ParameterBank, index: int) -> None:
        FlowTransform.__init__(self, stacked.dim)
        self.attach_row(stacked, index)


def _rows(row_type: type, stacked: ParameterBank) -> list:
    """Every row of ``stacked`` as a ``row_type`` layer, initialized one after the other as the
    plain layers are (under one seed, the values of L plain layers built in turn)."""
    rows = [row_type(stacked, k) for k in range(stacked.num_layers)]
    for row in rows:
        row.reset_parameters()
    return rows


class PlanarParameters(ParameterBank):
    r"""The raw parameters of ``num_layers`` planar layers, stacked: ``u`` and ``w`` of shape
    (L, D), ``bias`` of shape (L,); row :math:`k` holds layer :math:`k`'s ``u``, ``w`` and
    ``bias`` of :class:`~pyroflows.transforms.Planar` (made by :func:`planar_layers`).

    Arguments:
        dim: the event size D.
        num_layers: the number of layers L.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__(num_layers, dim)
        self.bias = nn.Parameter(torch.empty(self.num_layers))
        self.u = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.w = nn.Parameter(torch.empty(self.num_layers, self.dim))


class StackedPlanar(_LayerRow, Planar):
    r"""Layer ``index`` of a :class:`PlanarParameters`: the map of
    :class:`~pyroflows.transforms.Planar` with ``u``, ``w`` and ``bias`` read from row
    ``index`` of the stacked tensors. It behaves as a planar layer in every respect (forward,
    inverse, log-det, cache, conformance suite), alone or in a stack.

    Example:
        >>> import torch
        >>> from pyroflows.flows.banks import planar_layers
        >>> layers = planar_layers(3, num_layers=4)
        >>> layers[1].w.shape, layers[1].stacked.w.shape
        (torch.Size([3]), torch.Size([4, 3]))
        >>> layers[1](torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    w = RowView()
    u = RowView()
    bias = RowView(keep_dim=True)  # shape (1,), as Planar's


def planar_layers(dim: int, num_layers: int) -> list[StackedPlanar]:
    """``num_layers`` planar layers over one new :class:`PlanarParameters`, initialized as
    :class:`~pyroflows.transforms.Planar` layers (what ``pyroflows.flows.build("planar", ...)``
    stacks)."""
    return _rows(StackedPlanar, PlanarParameters(dim, num_layers))


class RadialParameters(ParameterBank):
    r"""The raw parameters of ``num_layers`` radial layers, stacked: ``x0`` of shape (L, D),
    ``alpha_prime`` and ``beta_prime`` of shape (L,); row :math:`k` holds layer :math:`k`'s
    parameters of :class:`~pyroflows.transforms.Radial` (made by :func:`radial_layers`).

    Arguments:
        dim: the event size D.
        num_layers: the number of layers L.
    """

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__(num_layers, dim)
        self.x0 = nn.Parameter(torch.empty(self.num_layers, self.dim))
        self.alpha_prime = nn.Parameter(torch.empty(self.num_layers))
        self.beta_prime = nn.Parameter(torch.empty(self.num_layers))


class StackedRadial(_LayerRow, Radial):
    r"""Layer ``index`` of a :class:`RadialParameters`: the map of
    :class:`~pyroflows.transforms.Radial` with ``x0``, ``alpha_prime`` and ``beta_prime`` read
    from row ``index`` of the stacked tensors; a radial layer in every respect.

    Example:
        >>> import torch
        >>> from pyroflows.flows.banks import radial_layers
        >>> layers = radial_layers(3, num_layers=4)
        >>> layers[2].x0.shape, layers[2].stacked.x0.shape
        (torch.Size([3]), torch.Size([4, 3]))
    """

    x0 = RowView()
    alpha_prime = RowView(keep_dim=True)  # shape (1,), as Radial's
    beta_prime = RowView(keep_dim=True)


def radial_layers(dim: int, num_layers: int) -> list[StackedRadial]:
    """``num_layers`` radial layers over one new :class:`RadialParameters`, initialized as
    :class:`~pyroflows.transforms.Radial` layers (what ``pyroflows.flows.build("radial", ...)``
    stacks)."""
    return _rows(StackedRadial, RadialParameters(dim, num_layers))


class MADEParameters(ParameterBank):
    r"""The flat parameters and masks of ``num_layers`` :class:`~pyroflows.nn.MADE` networks of
    one layout (the same widths and number of outputs, hence the same size :math:`P`),
    stacked: a parameter ``flat_parameters`` and a buffer ``mask``, both of shape (L, P); row
    :math:`k` is network :math:`k`'s ``flat_parameters`` and ``mask`` (the masks differ with
    the orders). The fused kernels mask a whole run of layers with one product and write one
    gradient.

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

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, size={self.flat_parameters.shape[-1]}"


# what a StackedMADE takes from its MADE besides `degrees` and `activation`
_LAYOUT = ("features", "hidden_dims", "num_params", "residual", "num_levels", "_shapes",
           "_sizes", "_blockable")


class StackedMADE(BankRow, MADE):
    """Network ``index`` of a :class:`MADEParameters`: a :class:`~pyroflows.nn.MADE` in every
    respect (the same map, :meth:`~pyroflows.nn.MADE.layer_parameters`, the fused kernels) whose
    ``flat_parameters`` and ``mask`` are row ``index`` of the stacked tensors (state_dict keys
    ``stacked.flat_parameters`` and ``stacked.mask``).

    Arguments:
        made: the network whose layout (widths, orders, activation) this row takes; its
            own parameters are not used (:func:`stacked_mades` copies them into the bank).
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
    """The networks ``nets`` (all of one size) as :class:`StackedMADE` rows of one new
    :class:`MADEParameters` holding their current parameters and masks: the same maps, one
    parameter tensor."""
    stacked = MADEParameters([n.flat_parameters for n in nets], [n.mask for n in nets])
    stacked = stacked.to(device=nets[0].flat_parameters.device)
    return [StackedMADE(n, stacked, k) for k, n in enumerate(nets)]
