"""Derived values kept on an object while what they derive from is unchanged.

The one mechanism behind every cache of a derived value in the package (a stack's inverse, a
guide's latent layout, a network's block plans, ...). A layer's cached *output* is the other
kind of cache, and lives in :class:`pyroflows.transforms.FlowTransform`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Memoized"]

T = TypeVar("T")


class Memoized:
    """Mixin: :meth:`memo` keeps values derived from the object's state, keyed by what they
    derive from; the memos are dropped when the object is pickled or deep-copied.

    A key must change whenever the value would: tensors' version counters, shapes, devices
    and dtypes, or the identity of objects the value itself holds (an ``id`` is unique only
    while its object lives).
    """

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
