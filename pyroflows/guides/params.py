"""A flow guide's parameters in Pyro's param store: one walk of its modules per call.

This does what ``pyro.module`` does for a plain ``nn.Module`` attribute of a ``PyroModule``
(the statement its attribute access makes): one ``pyro.param`` statement per parameter that
requires grad, named ``"{owner}.{attribute}$$${parameter}"``, and the same warning for a
frozen parameter of a module in training mode. It adds the rule Pyro has no mechanism for:
the store's entries are the modules' own tensors, so SVI steps exactly what the guide uses
even after ``torch.load``, a ``set_state`` of the store or a second guide of the same class
(``pyro.module`` returns the store's entry there, which the guide does not use, and
``update_module_params=True`` would make the store's tensor the module's, of whatever dtype,
device and shape it has). Matching entries present at set-up are copied into the modules
once, as Pyro's autoguides take them.

Both are one walk of the modules; Pyro's statements after a walk of the store are two, which
costs more per SVI step (``benchmarks/results/vi.md``, "Measured choices").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pyro
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name

from .. import _legacy, flows

__all__ = ["sync_param_store"]


def sync_param_store(owner: PyroModule, names: Sequence[str], at_setup: bool = False,
                     register: bool = False) -> bool:
    """Make the param store's entries for the parameters of ``owner``'s submodules ``names``
    be exactly the modules' tensors (at set-up, first convert entries of older layouts and
    copy matching entries in). With ``register``, inside ``owner``'s active Pyro context, also
    make each parameter's ``pyro.param`` statement; returns whether it did (not with
    module-local parameters, nor for a ``PyroModule`` submodule, whose statements only its
    attribute access makes)."""
    if pyro.settings.get("module_local_params") or not owner._pyro_context.used:
        return False  # no global param store in use, or no Pyro name known yet
    register = register and bool(owner._pyro_context.active) and not any(
        isinstance(owner._modules.get(name), PyroModule) for name in names)
    store = pyro.get_param_store()
    for name in names:
        module = owner._modules.get(name)
        if module is None:
            continue
        prefix = owner._pyro_get_fullname(name)
        if at_setup:
            if isinstance(module, flows.FlowStack):
                _legacy.stack_per_layer_entries(store, prefix, module)
            _legacy.pack_separate_entries_in_store(store, prefix, module)
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                if register and module.training:  # what pyro.module says of it
                    warnings.warn(f"{pname} was not registered in the param store "
                                  "because requires_grad=False. You can silence this "
                                  "warning by calling my_module.train(False)", stacklevel=3)
                continue
            full = param_with_module_name(prefix, pname)
            if full in store:
                old = store[full]
                if old is not p:
                    if at_setup and old.shape == p.shape:
                        with torch.no_grad():
                            p.copy_(old.detach())
                    del store[full]
                    store[full] = p
            else:
                store[full] = p
            if register:
                pyro.param(full, p)
    return register
