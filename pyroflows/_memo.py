"""Derived values kept on an object while what they derive from is unchanged: every cache of
the package but the layers' output cache (:class:`pyroflows.transforms.base.OutputCache`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["Memoized", "tensor_state", "optimizer_steps"]

_STEPS = [0]  # optimizer steps taken in this process, by every torch optimizer


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _STEPS[0] += 1


# (a global post-hook of torch's, public API: every Optimizer subclass runs it after step)
register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many steps torch optimizers have taken in this process. An optimizer that writes its
    parameters through ``.data`` (Pyro's ``ClippedAdam``: ``p.data.addcdiv_``) leaves their
    version counters as they were; this count still moves."""
    return _STEPS[0]


def tensor_state(t: Tensor) -> tuple[int, int, int]:
    """What a value derived from ``t`` is keyed on: its identity, version counter and storage
    address (``module.to(dtype)`` and ``vector_to_parameters`` assign ``t.data``, which keeps
    the identity and the version; a new dtype or device is a new storage). A storage freed
    and allocated again at the same address between two reads can still look unchanged."""
    return (id(t), t._version, t.data_ptr())

T = TypeVar("T")


class Memoized:
    """Mixin: :meth:`memo` keeps values derived from the object's state, keyed by what they
    derive from, and drops them on pickling or deep-copying. A key must change whenever the
    value would: version counters, shapes, devices, dtypes, or the identity of objects the value
    itself holds (an ``id`` is unique only while its object lives)."""

    def memo(self, name: str, key: Hashable, make: Callable[[], T]) -> T:
        """The value ``make()`` returned for ``key``, computed again when the key changed."""
        memos = self.__dict__.get("_memo")
        if memos is None:
            memos = self.__dict__["_memo"] = {}
        entry = memos.get(name)
        if entry is None or entry[0] != key:
            entry = memos[name] = (key, make())
        return entry[1]

    def forget(self, name: str | None = None) -> None:
        """Drop the memo ``name`` (all of them by default)."""
        memos = self.__dict__.get("_memo")
        if memos is not None:
            if name is None:
                memos.clear()
            else:
                memos.pop(name, None)

    def __getstate__(self) -> dict[str, Any]:
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state.pop("_memo", None)
        return state
