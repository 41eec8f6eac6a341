"""Saving and loading a fitted :class:`~pyroflows.density.DensityEstimator`: the file's
contents, options as plain values (callables by import name, imported back only from trusted
modules), atomic writes."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _legacy
from . import pipeline
from .training import snapshot

if TYPE_CHECKING:
    from .estimator import DensityEstimator

__all__ = ["save", "load", "encode_option", "decode_option"]

FORMAT = "pyroflows.DensityEstimator"
# The version written; _legacy.DENSITY_FILE_VERSIONS are those read.
FORMAT_VERSION = 4
# Modules whose nn.Module classes a file may name as an option; others need trusted_modules.
TRUSTED_MODULES = ("torch", "pyro", "pyroflows")
_TAG = "__pyroflows_option__"


def _import_name(module: str, qualname: str) -> Any:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _importable_name(obj: Any) -> str | None:
    """``"module:qualname"`` where that import gives back ``obj`` itself, else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    try:
        found = _import_name(module, qualname)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is obj else None


def encode_option(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: plain values, tensors,
    dtypes and devices as they are; numpy values, module-level callables (by import name) and
    ``functools.partial`` of those as tagged dicts. Anything else raises a ``ValueError``
    naming the option (``where``).

    Example:
        >>> saved = encode_option({"activation": torch.nn.Tanh}, "flow_options")
        >>> saved["activation"]["name"]
        'torch.nn.modules.activation:Tanh'
        >>> decode_option(saved, trusted=())
        {'activation': <class 'torch.nn.modules.activation.Tanh'>}
    """
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":  # np.float64 is a float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return {_TAG: "ndarray", "value": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, (tuple, list)):
        return type(value)(encode_option(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        if _TAG in value or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: dict options need string keys")
        return {k: encode_option(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {_TAG: "partial", "func": encode_option(value.func, f"{where}.func"),
                "args": encode_option(value.args, f"{where}.args"),
                "keywords": encode_option(value.keywords, f"{where}.keywords")}
    if callable(value) and (name := _importable_name(value)) is not None:
        return {_TAG: "callable", "name": name}
    raise ValueError(
        f"{where}={value!r} cannot be saved and loaded: pass plain values (numbers, strings, "
        "tuples, lists, dicts, tensors, numpy arrays, dtypes) or, for callables such as "
        "activation, a module-level class or function (e.g. torch.nn.Tanh) or a "
        "functools.partial of one (e.g. functools.partial(torch.nn.LeakyReLU, 0.1)); not a "
        "lambda, a locally defined function or a module instance"
    )


def decode_option(value: Any, trusted: Sequence[str]) -> Any:
    """The inverse of :func:`encode_option`, importing a callable only if it is an ``nn.Module``
    class from ``TRUSTED_MODULES`` or from a module (or package) in ``trusted``."""
    if isinstance(value, (tuple, list)):
        return type(value)(decode_option(v, trusted) for v in value)
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: decode_option(v, trusted) for k, v in value.items()}
    if kind == "ndarray":
        return np.array(value["value"], dtype=np.dtype(value["dtype"]))
    if kind == "partial":
        return functools.partial(decode_option(value["func"], trusted),
                                 *decode_option(value["args"], trusted),
                                 **decode_option(value["keywords"], trusted))
    if kind == "callable":
        module, _, qualname = str(value["name"]).partition(":")
        packages = [module.split(".")[0], module]
        if any(p in tuple(trusted) for p in packages):
            return _import_name(module, qualname)
        obj = _import_name(module, qualname) if packages[0] in TRUSTED_MODULES else None
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        raise ValueError(
            f"the saved options name the callable {module}.{qualname}; only nn.Module classes "
            f"from {', '.join(TRUSTED_MODULES)} are imported by default. If you trust this "
            f"file, pass trusted_modules=({module.split('.')[0]!r},) to load"
        )
    raise ValueError(f"unknown saved option kind {kind!r}")


def save(est: DensityEstimator, path: str | os.PathLike) -> None:
    """Write the fitted ``est`` to ``path``: a temporary file beside it, then ``os.replace``."""
    model = est._require_model()
    _, dtype = est._model_device_dtype()
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "params": {**est.get_params(), **est._saved_options},
        "flow_defaults": dict(est._flow_defaults),
        "whiten": est._whiten,
        "dim": model.dim,
        "precondition_": est.precondition_,
        "dtype": str(dtype).replace("torch.", ""),
        "state_dict": snapshot(model, "cpu"),
        "history": copy.deepcopy(est.history_),
    }
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(cls: type[DensityEstimator], path: str | os.PathLike,
         device: str | torch.device | None, trusted_modules: Sequence[str]) -> DensityEstimator:
    """Rebuild an estimator of class ``cls`` from the file at ``path``."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved pyroflows DensityEstimator")
    if payload.get("version") not in _legacy.DENSITY_FILE_VERSIONS:
        raise ValueError(f"{path}: unsupported format version {payload.get('version')!r}")
    params = dict(payload["params"])
    for name in ("tabak_options", "flow_options"):
        params[name] = decode_option(params.get(name) or {}, tuple(trusted_modules))
    params["dtype"] = None if params["dtype"] is None else getattr(torch, params["dtype"])
    est = cls(**params)
    fields = _legacy.density_file_fields(payload)
    if fields["whiten"] not in pipeline.WHITEN_KINDS:
        raise ValueError(f"{path}: unknown whitening kind {fields['whiten']!r}")
    est._flow_defaults, est._whiten = fields["flow_defaults"], fields["whiten"]
    est.precondition_ = fields["precondition_"]
    dim = int(payload["dim"])
    model = est._build(est.precondition_, dim, torch.device("cpu"),
                       getattr(torch, payload["dtype"]))
    model.load_state_dict(payload["state_dict"])
    target = torch.device(device) if device is not None else (est.device or "cpu")
    est._model = model.to(device=target)
    est.dim_ = dim
    est.history_ = payload["history"]
    if device is not None:
        est.device = torch.device(device)
    return est
