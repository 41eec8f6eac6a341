"""Saving and loading a fitted :class:`~pyroflows.density.DensityEstimator`: the file's
contents, options as plain values (callables by name, resolved on load only from the callables
pyroflows knows and those registered with :func:`register_callable`; nothing is imported), the
checks that tell a damaged or foreign file, and atomic writes."""

from __future__ import annotations

import copy
import functools
import os
import pickle
import re
import secrets
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _legacy, flows, transforms
from . import pipeline
from .distill import Student
from .training import snapshot

if TYPE_CHECKING:
    from .estimator import DensityEstimator

__all__ = ["save", "load", "write_atomic", "encode_option", "decode_option", "register_callable",
           "known_callables"]

FORMAT = "pyroflows.DensityEstimator"
# The version written; _legacy.DENSITY_FILE_VERSIONS are those read.
FORMAT_VERSION = 5
_TAG = "__pyroflows_option__"
# What every file torch.save writes begins with (a zip archive).
_ZIP_MAGIC = b"PK\x03\x04"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# A save's temporary file: ".{target name}.{pid}.{token}.tmp" beside the target.
_TEMPORARY = ".{name}.{pid}.{token}.tmp"
# A temporary of another save of the same target untouched this long is stale even where its
# writer's process cannot be checked (another machine on a shared disk, Windows).
STALE_SECONDS = 3600.0

_REGISTERED: dict[str, Callable] = {}


class UnknownCallableError(ValueError):
    """A file names a callable that is neither pyroflows' own nor registered."""


def _lookup(module: str, qualname: str) -> Any:
    """The object at ``qualname`` in the already-imported ``module``, read from the namespaces'
    dicts (no import, no module ``__getattr__``), or ``None``."""
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        try:
            obj = vars(obj).get(part)
        except TypeError:  # no __dict__ (or obj is None)
            return None
    return obj


def _importable_name(obj: Any) -> str | None:
    """``"module:qualname"`` where that name, looked up in the imported module, is ``obj``
    itself (a module-level function or class), else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}:{qualname}" if _lookup(module, qualname) is obj else None


def register_callable(obj: Callable) -> Callable:
    """Let :meth:`DensityEstimator.load <pyroflows.density.DensityEstimator.load>` rebuild
    options that name ``obj`` (a module-level class or function, such as a custom activation);
    returns ``obj``, so it also works as a decorator. Loading resolves a saved callable only
    among :func:`known_callables`: pyroflows' own and the registered ones; a file naming any
    other is refused before anything is imported or called.

    Example:
        >>> import torch, pyroflows as pf
        >>> pf.density.register_callable(torch.nn.Hardtanh) is torch.nn.Hardtanh
        True
        >>> "torch.nn.modules.activation:Hardtanh" in pf.density.known_callables()
        True
    """
    name = _importable_name(obj)
    if not callable(obj) or name is None:
        raise ValueError(f"register_callable: {obj!r} is not a module-level class or function "
                         "(a lambda, a local function or an instance has no name to load by)")
    _REGISTERED[name] = obj
    return obj


def known_callables() -> dict[str, Callable]:
    """The callables a file's options may name, by ``"module:qualname"``: torch's activation
    modules and ``nn.Identity``, pyroflows' layers and their constructors, the layers of the
    registered flow families, and those passed to :func:`register_callable`."""
    activations = [v for v in vars(nn).values() if isinstance(v, type)
                   and issubclass(v, nn.Module) and v.__module__ == nn.Tanh.__module__]
    builtin = [*activations, nn.Identity, *(getattr(transforms, n) for n in transforms.__all__),
               *(family.layer for family in flows.FAMILIES.values())]
    found = {name: obj for obj in builtin if (name := _importable_name(obj)) is not None}
    return {**found, **_REGISTERED}


def encode_option(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: plain values, tensors,
    dtypes and devices as they are; numpy values, module-level callables (by name) and
    ``functools.partial`` of those as tagged dicts. Anything else raises a ``ValueError``
    naming the option (``where``).

    Example:
        >>> saved = encode_option({"activation": torch.nn.Tanh}, "flow_options")
        >>> saved["activation"]["name"]
        'torch.nn.modules.activation:Tanh'
        >>> decode_option(saved)
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


def _resolve(name: Any) -> Callable:
    """The callable a file names, from :func:`known_callables`; never an import."""
    obj = known_callables().get(name) if isinstance(name, str) else None
    if obj is None:
        raise UnknownCallableError(
            f"the saved options name the callable {name!r}, which pyroflows does not know; it "
            "was not imported. If you trust this file, import that callable and pass it to "
            "pyroflows.density.register_callable before loading")
    return obj


def decode_option(value: Any) -> Any:
    """The inverse of :func:`encode_option`; a callable is resolved by name among
    :func:`known_callables` (pyroflows' own and the registered ones), never imported."""
    if isinstance(value, (tuple, list)):
        return type(value)(decode_option(v) for v in value)
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: decode_option(v) for k, v in value.items()}
    if kind == "ndarray":
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biufc":
            raise ValueError(f"a saved array has dtype {dtype}, not a numeric one")
        return np.array(value["value"], dtype=dtype)
    if kind == "partial":
        func, args = decode_option(value["func"]), decode_option(value["args"])
        keywords = decode_option(value["keywords"])
        if not callable(func):
            raise ValueError(f"a saved functools.partial wraps {func!r}, which is not callable")
        if not isinstance(args, (tuple, list)) or not isinstance(keywords, dict):
            raise ValueError("a saved functools.partial needs a tuple of args and a dict of "
                             "keywords")
        return functools.partial(func, *args, **keywords)
    if kind == "callable":
        return _resolve(value.get("name"))
    raise ValueError(f"unknown saved option kind {kind!r}")


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine; ``None`` where that cannot be asked."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temporaries(folder: str, name: str) -> list[str]:
    """Remove the temporary files that earlier saves of ``folder/name`` left behind (a save
    killed mid-write): those whose writing process no longer runs, or that no one has written
    to for ``STALE_SECONDS``; a live save's file stays. Returns the paths removed."""
    pattern = re.compile(re.escape(f".{name[:200]}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        path = os.path.join(folder, entry)
        pid = int(match.group(1))
        try:
            age = time.time() - os.stat(path).st_mtime
            alive = None if pid == os.getpid() else _pid_alive(pid)
            if alive is False or age > STALE_SECONDS:
                os.remove(path)
                removed.append(path)
        except OSError:  # gone already, or not ours to remove: leave it
            continue
    return removed


def _open_temporary(path: str) -> tuple[int, str]:
    """A new file beside ``path`` for writing, created as ``open(path, "wb")`` would create it:
    the umask applies, and where ``path`` exists its permission bits are kept."""
    folder, name = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, _TEMPORARY.format(name=name[:200], pid=os.getpid(),
                                                     token=secrets.token_hex(4)))
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return fd, tmp
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    return fd, tmp


def save(est: DensityEstimator, path: str | os.PathLike) -> None:
    """Write the fitted ``est`` to ``path``: a temporary file beside it, then ``os.replace``;
    first the stale temporaries of earlier, killed saves of ``path`` are removed."""
    model = est._require_model()
    _, dtype = est._model_device_dtype()
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "params": {**est.get_params(), **est._saved_options},
        "flow_defaults": dict(est._flow_defaults),
        "whiten": est._whiten,
        "dim": model.dim,
        "context_dim": model.context_dim,
        "precondition_": est.precondition_,
        "dtype": str(dtype).replace("torch.", ""),
        "state_dict": snapshot(model, "cpu"),
        "history": copy.deepcopy(est.history_),
        # after distill(): the student, rebuilt from its constructor's arguments (an optional
        # entry: files without one, all before it, load without a student)
        "student": None if est.student_ is None else {
            "config": est.student_.config(), "state_dict": snapshot(est.student_, "cpu")},
    }
    write_atomic(payload, path)


def write_atomic(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to ``path`` atomically: a temporary file beside it, flushed to
    disk, then ``os.replace`` (a crash leaves the old file or the new one, never half of one);
    first the stale temporaries of earlier, killed writes of ``path`` are removed. A symbolic
    link is written through, as ``open(path, "wb")`` writes: its target is replaced."""
    path = os.path.realpath(os.fspath(path))
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path}: the folder {folder} does not exist")
    remove_stale_temporaries(folder, name)
    fd, tmp = _open_temporary(path)
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


def _failed_checksum(f: Any) -> str | None:
    """The first entry of the zip archive ``f`` whose contents do not match its CRC-32, else
    ``None``. An archive whose every entry stores a CRC-32 of 0 is not checked: torch writes
    0 for all of them after ``torch.serialization.set_crc32_options(False)`` (one entry of 0
    among checked ones is checked, and fails)."""
    with zipfile.ZipFile(f) as archive:
        entries = archive.infolist()
        if all(info.CRC == 0 for info in entries if info.file_size > 0):
            return None
        for info in entries:
            try:
                with archive.open(info) as member:
                    while member.read(1 << 20):  # (zipfile checks the CRC-32 at the end)
                        pass
            except zipfile.BadZipFile:
                return info.filename
    return None


def read_torch_file(path: str, kind: str, prefix: str = "") -> Any:
    """What ``torch.save`` wrote at ``path``, read with ``torch.load(weights_only=True)`` (no
    pickled code runs); a ``ValueError`` (its message ``prefix`` first) saying what is wrong
    for an empty, foreign or damaged file, ``kind`` naming what the file should be ("a
    pyroflows file", "a checkpoint"). A missing file raises ``FileNotFoundError``."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
        if not head:
            raise ValueError(f"{prefix}{path} is empty: not {kind}")
        if head != _ZIP_MAGIC:
            raise ValueError(f"{prefix}{path} is not {kind} (or is damaged): it does not "
                             "begin as a file of torch.save does")
        f.seek(0)
        try:  # (torch.load does not check the archive's CRC-32s: a flipped byte loads)
            failed = _failed_checksum(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(f"{prefix}{path} is damaged (truncated or corrupted): not a whole "
                             f"archive ({type(e).__name__}: {str(e)[:200]})") from e
        if failed is not None:
            raise ValueError(f"{prefix}{path} is damaged (truncated or corrupted): its entry "
                             f"{failed!r} does not match its checksum")
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{prefix}{path} is not {kind} (or is damaged): it holds objects "
                             f"that {kind} never does, which were not unpickled") from e
        except Exception as e:  # noqa: BLE001 - torch's errors for a bad archive vary
            reason = str(e).split("\n")[0][:200]
            raise ValueError(f"{prefix}{path} is damaged (truncated or corrupted): torch could "
                             f"not read it ({type(e).__name__}: {reason})") from e


def read(path: str | os.PathLike) -> dict:
    """The contents of a ``DensityEstimator`` file (:func:`read_torch_file`); a
    ``ValueError`` saying what is wrong for an empty, foreign, damaged or newer file."""
    path = os.fspath(path)
    payload = read_torch_file(path, "a pyroflows file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is a torch file but not a saved pyroflows DensityEstimator")
    version = payload.get("version")
    if version not in _legacy.DENSITY_FILE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ValueError(f"{path}: format version {version!r} " + (
            "was written by a newer pyroflows; upgrade to load it" if newer else
            f"is unknown (this pyroflows reads {_legacy.DENSITY_FILE_VERSIONS})"))
    return payload


def load(cls: type[DensityEstimator], path: str | os.PathLike) -> DensityEstimator:
    """Rebuild an estimator of class ``cls`` on the CPU from the file at ``path`` (see
    :func:`read`); a file whose contents do not fit together is reported as damaged."""
    payload = read(path)
    try:
        params = dict(payload["params"])
        for name in ("tabak_options", "flow_options"):
            params[name] = decode_option(params.get(name) or {})
        if params["dtype"] is not None:
            params["dtype"] = _DTYPES[params["dtype"]]
        est = cls(**params)
        fields = _legacy.density_file_fields(payload)
        if fields["whiten"] not in pipeline.WHITEN_KINDS:
            raise ValueError(f"unknown whitening kind {fields['whiten']!r}")
        est._flow_defaults, est._whiten = fields["flow_defaults"], fields["whiten"]
        est.precondition_ = fields["precondition_"]
        dim = int(payload["dim"])
        context_dim = fields["context_dim"]
        if context_dim is not None:
            context_dim = int(context_dim)
        model = _built_to_fit(
            lambda: est._build(est.precondition_, dim, torch.device("cpu"),
                               _DTYPES[payload["dtype"]], context_dim=context_dim),
            payload["state_dict"], dim, est.num_layers, est.hidden_dims)
        history = payload["history"]
        if not isinstance(history, dict):
            raise TypeError(f"its history is a {type(history).__name__}, not a dict")
        student = _load_student(payload.get("student"), dim, context_dim,
                                _DTYPES[payload["dtype"]])
    except UnknownCallableError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        reason = " ".join(str(e).split())  # load_state_dict's message spans lines
        reason = reason if len(reason) <= 600 else reason[:600] + " ..."
        raise ValueError(f"{path} is damaged: {type(e).__name__}: {reason}") from e
    est._model, est.dim_, est.history_ = model, dim, history
    est.context_dim_ = context_dim
    est.student_ = student
    return est


def _load_student(saved: Any, dim: int, context_dim: int | None,
                  dtype: torch.dtype) -> Student | None:
    """The saved student (``None`` where the file has none), checked against the model."""
    if saved is None:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise TypeError("its student entry is not a dict with a config")
    config = dict(saved["config"])
    if config.get("dim") != dim or config.get("context_dim") != context_dim:
        raise ValueError(f"its student is for D={config.get('dim')}, C="
                         f"{config.get('context_dim')}, the model for D={dim}, C={context_dim}")
    return _built_to_fit(lambda: Student(**config).to(dtype=dtype), saved["state_dict"], dim,
                         int(config.get("num_layers", 0)),
                         [int(h) for h in config.get("hidden_dims", ())])


def _built_to_fit(build: Callable[[], nn.Module], state_dict: Any, dim: int,
                  num_layers: int, hidden_dims: Sequence[int]) -> nn.Module:
    """``build()`` with the saved ``state_dict`` loaded, refused before anything is built where
    the options a file names could not fit its tensors: every layer holds a bias per hidden
    unit, so ``num_layers * sum(hidden_dims)``, ``num_layers`` and ``dim`` are at most the
    saved tensors' numbers. (A tampered file's ``num_layers=10**6`` took minutes to build
    before its state dict was refused.)"""
    if not isinstance(state_dict, dict):
        raise TypeError(f"its state dict is a {type(state_dict).__name__}, not a dict")
    total = sum(t.numel() for t in state_dict.values() if torch.is_tensor(t))
    asked = max(dim, num_layers, num_layers * sum(hidden_dims))
    if asked > total:
        raise ValueError(f"its options (dim={dim}, num_layers={num_layers}, hidden_dims="
                         f"{tuple(hidden_dims)}) need more numbers than the {total} it saved")
    model = build()
    model.load_state_dict(state_dict)
    return model
