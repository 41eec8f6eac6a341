"""The private names of Pyro and PyTorch that pyroflows relies on, each with the reason.

Everything else uses public API (and Pyro's documented subclass protocols:
``AutoContinuous._setup_prototype`` (setting ``_unconstrained_shapes``, ``_cond_indep_stacks``;
with ``_prototype_hide_fn``) / ``_unpack_latent``, ``Trace_ELBO._get_trace``).
``tests/test_private_names.py`` checks every name here, so an upgrade that moves one fails there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import validation_enabled as infer_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn
from torch.distributions.transforms import _InverseTransform

__all__ = [
    "InverseTransform", "only_param_capture_active", "functorch_active", "global_module_hooks",
    "guess_max_plate_nesting", "register_load_state_dict_pre_hook", "site_is_traced",
    "enumerated_log_factors",
]

#: the class of ``t.inv``; a stack keeps one instance instead of one per access
InverseTransform = _InverseTransform


def only_param_capture_active() -> bool:
    """Whether no Pyro handler is active but ``SVI.step``'s parameter capture: then
    :class:`~pyroflows.guides.FlowELBO` may draw a guide untraced. Pyro has no public way to ask."""
    return all(type(m) is TraceMessenger and m.param_only for m in _PYRO_STACK)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform is running (the fused kernels' in-place backward
    passes step aside under them). PyTorch has no public way to ask."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def global_module_hooks() -> bool:
    """Whether global ``nn.Module`` forward hooks are registered (a draw skips ``forward``)."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def guess_max_plate_nesting(model, guide, args: tuple, kwargs: dict) -> int:
    """How many plate dims ``model`` and ``guide`` use, by Pyro's own guess (the private
    ``ELBO._guess_max_plate_nesting``; it also sets up an autoguide's prototype). Runs without
    the site-shape checks (a vectorizing caller checks them next, at the same cost) and holds
    back Pyro's INFO line."""
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


def register_load_state_dict_pre_hook(module: nn.Module, hook: Callable[..., None]) -> None:
    """``module.register_load_state_dict_pre_hook(hook)`` (``hook(module, state_dict, prefix,
    ...)``), public from torch 2.5; on older torch the private method it wraps."""
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(hook)
    else:
        module._register_load_state_dict_pre_hook(hook, with_module=True)


def site_is_traced(msg: dict) -> bool:
    """Whether ``poutine.trace`` records the sample site ``msg``: not where its ``infer`` holds
    ``_do_not_trace`` (a reparameterizer's auxiliary site). Pyro has no public way to ask."""
    return not msg["infer"].get("_do_not_trace")


def enumerated_log_factors(model_trace, guide_trace) -> tuple[dict, dict, set, Any]:
    """``TraceEnum_ELBO``'s split of a model trace run under ``poutine.enum`` (both traces
    packed): the packed log densities of the sites that depend on no enumerated site, by plate
    ordinal (a frozenset of plate symbols); the unscaled, masked ones of those that do, to be
    summed over ``sum_dims`` by ``pyro.ops.contract.contract_to_tensor``; ``sum_dims``; and the
    common scale those share (a ``ValueError`` where they differ). Pyro has no public way to
    ask: the private ``traceenum_elbo._compute_model_factors``."""
    costs, log_factors, _, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    return costs, log_factors, sum_dims, scale
