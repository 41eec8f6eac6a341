"""FlowStack: a composition of pyroflows layers with one cache, fused runs and a compile option."""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from .. import _legacy, _private
from .._fast import keeping_linearizations, run_parts
from .._memo import Memoized
from ..transforms.base import FlowTransform, OutputCache, module_stamp

__all__ = ["FlowStack"]


class FlowStack(OutputCache, Memoized, ComposeTransformModule):
    r"""A ``ComposeTransformModule`` of pyroflows layers with one pass per direction.

    .. math:: \log\left|\det \frac{\partial (t_K \circ \dots \circ t_1)}{\partial x}
              \right| = \sum_{k=1}^{K} \log\left|\det J_{t_k}(x_{k-1})\right|,
              \qquad x_k = t_k(x_{k-1}),

    accumulated while the layers run. When every part is a
    :class:`~pyroflows.transforms.FlowTransform` (``all_flow_transforms``), a call validates
    only the stack's input and keeps one cache of ``(x, y, log-det)``
    (:class:`~pyroflows.transforms.base.OutputCache`); else it is a plain
    ``ComposeTransformModule``. Consecutive layers that one kernel of :mod:`pyroflows._fast`
    computes run as one call of it (``fused = False`` on an instance: the plain operations).

    Arguments:
        parts: the layers, applied first to last.
        cache_size: as ``ComposeTransformModule``'s.
        compile: run the layers through :func:`torch.compile` (``True``: Inductor, or a
            backend name; not pickled); the first call per input shape compiles (seconds).

    Example:
        >>> import torch, pyroflows as pf
        >>> flow = pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,))
        >>> x = torch.randn(4, 3)
        >>> z = flow.inv(x)
        >>> flow.inv.log_abs_det_jacobian(x, z).shape
        torch.Size([4])
    """

    fused: bool = True

    def __init__(self, parts, cache_size: int = 0, compile: bool | str = False) -> None:
        super().__init__(parts, cache_size=cache_size)
        self.all_flow_transforms = len(parts) > 0 and all(
            isinstance(p, FlowTransform) for p in parts)
        if compile and not self.all_flow_transforms:
            raise ValueError("FlowStack: compile needs every part to be a FlowTransform")
        self.compile_backend = ("inductor" if compile is True else compile) or None
        _private.register_load_state_dict_pre_hook(self, _legacy.per_layer_keys_to_stacked)

    # ComposeTransform derives these from every part at each access, and a
    # TransformedDistribution reads them several times per construction; the parts of a
    # FlowStack do not change after construction
    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self.memo("domain", None, lambda: ComposeTransformModule.domain.fget(self))

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self.memo("codomain", None, lambda: ComposeTransformModule.codomain.fget(self))

    @property
    def inv(self) -> Transform:
        if not self.all_flow_transforms:
            return super().inv
        # the generic inverse, which calls back into _inv_call / log_abs_det_jacobian here
        return self.memo("inv", None, lambda: _private.InverseTransform(self))

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(z, log|det df/dz|)`` with :math:`z = f^{-1}(y)`: cached when ``y`` is what this
        stack just produced, else one inverse run."""
        return self._image_and_log_det(y, inverse=True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(y, log|det df/dx|)`` with :math:`y = f(x)`: cached when ``x`` is what this
        stack's last inverse produced, else one forward run (which leaves the cache as it
        was)."""
        return self._image_and_log_det(x, inverse=False)

    def _image_and_log_det(self, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if not self.all_flow_transforms:
            direction = "inverse" if inverse else "forward"
            raise TypeError(f"FlowStack.{direction}_and_log_det needs every part to be a "
                            "pyroflows FlowTransform; use stack(x) / stack.inv(y) and "
                            "log_abs_det_jacobian")
        hit = self.lookup(y=value) if inverse else self.lookup(x=value)
        if hit is not None:
            return (hit.x if inverse else hit.y), hit.log_det
        return self.run(value, inverse)

    def run(self, x: Tensor, inverse: bool = False, validate: bool = True
            ) -> tuple[Tensor, Tensor]:
        """``(image, log|det J|)`` of ``x`` through the stack (or its inverse), without the
        cache; ``validate=False`` skips the input checks (for a fresh draw of the base)."""
        if validate:
            self.parts[-1 if inverse else 0]._validate(
                x, "input to the inverse" if inverse else "input")
        backend = self.compile_backend
        if backend is None:
            return self._chain(x, inverse)
        chain = self.memo("compiled_chain", backend, lambda: torch.compile(
            self._chain, backend=backend, dynamic=False))
        return chain(x, inverse, False)  # the plain operations: compilers cannot trace kernels

    #: Within ``with FlowStack.keeping_linearizations() as kept:``, every fused run of IAF
    #: layers with autograd appends their linearizations at their inputs to ``kept``
    #: (:func:`~pyroflows._fast.affine.keeping_linearizations`).
    keeping_linearizations = staticmethod(keeping_linearizations)

    def run_linearized(self, x: Tensor) -> tuple[Tensor, Tensor, list]:
        """:meth:`run` of ``x`` forward (no input checks: a fresh draw of the base), and the
        :class:`~pyroflows._fast.affine.Linearization` of each of its layers that ran in a
        fused node with autograd (IAF's forward), in order, at its input: what sticking the
        landing solves with (:func:`~pyroflows.guides.landing.layerwise_score`), kept from the
        run instead of computed again."""
        with keeping_linearizations() as kept:
            y, log_det = self.run(x, inverse=False, validate=False)
        return y, log_det, kept

    def _chain(self, x: Tensor, inverse: bool, fused: bool = True) -> tuple[Tensor, Tensor]:
        return run_parts(self.parts, x, inverse, fused and self.fused)

    def _stamp(self) -> tuple | None:
        return module_stamp(self, shared=True)  # a bank shared by layers: visited once

    _uncached = run  # what the one-entry cache (OutputCache._cached) runs on a miss

    def __call__(self, x: Tensor) -> Tensor:
        if not self.all_flow_transforms:
            return super().__call__(x)
        return self._cached(x, inverse=False)

    def _inv_call(self, y: Tensor) -> Tensor:
        if not self.all_flow_transforms:
            return super()._inv_call(y)
        return self._cached(y, inverse=True)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self.all_flow_transforms:
            hit = self.lookup(x=x, y=y)
            if hit is not None:
                return hit.log_det
        return super().log_abs_det_jacobian(x, y)
