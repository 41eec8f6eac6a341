"""Fitting a Tabak transform by dual ascent of the log-likelihood (seed section 2.5): whitening,
random frames, candidates ranked on histograms, capped Gauss-Newton steps, early stopping."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..._distributed import Rows, is_data_parallel
from ..._gaussian import ml_gaussian, standard_normal_log_prob
from .map import (
    GAMMA_MAX,
    PARAMETERS,
    SIGMA_MAX,
    SIGMA_MIN,
    displacement,
    displacement_constants,
    local_ascent,
)

if TYPE_CHECKING:
    from .transform import Tabak

__all__ = [
    "SELECTIONS", "FittedSteps", "DualAscent", "check_data", "whitening", "threads_for",
    "dequantize",
]

#: The accepted values of ``Tabak(selection=...)``: how the kept step count is chosen.
SELECTIONS = ("best", "one_se", "significant")

# Parameters of the per-coordinate ascent problem: (sigma, shift = phi_0, gamma).
NUM_ASCENT_PARAMETERS = 3
# Below this many elements per step, CPU work runs on one thread: the fit's steps and the passes
# are many small elementwise ops, and on a loaded machine every threaded op waits for a core.
THREADED_NUMEL = 1 << 20
# The fit stops as collapsing where a training row's code leaves |z| <= max(CODE_RANGE, twice
# the largest whitened code), far beyond any N(0, I) draw: the steps then diverge.
CODE_RANGE = 10.0


@contextlib.contextmanager
def threads_for(numel: int, device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread when its per-step ops have fewer than
    ``THREADED_NUMEL`` elements (``numel``)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or numel >= THREADED_NUMEL or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_data(x: Tensor, dim: int, what: str) -> None:
    """Raise a :class:`ValueError` unless ``x`` is a floating ``(n, dim)`` tensor, rows finite."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Tabak.fit: {what} must be a tensor of shape (n, {dim}), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"Tabak.fit: {what} must be floating point, got {x.dtype}")
    bad = ~torch.isfinite(x).all(-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"Tabak.fit: {what} has {rows.numel()} row(s) with NaN or inf values "
                         f"(first at row {int(rows[0])}); drop or impute them before fitting")


def whitening(x: Tensor, whiten: str, rows: Rows | None = None) -> tuple[Tensor, Tensor]:
    """The whitening :math:`W(x) = L^{-1}(x - m)` of the rows of ``x``, as ``(m, L)`` in ``x``'s
    dtype: the ML mean and Cholesky factor (``whiten="full"``), the standard deviations
    (``"diagonal"``) or the identity (``"none"``). Constant columns, columns whose spread is
    below the dtype's resolution at their size and (``"full"``) a singular covariance raise a
    :class:`ValueError`. With ``rows``, ``x`` is this rank's shard of the rows."""
    rows = rows if rows is not None else Rows(False, x.shape[0])
    loc, tril, ridge = ml_gaussian(x, diagonal=whiten != "full", rows=rows)
    # The covariance's diagonal; where a ridge was needed, from the data (it is then either a
    # constant column or a singular covariance, and the ridge would hide which).
    var = (rows.mean((x.to(torch.float64) - loc).square(), 0) if ridge
           else tril.square().sum(-1))
    eps = torch.finfo(x.dtype).eps
    scale = rows.max(x.abs().amax(0)).to(torch.float64).clamp_min(torch.finfo(x.dtype).tiny)
    unresolved = var <= (16 * eps * scale) ** 2
    if bool(unresolved.any()):
        constant = rows.max(x.amax(0)) == rows.min(x.amin(0))
        cols = (unresolved & constant).nonzero().flatten().tolist()
        if cols:
            raise ValueError(f"Tabak.fit: column(s) {cols} are constant; data on a "
                             "lower-dimensional set has no density in R^D; drop those columns")
        cols = unresolved.nonzero().flatten().tolist()
        size = float(scale[unresolved].max())
        hint = "" if x.dtype == torch.float64 else ", or fit in float64"
        raise ValueError(f"Tabak.fit: column(s) {cols} vary, but their spread is below "
                         f"{x.dtype}'s resolution at their size (about {size:.0e}); center or "
                         f"rescale them first{hint}")
    if whiten == "full" and (ridge or bool(
            torch.diagonal(tril).square().min() <= 1e3 * eps * var.max())):
        raise ValueError("Tabak.fit: the data's covariance is singular (columns are linearly "
                         "dependent); drop redundant columns or use whiten='diagonal'")
    if whiten == "none":
        loc, tril = torch.zeros_like(loc), torch.eye(x.shape[-1], dtype=loc.dtype,
                                                     device=loc.device)
    return loc.to(x.dtype), tril.to(x.dtype)


def warn_repeats(x: Tensor) -> None:
    """Warn when a column is mostly repeated values (a lattice: the fit sharpens on them)."""
    s = torch.sort(x, dim=0).values
    repeated = (s[1:] == s[:-1]).to(x.dtype).mean(0)
    if bool((repeated > 0.5).any()):
        cols = (repeated > 0.5).nonzero().flatten().tolist()
        warnings.warn(
            f"Tabak.fit: column(s) {cols} are mostly repeated values (discrete data); "
            "the fit is well defined, but for a density add dequantization noise first "
            "(pyroflows.transforms.dequantize)",
            stacklevel=4,
        )


def dequantize(x: Tensor, resolution: float | Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    r"""``x`` (n, D) with uniform noise of each column's resolution :math:`h_j` added:
    :math:`x_{ij} + h_j (u_{ij} - \tfrac12)`, :math:`u_{ij} \sim U(0, 1)`, so each recorded value
    spreads over the cell of width :math:`h_j` around it. Repeated rows (rounded measurements,
    counts, categorical-ish columns) give a likelihood without bound, onto which a fit collapses;
    the dequantized data has a bounded density (a histogram's, at worst).

    Arguments:
        x: the data, floating point, shape ``(n, D)``.
        resolution: :math:`h`, a number or ``D`` numbers; by default each column's smallest
            positive gap between its distinct values.
        generator: the noise's random generator (default: torch's global one).

    Example:
        >>> x = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.5, 3.0]], dtype=torch.float64)
        >>> y = dequantize(x, generator=torch.Generator().manual_seed(0))
        >>> bool(((y - x).abs() <= torch.tensor([0.25, 1.0])).all())  # h = (0.5, 2)
        True
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError("dequantize: x must be a floating-point tensor of shape (n, D)")
    if resolution is None:
        s = torch.sort(x, dim=0).values
        gaps = s[1:] - s[:-1]
        gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, math.inf))
        h = gaps.amin(0) if x.shape[0] > 1 else torch.full_like(x[0], math.inf)
        if not bool(torch.isfinite(h).all()):
            cols = (~torch.isfinite(h)).nonzero().flatten().tolist()
            raise ValueError(f"dequantize: column(s) {cols} hold a single value (or NaN/inf), "
                             "so their resolution cannot be inferred; pass resolution=")
    else:
        h = torch.as_tensor(resolution, dtype=x.dtype, device=x.device).expand(x.shape[-1])
        if not bool(((h > 0) & torch.isfinite(h)).all()):
            raise ValueError(f"dequantize: resolution must be positive and finite, got "
                             f"{resolution}")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + h * (u - 0.5)


def histogram(c: Tensor, bins: int, rows: Rows | None = None) -> tuple[Tensor, Tensor]:
    """Each row of ``c`` (K, n) in ``bins`` equal-width bins: the bins' means of the points and
    shares of the points (empty: 0), shapes (K, bins); with ``rows``, of all ranks' points."""
    rows = rows if rows is not None else Rows(False, c.shape[-1])
    lo, hi = rows.min(c.amin(-1, keepdim=True)), rows.max(c.amax(-1, keepdim=True))
    scale = bins / (hi - lo).clamp_min(torch.finfo(c.dtype).tiny)
    idx = ((c - lo) * scale).long().clamp_(0, bins - 1)
    counts = rows.sum(c.new_zeros(c.shape[0], bins).scatter_add_(1, idx, torch.ones_like(c)))
    sums = rows.sum(c.new_zeros(c.shape[0], bins).scatter_add_(1, idx, c))
    return sums / counts.clamp_min(1), counts / rows.total


def haar_frames(num: int, dim: int, k: int, like: Tensor,
                generator: torch.Generator | None) -> Tensor:
    """``num`` Haar-random ``dim x k`` matrices with orthonormal columns (Q of a Gaussian's QR,
    with R's diagonal signs moved into Q, so the law is exactly Haar)."""
    g = torch.randn(num, dim, k, generator=generator, device=like.device, dtype=like.dtype)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def select(selection: str, per_row: list[Tensor], steps: list[int], best_step: int,
           rows: Rows | None = None) -> int:
    """The kept step count under ``selection`` from the held-out rows' log-likelihoods at every
    check (the rule is in :class:`~.transform.Tabak`'s docstring); with ``rows``, each rank's
    held-out rows are its shard of them."""
    best = per_row[steps.index(best_step)]
    rows = rows if rows is not None else Rows(False, best.shape[0])
    m = rows.total

    def within(values: Tensor) -> bool:
        d = best - values
        mean = rows.mean(d, 0)
        if m <= 1:
            return float(mean) <= 0.0
        std = (rows.sum((d - mean).square().sum()) / (m - 1)).sqrt()
        return float(mean) <= float(std) / math.sqrt(m)

    if selection == "significant":
        return 0 if within(per_row[0]) else best_step
    for step, values in zip(steps, per_row, strict=True):
        if step < best_step and within(values):
            return step
    return best_step


@dataclass
class FittedSteps:
    """A fit's result: the whitening, the kept steps' buffers (``frames`` (T, D, K) and the
    :data:`~.map.PARAMETERS`, (T, K) each), the checks' ``history``, ``best_step``, why the
    loop ``stopped`` (``"max_steps"``, ``"early_stopping"``, ``"collapse"`` or
    ``"interrupted"``) and, for a collapse, the ``reason``."""

    loc: Tensor
    scale_tril: Tensor
    steps: dict[str, Tensor]
    history: dict[str, list[float]]
    best_step: int
    stopped: str = "max_steps"
    reason: str | None = None


class DualAscent:
    """The fit of :meth:`Tabak.fit <pyroflows.transforms.Tabak.fit>` with a ``Tabak``'s options
    (its docstring describes the algorithm)."""

    def __init__(self, options: Tabak) -> None:
        self.options = options

    def run(self, x: Tensor, x_val: Tensor | None, progress: bool,
            distributed: bool | None = None) -> FittedSteps:
        """Fit the steps to the rows of ``x`` (held out: ``x_val``, or ``val_fraction`` of them);
        data-parallel (each rank's ``x`` and ``x_val`` its shard) as
        :func:`~pyroflows._distributed.is_data_parallel` says."""
        from tqdm.auto import tqdm

        o = self.options
        check_data(x, o.dim, "x")
        x = x.detach()
        parallel = is_data_parallel(distributed)
        shards = Rows(parallel, x.shape[0], x.device)
        seed = shards.broadcast_seed(o.seed)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
        if x_val is None:
            # data-parallel, each rank holds out rows of its shard, drawn by a generator of its
            # own, so ``gen`` (frames, candidates, widths) stays the same on every rank
            split = gen if not parallel else torch.Generator(device=x.device).manual_seed(
                int(seed) + 1 + shards.rank)
            n_val = max(1, int(round(o.val_fraction * x.shape[0])))
            perm = torch.randperm(x.shape[0], generator=split, device=x.device)
            x_val, x = x[perm[:n_val]], x[perm[n_val:]]
        else:
            check_data(x_val, o.dim, "x_val")
            x_val = x_val.detach().to(device=x.device, dtype=x.dtype)
        n = x.shape[0]
        self.rows = rows = Rows(parallel, n, x.device)
        rows_val = Rows(parallel, x_val.shape[0], x.device)
        if rows.total < 2 * o.dim + 2 or rows.smallest < 1:
            raise ValueError(f"Tabak.fit: need at least {2 * o.dim + 2} training rows (and one "
                             f"on every rank), got {rows.total}")
        loc, tril = whitening(x, o.whiten, rows)
        if rows.rank == 0:
            warn_repeats(x)

        def whiten(v: Tensor) -> Tensor:
            # Transposed, (D, n): every per-coordinate reduction then runs along contiguous rows.
            return torch.linalg.solve_triangular(tril, (v - loc).mT, upper=False)

        z, z_val = whiten(x), whiten(x_val)
        ld, ld_val = x.new_zeros(n), x.new_zeros(x_val.shape[0])
        # Every point's log-det shares the whitening's and the steps' sum of log(1 - sigma).
        ld_shared = -torch.log(torch.diagonal(tril)).sum()
        k = o.subspace_dim
        steps: dict[str, list[Tensor]] = {name: [] for name in ("frames", *PARAMETERS)}
        history: dict[str, list[float]] = {"step": [], "train_log_prob": [], "val_log_prob": []}
        per_row: list[Tensor] = []  # the held-out rows' log-likelihoods per check, for one_se

        def record(step: int) -> float:
            train = float(rows.mean(standard_normal_log_prob(z.mT) + ld, 0) + ld_shared)
            log_probs_val = standard_normal_log_prob(z_val.mT) + ld_val
            val = float(rows_val.mean(log_probs_val, 0) + ld_shared)
            if o.selection != "best":
                per_row.append(log_probs_val + ld_shared)
            history["step"].append(step)
            history["train_log_prob"].append(train)
            history["val_log_prob"].append(val)
            return val

        # The collapse bounds (Tabak's docstring): the codes' range, and the steps' log-det at
        # a training row, at most half the dtype's digits per coordinate.
        whiten_log_det = ld_shared
        code_limit = max(CODE_RANGE, 2 * float(rows.max(z.abs().amax())))
        log_det_limit = o.dim * -math.log(torch.finfo(x.dtype).eps) / 2

        def collapse() -> str | None:
            if not math.isfinite(history["train_log_prob"][-1]):
                return "the training log-likelihood is not finite"
            code = float(rows.max(z.abs().amax()))
            if not code <= code_limit:
                return f"a training row's code reached |z| = {code:.3g} (bound {code_limit:.3g})"
            stretch = float(rows.max(ld.amax()) + (ld_shared - whiten_log_det))
            if not stretch <= log_det_limit:
                return (f"the steps stretch a training row beyond {x.dtype}'s resolution "
                        f"(log-det {stretch:.1f} > {log_det_limit:.1f})")
            return None

        best_val, best_step, bad_checks, done = record(0), 0, 0, 0
        stopped, reason = "max_steps", None
        with threads_for(n * k * o.num_candidates, x.device):
            bar = tqdm(total=o.max_steps, disable=not progress or rows.rank != 0, desc="Tabak",
                       leave=False)
            try:
                while done < o.max_steps:
                    if bad_checks >= o.patience:
                        stopped = "early_stopping"
                        break
                    chunk = min(o.check_every, o.max_steps - done)
                    frames = haar_frames(chunk * o.num_rotations, o.dim, k, x, gen)
                    frames = frames.reshape(chunk, o.num_rotations, o.dim, k)
                    picks = torch.randint(rows.total, (chunk, k, o.num_candidates),
                                          generator=gen, device=x.device)
                    rel_widths = self.relative_widths((chunk, k, o.num_candidates), x, gen)
                    for i in range(chunk):
                        frame = self.best_frame(frames[i], z, picks[i], rel_widths[i])
                        frame_t = frame.mT
                        c, c_val = frame_t @ z, frame_t @ z_val
                        params, constants, keep, moved, log_ratio = self.ascent_step(
                            c, picks[i], rel_widths[i])
                        z = torch.addmm(z, frame, moved * keep)
                        ld = torch.addmv(ld, log_ratio.mT, keep.squeeze(-1))
                        moved_val, log_ratio_val = displacement(c_val, *constants, exact=False)
                        z_val = torch.addmm(z_val, frame, moved_val * keep)
                        ld_val = torch.addmv(ld_val, log_ratio_val.mT, keep.squeeze(-1))
                        ld_shared = ld_shared + (torch.log1p(-params[0]) * keep).sum()
                        steps["frames"].append(frame)
                        for name, p in zip(PARAMETERS, params, strict=True):
                            steps[name].append(p.squeeze(-1) if name in ("centers", "widths")
                                               else p.squeeze(-1) * keep.squeeze(-1))
                    done += chunk
                    bar.update(chunk)
                    val = record(done)
                    bar.set_postfix(val_log_prob=f"{val:.4f}")
                    reason = collapse()
                    if reason is not None:
                        # Kept: the best check before this one (the last good state).
                        stopped = "collapse"
                        break
                    if val > best_val:
                        best_val, best_step, bad_checks = val, done, 0
                    else:
                        bad_checks += 1
            except KeyboardInterrupt:
                if parallel:  # the other ranks may wait in a collective this rank left
                    raise
                # Ctrl-C: keep the best complete check so far (steps after it are dropped).
                stopped = "interrupted"
                checks = min(len(history[key]) for key in history)
                for key in history:
                    del history[key][checks:]
                del per_row[checks:]
            finally:
                bar.close()
        if not math.isfinite(best_val):
            raise RuntimeError("Tabak.fit: the held-out log-likelihood is not finite")
        if per_row:
            best_step = select(o.selection, per_row, history["step"], best_step, rows_val)

        def stacked(name: str, shape: tuple) -> Tensor:
            kept = steps[name][:best_step]
            return (torch.stack(kept) if kept else x.new_zeros((0, *shape))).contiguous()

        kept = {name: stacked(name, (k,)) for name in PARAMETERS}
        kept["frames"] = stacked("frames", (o.dim, k))
        return FittedSteps(loc, tril, kept, history, best_step, stopped, reason)

    def relative_widths(self, shape: tuple, like: Tensor,
                        generator: torch.Generator | None) -> Tensor:
        """Per step and coordinate epsilon / std: fixed, or log-uniform on the ``width`` range."""
        width = self.options.width
        if not isinstance(width, tuple):
            return like.new_full(shape, width)
        lo, hi = math.log(width[0]), math.log(width[1])
        u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
        return torch.exp(lo + (hi - lo) * u)

    def capped_step(self, grad: Tensor, gn: Tensor) -> tuple[Tensor, Tensor]:
        """The Gauss-Newton step ``G^{-1} grad``, its RMS displacement capped at ``step_size``,
        and the gain the quadratic model predicts for it (shapes ``(..., 3)``, ``(...)``)."""
        step_size = self.options.step_size
        ridge = 1e-8 * torch.eye(NUM_ASCENT_PARAMETERS, device=grad.device, dtype=grad.dtype)
        delta = torch.linalg.solve(gn + ridge, grad.unsqueeze(-1)).squeeze(-1)
        # The RMS displacement is sqrt(delta^T G delta) = sqrt(grad^T delta).
        length = (grad * delta).sum(-1).clamp_min(0).sqrt()
        scale = step_size / length.clamp_min(step_size)
        return delta * scale.unsqueeze(-1), (scale - 0.5 * scale * scale) * length * length

    def best_frame(self, frames: Tensor, z: Tensor, picks: Tensor, rel_width: Tensor) -> Tensor:
        """Of the frames (R, D, K), the one whose coordinates' best candidates predict the
        largest total gain."""
        if frames.shape[0] == 1:
            return frames[0]
        r, _, k = frames.shape
        c = (frames.mT @ z).reshape(r * k, -1)                          # (R K, n)
        picks, rel_width = picks.repeat(r, 1), rel_width.repeat(r, 1)  # (R K, m)
        predicted = self.predicted_gains(c, *self.candidates(c, picks, rel_width))  # (R K, m)
        total = predicted.amax(-1).reshape(r, k).sum(-1)
        return frames[total.argmax()]  # a tensor index: no host sync per step on a GPU

    def candidates(self, c: Tensor, picks: Tensor, rel_width: Tensor) -> tuple[Tensor, Tensor]:
        """The candidate centers of the rows of ``c`` (K, n), the points at ``picks`` (K, m;
        indices into all ranks' points), and their widths, ``rel_width`` (K, m) times each
        row's std."""
        mean = self.rows.mean(c, -1).unsqueeze(-1)
        std = (self.rows.mean(c * c, -1).unsqueeze(-1) - mean * mean).clamp_min(0).sqrt()
        return self.rows.gather(c, picks), rel_width * std.clamp_min(torch.finfo(c.dtype).eps)

    def predicted_gains(self, c: Tensor, centers: Tensor, widths: Tensor) -> Tensor:
        """The gain the capped step from each candidate (K, m) predicts, on a histogram of each
        row of ``c`` (``candidate_bins`` bins: m x bins work, not m x n)."""
        means, shares = histogram(c, self.options.candidate_bins, self.rows)
        grad, gn = local_ascent(means.unsqueeze(1), centers, widths, weights=shares.unsqueeze(1))
        return self.capped_step(grad, gn)[1]

    def ascent_step(self, c: Tensor, picks: Tensor, rel_width: Tensor) -> tuple[
        tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor, Tensor
    ]:
        """One capped Gauss-Newton step of every row of ``c`` (K, n) from the identity, at the
        candidate (``picks``, ``rel_width``: (K, m)) that predicts the largest gain. Returns the
        map parameters as (K, 1) columns, their :func:`~.map.displacement_constants`, ``keep``
        (K, 1: 1 where the step gains training likelihood, else 0) and
        :func:`~.map.displacement` of ``c``."""
        centers, widths = self.candidates(c, picks, rel_width)  # (K, m) each
        if picks.shape[1] > 1:
            best = self.predicted_gains(c, centers, widths).argmax(-1, keepdim=True)
            center, width = centers.gather(1, best).squeeze(-1), widths.gather(1, best).squeeze(-1)
        else:
            center, width = centers.squeeze(-1), widths.squeeze(-1)
        delta, _ = self.capped_step(*local_ascent(c, center, width,
                                                  mean=lambda v: self.rows.mean(v, -1)))
        params = (
            delta[:, 0].clamp(SIGMA_MIN, SIGMA_MAX),
            delta[:, 1],
            delta[:, 2].clamp(-GAMMA_MAX, GAMMA_MAX),
            center,
            width,
        )
        params = tuple(p.unsqueeze(-1) for p in params)
        constants = displacement_constants(*params)
        # The steps are in the safe region, where the cheaper logarithm is as good.
        moved, log_ratio = displacement(c, *constants, exact=False)
        # Exact per-coordinate gain in training log-likelihood (rotations preserve |z|), with
        # (phi(c)^2 - c^2) / 2 = moved (c + moved / 2); where the step would lose, the identity.
        gain = (self.rows.mean(log_ratio, -1).unsqueeze(-1) + torch.log1p(-params[0])
                - self.rows.mean(moved * torch.add(c, moved, alpha=0.5), -1).unsqueeze(-1))
        return params, constants, (gain > 0).to(c.dtype), moved, log_ratio
