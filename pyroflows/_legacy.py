"""Every backward-compatibility rule, so the rest of the package reads the current layout
only: state dicts, param stores and files with older layouts, each function saying which."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "per_layer_keys_to_stacked", "per_layer_parameter_names", "stack_per_layer_entries",
    "pack_separate_entries", "pack_separate_entries_in_store",
]


def _banks(stack: nn.Module) -> list[tuple[str, nn.Module, list[tuple[int, int]]]]:
    """The banks shared by layers of ``stack`` as ``(path, bank, members)``: ``path`` of the
    bank's submodule ``stacked`` in a layer (``""`` or ``"conditioner."``), ``members`` the
    ``(part index, row)`` of its layers."""
    found: dict[int, tuple[str, nn.Module, list[tuple[int, int]]]] = {}
    for i, part in enumerate(stack.parts):
        if "stacked" in part._modules:
            path, row = "", part
        elif "stacked" in getattr(part._modules.get("conditioner"), "_modules", {}):
            path, row = "conditioner.", part._modules["conditioner"]
        else:
            continue
        found.setdefault(id(row.stacked), (path, row.stacked, []))[2].append((i, row.index))
    return list(found.values())


def per_layer_parameter_names(stack: nn.Module) -> list[str]:
    """The names the stacked parameters of ``stack`` had when every layer kept its own:
    ``"{i}.u"`` (planar; radial alike), ``"{i}.conditioner.flat_parameters"`` (IAF/MAF/RealNVP)."""
    return [f"{i}.{path}{name}" for path, bank, members in _banks(stack) for i, _ in members
            for name, _ in bank.named_parameters(recurse=False)]


def per_layer_keys_to_stacked(stack: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a :class:`~pyroflows.flows.FlowStack`: per-layer entries
    (``"{i}.u"``, ``"{i}.conditioner.flat_parameters"`` and ``.mask``) become the stacked ones
    (``"{i}.stacked.u"``, ``"{i}.conditioner.stacked.flat_parameters"``), rows in row order;
    only where every layer of a bank has its parameters (buffers where present)."""
    for path, bank, members in _banks(stack):
        params = [name for name, _ in bank.named_parameters(recurse=False)]
        buffers = [name for name, _ in bank.named_buffers(recurse=False)]
        if len(members) != bank.num_layers or not all(
                f"{prefix}{i}.{path}{n}" in state_dict for i, _ in members for n in params):
            continue  # not an old-style entry: leave it to the usual checks
        part_of_row = {row: i for i, row in members}
        for n in params + buffers:
            old = [f"{prefix}{part_of_row[k]}.{path}{n}" for k in range(bank.num_layers)]
            if not all(key in state_dict for key in old):
                continue
            value = torch.stack([state_dict[key] for key in old])
            if value.dim() == 2 and value.shape[-1] == 1 and getattr(bank, n).dim() == 1:
                value = value.squeeze(-1)  # (1,) biases and radii -> (L,)
            for i, _ in members:
                state_dict[f"{prefix}{i}.{path}stacked.{n}"] = value
            for key in old:
                del state_dict[key]


def _entries(prefix: str, names: Iterable[str]) -> dict[str, str]:
    from pyro.params.param_store import param_with_module_name

    return {name: param_with_module_name(prefix, name) for name in names}


def stack_per_layer_entries(store, prefix: str, stack: nn.Module) -> None:
    """Param store entries under per-layer names (``flow$$$3.u``,
    ``flow$$$1.conditioner.flat_parameters``) become one under the stacked name
    (``flow$$$0.stacked.u``, ``flow$$$0.conditioner.stacked.flat_parameters``)."""
    full = _entries(prefix, per_layer_parameter_names(stack))
    local: dict[str, Tensor] = {name: store[key].detach() for name, key in full.items()
                                if key in store}
    if not local:
        return
    converted = dict(local)
    per_layer_keys_to_stacked(stack, converted, "")
    stacked_names = {name for name, _ in stack.named_parameters()}  # each tensor's first name
    new = _entries(prefix, converted)
    for key, value in converted.items():
        if key in stacked_names:
            store[new[key]] = value
    for key in local:
        if key not in converted:  # taken into a stacked entry
            del store[full[key]]


def pack_separate_entries(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of the affine layers: separate ``loc``, ``log_scale``,
    ``lower`` entries become the one ``packed`` parameter."""
    keys = {name: prefix + name for name in module._ROWS}
    if prefix + "packed" in state_dict or not all(k in state_dict for k in keys.values()):
        return  # a current state dict, or a broken one: the usual checks report it
    state_dict[prefix + "packed"] = module.pack(
        **{name: state_dict.pop(key) for name, key in keys.items()})


def pack_separate_entries_in_store(store, prefix: str, affine: nn.Module) -> None:
    """Param store entries ``affine.loc``, ``affine.log_scale``, ``affine.lower`` of an affine
    layer become its ``affine.packed`` entry; any other module is left alone."""
    if not hasattr(affine, "_ROWS"):
        return
    old = _entries(prefix, affine._ROWS)
    new = _entries(prefix, ["packed"])["packed"]
    if new in store or not all(key in store for key in old.values()):
        return
    store[new] = affine.pack(**{name: store[key].detach() for name, key in old.items()})
    for key in old.values():
        del store[key]


# ---- conditional planar and radial stacks ------------------------------------------------------
__all__ += ["per_layer_network_hint"]


def per_layer_network_hint(layer: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a conditional planar or radial layer with K > 1 layers: a
    state dict whose network outputs one layer's parameters was saved by a stack with one
    network per layer (``build(..., context_dim=C)`` up to pyroflows 0.2.0): a
    :class:`ValueError` that says to build that layout, which loads it."""
    last = len(layer.network.layers) - 1
    weight = state_dict.get(f"{prefix}network.layers.{last}.weight")
    one = sum(layer._split)
    if layer.num_layers > 1 and weight is not None and weight.shape[0] == one:
        raise ValueError(
            f"{type(layer).__name__}: this state dict holds one network per layer (its output "
            f"has {one} rows, one layer's parameters; this layer's network outputs all "
            f"{layer.num_layers} layers' parameters): build the stack with "
            "shared_network=False (pf.flows.build, AmortizedFlowGuide) to load it")


# ---- DensityEstimator files -------------------------------------------------------------------
__all__ += ["DENSITY_FILE_VERSIONS", "density_file_fields"]

#: The ``DensityEstimator`` file versions read: 2 tags its encoded options (version 1's plain
#: options decode to themselves), 3 adds ``"flow_defaults"``, 4 ``"whiten"``, 5 ``"context_dim"``.
DENSITY_FILE_VERSIONS = (1, 2, 3, 4, 5)


def density_file_fields(payload: dict) -> dict:
    """A ``DensityEstimator`` file's fields as its version built the model: ``flow_defaults``
    (versions 1-2: the layers' log-scale bound, 5.0), ``whiten`` (1-3: ``"learned"``),
    ``precondition_`` (before ``precondition="auto"``: the constructor's) and ``context_dim``
    (1-4: ``None``, a density without a context)."""
    version = payload["version"]
    defaults = payload.get("flow_defaults") if version >= 3 else None
    return {
        "flow_defaults": dict({"log_scale_bound": 5.0} if defaults is None else defaults),
        "whiten": payload.get("whiten") if version >= 4 else "learned",
        "precondition_": payload.get("precondition_", payload["params"]["precondition"]),
        "context_dim": payload.get("context_dim") if version >= 5 else None,
    }
