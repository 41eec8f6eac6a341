"""A module that several layers register as their child (a bank of stacked parameters)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["SharedModule"]


class SharedModule(nn.Module):
    """A module registered under several parents (the stacked parameters of a run of layers,
    each layer holding the same bank), listed once by every module walk.

    ``named_modules`` skips it after its first name even when asked to keep duplicates
    (``remove_duplicate=False``), so ``named_parameters(remove_duplicate=False)`` of any module
    holding it names its tensors once. That is what ``torch.func.functional_call`` relies on:
    with its default ``tie_weights=True`` it swaps a tensor under every name it has, and a
    tensor reached through one module under several names was swapped twice and then restored
    wrongly (the stack kept the passed tensors). ``state_dict`` keeps every name (it walks
    ``_modules`` itself), so saved keys are unchanged.
    """

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
