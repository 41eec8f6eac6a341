r"""Conditional flow layers (seed eq. 27): a layer's parameters :math:`\zeta` are the output
of a network of a context :math:`c` (a datapoint, an encoder's hidden layer), so one module
maps a batch of contexts to a batch of flows, :math:`x = f_{\zeta(c)}(z)`.

Every conditional layer follows Pyro's protocol: it is a
:class:`pyro.distributions.ConditionalTransformModule` whose ``condition(c)`` returns a
transform for the contexts ``c`` of shape ``(..., C)``, usable in ``TransformedDistribution``;
the context's batch dims broadcast against the input's (``c`` of shape (B, C) with ``x`` of
shape (B, D) or (S, B, D)). Each ``condition`` call returns a new transform, so a cached
output of one context is never an answer for another.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor
from torch.distributions import Transform

from .._checks import whole_number
from .._config import is_validation_enabled
from .._fast import broadcast_batch
from .base import FlowTransform

__all__ = ["ConditionalFlowTransform", "ConditionalMADELayer", "Conditioned", "check_broadcast"]


def check_broadcast(owner: str, what: str, batch: torch.Size, rows: torch.Size) -> None:
    """A :class:`ValueError` where an input's batch dims ``batch`` do not broadcast with the
    context rows' ``rows`` (``owner``, ``what``: the transform and the input, for the
    message)."""
    try:
        broadcast_batch(batch, rows)
    except RuntimeError:
        raise ValueError(f"{owner}: the {what}'s batch shape {tuple(batch)} does not broadcast "
                         f"with the context's {tuple(rows)}") from None


class ConditionalFlowTransform(ConditionalTransformModule):
    r"""Base class of pyroflows' conditional layers: ``condition(context)`` checks the context
    and returns ``conditioned(context)``, the layer's transform for it (subclasses implement
    ``conditioned``).

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
    """

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        name = type(self).__name__
        self.dim = whole_number(dim, f"{name}: dim", 1)
        self.context_dim = whole_number(context_dim, f"{name}: context_dim", 1)

    def check_context(self, context: Tensor) -> Tensor:
        """``context`` itself, or a :class:`ValueError` saying what is wrong with it: not a
        floating tensor of shape ``(..., C)`` of the layer's dtype and device, or (while
        :func:`pyroflows.is_validation_enabled`) holding NaN or infinite values."""
        name = type(self).__name__
        if not isinstance(context, Tensor) or not context.is_floating_point():
            raise ValueError(f"{name}: the context must be a floating-point torch.Tensor of "
                             f"shape (..., {self.context_dim}), got {type(context).__name__}"
                             + (f" of {context.dtype}" if isinstance(context, Tensor) else ""))
        if context.dim() < 1 or context.shape[-1] != self.context_dim:
            raise ValueError(f"{name}: the context must have shape (..., {self.context_dim}) "
                             f"(context size {self.context_dim}), got shape "
                             f"{tuple(context.shape)}")
        weight = next(self.parameters(), None)
        if weight is not None and (context.dtype != weight.dtype
                                   or context.device != weight.device):
            raise ValueError(f"{name}: the context must have the layer's dtype and device "
                             f"({weight.dtype}, {weight.device}), got {context.dtype} on "
                             f"{context.device}")
        if is_validation_enabled() and not bool(torch.isfinite(context).all()):
            raise ValueError(f"{name}: the context contains NaN or infinite values")
        return context

    def condition(self, context: Tensor) -> Transform:
        """The layer's transform for ``context`` (shape ``(..., C)``)."""
        return self.conditioned(self.check_context(context))

    def conditioned(self, context: Tensor) -> Transform:
        """The transform for a checked ``context``; subclasses implement it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


class ConditionalMADELayer(ConditionalFlowTransform):
    """Base of the conditional layers whose network (``conditioner``) takes the context as a
    per-row bias :math:`V c` of its first hidden layer (IAF, MAF, RealNVP, NSF):
    ``conditioned(c)`` is ``conditioned_type(self, c)``, the plain layer's map over this
    network, which copies the attributes named in ``conditioned_settings``."""

    conditioned_type: type[FlowTransform]
    #: the layer's attributes its conditioned transforms take over (besides the network)
    conditioned_settings: tuple[str, ...] = ()
    #: run the kernels (as the plain layers' ``fused``; a conditioned setting)
    fused: bool = True

    def conditioned(self, context: Tensor) -> FlowTransform:
        return self.conditioned_type(self, context)


class Conditioned:
    """Mixin of the transform that a :class:`ConditionalMADELayer`'s ``condition(c)`` returns:
    the plain layer's map (one class below in the MRO) over the conditional layer's network
    (shared, not copied), its ``conditioned_settings`` and ``mask`` buffer, and the context
    ``c`` as it was at ``condition(c)`` (a copy, through which gradients reach ``c``: a later
    in-place change of ``c`` changes nothing here, as for the planar and radial layers, whose
    parameters are computed then). A new object per context, so its output cache never
    answers for another context."""

    def __init__(self, owner: ConditionalMADELayer, context: Tensor) -> None:
        FlowTransform.__init__(self, owner.dim)
        self.conditioner = owner._modules["conditioner"]
        for name in owner.conditioned_settings:
            if name in owner.__dict__:
                self.__dict__[name] = owner.__dict__[name]
        mask = owner._buffers.get("mask")
        if mask is not None:
            self.register_buffer("mask", mask)
        self.__dict__["context"] = context.clone()

    def _validate(self, value: Tensor, what: str) -> None:
        super()._validate(value, what)
        check_broadcast(type(self).__name__, what, value.shape[:-1],
                        self.__dict__["context"].shape[:-1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, context_shape={tuple(self.context.shape)}"
