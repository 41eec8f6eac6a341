"""Parameter banks: the parameters of several layers in one tensor per name, one row per layer.

The one mechanism for stacked or packed parameters: a :class:`ParameterBank` is the submodule
``stacked`` of each of its :class:`BankRow` layers, which read their own tensors through
:class:`RowView` class attributes (views of rows, so gradients and in-place edits reach the
bank); :func:`stacked_rows` gives a run of layers' tensors stacked. Optimizers and
``pyro.module`` cost per tensor, and a fused kernel reads a run of layers from one tensor.
The layers built on banks live in :mod:`pyroflows.flows.banks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParameterBank", "BankRow", "RowView", "stacked_rows", "tensor_of"]


class ParameterBank(nn.Module):
    """Base of the stacked parameters of ``num_layers`` layers (rows of each tensor = layers).

    A bank is registered as the submodule ``stacked`` of each of its layers, so it has several
    parents. ``named_modules`` skips it after its first name even when asked to keep duplicates
    (``remove_duplicate=False``), so ``named_parameters(remove_duplicate=False)`` of any module
    holding it names its tensors once. That is what ``torch.func.functional_call`` relies on:
    with its default ``tie_weights=True`` it swaps a tensor under every name it has, and a
    tensor reached through one module under several names would be swapped twice and then
    restored wrongly. ``state_dict`` keeps every name (it walks ``_modules`` itself), so each
    layer's keys (``{i}.stacked.w``, ...) are saved.

    Arguments:
        num_layers: the number of rows L.
        dim: the layers' event size D, where the bank has one.
    """

    def __init__(self, num_layers: int, dim: int | None = None) -> None:
        super().__init__()
        if int(num_layers) < 1 or (dim is not None and int(dim) < 1):
            raise ValueError(f"{type(self).__name__}: num_layers and dim must be positive, got "
                             f"{num_layers!r}, {dim!r}")
        self.num_layers = int(num_layers)
        self.dim = None if dim is None else int(dim)

    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        if memo is None:
            memo = set()
        if self in memo:
            return
        memo.add(self)  # always: one module, however many parents list it
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:
                yield from module.named_modules(memo, prefix + ("." if prefix else "") + name,
                                                remove_duplicate)

    def extra_repr(self) -> str:
        dim = "" if self.dim is None else f"dim={self.dim}, "
        return f"{dim}num_layers={self.num_layers}"


class BankRow:
    """Mixin of a layer that is row ``index`` of a :class:`ParameterBank`, its submodule
    ``stacked`` (shared with the other rows: the layer's ``parameters()`` are the whole bank,
    and ``.to()`` or a copy of one layer moves or copies all of them). Its own tensors are
    :class:`RowView` class attributes."""

    stacked: ParameterBank
    index: int

    def attach_row(self, stacked: ParameterBank, index: int) -> None:
        """Make this (initialized) module row ``index`` of ``stacked``."""
        if not 0 <= int(index) < stacked.num_layers:
            raise ValueError(f"{type(self).__name__}: index {index} outside "
                             f"0..{stacked.num_layers - 1}")
        self.stacked = stacked
        self.index = int(index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, index={self.index}"  # type: ignore[misc]


class RowView:
    """Class attribute: the rows ``rows(module)`` of the tensor ``tensor`` (default: the
    attribute's own name) of the module's bank ``stacked`` (or, with ``in_bank=False``, of
    the module itself), read as the module's own tensor. A view: differentiable, and in-place
    edits under ``torch.no_grad()`` write into the bank.

    Arguments:
        rows: ``rows(module) -> int | slice``, default: the module's ``index`` (a
            :class:`BankRow`); an ``int`` for a fixed row.
        tensor: the name of the tensor in the bank.
        in_bank: read the tensor of ``module.stacked`` (a :class:`BankRow`); ``False``: of the
            module itself (a layer whose parameters are packed into one tensor).
        keep_dim: read row ``i`` as the slice ``i:i+1`` (shape (1, ...), as a layer of its own
            stores a scalar parameter).
    """

    def __init__(self, rows: Callable[[nn.Module], int | slice] | int | None = None,
                 tensor: str | None = None, in_bank: bool = True,
                 keep_dim: bool = False) -> None:
        self.rows = rows
        self.tensor = tensor
        self.in_bank = in_bank
        self.keep_dim = keep_dim

    def __set_name__(self, owner: type, name: str) -> None:
        if self.tensor is None:
            self.tensor = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        tensor = tensor_of(module._modules["stacked"] if self.in_bank else module, self.tensor)
        rows = self.rows
        if rows is None:
            row = module.__dict__["index"]
        elif isinstance(rows, int):
            row = rows
        else:
            row = rows(module)
        return tensor[row:row + 1] if self.keep_dim else tensor[row]


def tensor_of(module: nn.Module, name: str) -> Tensor:
    """``getattr(module, name)``, from its ``_parameters`` or ``_buffers`` where it is one
    (where ``nn.Module.__getattr__`` finds it, without that Python call); else the attribute (a
    tensor kept as a plain attribute, such as a hypernetwork's output, or a bank row's view)."""
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = module._buffers.get(name)
        if tensor is None:
            return getattr(module, name)
    return tensor


def _consecutive_rows(layers: Sequence[nn.Module]) -> tuple[ParameterBank, int] | None:
    """``(bank, first index)`` when ``layers`` are rows ``i, i + 1, ...`` of one bank, all of
    one type."""
    first = layers[0]
    kind = type(first)
    bank = first._modules.get("stacked")
    if not isinstance(bank, ParameterBank) or not isinstance(first, BankRow):
        return None
    start = first.index
    for k, layer in enumerate(layers):
        if (type(layer) is not kind or layer._modules["stacked"] is not bank
                or layer.index != start + k):
            return None
    return bank, start


def stacked_rows(layers: Sequence[nn.Module], names: Sequence[str],
                 scalar: Sequence[bool]) -> tuple[Tensor, ...]:
    """The tensors ``names`` of consecutive layers as stacked (K, ...) tensors: the bank's own
    tensors (or a slice of their rows) when the layers are rows ``i, i + 1, ...`` of one
    bank, else stacked from the layers (``scalar``: a tensor of shape (1,) per layer,
    concatenated to (K,))."""
    rows = _consecutive_rows(layers)
    if rows is not None:
        bank, start = rows
        tensors = tuple(getattr(bank, name) for name in names)
        if len(layers) == bank.num_layers:
            return tensors
        return tuple(t[start:start + len(layers)] for t in tensors)
    return tuple((torch.cat if one else torch.stack)([getattr(layer, name) for layer in layers])
                 for name, one in zip(names, scalar, strict=True))
