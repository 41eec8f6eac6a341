"""The density estimator's user API: its arguments and checks, the fit (the split, the automatic
choice of pipeline, the refiner), scoring, sampling, saving and loading."""

from __future__ import annotations

import inspect
import operator
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import flows
from .._config import validation
from ..transforms.tabak import Tabak
from . import persistence, pipeline
from .pipeline import DensityModel, evaluate
from .training import Trainer, snapshot

__all__ = ["DensityEstimator", "PRECONDITIONERS", "REFINERS", "usable_device"]

#: The accepted values of ``DensityEstimator(precondition=...)``.
PRECONDITIONERS = ("standardize", "whiten", "cholesky", "tabak", "auto", None)
#: The accepted values of ``DensityEstimator(refine=...)``.
REFINERS = ("tabak", None)
# What precondition="auto" chooses between; "whiten" first, so its candidate is the very fit
# precondition="whiten" makes with the same seed.
_AUTO = ("whiten", "tabak")
_FLOWS = ("maf", "realnvp")
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


def _check_matrix(t: Tensor, name: str, dim: int | None, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
    """``t`` as an ``(n, dim)`` matrix of finite rows on ``device`` in ``dtype``."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array shaped (n_samples, n_features), got "
                         f"shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {dim} (the number of "
                         "columns of the training data)")
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
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - torch raises AssertionError, RuntimeError, ...
        reason = str(e).split("\n")[0][:200]
        raise ValueError(f"{what}: device {str(device)!r} is not available on this machine "
                         f"({reason})") from e
    return device


def _check_columns_vary(given: Tensor, t: Tensor, name: str) -> None:
    """A ``ValueError`` where a column of ``t`` (``given`` converted to the fit's dtype) holds
    one value in every row: its density is a point mass, which no flow fits."""
    constant = (t == t[:1]).all(0)
    if not bool(constant.any()):
        return
    columns = constant.nonzero().flatten().tolist()
    shown = f"{columns[:10]}" + (f" (and {len(columns) - 10} more)" if len(columns) > 10 else "")
    lost = ~(given == given[:1]).all(0).to(constant.device) & constant
    if bool(lost.any()):
        size = float(t[0, lost].abs().max())
        raise ValueError(
            f"{name}'s columns {shown} vary in the data as given ({given.dtype}) but not in "
            f"{t.dtype}: their spread is below {t.dtype}'s resolution at their size (about "
            f"{size:.0e}). Center or rescale them first, or fit in float64 "
            "(dtype=torch.float64)")
    raise ValueError(
        f"{name}'s columns {shown} are constant (every row holds the value "
        f"{float(t[0, columns[0]]):.6g}{', ...' if len(columns) > 1 else ''}): their density "
        "is a point mass, which no flow fits; drop them")


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
    from ..transforms import MAF, RealNVP

    layer = {"maf": MAF, "realnvp": RealNVP}[flow]
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

    Layer log-scales are :math:`b \tanh(s / b)`, ``log_scale_bound=2.0`` unless ``flow_options``
    names one. Training: minibatch Adam, a validated moving average of the parameters, early
    stopping; the best state (the untrained one included) is restored at the end, after an
    error or a ``KeyboardInterrupt``.

    Arguments:
        flow: ``"maf"`` (one-pass density, D-pass sampling) or ``"realnvp"`` (one pass both ways).
        num_layers: the number of flow layers.
        hidden_dims: the conditioner networks' hidden sizes.
        precondition: the pipeline (see above).
        device: where to fit; default: that of a tensor passed to :meth:`fit`, else CPU.
        dtype: float32 or float64; default: that of a floating tensor passed to :meth:`fit`.
        seed: makes the split, initialization, shuffling and :meth:`sample` reproducible.
        tabak_options: keyword arguments of the Tabak preconditioner and refiner.
        flow_options: further keyword arguments of :func:`pyroflows.flows.build` and the layers;
            unknown names and values :meth:`save` cannot store (a lambda, a local function, a
            module instance) raise a ``ValueError`` here.
        refine: ``"tabak"`` or ``None`` (see above).

    Attributes (after :meth:`fit`):
        dim_: the number of columns D.
        history_: per-epoch lists ``epoch``, ``train_log_prob``, ``val_log_prob``; ``best_epoch``,
            ``best_val_log_prob``, ``initial_val_log_prob``, ``final_val_log_prob`` (with the
            refiner), ``stopped``, ``skipped_steps`` (non-finite steps not applied),
            ``seconds``, ``num_train``, ``num_val``, ``precondition``, and where they apply
            ``refine_steps`` and ``candidates``; log-likelihoods in nats per sample, in x-space.
        precondition_: the preconditioner the fitted model uses.

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
    """

    def __init__(self, flow: str = "maf", num_layers: int = 5,
                 hidden_dims: Sequence[int] = (128, 128), precondition: str | None = "whiten",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 seed: int | None = None, tabak_options: dict | None = None,
                 flow_options: dict | None = None, refine: str | None = None) -> None:
        if flow not in _FLOWS:
            raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        if refine not in REFINERS:
            raise ValueError(f"refine must be one of {REFINERS}, got {refine!r}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        hidden = tuple(int(h) for h in hidden_dims)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden_dims must be positive integers, got {hidden_dims!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.flow = flow
        self.num_layers = int(num_layers)
        self.hidden_dims = hidden
        self.precondition = precondition
        self.refine = refine
        self.device = None if device is None else _torch_device(device, "device")
        self.dtype = dtype
        self.seed = None if seed is None else int(seed)
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
        self._flow_defaults = dict(pipeline.FLOW_DEFAULTS)
        self._whiten = pipeline.WHITEN
        self._model: DensityModel | None = None
        self.precondition_: str | None = None if precondition == "auto" else precondition
        self.dim_: int | None = None
        self.history_: dict | None = None

    def get_params(self) -> dict:
        """The constructor arguments (what :meth:`save` stores to rebuild the model)."""
        return {"flow": self.flow, "num_layers": self.num_layers, "hidden_dims": self.hidden_dims,
                "precondition": self.precondition,
                "device": None if self.device is None else str(self.device),
                "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
                "seed": self.seed, "tabak_options": dict(self.tabak_options),
                "flow_options": dict(self.flow_options), "refine": self.refine}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v not in (None, {}))
        fitted = "" if self._model is None else f", fitted on D={self.dim_}"
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

    def _build(self, precondition: str | None, dim: int, device: torch.device,
               dtype: torch.dtype, seed: int | None = None) -> DensityModel:
        """The unfitted model of ``precondition``'s pipeline, with this estimator's options."""
        return pipeline.build_model(
            precondition, dim, flow=self.flow, num_layers=self.num_layers,
            hidden_dims=self.hidden_dims, flow_options=self.flow_options,
            flow_defaults=self._flow_defaults, whiten=self._whiten,
            tabak_options=self.tabak_options, refine=self.refine, seed=seed,
        ).to(device=device, dtype=dtype)

    def fit(self, x: Any, x_val: Any = None, max_epochs: int = 500, batch_size: int = 256,
            lr: float = 1e-3, patience: int = 20, val_fraction: float = 0.1,
            weight_decay: float = 0.0, averaging_epochs: float = 1.0,
            progress: bool = True) -> DensityEstimator:
        """Fit to the rows of ``x`` (numpy array or tensor, shaped (n, D)); returns ``self``.

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
            batch_size: minibatch size (capped at the number of training rows).
            lr: Adam's learning rate.
            patience: stop after this many epochs without a better validation log-likelihood.
            val_fraction: the held-out share of ``x`` when ``x_val`` is not given.
            weight_decay: Adam's L2 penalty.
            averaging_epochs: the horizon in epochs (at least 10 steps) of the parameters' moving
                average that is validated and kept; 0: the last Adam iterate.
            progress: show a progress bar.
        """
        if int(max_epochs) < 0 or int(batch_size) < 1 or int(patience) < 0 or not lr > 0:
            raise ValueError("need max_epochs >= 0, batch_size >= 1, patience >= 0 and lr > 0; got "
                             f"max_epochs={max_epochs}, batch_size={batch_size}, "
                             f"patience={patience}, lr={lr}")
        if not float(averaging_epochs) >= 0:
            raise ValueError(f"averaging_epochs must be >= 0, got {averaging_epochs}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        start = time.perf_counter()
        given = _as_tensor(x, "x")
        device = usable_device(self.device or given.device, "fit")
        dtype = self.dtype or self._fit_dtype(given, from_torch=isinstance(x, Tensor))
        t = _check_matrix(given, "x", None, device, dtype)
        n, dim = t.shape
        if dim < 1:
            raise ValueError("x has no columns")
        gen = torch.Generator()
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        if x_val is None:
            num_val = max(1, round(val_fraction * n))
            held_out = (f", {num_val} of them held out for validation (val_fraction="
                        f"{val_fraction})")
        else:
            x_val_t = _check_matrix(_as_tensor(x_val, "x_val"), "x_val", dim, device, dtype)
            if x_val_t.shape[0] < 1:
                raise ValueError("x_val has no rows: pass held-out rows, or x_val=None to hold "
                                 "out val_fraction of x")
            num_val, held_out = 0, ""
        if n - num_val < dim + 1:
            raise ValueError(
                f"x has {n} row{'s' * (n != 1)}{held_out}: a fit needs at least D + 1 = "
                f"{dim + 1} training rows (fewer lie on a hyperplane, where the likelihood is "
                "unbounded)")
        _check_columns_vary(given, t, "x")
        if x_val is None:
            perm = torch.randperm(n, generator=gen).to(device)
            x_train, x_val_t = t[perm[num_val:]], t[perm[:num_val]]
        else:
            x_train = t

        candidates = _AUTO if self.precondition == "auto" else (self.precondition,)
        fits = []
        for precondition in candidates:
            try:
                model = self._fit_one(
                    precondition, dim, device, dtype, x_train, x_val_t, gen,
                    max_epochs=int(max_epochs), batch_size=int(batch_size), lr=float(lr),
                    patience=int(patience), weight_decay=float(weight_decay),
                    averaging_epochs=float(averaging_epochs), progress=progress, start=start,
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
                 patience, progress, start, **train) -> DensityModel:
        """Build, fit and hold the model of one preconditioner; held from the end of the
        stages' fit, so the estimator ends in the best state so far whatever happens after.
        An interrupted phase (a Tabak fit that reports it, or the training loop) ends the fit:
        no later phase runs, and a refiner that was not fitted is the identity."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            model = self._build(precondition, dim, device, dtype,
                                seed=int(torch.randint(2**31, (1,))))
        u_train, ld_train, u_val, ld_val = pipeline.fit_stages(model, x_train, x_val_t, progress)
        trainer = Trainer(model, u_train, ld_train, u_val, ld_val, gen, **train)
        self._model, self.dim_, self.history_ = model, dim, trainer.history
        self.precondition_ = precondition
        history = self.history_
        history["precondition"] = precondition
        if any(pipeline.interrupted(stage) for stage in model.stages):
            self._interrupted(f"{precondition}: precondition", "the flow is untrained",
                              stacklevel=5)
        else:
            trainer.run(max_epochs, patience, progress, start)
        history["final_val_log_prob"] = history["best_val_log_prob"]
        if history["stopped"] == "interrupted":
            history.setdefault("interrupted_in", f"{precondition}: flow")
        if model.refine:
            if history["stopped"] == "interrupted":
                pipeline.skip_refiner(model)
            else:
                try:
                    history["final_val_log_prob"] = pipeline.fit_refiner(
                        model, u_train, u_val, ld_val, progress)
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

    def log_prob(self, x: Any) -> Tensor:
        """``log p(x)`` in nats for each row of ``x`` (shape (n, D), or (D,) for one point)."""
        t, single = self._prepare(x)
        with torch.no_grad(), validation(False):
            lp = evaluate(self._require_model().log_prob, t)
        return lp[0] if single else lp

    def score(self, x: Any) -> float:
        """The mean log-likelihood of the rows of ``x``, in nats per sample (at least one row)."""
        lp = self.log_prob(x)
        if lp.numel() == 0:
            raise ValueError("x has no rows: the mean log-likelihood of no rows is undefined")
        return float(lp.mean())

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """``n`` draws from the fitted density, shaped (n, D); ``n`` a whole number (2.7 is an
        error, not 2 draws)."""
        model = self._require_model()
        try:
            count = operator.index(n)
        except TypeError:
            raise ValueError(f"n must be a whole number of draws, got {n!r}") from None
        if count < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        device, dtype = self._model_device_dtype()
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        z = torch.randn(count, model.dim, generator=gen, device=device, dtype=dtype)
        with torch.no_grad(), validation(False):
            return evaluate(model.sample, z)

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> DensityEstimator:
        """Move the fitted model (and later fits) to ``device`` and ``dtype``; returns ``self``.
        A device this machine lacks or a dtype other than float32 and float64 is a
        ``ValueError``, and a move that fails leaves the estimator as it was."""
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        target = None if device is None else usable_device(device, "to")
        if self._model is not None:
            old_device, old_dtype = self._model_device_dtype()
            # A failure part way (out of memory) leaves some tensors moved: move them back,
            # and restore the values a narrowing dtype would have rounded.
            saved = snapshot(self._model) if dtype not in (None, old_dtype) else None
            try:
                self._model.to(device=target, dtype=dtype)
            except BaseException:
                self._model.to(device=old_device, dtype=old_dtype)
                if saved is not None:
                    self._model.load_state_dict(saved)
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
        if device is not None:
            est.device = target
        return est
