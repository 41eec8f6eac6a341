"""The private names of Pyro and PyTorch that pyroflows relies on, each with the reason.

Everything else in the package uses public API (and Pyro's documented subclass protocols:
``AutoContinuous._setup_prototype`` / ``_unpack_latent``, ``Trace_ELBO._get_trace``).
``tests/test_private_names.py`` checks every name here, so an upgrade of Pyro or PyTorch that
moves one fails there, loudly, rather than somewhere inside a guide.
"""

from __future__ import annotations

import logging

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import validation_enabled as infer_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn
from torch.distributions.transforms import _InverseTransform

__all__ = [
    "InverseTransform", "only_param_capture_active", "functorch_active", "global_module_hooks",
    "guess_max_plate_nesting",
]

#: ``t.inv`` of a transform, the class ``Transform.inv`` makes; a stack keeps one instance
#: instead of building it on every access.
InverseTransform = _InverseTransform


def only_param_capture_active() -> bool:
    """Whether no Pyro effect handler is active except ``SVI.step``'s parameter capture
    (``poutine.trace(param_only=True)``): then :class:`~pyroflows.guides.FlowELBO` may draw a
    flow guide without tracing it, since no handler could change or record its sites. Pyro has
    no public way to ask which handlers are active."""
    return all(type(m) is TraceMessenger and m.param_only for m in _PYRO_STACK)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running:
    the fused kernels write their own backward with in-place operations, which these
    transforms refuse, so they step aside. PyTorch has no public way to ask."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def global_module_hooks() -> bool:
    """Whether global forward hooks are registered on every ``nn.Module``
    (``nn.modules.module.register_module_forward_hook``): a guide drawn without its
    ``forward`` would skip them."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def guess_max_plate_nesting(model, guide, args: tuple, kwargs: dict) -> int:
    """How many plate dims ``model`` and ``guide`` use: the deepest vectorized plate dim of one
    unvectorized run of both (which also sets up an autoguide's prototype). This is Pyro's own
    guess, which Pyro offers only as the private method ``ELBO._guess_max_plate_nesting``. It
    runs without the site-shape checks an ELBO adds to it (a caller that vectorizes next checks
    the shapes there, and the checks cost as much as the guess), and its INFO line, which Pyro
    prints by default, is held back."""
    elbo_logger = logging.getLogger("pyro.infer.elbo")
    elbo_logger.addFilter(_no_records)
    try:
        elbo = Trace_ELBO()
        with infer_validation_enabled(False):
            elbo._guess_max_plate_nesting(model, guide, args, kwargs)
    finally:
        elbo_logger.removeFilter(_no_records)
    return int(elbo.max_plate_nesting)


def _no_records(record: logging.LogRecord) -> bool:
    return False
