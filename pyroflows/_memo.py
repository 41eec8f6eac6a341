"""Derived values kept on an object while what they derive from is unchanged: every cache of
the package but the layers' output cache (:class:`pyroflows.transforms.base.OutputCache`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["Memoized"]

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
