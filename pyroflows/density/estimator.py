"""The density estimator's user API: its arguments and their checks, the fit (the split, the
automatic choice of pipeline, the refiner), and scoring, sampling, moving, saving and loading a
fitted model."""

from __future__ import annotations

import inspect
import os
import time
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
from .training import Trainer

__all__ = ["DensityEstimator", "PRECONDITIONERS", "REFINERS"]

#: The accepted values of ``DensityEstimator(precondition=...)``.
PRECONDITIONERS = ("standardize", "whiten", "cholesky", "tabak", "auto", None)
#: The accepted values of ``DensityEstimator(refine=...)``.
REFINERS = ("tabak", None)
# What precondition="auto" fits and chooses between, on the validation split. "whiten" first,
# so its candidate is the very fit precondition="whiten" makes with the same seed.
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
        raise ValueError(
            f"{name} must be a 2-D array shaped (n_samples, n_features), got shape "
            f"{tuple(t.shape)}"
        )
    if dim is not None and t.shape[1] != dim:
        raise ValueError(
            f"{name} has {t.shape[1]} columns, expected {dim} (the number of columns of the "
            "training data)"
        )
    t = t.to(device=device, dtype=dtype)
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        shown = rows[:5].tolist()
        more = f" (and {rows.numel() - 5} more)" if rows.numel() > 5 else ""
        raise ValueError(
            f"{name} has NaN or infinite values (in {dtype}) in {rows.numel()} row(s), e.g. "
            f"rows {shown}{more}; drop or impute them first"
        )
    return t


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
    """What ``flows.build(flow, ...)`` takes besides what the estimator passes itself: the
    stack's own options and the layer constructor's keywords."""
    from ..transforms import MAF, RealNVP

    layer = {"maf": MAF, "realnvp": RealNVP}[flow]
    own = _parameter_names(flows.build) - {"name", "dim"}
    return (own | _parameter_names(layer.__init__)) - {"self", "dim"}


class DensityEstimator:
    r"""A normalizing flow fitted to a data matrix by maximum likelihood (seed eq. 1, 4):

    .. math:: \log p(x) = \log N\bigl(z; 0, I\bigr) + \log\Bigl|\det \frac{\partial z}{\partial x}
              \Bigr|, \qquad z = f^{-1}\bigl(P^{-1}(x)\bigr),

    where :math:`f` is a MAF or RealNVP stack (forward: base to data) and :math:`P` is a fixed
    preconditioner fitted to the training split. Preconditioning is part of the model, not of
    the data: :meth:`log_prob` is the density of the user's original :math:`x`, with the
    Jacobian of every stage included. The pipeline, data side first:

    - ``"whiten"`` (default): standardize, :math:`u = (x - m) / \sigma`; then the flow layers
      (identity at the start); then a learnable full-covariance base, :math:`z = L^{-1} v`,
      with :math:`L` starting as the Cholesky factor of the maximum-likelihood covariance of
      :math:`u`. Before training the model *is* the ML full-covariance Gaussian
      :math:`N(m, \hat\Sigma)`, and early stopping (which considers the untrained state too)
      never returns a model whose validation log-likelihood is below that Gaussian's. The layers
      see the data's own coordinates rather than a rotation of them.
    - ``"cholesky"``: standardize, then whiten with a fixed Cholesky factor,
      :math:`w = C^{-1} u` with :math:`C C^\top` the ML covariance of :math:`u` (log-det
      :math:`-\sum_i \log C_{ii}`); then the flow layers; then the same learnable
      :math:`z = L^{-1} v`, but started at :math:`L = I`. It too starts at the ML Gaussian;
      only the coordinates the layers see differ. Worth trying on low-dimensional data with
      curved structure, chosen on validation data; on real data sets it does worse than
      ``"whiten"`` (``benchmarks/results/density.md``, "Fixed whitening").
    - ``"standardize"``: only the per-column standardization (the start is the ML diagonal
      Gaussian).
    - ``"tabak"``: the non-parametric Tabak-Vanden-Eijnden flow
      (:class:`pyroflows.transforms.Tabak`, which whitens first) is fitted to the training split
      (its step count chosen on the validation split) and Gaussianizes it; the neural flow then
      models what is left, starting from Tabak's density. Options for it go in
      ``tabak_options``. Tabak leaves the *training* split almost exactly :math:`N(0, I)`, so
      there is little left for the neural flow to learn there; it is the more robust choice in
      the tails with few rows.
    - ``"auto"``: fit the ``"whiten"`` and the ``"tabak"`` pipelines (each with ``refine``,
      each flow with the whole epoch budget, so about twice the time; the ``"whiten"``
      candidate is the very fit ``precondition="whiten"`` makes with the same ``seed``) and
      keep the one with the higher validation log-likelihood; ``precondition_`` and
      ``history_["candidates"]`` say which was kept and what each scored. With
      ``refine="tabak"`` this is the recommended Tabak + flow configuration. The choice sees
      only the validation split: where a flow's tails fail far outside the data validation
      cannot tell; the estimator's log-scale bound (below) removes those tails.
    - ``None``: the flow sees the raw data, with base ``N(0, I)``.

    ``refine="tabak"`` orders the two the other way round as well: after the flow is trained,
    a Tabak transform :math:`R` without whitening is fitted to the flow's latent codes
    :math:`z` of the training split, its step count chosen on the validation split's codes,
    and the base becomes :math:`p_R(z) = N(R^{-1}(z); 0, I)\,|\det \partial R^{-1}/\partial
    z|`, so

    .. math:: \log p(x) = \log N\bigl(R^{-1}(z); 0, I\bigr) + \log\Bigl|\det
              \frac{\partial R^{-1}(z)}{\partial x}\Bigr|.

    Zero steps (the flow alone) is one of the choices, and the refiner keeps its best step
    count only if that beats zero steps by more than one standard error of the per-row
    differences on the validation codes (``Tabak(selection="significant")``), so a gain that
    a small validation split cannot distinguish from noise buys no steps; Tabak then removes
    what non-Gaussianity the flow left, rather than leaving the flow nothing to learn. It
    costs one Tabak fit on the codes.

    Log-scale bound: the MAF/RealNVP layers get ``log_scale_bound=2.0`` unless
    ``flow_options`` names one (the layers' own default is 5): each layer's log-scale is
    :math:`b \tanh(s / b)`, so it scales a coordinate by at most :math:`e^{b}` and its
    :math:`|\log\det|` is at most :math:`D b`. It matters with few rows, where a flow's tails
    can fail on test points far outside the data. A saved estimator keeps the defaults it was
    built with.

    Training: minibatch Adam on the training split; after every epoch the mean validation
    log-likelihood of an exponential moving average of the parameters (less noisy than Adam's
    last iterate); early stopping after ``patience`` epochs without improvement, and the best
    state (the untrained one included) restored at the end, after an exception, or after a
    ``KeyboardInterrupt`` (which ends training gracefully and returns the best model).

    The measurements behind these defaults are in ``benchmarks/results/density.md``.

    Arguments:
        flow: ``"maf"`` (masked autoregressive: one-pass density, D-pass sampling) or
            ``"realnvp"`` (affine coupling: one pass both ways).
        num_layers: the number of flow layers.
        hidden_dims: the conditioner networks' hidden sizes.
        precondition: ``"whiten"``, ``"cholesky"``, ``"standardize"``, ``"tabak"``,
            ``"auto"`` or ``None`` (see above).
        device: where to fit; default: the device of a tensor passed to :meth:`fit`, else CPU.
        dtype: floating dtype; default: that of a floating tensor passed to :meth:`fit`, else
            ``torch.get_default_dtype()``.
        seed: makes the split, initialization, shuffling and :meth:`sample` reproducible.
        tabak_options: keyword arguments for :class:`pyroflows.transforms.Tabak` (the
            preconditioner and the refiner; the refiner never whitens, and selects its step
            count with ``"significant"`` unless ``selection`` is given here).
        flow_options: further keyword arguments for :func:`pyroflows.flows.build` and the
            layers (e.g. ``permutation``, ``affine``, ``log_scale_bound`` (default here 2.0, see
            above), ``order``/``mask``, ``activation``). Both option dicts are checked when
            the estimator is built: an unknown name, ``num_layers``/``hidden_dims``
            (arguments of their own here) or a value that :meth:`save` cannot store (a
            lambda, a local function, a module instance; pass a module-level class such as
            ``torch.nn.Tanh`` or a ``functools.partial`` of one) raises a ``ValueError``.
        refine: ``"tabak"`` or ``None`` (default): a Tabak transform fitted to the trained
            flow's latent codes (see above).

    Attributes (after :meth:`fit`):
        dim_: the number of columns D.
        history_: a dict with per-epoch lists ``epoch``, ``train_log_prob`` (running mean over
            the epoch's minibatches; at epoch 0, the untrained model on the whole training
            split) and ``val_log_prob``, plus ``best_epoch``, ``best_val_log_prob``,
            ``initial_val_log_prob`` (the untrained model, e.g. the ML Gaussian), ``stopped``
            (``"early_stopping"``, ``"max_epochs"``, ``"interrupted"`` or ``"error"``),
            ``skipped_steps`` (minibatches with a non-finite loss or gradient, not applied),
            ``seconds``, ``num_train`` and ``num_val``. All log-likelihoods are per sample, in
            nats, in the original space of ``x``. With ``refine``: ``refine_steps`` (the
            refiner's kept steps) and ``final_val_log_prob`` (the refined model's validation
            score; without a refiner, ``best_val_log_prob``); ``precondition`` (the pipeline it
            describes) and, with ``"auto"``, ``candidates`` (each pipeline's
            ``final_val_log_prob``).
        precondition_: the preconditioner the fitted model uses (with ``"auto"``, the chosen
            one).

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

    def __init__(
        self,
        flow: str = "maf",
        num_layers: int = 5,
        hidden_dims: Sequence[int] = (128, 128),
        precondition: str | None = "whiten",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        tabak_options: dict | None = None,
        flow_options: dict | None = None,
        refine: str | None = None,
    ) -> None:
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
        self.device = None if device is None else torch.device(device)
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
        return {
            "flow": self.flow,
            "num_layers": self.num_layers,
            "hidden_dims": self.hidden_dims,
            "precondition": self.precondition,
            "device": None if self.device is None else str(self.device),
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "seed": self.seed,
            "tabak_options": dict(self.tabak_options),
            "flow_options": dict(self.flow_options),
            "refine": self.refine,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v not in (None, {}))
        fitted = "" if self._model is None else f", fitted on D={self.dim_}"
        return f"DensityEstimator({args}{fitted})"

    # ---- the fitted model -----------------------------------------------------------------
    def _require_model(self) -> DensityModel:
        if self._model is None:
            raise ValueError("this DensityEstimator is not fitted yet: call fit(x) first")
        return self._model

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self._require_model().flow.parameters())
        return p.device, p.dtype

    def _prepare(self, x: Any, name: str = "x") -> tuple[Tensor, bool]:
        """A fitted model's input as an ``(n, D)`` tensor on its device and dtype; the flag says
        whether a single point of shape ``(D,)`` was given."""
        model = self._require_model()
        t = _as_tensor(x, name)
        single = t.dim() == 1
        if single:
            t = t.unsqueeze(0)
        device, dtype = self._model_device_dtype()
        return _check_matrix(t, name, model.dim, device, dtype), single

    def _build(self, precondition: str | None, dim: int, device: torch.device,
               dtype: torch.dtype, seed: int | None = None) -> DensityModel:
        """The unfitted model of the pipeline of ``precondition``, with this estimator's
        options."""
        return pipeline.build_model(
            precondition, dim, flow=self.flow, num_layers=self.num_layers,
            hidden_dims=self.hidden_dims, flow_options=self.flow_options,
            flow_defaults=self._flow_defaults, whiten=self._whiten,
            tabak_options=self.tabak_options, refine=self.refine, seed=seed,
        ).to(device=device, dtype=dtype)

    # ---- fitting --------------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        x_val: Any = None,
        max_epochs: int = 500,
        batch_size: int = 256,
        lr: float = 1e-3,
        patience: int = 20,
        val_fraction: float = 0.1,
        weight_decay: float = 0.0,
        averaging_epochs: float = 1.0,
        progress: bool = True,
    ) -> DensityEstimator:
        """Fit to the rows of ``x`` (numpy array or tensor, shaped (n, D)); returns ``self``.

        Arguments:
            x: training data. Without ``x_val``, a random ``val_fraction`` of its rows (at least
                one) is held out for early stopping.
            x_val: held-out rows for early stopping (then all of ``x`` is used for training).
            max_epochs: the most passes over the training rows (0: keep the initial model,
                e.g. the ML Gaussian).
            batch_size: minibatch size (capped at the number of training rows).
            lr: Adam's learning rate.
            patience: stop after this many epochs without a better validation log-likelihood.
            val_fraction: the held-out share of ``x`` when ``x_val`` is not given.
            weight_decay: Adam's L2 penalty.
            averaging_epochs: the horizon, in epochs (at least 10 steps), of the exponential
                moving average of the parameters that is validated and kept; 0 turns the
                averaging off (the last Adam iterate is used).
            progress: show a tqdm bar with the train/validation log-likelihood.
        """
        if int(max_epochs) < 0 or int(batch_size) < 1 or int(patience) < 0 or not lr > 0:
            raise ValueError(
                "need max_epochs >= 0, batch_size >= 1, patience >= 0 and lr > 0; got "
                f"max_epochs={max_epochs}, batch_size={batch_size}, patience={patience}, lr={lr}"
            )
        if not float(averaging_epochs) >= 0:
            raise ValueError(f"averaging_epochs must be >= 0, got {averaging_epochs}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        start = time.perf_counter()
        t = _as_tensor(x, "x")
        device = self.device or t.device
        from_torch = isinstance(x, Tensor) and t.is_floating_point()
        dtype = self.dtype or (t.dtype if from_torch else torch.get_default_dtype())
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.get_default_dtype()
        t = _check_matrix(t, "x", None, device, dtype)
        n, dim = t.shape
        gen = torch.Generator()
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        if x_val is None:
            if n < 2:
                raise ValueError(
                    f"x needs at least 2 rows (one to train on, one to validate), got {n}"
                )
            num_val = min(max(1, round(val_fraction * n)), n - 1)
            perm = torch.randperm(n, generator=gen).to(device)
            x_train, x_val_t = t[perm[num_val:]], t[perm[:num_val]]
        else:
            if n < 2:
                raise ValueError(f"x needs at least 2 rows to fit a density, got {n}")
            x_val_t = _check_matrix(_as_tensor(x_val, "x_val"), "x_val", dim, device, dtype)
            if x_val_t.shape[0] < 1:
                raise ValueError("x_val has no rows")
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
            except BaseException:
                # a later candidate failed: hold the best finished one, not the failed one
                if fits:
                    self._keep_best(fits, start)
                raise
            fits.append((self.history_["final_val_log_prob"], precondition, model, self.history_))
            if self.history_["stopped"] == "interrupted":  # Ctrl-C ends the whole fit
                break
        if len(fits) > 1:
            self._keep_best(fits, start)
        return self

    def _keep_best(self, fits: list, start: float) -> None:
        """Hold the candidate with the higher validation log-likelihood (the first on a tie or
        NaN), recording every candidate's score in ``history_["candidates"]``."""
        best = max(range(len(fits)), key=lambda i: (fits[i][0] > fits[0][0], -i))
        _, chosen, model, history = fits[best]
        history["candidates"] = {pre: val for val, pre, _, _ in fits}
        history["seconds"] = time.perf_counter() - start
        self._model, self.history_ = model, history
        self.precondition_ = chosen

    def _fit_one(self, precondition, dim, device, dtype, x_train, x_val_t, gen, *, max_epochs,
                 patience, progress, start, **train) -> DensityModel:
        """Build the model for one preconditioner, fit its stages, train its flow and fit its
        refiner; the estimator holds it (and its history) from the start of training, so it
        ends in the best state so far whatever happens."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            model = self._build(precondition, dim, device, dtype,
                                seed=int(torch.randint(2**31, (1,))))
        u_train, ld_train, u_val, ld_val = pipeline.fit_stages(model, x_train, x_val_t, progress)
        trainer = Trainer(model, u_train, ld_train, u_val, ld_val, gen, **train)
        self._model, self.dim_, self.history_ = model, dim, trainer.history
        self.precondition_ = precondition
        trainer.run(max_epochs, patience, progress, start)
        history = self.history_
        history["precondition"] = precondition
        history["final_val_log_prob"] = history["best_val_log_prob"]
        if model.refine:
            history["final_val_log_prob"] = pipeline.fit_refiner(model, u_train, u_val, ld_val,
                                                                 progress)
            history["refine_steps"] = int(model.refine[0].num_steps)
            history["seconds"] = time.perf_counter() - start
        return model

    # ---- using a fitted model -------------------------------------------------------------
    def log_prob(self, x: Any) -> Tensor:
        """``log p(x)`` in nats for each row of ``x`` (shape (n, D), or (D,) for one point), in
        the original space of the data, on the model's device and dtype."""
        t, single = self._prepare(x)
        with torch.no_grad(), validation(False):
            lp = evaluate(self._require_model().log_prob, t)
        return lp[0] if single else lp

    def score(self, x: Any) -> float:
        """The mean log-likelihood of the rows of ``x``, in nats per sample."""
        return float(self.log_prob(x).mean())

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """``n`` draws from the fitted density, shaped (n, D), on the model's device and dtype.
        MAF draws take D sequential passes per layer; RealNVP one."""
        model = self._require_model()
        if int(n) < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        device, dtype = self._model_device_dtype()
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        z = torch.randn(int(n), model.dim, generator=gen, device=device, dtype=dtype)
        with torch.no_grad(), validation(False):
            return evaluate(model.sample, z)

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> DensityEstimator:
        """Move the fitted model (parameters and preconditioner buffers); returns ``self``."""
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        if self._model is not None:
            self._model.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to ``path`` atomically: a temporary file in the same folder,
        then ``os.replace``, so a crash never leaves a half-written file under ``path``."""
        persistence.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             trusted_modules: Sequence[str] = ()) -> DensityEstimator:
        """Rebuild a saved estimator (on ``device``, default the saved one or CPU); its
        ``log_prob`` reproduces the saved model's exactly, and its options equal those it was
        built with.

        The file is read with ``torch.load(weights_only=True)``. Callables among the options
        (e.g. ``flow_options={"activation": torch.nn.Tanh}``) are saved by import name; on
        loading, ``nn.Module`` classes from torch, pyro and pyroflows are imported, and any
        other callable only if its module or top-level package is in ``trusted_modules``
        (e.g. ``("mypackage",)``), so an untrusted file cannot make ``load`` run a function
        of its choosing.
        """
        return persistence.load(cls, path, device, trusted_modules)
