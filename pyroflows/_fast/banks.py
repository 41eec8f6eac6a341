"""Parameter banks: the parameters of several layers in one tensor per name, one row per layer.

The one mechanism for stacked or packed parameters: a :class:`ParameterBank` is the submodule
``stacked`` of each of its :class:`BankRow` layers, which read their tensors as views of rows
(:class:`RowView`); optimizers and ``pyro.module`` cost per tensor, and a fused kernel reads a
run of layers from one tensor. The layers on banks live in :mod:`pyroflows.flows.banks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParameterBank", "BankRow", "RowView", "stacked_rows", "tensor_of"]


class ParameterBank(nn.Module):
    """Base of the stacked parameters of ``num_layers`` layers (row k of each tensor: layer k).

    It is the submodule ``stacked`` of each of its layers, and ``named_modules`` names it once
    even with ``remove_duplicate=False``: ``torch.func.functional_call`` would otherwise swap
    its tensors twice and restore them wrongly. ``state_dict`` keeps every layer's keys.

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
    ``stacked``: its ``parameters()`` are the whole bank, its own tensors are RowViews."""

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
    """Class attribute: rows of a tensor of the module's bank ``stacked`` (or of the module
    itself), read as the module's own tensor; a view, so gradients and in-place edits under
    ``torch.no_grad()`` reach the bank.

    Arguments:
        rows: ``rows(module) -> int | slice``, or an ``int``; default: the module's ``index``.
        tensor: the name of the tensor (default: the attribute's name).
        in_bank: ``False``: the module's own tensor (a layer packed into one tensor).
        keep_dim: read row ``i`` as ``i:i+1`` (shape (1, ...), as a layer's scalar).
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
    """``getattr(module, name)``, without ``nn.Module.__getattr__``'s Python call."""
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = module._buffers.get(name)
        if tensor is None:
            return getattr(module, name)
    return tensor


def _consecutive_rows(layers: Sequence[nn.Module]) -> tuple[ParameterBank, int] | None:
    """``(bank, i)`` when ``layers`` are rows ``i, i + 1, ...`` of one bank, of one type."""
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
    """The tensors ``names`` of consecutive layers stacked (K, ...): the bank's own (or a slice)
    when they are consecutive rows of one bank, else stacked (``scalar``: (1,) each, to (K,))."""
    rows = _consecutive_rows(layers)
    if rows is not None:
        bank, start = rows
        tensors = tuple(getattr(bank, name) for name in names)
        if len(layers) == bank.num_layers:
            return tensors
        return tuple(t[start:start + len(layers)] for t in tensors)
    return tuple((torch.cat if one else torch.stack)([getattr(layer, name) for layer in layers])
                 for name, one in zip(names, scalar, strict=True))
