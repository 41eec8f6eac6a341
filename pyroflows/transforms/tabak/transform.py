"""The fitted Tabak transform: its buffers, its passes in both directions, and the density they
define."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor

from ..._gaussian import standard_normal_log_prob
from ..base import FlowTransform
from .fit import SELECTIONS, DualAscent, threads_for
from .map import (
    PARAMETERS,
    displacement,
    displacement_constants,
    inverse_displacement,
    inverse_displacement_constants,
)

__all__ = ["Tabak", "tabak", "gaussianize", "NotFittedError"]

# Elements per (K, rows) intermediate (and thread) when the fitted transform runs a batch on the
# CPU: 1 MiB in float64, so a step's temporaries stay in cache (benchmarks/results/tabak.md).
CHUNK_NUMEL = 1 << 17


class NotFittedError(RuntimeError, ValueError):
    """Raised when an unfitted :class:`Tabak` transform is used before :meth:`Tabak.fit`."""


class Tabak(FlowTransform):
    r"""The Tabak transform (seed section 2.5, eq. 23-25): a flow fitted to data by many small,
    exactly invertible steps that carry the data to :math:`N(0, I)`.

    The Gaussianizing map ``t.inv`` is :math:`G = S_T \circ \dots \circ S_1 \circ W`: a whitening
    :math:`W(x) = L^{-1}(x - m)`, then steps

    .. math:: S_t(z) = z + Q_t\bigl(\varphi_t(Q_t^\top z) - Q_t^\top z\bigr),

    where :math:`Q_t` (D x K) has Haar-random orthonormal columns and :math:`\varphi_t` applies
    the map of seed eq. 25 (:func:`~.map.map_1d`) to each rotated coordinate with its own
    :math:`(\sigma, \varphi_0, \gamma, x_0, \epsilon)`. So :math:`\log|\det \partial G/\partial x|
    = -\sum_i \log L_{ii} + \sum_{t,k} \log\varphi_{t,k}'` and the density is :math:`\rho(x) =
    |\det \partial G / \partial x|\, \mathcal N(G(x); 0, I)` (seed eq. 1); ``t(z) = G^{-1}(z)``
    maps :math:`N(0, I)` draws to data space.

    :meth:`fit`: each step draws :math:`Q_t` and per rotated coordinate ``num_candidates``
    centers :math:`x_0` at training points, and takes the capped Gauss-Newton ascent step on the
    local log-likelihood of seed eq. 23 (:func:`~.map.local_ascent`) of the center predicting
    the largest gain (none where it would lose); it stops after ``patience`` held-out checks
    without improvement. NaN/inf rows and constant, unresolved (spread below the dtype's
    resolution) or (when whitening) collinear columns raise a :class:`ValueError`. The fit stops
    as collapsing, keeping the best check before, when a training row's code leaves
    :math:`|z| \le \max(10, 2 \max|W(x)|)` or the steps' log-det at a training row exceeds
    :math:`\tfrac D2 \log(1/\mathrm{eps})` (each coordinate keeps half the dtype's digits):
    repeated rows have an unbounded likelihood, onto which the steps sharpen; add noise of the
    data's resolution first (:func:`~.fit.dequantize`). A failed fit leaves the old state
    intact; a ``KeyboardInterrupt`` keeps the best state so far.

    References:
        Tabak & Vanden-Eijnden, "Density estimation by dual ascent of the log-likelihood",
        Comm. Math. Sci. 8 (2010), 217-233.

    Arguments:
        dim: the event size D.
        max_steps: the most ascent steps :meth:`fit` takes.
        step_size: cap on each step's root mean squared displacement of the points.
        whiten: ``True`` (full whitening), ``"diagonal"`` (standardize each column) or ``False``.
        width: :math:`\epsilon` relative to the rotated coordinate's std, or a ``(low, high)``
            range to draw it from log-uniformly per step and coordinate.
        subspace_dim: K, the directions moved per step (default ``min(D, 64)``; buffers hold
            ``max_steps x D x K`` numbers).
        check_every: steps between held-out log-likelihood checks.
        patience: checks without improvement before stopping.
        val_fraction: share of the rows held out when ``fit`` gets no ``x_val``.
        num_candidates: random centers tried per coordinate and step (1: the plain algorithm).
        candidate_bins: bins of the histogram the candidates' gains are ranked on.
        num_rotations: random frames drawn per step, the best one used (helps from about 5-D).
        seed: seed of the fit's rotations, centers and split (default: torch's global RNG).
        selection: the kept step count: ``"best"``, the best held-out score; ``"one_se"``, the
            smallest checked count :math:`s` with :math:`\bar d_s \le \mathrm{sd}(d_s)/\sqrt{m}`
            (:math:`d_s`: the best count's held-out row log-likelihoods minus count :math:`s`'s,
            over :math:`m` rows); ``"significant"``, the best count if :math:`\bar d_0 >
            \mathrm{sd}(d_0)/\sqrt{m}`, else none.

    Example:
        >>> import torch, pyroflows as pf
        >>> x = torch.randn(500, 2, dtype=torch.float64) ** 3
        >>> t = pf.transforms.Tabak(2, max_steps=100, seed=0).fit(x, progress=False)
        >>> z = t.inv(x)                      # Gaussianized data
        >>> torch.allclose(t(z), x)           # exact inverse
        True
        >>> t.log_prob(x).shape               # the fitted density
        torch.Size([500])
    """

    _STEP_BUFFERS = ("frames", *PARAMETERS)

    def __init__(self, dim: int, max_steps: int = 5000, step_size: float = 0.1,
                 whiten: bool | str = True, width: float | tuple[float, float] = 0.1,
                 subspace_dim: int | None = None, check_every: int = 25, patience: int = 20,
                 val_fraction: float = 0.1, num_candidates: int = 16, candidate_bins: int = 256,
                 num_rotations: int = 1, seed: int | None = None,
                 selection: str = "best") -> None:
        super().__init__(dim)
        if whiten not in (True, False, "full", "diagonal", "none"):
            raise ValueError(f"Tabak: whiten must be True, False or 'diagonal', got {whiten!r}")
        k = min(self.dim, 64) if subspace_dim is None else int(subspace_dim)
        if not 1 <= k <= self.dim:
            raise ValueError(f"Tabak: subspace_dim must be in [1, {self.dim}], got {subspace_dim}")
        ranged = not isinstance(width, (int, float)) and hasattr(width, "__len__")
        widths = tuple(float(v) for v in width) if ranged else (float(width), float(width))
        if len(widths) != 2 or not 0 < widths[0] <= widths[1]:
            raise ValueError(f"Tabak: width must be positive or a (low, high) range, got {width}")
        if (int(max_steps) < 1 or not step_size > 0 or int(num_candidates) < 1
                or int(candidate_bins) < 1 or int(num_rotations) < 1):
            raise ValueError("Tabak: max_steps, step_size, num_candidates and candidate_bins must "
                             "be positive")
        if not 0 < val_fraction < 1 or int(check_every) < 1 or int(patience) < 1:
            raise ValueError("Tabak: need 0 < val_fraction < 1, check_every >= 1, patience >= 1")
        if selection not in SELECTIONS:
            raise ValueError(f"Tabak: selection must be one of {SELECTIONS}, got {selection!r}")
        self.max_steps, self.step_size = int(max_steps), float(step_size)
        self.whiten = {True: "full", False: "none"}.get(whiten, whiten)
        self.width = widths if ranged else widths[0]
        self.subspace_dim, self.selection, self.seed = k, selection, seed
        self.check_every, self.patience = int(check_every), int(patience)
        self.val_fraction = float(val_fraction)
        self.num_candidates, self.candidate_bins = int(num_candidates), int(candidate_bins)
        self.num_rotations = int(num_rotations)
        self.history: dict[str, list[float] | str] = {}
        self.best_step = 0
        dt = torch.get_default_dtype()
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("loc", torch.zeros(self.dim, dtype=dt))
        self.register_buffer("scale_tril", torch.eye(self.dim, dtype=dt))
        self.register_buffer("frames", torch.zeros(0, self.dim, k, dtype=dt))
        for name in PARAMETERS:
            self.register_buffer(name, torch.zeros(0, k, dtype=dt))

    @property
    def num_steps(self) -> int:
        """The number of fitted ascent steps T."""
        return self.frames.shape[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, subspace_dim={self.subspace_dim}, num_steps={self.num_steps}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The step buffers are sized by the fit: take the saved sizes before loading.
        for name in self._STEP_BUFFERS:
            value = state_dict.get(prefix + name)
            old = getattr(self, name)
            if isinstance(value, Tensor) and value.shape != old.shape:
                setattr(self, name, old.new_empty(value.shape))
        saved = state_dict.get(prefix + "frames")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(saved, Tensor) and saved.is_floating_point():
            self._orthonormalize_frames(saved.dtype)

    def _apply(self, fn, *args, **kwargs):
        old = self.frames.dtype
        super()._apply(fn, *args, **kwargs)
        self._orthonormalize_frames(old)
        return self

    @torch.no_grad()
    def _orthonormalize_frames(self, old: torch.dtype) -> None:
        """Frames rounded in ``old`` are orthonormal only to ``old``'s precision: where the
        buffers are now finer, replace each by its nearest matrix with orthonormal columns (the
        polar factor :math:`UV^\\top` of its SVD), so the steps stay exact inverses and
        :math:`\\log|\\det|` the sum of the log-slopes to the new precision."""
        new = self.frames.dtype
        if (not new.is_floating_point or not old.is_floating_point or self.num_steps == 0
                or torch.finfo(new).eps >= torch.finfo(old).eps):
            return
        u, _, vh = torch.linalg.svd(self.frames.to(torch.float64), full_matrices=False)
        self.frames.copy_(u @ vh)
        self.clear_cache()

    def fit(self, x: Tensor, x_val: Tensor | None = None, progress: bool = True,
            distributed: bool | None = None) -> Tabak:
        """Fit the steps to the rows of ``x`` (n, D), held out ``x_val`` (default:
        ``val_fraction`` of ``x``'s rows), and return ``self``; ``history`` then holds ``step``,
        ``train_log_prob`` and ``val_log_prob`` (nats per sample) at every check, ``stopped``
        (``"max_steps"``, ``"early_stopping"``, ``"collapse"`` with its ``"reason"``, or
        ``"interrupted"``), and ``best_step`` the kept count. A collapse or a
        ``KeyboardInterrupt`` keeps the best state before it, with a warning. The buffers take
        ``x``'s device and dtype.

        Data-parallel (``distributed=None``: whenever ``torch.distributed`` is initialized
        with more than one process, as under ``torchrun``; ``False`` fits each rank alone):
        each rank passes its shard of the rows (and of ``x_val``), every statistic of a step
        (the whitening's moments, the histograms, the Gauss-Newton sums, the gains, the
        checks) is a sum over all ranks' rows, the candidates are drawn from all rows, so
        every rank takes the identical step, and the fit is the one-process fit of the shards
        concatenated in rank order, up to float rounding (given ``x_val``; without it each
        rank holds out ``val_fraction`` of its own shard). A ``seed`` of ``None`` is drawn on
        rank 0 for all. Only rank 0 shows progress and warns of repeated values. A
        ``KeyboardInterrupt`` reaching one rank is raised again there, the transform left as
        it was: the other ranks may wait in a collective that rank has left, and only ending
        the process (the launcher then ends the others) frees them."""
        fitted = DualAscent(self).run(x, x_val, progress, distributed)
        # Commit only now, so an exception in the fit leaves the old state intact.
        self.loc, self.scale_tril = fitted.loc, fitted.scale_tril
        for name, value in fitted.steps.items():
            setattr(self, name, value)
        self.fitted = torch.ones((), dtype=torch.bool, device=fitted.loc.device)
        self.history, self.best_step = dict(fitted.history), fitted.best_step
        self.history["stopped"] = fitted.stopped
        self.clear_cache()
        if fitted.stopped == "collapse":
            self.history["reason"] = fitted.reason
            warnings.warn(
                f"Tabak.fit: stopped, the fit is collapsing: {fitted.reason}; keeping step "
                f"{fitted.best_step}. Repeated rows (rounded or discrete values) have no "
                "density to fit: dequantize them first "
                "(pyroflows.transforms.dequantize(x))", stacklevel=2)
        elif fitted.stopped == "interrupted":
            warnings.warn(f"Tabak.fit interrupted: keeping the best state so far (step "
                          f"{fitted.best_step})", stacklevel=2)
        return self

    def fit_transform(self, x: Tensor, x_val: Tensor | None = None,
                      progress: bool = True) -> Tensor:
        """Fit to ``x`` and return the Gaussianized training data ``t.inv(x)``."""
        return self.fit(x, x_val=x_val, progress=progress).inv(x)

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise NotFittedError("Tabak: this transform is not fitted yet; call .fit(x) before "
                                 "using it")

    def _whiten(self, x: Tensor) -> Tensor:
        flat = (x - self.loc).reshape(-1, self.dim)
        z = torch.linalg.solve_triangular(self.scale_tril.mT, flat, upper=True, left=False)
        return z.reshape(x.shape)

    def _whiten_log_det(self) -> Tensor:
        """log|det dW/dx| = -sum log L_ii."""
        return -torch.log(torch.diagonal(self.scale_tril)).sum()

    def _step_constants(self, inverse: bool) -> list[tuple[Tensor, ...]]:
        """Per step, the ``(K, 1)`` constant columns of :func:`~.map.displacement` (or
        :func:`~.map.inverse_displacement`)."""
        make = inverse_displacement_constants if inverse else displacement_constants
        columns = make(*(getattr(self, name) for name in PARAMETERS))
        # (T, P, K, 1) -> T tuples of P views: one split, not P indexing ops per step and chunk.
        stacked = torch.stack(columns, dim=1).unsqueeze(-1)
        return [tuple(step.unbind(0)) for step in stacked.unbind(0)]

    def _run_steps(self, z: Tensor, inverse: bool,
                   log_det: bool = True) -> tuple[Tensor, Tensor | None]:
        """The steps applied to ``z`` (..., D), or with ``inverse`` their inverses in reverse
        order: the image and the forward steps' summed log-slopes (``None`` if ``inverse`` and
        not ``log_det``). On the CPU rows run through all steps in chunks of ``CHUNK_NUMEL``
        elements per thread, so each step's elementwise passes stay in cache."""
        batch = z.shape[:-1]
        flat = z.reshape(-1, self.dim)
        rows = flat.shape[0]
        constants = self._step_constants(inverse)
        order = list(reversed(range(self.num_steps)) if inverse else range(self.num_steps))
        log_det = log_det or not inverse
        frames = list(self.frames.unbind(0))
        frames_t = [frame.mT for frame in frames]
        outs, log_slopes = [], []
        with threads_for(rows * self.subspace_dim, flat.device):
            chunk = rows
            if flat.device.type == "cpu":
                per_chunk = CHUNK_NUMEL * torch.get_num_threads() // self.subspace_dim
                chunk = max(1, min(rows, per_chunk))
            for part in flat.split(chunk) if rows else (flat,):
                # Transposed, (D, n): sums over the K coordinates then add contiguous rows.
                zt = part.mT
                acc = zt.new_zeros(zt.shape[-1])
                for t in order:
                    c = frames_t[t] @ zt
                    if inverse:
                        moved, log_ratio = inverse_displacement(c, *constants[t], log_det=log_det)
                    else:
                        moved, log_ratio = displacement(c, *constants[t])
                    zt = torch.addmm(zt, frames[t], moved)
                    if log_det:
                        acc = acc + log_ratio.sum(0)
                outs.append(zt.mT)
                log_slopes.append(acc)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if not log_det:
            return out.reshape(*batch, self.dim), None
        acc = log_slopes[0] if len(log_slopes) == 1 else torch.cat(log_slopes)
        # The log(1 - sigma) part of every log-slope is the same for all points: added once.
        return out.reshape(*batch, self.dim), (acc + torch.log1p(-self.sigmas).sum()).reshape(batch)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Gaussianize: ``z = G(y)``, and ``log|det d t(z)/dz| = -log|det dG/dy|``."""
        self._check_fitted()
        z, log_slopes = self._run_steps(self._whiten(y), inverse=False)
        return z, -(log_slopes + self._whiten_log_det())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map N(0, I) draws to data space: the inverse steps in reverse order, then un-whiten."""
        self._check_fitted()
        z, log_slopes = self._run_steps(x, inverse=True)
        y = self.loc + z @ self.scale_tril.mT
        return y, -(log_slopes + self._whiten_log_det())

    def forward_value(self, x: Tensor) -> Tensor:
        """``t(x)`` without the log-det (faster), for draws that are not scored. Not cached."""
        self._check_fitted()
        self._validate(x, "input")
        z, _ = self._run_steps(x, inverse=True, log_det=False)
        return self.loc + z @ self.scale_tril.mT

    def log_prob(self, x: Tensor) -> Tensor:
        """The fitted log-density :math:`\\log\\rho(x)` (seed eq. 1), shape ``x.shape[:-1]``."""
        self._validate(x, "x")
        z, log_det = self.inverse_and_log_det(x)
        return standard_normal_log_prob(z) - log_det

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        """Draws from the fitted density: ``t(z)`` for ``z ~ N(0, I)``."""
        self._check_fitted()
        z = torch.randn((*sample_shape, self.dim), device=self.loc.device, dtype=self.loc.dtype)
        return self.forward_value(z)

    def truncated(self, num_steps: int) -> Tabak:
        """A copy with the whitening and the first ``num_steps`` steps (0: the whitening alone)."""
        self._check_fitted()
        if not 0 <= int(num_steps) <= self.num_steps:
            raise ValueError(f"Tabak.truncated: num_steps must be in [0, {self.num_steps}], "
                             f"got {num_steps}")
        out = copy.deepcopy(self)
        for name in self._STEP_BUFFERS:
            setattr(out, name, getattr(self, name)[: int(num_steps)].clone())
        out.clear_cache()
        return out


def tabak(dim: int, **kwargs) -> Tabak:
    """Build an unfitted :class:`Tabak` transform; see its arguments."""
    return Tabak(dim, **kwargs)


def gaussianize(x: Tensor, x_val: Tensor | None = None, progress: bool = False,
                **kwargs) -> tuple[Tensor, Tabak]:
    """Fit a :class:`Tabak` transform to ``x`` (n, D) and return ``(z, tabak)``, ``z =
    tabak.inv(x)`` approximately :math:`N(0, I)`: a model of ``z`` (e.g. a Gaussian mixture, as
    in Agnelli, Cadeiras, Tabak, Turner & Vanden-Eijnden 2010) has the density
    ``TransformedDistribution(model_of_z, [tabak])`` in ``x``. ``kwargs``: :class:`Tabak`'s.

    Example:
        >>> import torch
        >>> from pyroflows.transforms.tabak import gaussianize
        >>> x = torch.rand(400, 2, dtype=torch.float64)
        >>> z, t = gaussianize(x, max_steps=50, seed=0)
        >>> z.shape, bool(torch.isfinite(t.log_prob(x)).all())
        (torch.Size([400, 2]), True)
    """
    t = Tabak(x.shape[-1], **kwargs).fit(x, x_val=x_val, progress=progress)
    with torch.no_grad():
        z = t.inv(x)
    return z, t
