"""The density estimator's user API: its arguments and checks, the fit (the split, the automatic
choice of pipeline, the refiner), scoring, sampling (within bounds: rejection), saving and
loading; with a context, the same for a conditional density p(y | x)."""

from __future__ import annotations

import inspect
import math
import operator
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import flows
from .._checks import whole_number
from .._config import validation
from .._distributed import is_data_parallel
from .._random import generator
from ..transforms.tabak import Tabak
from . import distill as distillation
from . import persistence, pipeline, streaming, training
from .distill import DISTILL_DEFAULTS, Student
from .pipeline import DensityModel, evaluate
from .training import Trainer, fit_signature, row_moments, snapshot

__all__ = ["DensityEstimator", "PRECONDITIONERS", "REFINERS", "usable_device"]

#: ``sample(..., bounds=...)``'s default least acceptance rate: below it (estimated from at least
#: ``10 / min_acceptance`` draws of a context) rejection sampling stops with a ``ValueError``.
MIN_ACCEPTANCE = 1e-3
# The most rows one round of rejection sampling draws (all pending contexts together).
_ROUND_ROWS = 2**18

#: The accepted values of ``DensityEstimator(precondition=...)``.
PRECONDITIONERS = ("standardize", "whiten", "cholesky", "tabak", "auto", None)
#: The accepted values of ``DensityEstimator(refine=...)``.
REFINERS = ("tabak", None)
# What precondition="auto" chooses between; "whiten" first, so its candidate is the very fit
# precondition="whiten" makes with the same seed.
_AUTO = ("whiten", "tabak")
_FLOWS = tuple(pipeline.FLOW_DEFAULTS)  # the flows with estimator defaults: maf, realnvp, nsf
# Options named by the constructor itself: passing them again in an options dict is ambiguous.
_RESERVED_FLOW_OPTIONS = ("num_layers", "hidden_dims")
_RESERVED_TABAK_OPTIONS = ("dim",)


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is the user's input
            raise ValueError(f"{name} could not be read as a numeric array: {e}") from e
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric, got an array of dtype {arr.dtype}")
        t = torch.as_tensor(arr)
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t


def _not_boolean(t: Tensor, name: str) -> Tensor:
    """``t``, the rows a density is fitted to, unless boolean (a streamed fit's batches too:
    0/1 values have no density; a boolean context is fine, it is converted)."""
    if t.dtype == torch.bool:
        raise ValueError(f"{name} is boolean: convert it to numbers first (and dequantize "
                         "discrete values: pf.transforms.dequantize)")
    return t


def _check_matrix(t: Tensor, name: str, dim: int | None, device: torch.device,
                  dtype: torch.dtype,
                  what: str = "the number of columns of the training data") -> Tensor:
    """``t`` as an ``(n, dim)`` matrix of finite rows on ``device`` in ``dtype`` (``what``:
    where ``dim`` comes from, for the message)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array shaped (n_samples, n_features), got "
                         f"shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {dim} ({what})")
    t = t.to(device=device, dtype=dtype)
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        shown = rows[:5].tolist()
        more = f" (and {rows.numel() - 5} more)" if rows.numel() > 5 else ""
        raise ValueError(f"{name} has NaN or infinite values (in {dtype}) in {rows.numel()} "
                         f"row(s), e.g. rows {shown}{more}; drop or impute them first")
    return t


def _torch_device(device: str | torch.device, what: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', "
                         "'cuda:1')") from e


def usable_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` where this machine can put tensors, else a ``ValueError``
    naming it (``what``: the context for the message).

    Example:
        >>> usable_device("cpu")
        device(type='cpu')
    """
    device = _torch_device(device, what)
    if device.type == "meta":  # (tensors there hold no values: a move would lose them)
        raise ValueError(f"{what}: the meta device holds no values; choose a real device")
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - torch raises AssertionError, RuntimeError, ...
        reason = str(e).split("\n")[0][:200]
        raise ValueError(f"{what}: device {str(device)!r} is not available on this machine "
                         f"({reason})") from e
    return device


def _constant_columns(t: Tensor) -> list[int]:
    """The columns of ``t`` (n, D) that hold one value in every row."""
    return (t == t[:1]).all(0).nonzero().flatten().tolist()


def _check_columns_vary(given: Tensor, t: Tensor, name: str) -> None:
    """A ``ValueError`` where a column of ``t`` (``given`` converted to the fit's dtype) holds
    one value in every row: its density is a point mass, which no flow fits."""
    constant = _check_resolution(given, t, name)
    if constant is None:
        return
    columns = constant.nonzero().flatten().tolist()
    shown = f"{columns[:10]}" + (f" (and {len(columns) - 10} more)" if len(columns) > 10 else "")
    raise ValueError(
        f"{name}'s columns {shown} are constant (every row holds the value "
        f"{float(t[0, columns[0]]):.6g}{', ...' if len(columns) > 1 else ''}): their density "
        "is a point mass, which no flow fits; drop them")


def _check_resolution(given: Tensor, t: Tensor, name: str) -> Tensor | None:
    """The mask of ``t``'s constant columns (``None``: none), after a ``ValueError`` where one
    varies in ``given`` (``t`` before its conversion to the fit's dtype) and not in ``t``."""
    constant = (t == t[:1]).all(0)
    if not bool(constant.any()):
        return None
    lost = ~(given == given[:1]).all(0).to(constant.device) & constant
    if bool(lost.any()):
        columns = lost.nonzero().flatten().tolist()
        size = float(t[0, lost].abs().max())
        raise ValueError(
            f"{name}'s columns {columns[:10]} vary in the data as given ({given.dtype}) but not "
            f"in {t.dtype}: their spread is below {t.dtype}'s resolution at their size (about "
            f"{size:.0e}). Center or rescale them first, or fit in float64 "
            "(dtype=torch.float64)")
    return constant


def _check_context_columns_vary(t: Tensor) -> None:
    """A ``ValueError`` where a context column holds one value in every training row: it
    carries no information about ``y`` and has no spread to standardize by."""
    columns = _constant_columns(t)
    if columns:
        raise ValueError(f"context's columns {columns[:10]} are constant in the training rows: "
                         "they carry no information and cannot be standardized; drop them")


def _bounds(bounds: Any, dim: int, device: torch.device,
            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``bounds = (low, high)`` as two (D,) tensors (scalars broadcast; infinities leave a side
    open), else a ``ValueError`` saying what is wrong."""
    try:
        low, high = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (low, high), got {bounds!r}") from None
    out = []
    for name, value in (("low", low), ("high", high)):
        t = _as_tensor(value, f"bounds' {name}").to(device=device, dtype=dtype)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, dim)):
            raise ValueError(f"bounds' {name} must be a number or have shape ({dim},), got "
                             f"shape {tuple(t.shape)}")
        if bool(torch.isnan(t).any()):
            raise ValueError(f"bounds' {name} holds NaN")
        out.append(t.expand(dim))
    if not bool((out[0] < out[1]).all()):
        raise ValueError(f"bounds need low < high in every coordinate, got low={out[0].tolist()}, "
                         f"high={out[1].tolist()}")
    return out[0], out[1]


def _parameter_names(fn: Any) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_option_names(options: dict, accepted: set[str], reserved: Sequence[str],
                        what: str) -> None:
    for key in options:
        if not isinstance(key, str):
            raise ValueError(f"{what}: option names must be strings, got {key!r}")
        if key in reserved:
            raise ValueError(f"{what}: {key!r} is a DensityEstimator argument; pass it there")
        if key not in accepted:
            raise ValueError(f"{what}: unknown option {key!r}; accepted: "
                             f"{sorted(accepted - set(reserved))}")


def _accepted_flow_options(flow: str) -> set[str]:
    """The keywords of ``flows.build(flow, ...)`` and of the layer, less those passed here."""
    layer = flows.FAMILIES[flow].layer
    own = _parameter_names(flows.build) - {"name", "dim"}
    return (own | _parameter_names(layer.__init__)) - {"self", "dim"}


class DensityEstimator:
    r"""A normalizing flow fitted to a data matrix by maximum likelihood (seed eq. 1, 4):

    .. math:: \log p(x) = \log N\bigl(z; 0, I\bigr) + \log\Bigl|\det \frac{\partial z}{\partial x}
              \Bigr|, \qquad z = f^{-1}\bigl(P^{-1}(x)\bigr),

    where :math:`f` is a MAF or RealNVP stack and :math:`P` a fixed preconditioner fitted to the
    training split; :meth:`log_prob` is the density of the original :math:`x`, every stage's
    Jacobian included. The pipelines, data side first:

    - ``"whiten"`` (default): standardize, :math:`u = (x - m) / \sigma`; the flow layers; a
      learnable base :math:`z = L^{-1} v`, :math:`L` started at the Cholesky factor of the ML
      covariance of :math:`u`. Untrained, the model is the ML Gaussian, and early stopping
      never returns one that scores lower on validation.
    - ``"cholesky"``: standardize, a fixed whitening :math:`w = C^{-1} u` (:math:`C C^\top` the
      ML covariance of :math:`u`), the layers, the learnable base started at :math:`L = I`; a
      candidate for low-dimensional curved data, worse than ``"whiten"`` on real data sets.
    - ``"standardize"``: the standardization only (the start is the ML diagonal Gaussian).
    - ``"tabak"``: a :class:`~pyroflows.transforms.Tabak` transform fitted to the training split
      (``tabak_options``; its step count chosen on the validation split) Gaussianizes the data;
      the flow models what is left.
    - ``"auto"``: fit ``"whiten"`` and ``"tabak"`` (about twice the time) and keep the one with
      the higher validation log-likelihood (``precondition_``, ``history_["candidates"]``).
    - ``None``: the flow on the raw data, base ``N(0, I)``.

    ``refine="tabak"`` fits a Tabak transform :math:`R` without whitening to the trained flow's
    latent codes: the base becomes :math:`N(R^{-1}(z); 0, I)\,|\det \partial R^{-1}/\partial z|`,
    its steps kept only if they beat none by one standard error (``selection="significant"``).

    **With a context** (``fit(y, context=x)``) it learns a conditional density (seed eq. 27;
    Papamakarios et al. 2017, "Masked Autoregressive Flow for Density Estimation", sec. 3.4):

    .. math:: \log p(y \mid x) = \log N(z; 0, I) + \log\Bigl|\det \frac{\partial z}
              {\partial y}\Bigr|, \qquad z = f_h^{-1}\bigl(P^{-1}(y)\bigr), \qquad
              h = (x - m_x) / s_x,

    :math:`f_h` the conditional MAF or RealNVP stack (``pf.flows.build(..., context_dim=C)``)
    whose networks see the context standardized by the training contexts' mean and ML standard
    deviation (buffers of the model: saved, moved by :meth:`to`). The stages :math:`P` and the
    refiner are fixed maps of :math:`y` (or :math:`z`) alone, exact changes of variables for
    every context, so every pipeline applies: ``"whiten"`` starts the base at
    :math:`N(m + W h, L L^\top)` (:class:`~pyroflows.density.pipeline.ContextShift`), the
    least-squares regression of the standardized :math:`y` on :math:`h` with :math:`L` the
    Cholesky factor of its residuals' ML covariance, so the untrained model is the ML
    linear-Gaussian conditional and early stopping never keeps a worse one; ``"tabak"``
    Gaussianizes the marginal of :math:`y` and the flow models what the context adds;
    ``"auto"`` chooses between them on validation as without a context; ``refine="tabak"``
    refines the base that every context shares. Neural posterior estimation (NPE;
    Papamakarios & Murray 2016, Greenberg et al. 2019): fit :math:`y = \theta` on simulated
    pairs :math:`(\theta, x)`, then ``sample(n, context=x_o, bounds=(low, high))`` draws the
    posterior for an observation, rejecting draws outside a box prior's support.

    Layer log-scales are :math:`b \tanh(s / b)`, ``log_scale_bound=2.0`` unless ``flow_options``
    names one. Training: minibatch Adam, a validated moving average of the parameters, early
    stopping; the best state (the untrained one included) is restored at the end, after an
    error or a ``KeyboardInterrupt``. Where :meth:`fit` is not given them, a conditional fit
    takes a larger step size (3e-3, not 1e-3) and a minibatch that keeps at least 6 steps an
    epoch (128 for 1,000 simulations, 900 of them trained on; 512 from 3,072 training rows up),
    measured on NPE fits (``benchmarks/results/sbi.md``): the SBI benchmark's NPE recipe is
    ``DensityEstimator("nsf", num_layers=3, hidden_dims=(64, 64), flow_options={"bound":
    3.0}).fit(theta, context=x)`` with no further options (bins on [-3, 3]: the prior's box
    is within 1.73 standard deviations).

    Arguments:
        flow: ``"maf"`` (one-pass density, D-pass sampling), ``"realnvp"`` (one pass both
            ways) or ``"nsf"`` (MAF's directions with spline layers, for thin, curved or
            multimodal densities; bins on [-6, 6] of the standardized data, the identity
            beyond, so not for heavy tails).
        num_layers: the number of flow layers.
        hidden_dims: the conditioner networks' hidden sizes.
        precondition: the pipeline (see above).
        device: where to fit; default: that of a tensor passed to :meth:`fit`, else CPU.
        dtype: float32 or float64; default: that of a floating tensor passed to :meth:`fit`.
        seed: makes the split, initialization, shuffling and :meth:`sample` reproducible
            (without it, :meth:`sample` follows torch's global generator).
        tabak_options: keyword arguments of the Tabak preconditioner and refiner.
        flow_options: further keyword arguments of :func:`pyroflows.flows.build` and the layers;
            unknown names and values :meth:`save` cannot store (a lambda, a local function, a
            module instance) raise a ``ValueError`` here.
        refine: ``"tabak"`` or ``None`` (see above).
        context_dim: the context size C; default: read from the context passed to :meth:`fit`
            (none: a density of the rows alone).

    Attributes (after :meth:`fit`):
        dim_: the number of columns D.
        context_dim_: the context size C, ``None`` without a context.
        acceptance_rate_: after :meth:`sample` with ``bounds``, the share of draws inside them
            per context row (shape (B,); () for one context or none); ``None`` after a call
            without bounds.
        history_: per-epoch lists ``epoch``, ``train_log_prob``, ``val_log_prob``; ``best_epoch``,
            ``best_val_log_prob``, ``initial_val_log_prob``, ``final_val_log_prob`` (with the
            refiner), ``stopped``, ``skipped_steps`` (non-finite steps not applied),
            ``seconds``, ``num_train``, ``num_val``, ``precondition``, ``lr`` (Adam's step
            size), ``batch_size`` (streamed and data-parallel: the global batch), and where
            they apply ``refine_steps`` and ``candidates``; log-likelihoods in nats per
            sample, in x-space.
            After :meth:`distill`, ``history_["distill"]``: the distillation's record (see
            :func:`~pyroflows.density.distill.distill`) with its ``fidelity`` report.
        precondition_: the preconditioner the fitted model uses.
        student_: after :meth:`distill`, the IAF student that :meth:`sample` draws from
            (:class:`~pyroflows.density.distill.Student`); ``None`` before, and again after a
            new :meth:`fit`.

    Example:
        >>> import torch, pyroflows as pf
        >>> x = torch.randn(500, 2, dtype=torch.float64) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]],
        ...     dtype=torch.float64)
        >>> est = pf.density.DensityEstimator("maf", num_layers=2, hidden_dims=(16,), seed=0)
        >>> est = est.fit(x, max_epochs=5, progress=False)
        >>> est.log_prob(x[:3]).shape
        torch.Size([3])
        >>> est.sample(4).shape
        torch.Size([4, 2])
        >>> est.history_["best_val_log_prob"] >= est.history_["initial_val_log_prob"]
        True
        >>> c = torch.randn(300, 1, dtype=torch.float64)  # p(y | c): y = 2 c + noise
        >>> y = 2 * c + 0.5 * torch.randn(300, 1, dtype=torch.float64)
        >>> cond = pf.density.DensityEstimator("maf", num_layers=2, hidden_dims=(16,), seed=0)
        >>> cond = cond.fit(y, context=c, max_epochs=5, progress=False)
        >>> cond.log_prob(y[:3], context=c[:3]).shape
        torch.Size([3])
        >>> cond.sample(10, context=torch.tensor([[0.0], [1.0]], dtype=torch.float64)).shape
        torch.Size([10, 2, 1])
        >>> cond.sample(10, context=torch.tensor([1.0], dtype=torch.float64), bounds=(0, 4)).shape
        torch.Size([10, 1])
    """

    def __init__(self, flow: str = "maf", num_layers: int = 5,
                 hidden_dims: Sequence[int] = (128, 128), precondition: str | None = "whiten",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 seed: int | None = None, tabak_options: dict | None = None,
                 flow_options: dict | None = None, refine: str | None = None,
                 context_dim: int | None = None) -> None:
        if flow not in _FLOWS:
            raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        if refine not in REFINERS:
            raise ValueError(f"refine must be one of {REFINERS}, got {refine!r}")
        num_layers = whole_number(num_layers, "num_layers", 1)
        try:
            hidden = tuple(whole_number(h, "hidden_dims", 1) for h in hidden_dims)
        except (TypeError, ValueError):
            hidden = ()
        if not hidden:
            raise ValueError(f"hidden_dims must be a sequence of positive whole numbers, got "
                             f"{hidden_dims!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if context_dim is not None:
            try:
                context_dim = operator.index(context_dim)
            except TypeError:
                context_dim = -1
            if context_dim < 1:
                raise ValueError(f"context_dim must be a positive integer or None, got "
                                 f"{context_dim!r}")
        self.context_dim = context_dim
        self.flow = flow
        self.num_layers = num_layers
        self.hidden_dims = hidden
        self.precondition = precondition
        self.refine = refine
        self.device = None if device is None else _torch_device(device, "device")
        self.dtype = dtype
        self.seed = None if seed is None else whole_number(seed, "seed")
        self.tabak_options = dict(tabak_options or {})
        self.flow_options = dict(flow_options or {})
        _check_option_names(self.flow_options, _accepted_flow_options(flow),
                            _RESERVED_FLOW_OPTIONS, "flow_options")
        _check_option_names(self.tabak_options, _parameter_names(Tabak.__init__) - {"self"},
                            _RESERVED_TABAK_OPTIONS, "tabak_options")
        # Encoded now, so an option that save/load cannot carry is rejected here, not later.
        self._saved_options = {
            name: persistence.encode_option(getattr(self, name), name)
            for name in ("tabak_options", "flow_options")
        }
        # Saved with the model: a file keeps the defaults it was built with.
        self._flow_defaults = dict(pipeline.FLOW_DEFAULTS[flow])
        self._whiten = pipeline.WHITEN
        self._model: DensityModel | None = None
        self.precondition_: str | None = None if precondition == "auto" else precondition
        self.dim_: int | None = None
        self.context_dim_: int | None = None
        self.history_: dict | None = None
        self.acceptance_rate_: Tensor | None = None
        self.student_: Student | None = None

    def get_params(self) -> dict:
        """The constructor arguments (what :meth:`save` stores to rebuild the model)."""
        return {"flow": self.flow, "num_layers": self.num_layers, "hidden_dims": self.hidden_dims,
                "precondition": self.precondition,
                "device": None if self.device is None else str(self.device),
                "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
                "seed": self.seed, "tabak_options": dict(self.tabak_options),
                "flow_options": dict(self.flow_options), "refine": self.refine,
                "context_dim": self.context_dim}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v not in (None, {}))
        fitted = "" if self._model is None else f", fitted on D={self.dim_}" + (
            "" if self.context_dim_ is None else f" given C={self.context_dim_}")
        return f"DensityEstimator({args}{fitted})"

    def _require_model(self) -> DensityModel:
        if self._model is None:
            raise ValueError("this DensityEstimator is not fitted yet: call fit(x) first")
        return self._model

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self._require_model().flow.parameters())
        return p.device, p.dtype

    def _prepare(self, x: Any, name: str = "x") -> tuple[Tensor, bool]:
        """A fitted model's input as ``(n, D)`` on its device and dtype; whether it was ``(D,)``."""
        model = self._require_model()
        t = _as_tensor(x, name)
        single = t.dim() == 1
        if single:
            t = t.unsqueeze(0)
        device, dtype = self._model_device_dtype()
        return _check_matrix(t, name, model.dim, device, dtype), single

    def _prepare_context(self, context: Any, name: str = "context"
                         ) -> tuple[Tensor | None, bool]:
        """The contexts of a call as ``(B, C)`` on the model's device and dtype and whether they
        were one ``(C,)``; ``(None, True)`` for a model without a context. Passing a context
        to an unconditional model, or none to a conditional one, is a ``ValueError`` (its
        message names the argument ``name``)."""
        model = self._require_model()
        if model.context_dim is None:
            if context is not None:
                raise ValueError("this DensityEstimator was fitted without a context (a density "
                                 f"of the rows alone): do not pass {name}=, or fit(y, "
                                 "context=x) to learn p(y | x)")
            return None, True
        if context is None:
            raise ValueError(f"this DensityEstimator learned p(y | context) with "
                             f"{model.context_dim} context columns: pass {name}= of shape "
                             f"({model.context_dim},) or (n, {model.context_dim})")
        t = _as_tensor(context, name)
        if t.dim() not in (1, 2):
            raise ValueError(f"{name} must have shape ({model.context_dim},) or (n, "
                             f"{model.context_dim}), got shape {tuple(t.shape)}")
        single = t.dim() == 1
        if single:
            t = t.unsqueeze(0)
        device, dtype = self._model_device_dtype()
        return _check_matrix(t, name, model.context_dim, device, dtype,
                             what="the context width of the fit"), single

    def _inputs(self, x: Any, context: Any, names: tuple[str, str] = ("x", "context")
                ) -> tuple[Tensor, Tensor | None, bool]:
        """``x`` as ``(n, D)`` rows and their contexts ``(n, C)`` (one context of shape (C,)
        repeated for every row; one point of shape (D,) repeated for every context), and
        whether the answer is one value; error messages name the arguments ``names``."""
        t, single = self._prepare(x, names[0])
        c, one_context = self._prepare_context(context, names[1])
        if c is None:
            return t, None, single
        if one_context:
            return t, c.expand(t.shape[0], -1), single
        if single:
            return t.expand(c.shape[0], -1), c, False
        if c.shape[0] != t.shape[0]:
            raise ValueError(f"{names[1]} has {c.shape[0]} rows but {names[0]} has "
                             f"{t.shape[0]}: pass one context row per row, or one context of "
                             "shape (C,) for every row")
        return t, c, single

    def _build(self, precondition: str | None, dim: int, device: torch.device,
               dtype: torch.dtype, seed: int | None = None,
               context_dim: int | None = None) -> DensityModel:
        """The unfitted model of ``precondition``'s pipeline, with this estimator's options."""
        return pipeline.build_model(
            precondition, dim, flow=self.flow, num_layers=self.num_layers,
            hidden_dims=self.hidden_dims, flow_options=self.flow_options,
            flow_defaults=self._flow_defaults, whiten=self._whiten,
            tabak_options=self.tabak_options, refine=self.refine, seed=seed,
            context_dim=context_dim,
        ).to(device=device, dtype=dtype)

    def fit(self, x: Any, x_val: Any = None, max_epochs: int = 500,
            batch_size: int | None = None, lr: float | None = None, patience: int = 20,
            val_fraction: float = 0.1,
            weight_decay: float = 0.0, averaging_epochs: float = 1.0,
            progress: bool = True, *, clip_factor: float | None = None, context: Any = None,
            context_val: Any = None, y_val: Any = None, distributed: bool | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1,
            resume: str | os.PathLike | None = None) -> DensityEstimator:
        """Fit to the rows of ``x`` (numpy array or tensor, shaped (n, D)); returns ``self``.
        With ``context`` (shaped (n, C), one row per row of ``x``), fit ``p(x | context)``.

        **Streamed data** (:mod:`~pyroflows.density.streaming`): ``x`` may be a map-style
        ``Dataset`` (such as ``ArrayDataset(np.load(path, mmap_mode="r"))``, read a batch at a
        time; ``x_val`` default: ``val_fraction`` of its rows), a ``DataLoader`` or a list of
        batches (``x_val`` needed, given the same way); with a context, batches and items are
        ``(y, c)`` pairs. The preconditioning statistics come from one streaming pass
        (float64 sums); only ``"standardize"``, ``"whiten"``, ``"cholesky"`` and ``None``
        stream: Tabak's fit (``"tabak"``, ``"auto"``, ``refine="tabak"``) needs the rows in
        memory and is a ``ValueError``. **Data-parallel** under ``torchrun`` (or any initialized
        process group of more than one process, or ``distributed=True``): every rank passes
        the same ``Dataset`` and trains on its share of each global batch of ``batch_size``
        rows, or its own ``DataLoader``/arrays shard; the gradients and validation sums are
        all-reduced, so every rank takes the same steps and stops alike, and only rank 0 shows
        progress and writes checkpoints. Progress shows rows trained per second
        (``history_["rows_per_second"]``).

        The training rows must number at least D + 1: fewer lie on a hyperplane, where the
        likelihood is unbounded. A column that holds one value in every row (also one that
        varies only below the fit dtype's resolution, such as data near 1e30 in float32) is an
        error. A half-precision tensor is fitted in float32 (with a warning): float16 has too
        few digits for the covariance and the log-determinants.

        A ``KeyboardInterrupt`` (Ctrl-C) stops the fit within a step and keeps the best state
        so far, with a warning: ``history_["stopped"]`` is ``"interrupted"`` and
        ``history_["interrupted_in"]`` says where (``"tabak: precondition"``: the Tabak stage
        keeps its steps so far and the flow is untrained; ``"<precondition>: flow"``: the flow
        keeps its best epoch and a refiner is left out; ``"<precondition>: refine"``: the
        refiner keeps its steps so far). No later phase or candidate runs.

        Arguments:
            x: training data.
            x_val: held-out rows for early stopping (default: ``val_fraction`` of ``x``'s rows).
            max_epochs: the most passes over the training rows (0: keep the initial model).
            batch_size: minibatch size (capped at the number of training rows); default:
                256, and with a context the largest of 512, 256, 128, 64 and 32 that makes
                at least 6 steps an epoch (:func:`~pyroflows.density.training.default_batch_size`;
                streamed fits: 256); the size used is ``history_["batch_size"]``.
            lr: Adam's learning rate; default: 1e-3, and 3e-3 with a context
                (:func:`~pyroflows.density.training.default_lr`); the rate used is
                ``history_["lr"]``.
            patience: stop after this many epochs without a better validation log-likelihood.
            val_fraction: the held-out share of ``x`` when ``x_val`` is not given.
            weight_decay: Adam's L2 penalty.
            averaging_epochs: the horizon in epochs (at least 10 steps) of the parameters' moving
                average that is validated and kept; 0: the last Adam iterate.
            clip_factor: each step's gradient is clipped at this multiple of the running
                gradient norm of about the last 100 steps, below the fixed cap of 1e3
                (:class:`~pyroflows.density.training.GradientClip`); 0: the fixed cap only;
                default: 2 with a context, 0 without
                (:func:`~pyroflows.density.training.default_clip_factor`); the factor used is
                ``history_["clip_factor"]``.
            progress: show a progress bar.
            context: the contexts of the rows of ``x`` (conditional density estimation: ``x``
                is the ``y`` of ``p(y | context)``); a column constant over the training rows
                is an error.
            context_val: the contexts of the rows of ``x_val`` (needed with it, and only then).
            y_val: another name for ``x_val``, for the ``p(y | context)`` reading.
            distributed: train data-parallel (``None``: where a process group of more than
                one process is initialized).
            checkpoint: a file the training state is written to atomically every
                ``checkpoint_every`` epochs and after the last (model, optimizer, averaged
                parameters, best state, epoch, history, random states).
            checkpoint_every: epochs between checkpoints.
            resume: a checkpoint of this fit (same data, options, processes) to continue from,
                reaching the result of an uninterrupted fit; read with
                ``torch.load(weights_only=True)``, so no code in it runs.
        """
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"need batch_size >= 1 (or None: the default), got {batch_size}")
        if lr is not None and not 0 < lr < math.inf:  # (inf: every step skipped, silently)
            raise ValueError(f"need a finite lr > 0 (or None: the default), got {lr}")
        max_epochs = whole_number(max_epochs, "max_epochs")
        patience = whole_number(patience, "patience")
        if batch_size is not None:
            batch_size = whole_number(batch_size, "batch_size", 1)
        lr = None if lr is None else float(lr)
        if not float(averaging_epochs) >= 0:
            raise ValueError(f"averaging_epochs must be >= 0, got {averaging_epochs}")
        if clip_factor is not None:
            if not float(clip_factor) >= 0:
                raise ValueError(f"clip_factor must be >= 0 (0: the fixed cap only) or None "
                                 f"(the default), got {clip_factor}")
            clip_factor = float(clip_factor)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if y_val is not None:
            if x_val is not None:
                raise ValueError("pass the held-out rows once: x_val or y_val (another name for "
                                 "it), not both")
            x_val = y_val
        checkpoint_every = whole_number(checkpoint_every, "checkpoint_every", 1)
        if checkpoint is not None:  # (found before the work, not after an epoch of it)
            folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
            missing = [not os.path.isdir(folder)]
            if is_data_parallel(distributed):  # rank 0 writes: its answer, on every rank
                torch.distributed.broadcast_object_list(missing, src=0)
            if missing[0]:
                raise ValueError(f"checkpoint: the folder {folder} does not exist (on the "
                                 "process that writes it: rank 0 when data-parallel)")
        saving = {"checkpoint": checkpoint, "checkpoint_every": int(checkpoint_every),
                  "resume": resume}
        if (checkpoint is not None or resume is not None) and self.precondition == "auto":
            raise ValueError("checkpoints hold one model: choose precondition='whiten' or "
                             "'tabak' (what 'auto' chose: precondition_) to checkpoint a fit")
        if streaming.is_stream(x) or is_data_parallel(distributed):
            return streaming.fit_streamed(
                self, x, x_val, max_epochs=int(max_epochs),
                batch_size=training.DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size),
                lr=lr, patience=int(patience), val_fraction=float(val_fraction),
                weight_decay=float(weight_decay), averaging_epochs=float(averaging_epochs),
                clip_factor=clip_factor, progress=progress, distributed=distributed,
                context=context, context_val=context_val, **saving)
        start = time.perf_counter()
        given = _not_boolean(_as_tensor(x, "x"), "x")
        device = usable_device(self.device or given.device, "fit")
        dtype = self.dtype or self._fit_dtype(given, from_torch=isinstance(x, Tensor))
        t = _check_matrix(given, "x", None, device, dtype)
        n, dim = t.shape
        if dim < 1:
            raise ValueError("x has no columns")
        gen = generator(self.seed)
        if x_val is None:
            num_val = max(1, round(val_fraction * n))
            held_out = (f", {num_val} of them held out for validation (val_fraction="
                        f"{val_fraction})")
        else:
            x_val_t = _check_matrix(_not_boolean(_as_tensor(x_val, "x_val"), "x_val"), "x_val",
                                    dim, device, dtype)
            if x_val_t.shape[0] < 1:
                raise ValueError("x_val has no rows: pass held-out rows, or x_val=None to hold "
                                 "out val_fraction of x")
            num_val, held_out = 0, ""
        c, c_val = self._fit_contexts(context, context_val, n,
                                      None if x_val is None else x_val_t.shape[0], device, dtype)
        if n - num_val < dim + 1:
            raise ValueError(
                f"x has {n} row{'s' * (n != 1)}{held_out}: a fit needs at least D + 1 = "
                f"{dim + 1} training rows (fewer lie on a hyperplane, where the likelihood is "
                "unbounded)")
        _check_columns_vary(given, t, "x")
        if x_val is None:
            perm = torch.randperm(n, generator=gen).to(device)
            x_train, x_val_t = t[perm[num_val:]], t[perm[:num_val]]
            if c is not None:
                c, c_val = c[perm[num_val:]], c[perm[:num_val]]
            columns = _constant_columns(x_train)
            if columns:
                raise ValueError(
                    f"x's columns {columns[:10]} are constant in the {n - num_val} training "
                    f"rows: they vary only in the {num_val} rows held out for validation "
                    f"(val_fraction={val_fraction}); pass more rows, held-out rows as x_val, "
                    "or another seed")
        else:
            x_train = t
        if c is not None:
            _check_context_columns_vary(c)
        if batch_size is None:
            batch_size = training.default_batch_size(x_train.shape[0], c is not None)

        candidates = _AUTO if self.precondition == "auto" else (self.precondition,)
        fits = []
        for precondition in candidates:
            try:
                model = self._fit_one(
                    precondition, dim, device, dtype, x_train, x_val_t, gen,
                    max_epochs=int(max_epochs), batch_size=int(batch_size), lr=lr,
                    patience=int(patience), weight_decay=float(weight_decay),
                    averaging_epochs=float(averaging_epochs), clip_factor=clip_factor,
                    progress=progress, start=start,
                    contexts=(c, c_val), saving=saving,
                )
            except KeyboardInterrupt:
                # before this candidate had a usable state: keep the finished ones, if any
                if not fits:
                    raise
                self._keep_best(fits, start)
                self._interrupted(f"{precondition}: precondition", "the candidate "
                                  f"{precondition!r} is left out")
                return self
            except BaseException:
                # a later candidate failed: hold the best finished one, not the failed one
                if fits:
                    self._keep_best(fits, start)
                raise
            fits.append((self.history_["final_val_log_prob"], precondition, model, self.history_))
            if self.history_["stopped"] == "interrupted":  # Ctrl-C ends the whole fit
                break
        stopped = {key: self.history_.get(key) for key in ("stopped", "interrupted_in")}
        if len(fits) > 1:
            self._keep_best(fits, start)
            if stopped["stopped"] == "interrupted":
                self.history_.update(stopped)
        return self

    def _fit_contexts(self, context: Any, context_val: Any, n: int, n_val: int | None,
                      device: torch.device, dtype: torch.dtype
                      ) -> tuple[Tensor | None, Tensor | None]:
        """The fit's contexts as ``(n, C)`` and ``(n_val, C)`` matrices (``n_val``: the rows of
        ``x_val``, ``None`` without it), or ``(None, None)``; a ``ValueError`` for a context
        that is missing, unexpected, misshapen, of the wrong width or not finite."""
        if context is None:
            if self.context_dim is not None:
                raise ValueError(f"this DensityEstimator was built with context_dim="
                                 f"{self.context_dim}: pass context= (one row of "
                                 f"{self.context_dim} values per row of y)")
            if context_val is not None:
                raise ValueError("context_val is given but context is not: pass the training "
                                 "rows' contexts too, or neither")
            return None, None
        width = self.context_dim
        out = []
        for name, value, rows, of in (("context", context, n, "x"),
                                      ("context_val", context_val, n_val, "x_val")):
            if rows is None:
                if value is not None:
                    raise ValueError("context_val is given but x_val (y_val) is not: pass the "
                                     "held-out rows too, or neither")
                out.append(None)
                continue
            if value is None:
                raise ValueError("x_val (y_val) needs context_val, the contexts of its rows")
            t = _as_tensor(value, name)
            if t.dim() != 2:
                hint = " (one context column: reshape(-1, 1))" if t.dim() == 1 else ""
                raise ValueError(f"{name} must be a 2-D array shaped (n_samples, "
                                 f"n_context_features), one row per row of {of}, got shape "
                                 f"{tuple(t.shape)}{hint}")
            if t.shape[0] != rows:
                raise ValueError(f"{name} has {t.shape[0]} rows but {of} has {rows}: pass one "
                                 f"context row per row of {of}")
            what = ("context_dim" if self.context_dim is not None
                    else "the number of columns of context")
            given, t = t, _check_matrix(t, name, width, device, dtype, what=what)
            if t.shape[0]:
                _check_resolution(given, t, name)  # (a context too: it varies, as given)
            if t.shape[1] < 1:
                raise ValueError(f"{name} has no columns")
            width = t.shape[1]
            out.append(t)
        return out[0], out[1]

    @staticmethod
    def _fit_dtype(given: Tensor, from_torch: bool) -> torch.dtype:
        """The dtype a fit without ``dtype=`` uses: a floating tensor's own (half precision:
        float32), else the default dtype (float32 where that is neither float32 nor float64)."""
        if from_torch and given.is_floating_point():
            if given.dtype in (torch.float32, torch.float64):
                return given.dtype
            warnings.warn(f"x is {given.dtype}: fitting in float32 ({given.dtype} has too few "
                          "digits for the covariance and the log-determinants); pass dtype= to "
                          "choose", stacklevel=3)
            return torch.float32
        default = torch.get_default_dtype()
        return default if default in (torch.float32, torch.float64) else torch.float32

    def _interrupted(self, where: str, what: str, stacklevel: int = 4) -> None:
        """Record and report a ``KeyboardInterrupt`` that ended the fit in phase ``where``."""
        self.history_["stopped"], self.history_["interrupted_in"] = "interrupted", where
        warnings.warn(f"fit interrupted ({where}): keeping the best state so far; {what}",
                      stacklevel=stacklevel)

    def _keep_best(self, fits: list, start: float) -> None:
        """Hold the candidate with the higher validation score (the first on a tie or NaN)."""
        best = max(range(len(fits)), key=lambda i: (fits[i][0] > fits[0][0], -i))
        _, chosen, model, history = fits[best]
        history["candidates"] = {pre: val for val, pre, _, _ in fits}
        history["seconds"] = time.perf_counter() - start
        self._model, self.history_ = model, history
        self.precondition_ = chosen

    def _fit_one(self, precondition, dim, device, dtype, x_train, x_val_t, gen, *, max_epochs,
                 patience, progress, start, contexts, saving=None, **train) -> DensityModel:
        """Build, fit and hold the model of one preconditioner; held from the end of the
        stages' fit, so the estimator ends in the best state so far whatever happens after.
        An interrupted phase (a Tabak fit that reports it, or the training loop) ends the fit:
        no later phase runs, and a refiner that was not fitted is the identity. ``contexts``:
        the splits' contexts, ``(None, None)`` without."""
        c_train, c_val = contexts
        context_dim = None if c_train is None else c_train.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            model = self._build(precondition, dim, device, dtype,
                                seed=int(torch.randint(2**31, (1,))), context_dim=context_dim)
        h_train = h_val = None
        if context_dim is not None:
            pipeline.fit_context(model, c_train)
            h_train, h_val = model.features(c_train), model.features(c_val)
        u_train, ld_train, u_val, ld_val = pipeline.fit_stages(model, x_train, x_val_t, progress,
                                                               h_train)
        trainer = Trainer(model, u_train, ld_train, u_val, ld_val, gen, h_train=h_train,
                          h_val=h_val, **train)
        saving = dict(saving or {})
        interrupted = any(pipeline.interrupted(stage) for stage in model.stages)
        signature = None
        if not interrupted:
            mean, sd = row_moments(x_train if c_train is None else (x_train, c_train))
            signature = fit_signature(self, precondition, dim, context_dim, dtype,
                                      trainer.batch_size, x_train.shape[0], x_val_t.shape[0], 1,
                                      training=trainer.options, mean=mean, sd=sd)
            resume = saving.pop("resume", None)
            if resume is not None:  # before the estimator lets go of its model: loses nothing
                trainer.restore(resume, signature)
        self._model, self.dim_, self.history_ = model, dim, trainer.history
        self.student_ = None  # a student of the model this fit replaces
        self.context_dim_ = context_dim
        self.precondition_ = precondition
        history = self.history_
        history["precondition"] = precondition
        history["batch_size"] = trainer.batch_size
        if interrupted:
            self._interrupted(f"{precondition}: precondition", "the flow is untrained",
                              stacklevel=5)
        else:
            trainer.run(max_epochs, patience, progress, start, signature=signature, **saving)
        history["final_val_log_prob"] = history["best_val_log_prob"]
        if history["stopped"] == "interrupted":
            history.setdefault("interrupted_in", f"{precondition}: flow")
        if model.refine:
            if history["stopped"] == "interrupted":
                pipeline.skip_refiner(model)
            else:
                try:
                    history["final_val_log_prob"] = pipeline.fit_refiner(
                        model, u_train, u_val, ld_val, progress, h_train, h_val)
                except KeyboardInterrupt:
                    pipeline.skip_refiner(model)
                    self._interrupted(f"{precondition}: refine", "the refiner is left out",
                                      stacklevel=5)
                except BaseException:
                    pipeline.skip_refiner(model)
                    history["stopped"] = "error"
                    raise
                if pipeline.interrupted(model.refine[0]):
                    history["stopped"] = "interrupted"
                    history["interrupted_in"] = f"{precondition}: refine"
            history["refine_steps"] = int(model.refine[0].num_steps)
        history["seconds"] = time.perf_counter() - start
        return model

    def log_prob(self, x: Any, context: Any = None) -> Tensor:
        """``log p(x)`` in nats for each row of ``x`` (shape (n, D), or (D,) for one point); with
        a context, ``log p(x | context)``: ``context`` of shape (n, C), one row per row of
        ``x``, or (C,) for every row (``x`` of shape (D,) with contexts (B, C): that point
        under each context, shape (B,))."""
        t, c, single = self._inputs(x, context)
        if t.shape[0] == 0:
            return t.new_zeros(0)
        with torch.no_grad(), validation(False):
            lp = evaluate(self._require_model().log_prob, t, c)
        return lp[0] if single else lp

    def score(self, x: Any, context: Any = None) -> float:
        """The mean log-likelihood of the rows of ``x`` (given ``context``, as in
        :meth:`log_prob`), in nats per sample (at least one row)."""
        lp = self.log_prob(x, context)
        if lp.numel() == 0:
            raise ValueError("x has no rows: the mean log-likelihood of no rows is undefined")
        return float(lp.mean())

    def sample(self, n: int, seed: int | None = None, *, context: Any = None,
               bounds: Any = None, min_acceptance: float = MIN_ACCEPTANCE,
               exact: bool = False) -> Tensor:
        """``n`` draws from the fitted density, shaped (n, D); ``n`` a whole number (2.7 is an
        error, not 2 draws). With a context of shape (B, C): ``n`` draws for each row, shaped
        (n, B, D); of shape (C,): (n, D).

        ``bounds = (low, high)`` (numbers or (D,) arrays; ``-inf``/``inf`` leave a side open)
        keeps only draws inside the box, drawing more until each context has ``n`` (rejection
        sampling: draws of the density truncated to the box, as NPE needs for a bounded
        prior). The share of draws accepted per context is kept in ``acceptance_rate_``. Where
        a context's share, estimated from at least ``10 / min_acceptance`` draws, is below
        ``min_acceptance``, sampling stops with a ``ValueError``: the fitted density puts
        almost no mass inside the bounds. :meth:`log_prob` stays the untruncated density.

        After :meth:`distill` the draws are the student's (one pass per layer), an
        approximation of the fitted density whose cost ``history_["distill"]["fidelity"]``
        reports; ``exact=True`` draws from the fitted density itself (a MAF: D passes per
        layer). :meth:`log_prob` is always the fitted density's.

        ``seed``: the same ``n`` draws at every call. Without it, the draws continue a
        sequence of the estimator's ``seed`` (one per fitted or loaded model), or, for an
        estimator without one, come from torch's global generator."""
        model = self._require_model()
        try:
            count = operator.index(n)
        except TypeError:
            raise ValueError(f"n must be a whole number of draws, got {n!r}") from None
        if count < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        c, single = self._prepare_context(context)
        student = None if exact else self.student_
        rows = 1 if c is None else c.shape[0]
        device, dtype = self._model_device_dtype()
        gen = generator(self._sample_seed(model) if seed is None else int(seed), device)
        if bounds is None:
            z = torch.randn(count, rows, model.dim, generator=gen, device=device, dtype=dtype)
            draws = self._draw(model, z, c, student)
            self.acceptance_rate_ = None  # (it describes the last call; this one had no bounds)
        else:
            if not 0.0 < float(min_acceptance) <= 1.0:
                raise ValueError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
            low, high = _bounds(bounds, model.dim, device, dtype)
            draws, rate = self._draw_within(model, student, count, c, rows, low, high, gen,
                                            float(min_acceptance))
            self.acceptance_rate_ = rate[0] if single else rate
        return draws[:, 0] if single else draws

    def _seeds(self, offset: int) -> torch.Generator:
        """A CPU generator of seeds: from the estimator's ``seed`` plus ``offset`` (apart from
        the fit's stream), or without one from torch's global generator, so that
        ``torch.manual_seed`` governs it as it does PyTorch's own sampling."""
        return generator(None if self.seed is None else self.seed + offset)

    def _sample_seed(self, model: DensityModel) -> int:
        """The seed of :meth:`sample`'s draws of ``model`` without a ``seed`` argument: with the
        estimator's ``seed``, the next of one stream from it per fitted or loaded model (two
        estimators of one seed draw the same sequence; each call continues it); without, a
        draw of torch's global generator."""
        if self.seed is None:
            return int(torch.randint(2**62, (1,)))
        held = self.__dict__.get("_sample_stream")
        if held is None or held[0]() is not model:
            held = (weakref.ref(model), self._seeds(2))
            self.__dict__["_sample_stream"] = held
        return int(torch.randint(2**62, (1,), generator=held[1]))

    @staticmethod
    def _draw(model: DensityModel, z: Tensor, c: Tensor | None,
              student: Student | None = None) -> Tensor:
        """The images of base draws ``z`` (k, R, D) under the contexts ``c`` (R, C) or none:
        the model's, or the ``student``'s where given."""
        k, rows, dim = z.shape
        if z.numel() == 0:
            return z.clone()
        flat_c = None if c is None else c.expand(k, rows, c.shape[-1]).reshape(k * rows, -1)
        with torch.no_grad(), validation(False):
            if student is None:
                out = evaluate(model.sample, z.reshape(k * rows, dim), flat_c)
            else:
                out = evaluate(lambda e, h: distillation.sample(model, student, e, h),
                               z.reshape(k * rows, dim), flat_c)
            return out.reshape(k, rows, dim)

    def _draw_within(self, model: DensityModel, student: Student | None, count: int,
                     c: Tensor | None, rows: int,
                     low: Tensor, high: Tensor, gen: torch.Generator,
                     min_acceptance: float) -> tuple[Tensor, Tensor]:
        """``count`` draws inside ``[low, high]`` for each of ``rows`` contexts, shaped
        (count, rows, D), and each context's acceptance rate: rounds of draws for the contexts
        still short, each round sized by the rate seen so far (every draw's rank among its
        context's accepted ones places it; no loop over draws)."""
        device, dtype = low.device, low.dtype
        out = torch.empty(count, rows, model.dim, device=device, dtype=dtype)
        filled = torch.zeros(rows, dtype=torch.int64, device=device)
        accepted = torch.zeros(rows, dtype=torch.int64, device=device)
        drawn = torch.zeros(rows, dtype=torch.int64, device=device)
        enough = math.ceil(10 / min_acceptance)
        while True:
            pending = (filled < count).nonzero().flatten()
            if pending.numel() == 0:
                break
            rate = accepted[pending] / drawn[pending].clamp_min(1)
            hopeless = (drawn[pending] >= enough) & (rate < min_acceptance)
            if bool(hopeless.any()):
                row = int(pending[hopeless.nonzero()[0, 0]])
                raise ValueError(
                    f"sample(bounds=...): only {int(accepted[row])} of {int(drawn[row])} draws "
                    f"for context row {row} fall inside the bounds (rate "
                    f"{float(accepted[row]) / float(drawn[row]):.2g}, below min_acceptance="
                    f"{min_acceptance:g}): the fitted density puts almost no mass inside them. "
                    "Check that the bounds are the prior's and that the observation is one the "
                    "training contexts cover; pass a smaller min_acceptance to keep drawing")
            guess = torch.where(drawn[pending] > 0, rate, torch.ones_like(rate))
            need = count - filled[pending]
            size = int((need / guess.clamp_min(min_acceptance)).max() * 1.1) + 1
            size = max(1, min(size, _ROUND_ROWS // pending.numel()))
            z = torch.randn(size, pending.numel(), model.dim, generator=gen, device=device,
                            dtype=dtype)
            x = self._draw(model, z, None if c is None else c[pending], student)
            inside = ((x >= low) & (x <= high)).all(-1)  # (size, pending)
            accepted[pending] += inside.sum(0)
            drawn[pending] += size
            rank = inside.cumsum(0)
            keep = inside & (rank <= need)
            i, j = keep.nonzero(as_tuple=True)
            out[filled[pending][j] + rank[i, j] - 1, pending[j]] = x[i, j]
            filled[pending] += keep.sum(0)
        return out, accepted.to(dtype) / drawn.to(dtype)

    def distill(self, num_layers: int | None = None, hidden_dims: Sequence[int] | None = None,
                max_steps: int = DISTILL_DEFAULTS["max_steps"],
                batch_size: int = DISTILL_DEFAULTS["batch_size"],
                lr: float = DISTILL_DEFAULTS["lr"], *, context: Any = None, x_val: Any = None,
                context_val: Any = None, num_draws: int = 4096,
                tol: float = DISTILL_DEFAULTS["tol"], progress: bool = True
                ) -> DensityEstimator:
        r"""Train an IAF student for one-pass sampling by probability density distillation
        (seed section 3.3.4; van den Oord et al., 2018); returns ``self``.

        The student :math:`x = P(g(\varepsilon))`, :math:`\varepsilon \sim N(0, I)`, keeps
        the fitted preconditioning :math:`P` and replaces the flow (and refiner) by
        :math:`g`: a learnable affine layer started at the ML Gaussian of the fitted model's
        draws, then ``num_layers`` IAF layers (:class:`~pyroflows.density.distill.Student`).
        It is trained on its own draws to minimize

        .. math:: \mathrm{KL}(q \,\|\, p) = E_q\bigl[\log q(x) - \log p(x)\bigr],

        :math:`p` the fitted density (:meth:`log_prob`, preconditioning included: the KL of
        the preconditioned variables is the same number), for at most ``max_steps`` Adam steps
        of ``batch_size`` draws, the step size decayed from ``lr`` to 0 by a cosine; every 50
        steps the KL is estimated on fixed validation draws, the state with the lowest estimate
        is kept (also after a ``KeyboardInterrupt``, with a warning), and the run stops once
        the last 1000 steps gained less than ``tol`` nats per dimension (the convergence rule
        of :func:`~pyroflows.density.distill.distill`). The defaults (4000 steps of 512 draws,
        ``lr`` 4e-3) are measured choices (``benchmarks/results/distill.md``), and the
        defaults' student has the fitted MAF's shape, the middle of the speed-fidelity trade
        measured there: at large D a wider student (``hidden_dims``) matches the fitted density
        more closely and samples more slowly, a narrower one the reverse. The fitted model is
        not changed.

        From then on :meth:`sample` draws from the student (one fused pass per layer, where the
        fitted MAF takes D passes per layer) unless ``exact=True``; :meth:`log_prob` stays the
        fitted density. ``history_["distill"]`` records the run and its ``fidelity``: the
        Monte-Carlo estimate of :math:`\mathrm{KL}(q\|p)` on ``num_draws`` student draws
        (``kl``, ``kl_se``, per dimension ``kl_per_dim``), and the mean held-out
        log-likelihoods of the student and of the fitted model (``student_log_prob``,
        ``teacher_log_prob``, their paired gap ``log_prob_gap`` with ``log_prob_gap_se``) on
        the rows ``x_val``, or, without them, on ``num_draws`` draws of the fitted model (the
        gap then estimates :math:`\mathrm{KL}(p\|q)`). The student and the record are saved
        and loaded with the estimator; a new :meth:`fit` drops them.

        A conditional estimator gets a conditional student (the context enters every IAF
        layer's MADE, standardized as the fitted flow sees it), trained on contexts drawn with
        replacement from ``context`` (shape (n, C): pass the training contexts); ``x_val``
        then needs ``context_val``, one context per row (or one of shape (C,)).

        Arguments:
            num_layers: the student's IAF layers (default: the estimator's ``num_layers``).
            hidden_dims: their MADE hidden widths (default: the estimator's).
            max_steps: Adam steps.
            batch_size: student draws per step.
            lr: Adam's initial step size.
            context: the contexts to train on (conditional estimators only).
            x_val, context_val: held-out rows (and their contexts) for the fidelity report.
            num_draws: draws for the fidelity report's estimates.
            tol: the convergence rule's threshold in nats per dimension (0: run every step).
            progress: show a progress bar.

        Example:
            >>> import torch, pyroflows as pf
            >>> x = torch.randn(500, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
            >>> est = pf.density.DensityEstimator("maf", num_layers=2, hidden_dims=(16,), seed=0)
            >>> est = est.fit(x, max_epochs=3, progress=False)
            >>> est = est.distill(max_steps=30, num_draws=500, progress=False)
            >>> est.sample(4).shape, est.sample(4, exact=True).shape
            (torch.Size([4, 2]), torch.Size([4, 2]))
            >>> sorted(k for k in est.history_["distill"]["fidelity"] if k.startswith("kl"))
            ['kl', 'kl_per_dim', 'kl_per_dim_se', 'kl_se']
        """
        model = self._require_model()
        layers = self.num_layers if num_layers is None else num_layers
        hidden = self.hidden_dims if hidden_dims is None else hidden_dims
        try:
            layers, hidden = operator.index(layers), tuple(operator.index(h) for h in hidden)
        except TypeError:
            raise ValueError("num_layers and hidden_dims must be whole numbers, got "
                             f"{num_layers!r} and {hidden_dims!r}") from None
        if layers < 1 or not hidden or min(hidden) < 1:
            raise ValueError("num_layers and hidden_dims must be positive, got "
                             f"{num_layers!r} and {hidden_dims!r}")
        num_draws = whole_number(num_draws, "num_draws", 2)
        distillation.check_options(max_steps, batch_size, lr, tol)  # (before any work)
        c, _ = self._prepare_context(context)
        if c is not None and c.shape[0] < 1:
            raise ValueError("context has no rows: pass the training contexts")
        xv = cv = None
        if x_val is not None:
            xv, cv, _ = self._inputs(x_val, context_val, ("x_val", "context_val"))
            if xv.shape[0] < 1:  # (before the training, not after it in the report)
                raise ValueError("x_val has no rows: pass held-out rows, or x_val=None to "
                                 "score draws of the fitted model")
        elif context_val is not None:
            raise ValueError("context_val is given without x_val")
        device, dtype = self._model_device_dtype()
        seeds = self._seeds(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))
            student = Student(model.dim, layers, hidden, context_dim=model.context_dim)
        student = student.to(device=device, dtype=dtype)
        gen = generator(int(torch.randint(2**62, (1,), generator=seeds)), device)
        with torch.no_grad():
            h = model.features(c)
        distillation.start(model, student, contexts=c, generator=gen)
        with distillation.frozen(model):
            record = distillation.distill(
                student, distillation.teacher_log_prob(model), max_steps=max_steps,
                batch_size=batch_size, lr=lr, contexts=h, tol=tol, generator=gen,
                progress=progress)
        record["fidelity"] = distillation.fidelity(model, student, num_draws=num_draws,
                                                   x_val=xv, contexts=c, context_val=cv,
                                                   generator=gen)
        record.update(num_layers=layers, hidden_dims=list(hidden))
        self.student_ = student
        self.history_["distill"] = record
        return self

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> DensityEstimator:
        """Move the fitted model (and later fits) to ``device`` and ``dtype``; returns ``self``.
        As :meth:`torch.nn.Module.to`, a dtype alone may come first (``est.to(torch.float64)``).
        A device this machine lacks or a dtype other than float32 and float64 is a
        ``ValueError``, and a move that fails leaves the estimator as it was."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise ValueError(f"to: two dtypes given, {device!r} and {dtype!r}")
            device, dtype = None, device
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        target = None if device is None else usable_device(device, "to")
        if self._model is not None:
            old_device, old_dtype = self._model_device_dtype()
            # the model and its student (where distilled) move together
            modules = torch.nn.ModuleList([self._model, *filter(None, [self.student_])])
            # A failure part way (out of memory) leaves some tensors moved: move them back,
            # and restore the values a narrowing dtype would have rounded.
            saved = snapshot(modules) if dtype not in (None, old_dtype) else None
            try:
                modules.to(device=target, dtype=dtype)
            except BaseException:
                modules.to(device=old_device, dtype=old_dtype)
                if saved is not None:
                    modules.load_state_dict(saved)
                raise
        if target is not None:
            self.device = target
        if dtype is not None:
            self.dtype = dtype
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to ``path`` atomically (a crash leaves no half-written file)."""
        persistence.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike,
             device: str | torch.device | None = None) -> DensityEstimator:
        """Rebuild a saved estimator on ``device`` (default: the saved one, else CPU), scoring
        exactly as saved.

        Loading runs no code from the file: it is read with ``torch.load(weights_only=True)``,
        and a callable among the options (an activation) is looked up by name among
        :func:`~pyroflows.density.known_callables` (torch's activations, pyroflows' layers,
        those passed to :func:`~pyroflows.density.register_callable`); nothing is imported. A
        file naming any other callable is refused with a ``ValueError`` before anything is
        built. An empty, foreign, damaged or newer file, and a saved device this machine
        lacks, are a ``ValueError`` saying which."""
        est = persistence.load(cls, path)
        target = device if device is not None else (est.device or "cpu")
        target = usable_device(target, f"loading {os.fspath(path)}" + (
            "" if device is not None else " on its saved device (pass device= to load elsewhere)"))
        est._model.to(device=target)
        if est.student_ is not None:
            est.student_.to(device=target)
        if device is not None:
            est.device = target
        return est
