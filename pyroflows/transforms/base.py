"""The base class of every pyroflows transform: validation and a cache that cannot go stale."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

from .._checks import whole_number
from .._config import is_validation_enabled
from .._fast import traced
from .._memo import optimizer_steps

__all__ = ["FlowTransform", "OutputCache", "module_stamp"]


@dataclass
class _CacheEntry:
    x: Tensor
    y: Tensor
    log_det: Tensor
    x_version: int
    y_version: int
    stamp: tuple
    inverse: bool  # which call stored it: the output is ``x`` after an inverse, else ``y``


def module_stamp(module: nn.Module, shared: bool = False) -> tuple | None:
    """The cache key of a module's state: the grad mode, the count of optimizer steps, and
    the identity, version counter and storage address of every parameter and buffer
    (``None`` in inference mode and under ``torch.func`` or ``torch.compile``, where nothing
    is cached). A storage freed and allocated again at the same address between two calls
    (``p.data = ...`` in a loop, outside an optimizer) can still look unchanged.
    ``shared=True`` visits a submodule shared by several owners once (a bank of a stack)."""
    # walks the dictionaries directly: named_parameters() builds prefixed names and a seen-set,
    # several times the cost, and this runs a few times per layer per training step
    if torch.is_inference_mode_enabled() or traced():  # (torch.func's tensors: no storage)
        return None
    states: list = []
    seen: set[int] | None = set() if shared else None
    todo = [module]
    while todo:
        m = todo.pop()
        if seen is not None:
            if id(m) in seen:
                continue
            seen.add(id(m))
        # (tensor_state's triple, written out: this runs a few times per layer per step)
        for t in m._parameters.values():
            if t is not None:
                states += (id(t), t._version, t.data_ptr())
        for t in m._buffers.values():
            if t is not None:
                states += (id(t), t._version, t.data_ptr())
        todo.extend(c for c in m._modules.values() if c is not None)
    return (torch.is_grad_enabled(), optimizer_steps(), tuple(states))


def _first_floating(module: nn.Module) -> Tensor | None:
    """The first floating parameter or buffer of ``module`` or its submodules (what an input's
    dtype and device must match), walking the dictionaries as :func:`module_stamp` does."""
    todo = [module]
    while todo:
        m = todo.pop()
        for t in chain(m._parameters.values(), m._buffers.values()):
            if t is not None and t.is_floating_point():
                return t
        todo.extend(c for c in m._modules.values() if c is not None)
    return None


def _all_finite(value: Tensor) -> bool:
    # one reduction first: a non-finite entry always makes the sum non-finite; only when the
    # sum is non-finite (which finite entries can also cause, by overflow) look elementwise
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


class OutputCache:
    """Mixin: the one cache of a map's last ``(x, y, log_det)``, which cannot go stale.

    The rule: the cache answers only for the tensor it *produced*. After ``y = t(x)``,
    ``t.inv(y)`` returns ``x`` and ``t.log_abs_det_jacobian(x, y)`` the stored log-det (so a
    sample just drawn is scored without an inverse); after ``x = t.inv(y)``, ``t(x)`` returns
    ``y``. A call on any other tensor computes, and a forward call ``t(x)`` never answers
    because ``x`` was the last *input* (``torch.autograd.gradcheck`` and finite differences
    perturb their input in place, through ``.data``, which no version counter sees). An
    answer also needs both tensors of the pair at their stored versions (an in-place edit of
    either invalidates) and :func:`module_stamp` unchanged, so an optimizer step,
    ``load_state_dict`` or ``.to()`` force a recomputation; edits through ``.data`` of the
    produced tensor itself are not seen. Nothing is stored in inference mode; the entry is
    dropped on pickling. The owner's ``_uncached(value, inverse)`` computes a miss."""

    _cache: _CacheEntry | None = None

    def with_cache(self, cache_size: int = 1) -> OutputCache:
        """``self``, whatever ``cache_size``: the map keeps its own cache of one pair, which
        answers only for the tensors it produced (Pyro's reparameterizers call this)."""
        return self

    def _stamp(self) -> tuple | None:
        return module_stamp(self)

    def _store(self, x: Tensor, y: Tensor, log_det: Tensor, stamp: tuple | None,
               inverse: bool = False) -> None:
        # through __dict__: a plain attribute, so nn.Module.__setattr__'s checks are skipped
        if stamp is None or x.is_inference() or y.is_inference():
            self.__dict__["_cache"] = None
            return
        self.__dict__["_cache"] = _CacheEntry(x, y, log_det, x._version, y._version, stamp,
                                              inverse)

    def lookup(self, x: Tensor | None = None, y: Tensor | None = None) -> _CacheEntry | None:
        """The entry when ``y`` alone is the output of the last forward call, ``x`` alone the
        output of the last inverse call, or ``(x, y)`` the last call's pair; all unchanged."""
        c = self._cache
        if c is None:
            return None
        if x is None:
            if y is None or c.inverse:
                return None
        elif y is None and not c.inverse:
            return None
        if x is not None and x is not c.x:
            return None
        if y is not None and y is not c.y:
            return None
        if c.x._version != c.x_version or c.y._version != c.y_version:
            return None
        if c.stamp != self._stamp():
            return None
        return c

    def clear_cache(self) -> None:
        """Drop the cached ``(x, y, log_det)`` triple."""
        self.__dict__["_cache"] = None

    def _cached(self, value: Tensor, inverse: bool) -> Tensor:
        """``t(value)`` (``t.inv(value)`` when ``inverse``), from the cache when ``value`` is
        the output it produced, else computed and stored."""
        hit = self.lookup(y=value) if inverse else self.lookup(x=value)
        if hit is not None:
            return hit.x if inverse else hit.y
        stamp = self._stamp()
        image, log_det = self._uncached(value, inverse)
        x, y = (image, value) if inverse else (value, image)
        self._store(x, y, log_det, stamp, inverse)
        return image

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None
        return state


class FlowTransform(OutputCache, TransformModule):
    r"""Base class of the pyroflows transforms: a bijection of :math:`\mathbb{R}^D` with a cheap
    :math:`\log|\det J|`, positive determinant (``sign = +1``) unless a subclass says not.

    Subclasses implement ``forward_and_log_det(x) -> (y, log|det dy/dx|)`` and
    ``inverse_and_log_det(y) -> (x, log|det dy/dx|)`` (the *forward* map's log-det both ways);
    this class supplies ``__call__``, ``inv``, ``log_abs_det_jacobian``, the output cache
    (:class:`OutputCache`: scoring a sample just drawn needs no inverse) and validation: a
    :class:`ValueError` for inputs not of shape ``(..., D)``, and for non-finite ones while
    :func:`pyroflows.is_validation_enabled`. A layer that a fused kernel runs says so with
    ``fused_kind(inverse)`` and ``run_fused`` (:mod:`pyroflows._fast.dispatch`).

    Arguments:
        dim: the event size D.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)
        self.dim = whole_number(dim, f"{type(self).__name__}: dim", low=1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fused_kind(self, inverse: bool):
        """What a fused kernel needs to run this direction, or ``None`` (none can)."""
        return None

    def plain_map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """One direction's map and log-det by plain differentiable operations."""
        return self.inverse_and_log_det(x) if inverse else self.forward_and_log_det(x)

    def has_score_step(self) -> bool:
        """Whether :meth:`score_step` gives this layer's step in closed form."""
        return False

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        r"""One layer of a flow's score, for sticking the landing layer by layer
        (:func:`pyroflows.guides.landing.layerwise_score`): :math:`y = f(x)` and
        :math:`J^{-\top}\bigl(g - \nabla_x \log|\det J(x)|\bigr)`, :math:`J = \partial f /
        \partial x`, with the parameters as constants, where :meth:`has_score_step`."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form score step")

    def _validate(self, value: Tensor, what: str) -> None:
        name = type(self).__name__
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: {what} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() < 1 or value.shape[-1] != self.dim:
            raise ValueError(f"{name}: {what} must have shape (..., {self.dim}) (event size "
                             f"{self.dim}), got shape {tuple(value.shape)}")
        ref = _first_floating(self)
        if ref is not None and (value.dtype != ref.dtype or value.device != ref.device):
            raise ValueError(f"{name}: {what} is {value.dtype} on {value.device}, the layer is "
                             f"{ref.dtype} on {ref.device}: move one to the other "
                             "(layer.to(x) or x.to(...))")
        # (not under torch.func or torch.compile: the check is data-dependent control flow)
        if is_validation_enabled() and not traced() and not _all_finite(value):
            raise ValueError(f"{name}: {what} contains NaN or infinite values")

    def _uncached(self, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        self._validate(value, "input to the inverse" if inverse else "input")
        return self.inverse_and_log_det(value) if inverse else self.forward_and_log_det(value)

    def __call__(self, x: Tensor) -> Tensor:
        return self._cached(x, inverse=False)

    def _call(self, x: Tensor) -> Tensor:
        return self(x)

    def _inv_call(self, y: Tensor) -> Tensor:
        return self._cached(y, inverse=True)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inv_call(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det dy/dx|`` of shape ``x.shape[:-1]`` for ``y = t(x)``; free when ``(x, y)``
        is the last call's pair (:class:`OutputCache`)."""
        hit = self.lookup(x=x, y=y)
        if hit is not None:
            return hit.log_det
        return self._log_abs_det_jacobian_uncached(x, y)

    def _log_abs_det_jacobian_uncached(self, x: Tensor, y: Tensor) -> Tensor:
        """Log-det on a cache miss, from ``x`` (MAF: from ``y``, its cheap direction)."""
        self._validate(x, "input")
        return self.forward_and_log_det(x)[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    __repr__ = nn.Module.__repr__
