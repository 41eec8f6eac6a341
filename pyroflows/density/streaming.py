"""Fitting a density model to streamed rows: a ``Dataset`` (a memory-mapped ``.npy`` of any
size), a ``DataLoader`` or any re-iterable source of batches, in one process or data-parallel
over a ``torch.distributed`` process group; the preconditioning statistics in one streaming
pass, the flow trained batch by batch."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .._config import validation
from .._distributed import Rows, is_data_parallel
from .._random import generator
from . import pipeline
from .pipeline import DensityModel
from .training import Trainer, fit_signature, parallel_step, training_step

__all__ = ["ArrayDataset", "StreamTrainer", "STREAMED_PRECONDITIONERS", "is_stream",
           "stream_moments", "start_model", "fit_streamed"]

#: The preconditioners a streamed fit can use: their statistics are the data's mean and
#: covariance, sums over rows. Tabak's fit (``"tabak"``, ``"auto"``, ``refine="tabak"``)
#: revisits its rows at every step, so it needs them in memory.
STREAMED_PRECONDITIONERS = ("standardize", "whiten", "cholesky", None)
# Rows per validation batch (a global batch, split over the ranks) of a Dataset source.
EVAL_BATCH = pipeline.EVAL_CHUNK


class ArrayDataset(Dataset):
    r"""The rows of an ``(n, D)`` array (a tensor, a numpy array, or a memory-mapped one such as
    ``np.load(path, mmap_mode="r")``) as a map-style ``Dataset``, with an optional ``(n, C)``
    context: item ``i`` is row ``i`` (or the pair ``(y_i, c_i)``). :meth:`batch` (which a fit
    uses; a ``DataLoader`` goes through ``__getitems__``) reads a batch of rows with one fancy
    index, so a memory-mapped file is read a batch at a time and never loaded whole.

    Arguments:
        x: the rows, shape (n, D).
        context: their contexts, shape (n, C), or ``None``.

    Example:
        >>> rows = ArrayDataset(np.arange(12.0).reshape(6, 2))
        >>> len(rows), rows.batch([4, 1]).tolist()
        (6, [[8.0, 9.0], [2.0, 3.0]])
    """

    def __init__(self, x: Any, context: Any = None) -> None:
        self.x = x if isinstance(x, (Tensor, np.ndarray)) else np.asarray(x)
        self.context = (context if context is None or isinstance(context, (Tensor, np.ndarray))
                        else np.asarray(context))
        if self.x.ndim != 2:
            raise ValueError(f"ArrayDataset: x must be 2-D shaped (n_samples, n_features), got "
                             f"shape {tuple(self.x.shape)}")
        if self.context is not None and (self.context.ndim != 2
                                         or self.context.shape[0] != self.x.shape[0]):
            raise ValueError(f"ArrayDataset: context must be 2-D with one row per row of x "
                             f"({self.x.shape[0]}), got shape {tuple(self.context.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def _take(a: Tensor | np.ndarray, index: np.ndarray) -> Tensor:
        if isinstance(a, Tensor):
            return a[torch.as_tensor(index, device=a.device)]
        return torch.from_numpy(np.ascontiguousarray(a[index]))

    def batch(self, indices: list[int]) -> Tensor | tuple[Tensor, Tensor]:
        """Rows ``indices`` as one ``(B, D)`` tensor (with a context: the pair of ``(B, D)``
        and ``(B, C)``), read with one fancy index."""
        index = np.asarray(indices, dtype=np.int64)
        y = self._take(self.x, index)
        return y if self.context is None else (y, self._take(self.context, index))

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The rows ``indices`` as a ``DataLoader`` takes them (a list of items, views of one
        batch read by :meth:`batch`)."""
        out = self.batch(indices)
        return list(out.unbind(0)) if self.context is None else list(zip(*(
            part.unbind(0) for part in out), strict=True))


def is_stream(x: Any) -> bool:
    """Whether ``fit`` reads ``x`` as streamed data: a ``Dataset``, a ``DataLoader``, a list or
    tuple of 2-D batches (or of ``(y, c)`` pairs of them), or any other iterable that is not an
    array (tensors, numpy arrays and nested lists of numbers are arrays)."""
    if isinstance(x, (Dataset, DataLoader)):
        return True
    if isinstance(x, (Tensor, np.ndarray, str, bytes, dict)) or hasattr(x, "__array__"):
        return False
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(_is_batch(b) for b in x)
    return hasattr(x, "__iter__")


def _is_batch(b: Any) -> bool:
    if isinstance(b, (Tensor, np.ndarray)):
        return b.ndim == 2
    return isinstance(b, (tuple, list)) and len(b) in (1, 2) and all(
        isinstance(p, (Tensor, np.ndarray)) and p.ndim == 2 for p in b)  # ((y,), (y, c))


class _Errors:
    """The first bad batch a pass met, reported on every rank after the pass (a rank that
    raised alone would leave the others waiting in a collective). ``deferred``: a batch's
    finiteness is kept on the device and read once, after the pass (a training pass makes no
    host synchronization per batch; the bad batch's step is skipped as any non-finite step)."""

    def __init__(self, rows: Rows, deferred: bool = False) -> None:
        self.rows, self.message, self.deferred = rows, None, deferred
        self._first_bad: Tensor | None = None  # (deferred) the first bad batch's number, or -1
        self._source = ("", None)  # (deferred) the source's name and dtype, for the message

    def note(self, message: str) -> None:
        if self.message is None:
            self.message = message

    def note_finite(self, finite: Tensor, name: str, number: int, dtype: torch.dtype,
                    what: str) -> None:
        """Note batch ``number`` of ``name`` if ``finite`` (a 0-d bool tensor) is false."""
        if not self.deferred:
            if not bool(finite):
                self.note(f"{name}: batch {number} has NaN or infinite {what} (in {dtype}); "
                          "drop or impute them first")
            return
        # (a batch's rows and contexts are numbered apart: 2 * number + (contexts))
        bad = torch.where(finite, -1, 2 * number + (what == "contexts"))
        first = self._first_bad
        self._first_bad = bad if first is None else torch.where(first >= 0, first, bad)
        self._source = (name, dtype)

    def raise_any(self) -> None:
        if self._first_bad is not None and self.message is None:
            code = int(self._first_bad)  # (one synchronization per pass)
            if code >= 0:
                name, dtype = self._source
                what = "contexts" if code % 2 else "rows"
                self.note(f"{name}: batch {code // 2} has NaN or infinite {what} (in {dtype}); "
                          "drop or impute them first")
        flag = torch.tensor([float(self.message is not None)], device=self.rows.device)
        if float(self.rows.sum(flag)) > 0:
            raise ValueError(self.message or "another process met bad data (its message is "
                             "on that rank's output)")


def _to_tensor(part: Any, name: str) -> Tensor:
    if isinstance(part, Tensor):
        return part
    if isinstance(part, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(part))
    raise ValueError(f"{name}: a batch must be a tensor or numpy array (or a (y, context) pair "
                     f"of them), got {type(part).__name__}")


class _Batches:
    """A source's batches as ``(y, c)`` on the fit's device and dtype (``c``: ``None`` without
    a context), checked where asked: 2-D, the expected widths, real and finite."""

    def __init__(self, source: Any, name: str, device: torch.device, dtype: torch.dtype | None,
                 dim: int | None = None, context_dim: int | None = None) -> None:
        self.source, self.name = source, name
        self.device, self.dtype = device, dtype
        self.dim, self.context_dim = dim, context_dim

    def parse(self, batch: Any, number: int,
              errors: _Errors | None) -> tuple[Tensor, Tensor | None] | None:
        """The batch checked and moved (``errors``: a non-finite one noted there; data-parallel
        every bad one is, and skipped as ``None``, so that every rank raises after the pass)."""
        try:
            y, c = self._checked(batch, number)
        except ValueError as error:
            if errors is None or not errors.rows.parallel:
                raise
            errors.note(str(error))
            return None
        if errors is not None:
            for part, what in ((y, "rows"), (c, "contexts")):
                if part is not None:
                    errors.note_finite(torch.isfinite(part).all(), self.name, number,
                                       self.dtype, what)
        return y, c

    def _checked(self, batch: Any, number: int) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (tuple, list)) and len(batch) == 1:  # (TensorDataset(y)'s items)
            batch = batch[0]
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise ValueError(f"{self.name}: batch {number} is a sequence of {len(batch)} "
                                 "parts; a batch is a (n, D) array (or a 1-tuple of one, as a "
                                 "TensorDataset's) or a (y, context) pair")
            y, c = _to_tensor(batch[0], self.name), _to_tensor(batch[1], self.name)
        else:
            y, c = _to_tensor(batch, self.name), None
        for part, what, width in ((y, "rows", self.dim), (c, "contexts", self.context_dim)):
            if part is None:
                continue
            if part.dim() != 2 or part.is_complex() or part.dtype == torch.bool:
                raise ValueError(f"{self.name}: batch {number}'s {what} must be a real 2-D array "
                                 f"shaped (rows, columns), got shape {tuple(part.shape)} of "
                                 f"dtype {part.dtype}")
            if width is not None and part.shape[1] != width:
                raise ValueError(f"{self.name}: batch {number}'s {what} have {part.shape[1]} "
                                 f"columns, expected {width} (those of the first batch)")
        if c is not None and c.shape[0] != y.shape[0]:
            raise ValueError(f"{self.name}: batch {number} has {y.shape[0]} rows but "
                             f"{c.shape[0]} contexts")
        if self.dtype is None:  # the first batch's, as an in-memory fit takes a tensor's
            default = torch.get_default_dtype()
            self.dtype = y.dtype if y.dtype in (torch.float32, torch.float64) else (
                default if default in (torch.float32, torch.float64) else torch.float32)
        if (c is None) != (self.context_dim is None) and self.dim is not None:
            raise ValueError(f"{self.name}: batch {number} " + (
                "has no contexts but the fit's first batch had" if c is None else
                "has contexts but the fit's first batch had none"))
        y = y.to(device=self.device, dtype=self.dtype, non_blocking=True)
        c = None if c is None else c.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return y, c

    def __call__(self, epoch: int, gen: torch.Generator | None,
                 errors: _Errors | None = None) -> Iterator[tuple[Tensor, Tensor | None] | None]:
        for number, batch in enumerate(self.source.batches(epoch, gen)):
            yield None if batch is None else self.parse(batch, number, errors)


class Permutation:
    r"""A pseudo-random permutation :math:`\pi` of ``range(n)``, evaluated at any positions
    without building it, so an epoch's order costs memory for one batch, not 4 or 8 bytes a
    row: a balanced Feistel network of :data:`ROUNDS` rounds on :math:`2h`-bit integers
    (:math:`2^{2h} \ge n`; each round :math:`(L, R) \mapsto (R, L \oplus F_k(R))` with a
    multiply-xorshift :math:`F` and round keys :math:`k` drawn from ``generator``), a bijection
    of :math:`[0, 2^{2h})`, cycle-walked into :math:`[0, n)` (Black & Rogaway 2002): a value
    at or above :math:`n` is encrypted again until it lands below (fewer than 4 tries on
    average, as :math:`2^{2h} < 4n`).

    Example:
        >>> pi = Permutation(10, torch.Generator().manual_seed(0))
        >>> sorted(pi(torch.arange(10)).tolist()) == list(range(10))
        True
    """

    ROUNDS = 8

    def __init__(self, n: int, generator: torch.Generator | None) -> None:
        bits = max(2, (int(n) - 1).bit_length())
        self.n, self.half = int(n), (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = torch.randint(0, 2**31 - 1, (self.ROUNDS,), generator=generator).tolist()

    def _mix(self, r: Tensor, key: int) -> Tensor:
        # a 32-bit integer hash of (r, key) (multiply-xorshift rounds), then the half's bits;
        # every product stays below 2^63
        x = (r + key * 0x9E3779B1) & 0xFFFFFFFF
        for _ in range(2):
            x = x ^ (x >> 16)
            x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return (x ^ (x >> 16)) & self.mask

    def _encrypt(self, v: Tensor) -> Tensor:
        left, right = v >> self.half, v & self.mask
        for key in self.keys:
            left, right = right, left ^ self._mix(right, key)
        return (left << self.half) | right

    def __call__(self, positions: Tensor) -> Tensor:
        r""":math:`\pi` at ``positions`` (int64, each in ``[0, n)``)."""
        if self.n == 0 and positions.numel():  # (cycle-walking would never land)
            raise ValueError("a permutation of no rows has no positions")
        v = self._encrypt(positions.to(torch.int64))
        out = v >= self.n
        while bool(out.any()):
            v = torch.where(out, self._encrypt(v), v)
            out = v >= self.n
        return v


class _Subset:
    """Positions ``offset`` to ``offset + size`` of a :class:`Permutation`: a held-out split
    of the rows, never materialized."""

    def __init__(self, perm: Permutation, offset: int, size: int) -> None:
        self.perm, self.offset, self.size = perm, offset, size

    def __call__(self, positions: Tensor) -> Tensor:
        return self.perm(positions + self.offset)


class _Indexed:
    """Rows ``indices`` (a :class:`_Subset`; ``None``: all rows) of a map-style dataset in
    global batches of ``batch_size`` (a fresh :class:`Permutation` each epoch where
    ``shuffle``), rank ``rank`` of ``world`` taking every ``world``-th row of each: the ranks'
    batches together are the one process's, every row once per epoch, no padding. ``None``
    stands for a rank's empty share. No memory grows with the data: every order is computed
    a batch at a time (a ``DataLoader``'s sampler, by contrast, holds a list of the rows)."""

    def __init__(self, dataset: Any, indices: _Subset | None, batch_size: int, rank: int,
                 world: int, shuffle: bool) -> None:
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.size = len(dataset) if indices is None else indices.size

    def batches(self, epoch: int, gen: torch.Generator | None) -> Iterator[Any]:
        perm = Permutation(self.size, gen) if self.shuffle and gen is not None else None
        for start in range(0, self.size, self.batch_size):
            stop = min(start + self.batch_size, self.size)
            part = torch.arange(start + self.rank, stop, self.world)  # this rank's positions
            if perm is not None:
                part = perm(part)
            if self.indices is not None:
                part = self.indices(part)
            yield None if part.numel() == 0 else _fetch(self.dataset, part.sort().values.tolist())


def _fetch(dataset: Any, indices: list[int]) -> Any:
    """The rows ``indices`` of a map-style dataset as one batch: an ``ArrayDataset``'s
    ``batch``, else its ``__getitems__`` where it has one (a batch, or a list of items to
    collate), else its items collated."""
    if isinstance(dataset, ArrayDataset):
        return dataset.batch(indices)
    if hasattr(dataset, "__getitems__"):
        out = dataset.__getitems__(indices)
        return default_collate(out) if isinstance(out, list) else out
    return default_collate([dataset[i] for i in indices])


class _Iterable:
    """A ``DataLoader`` or other re-iterable source as it comes; before each pass its
    sampler's ``set_epoch`` (a ``DistributedSampler``'s) is called where it has one."""

    def __init__(self, loader: Any, name: str) -> None:
        if iter(loader) is loader:
            raise ValueError(f"{name} is a one-shot iterator (a generator?): a fit passes over "
                             "its data once per epoch, so pass a re-iterable source (a "
                             "DataLoader, a Dataset, a list of batches)")
        self.loader = loader

    def batches(self, epoch: int, gen: torch.Generator | None) -> Iterator[Any]:
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        for holder in (getattr(self.loader, "sampler", None), batch_sampler,
                       getattr(batch_sampler, "sampler", None)):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        yield from self.loader


_DTYPES = (None, torch.float32, torch.float64)  # the codes the ranks agree on


def _agree(batches: _Batches, rows: Rows) -> None:
    """Data-parallel, after the statistics pass: every rank takes the widths D and C and the
    dtype of the ranks that had rows (a rank whose shard is empty has none of its own); ranks
    whose widths or contexts differ are a ``ValueError`` on every rank; the dtype is the widest
    any rank's first batch had."""
    has = batches.dim is not None
    # (-1: no context; a rank without rows sends -2 to the maximum, +inf to the minimum)
    widths = [float(batches.dim), -1.0 if batches.context_dim is None else
              float(batches.context_dim)] if has else None
    code = float(_DTYPES.index(batches.dtype))
    high = rows.max(torch.tensor((widths or [-2.0, -2.0]) + [code], device=rows.device))
    low = rows.min(torch.tensor(widths or [math.inf, math.inf], device=rows.device))
    if high[0] < 0:
        return  # no rank had rows: stream_moments says so
    if not torch.equal(high[:2], low):
        raise ValueError(f"{batches.name}: the processes' batches differ: {int(low[0])} to "
                         f"{int(high[0])} columns, {int(low[1])} to {int(high[1])} context "
                         "columns (-1: no contexts); every rank's rows need the same columns")
    batches.dim = int(high[0])
    batches.context_dim = None if high[1] < 0 else int(high[1])
    batches.dtype = _DTYPES[int(high[2])]


@torch.no_grad()
def stream_moments(batches: _Batches, rows: Rows) -> tuple[int, Tensor, Tensor, int,
                                                             int | None, int]:
    r"""One pass over ``batches``: the number of rows, the mean and the ML covariance (divisor
    n) of the rows joined with their contexts, :math:`[y, c]`, in float64, over all ranks'
    rows; the widths D and C (``None`` without a context); and the steps of an epoch (the
    batches of the pass; data-parallel, the most any rank had). Each batch's count, mean and
    centred cross-products :math:`M_2` are merged into the running ones (Chan, Golub & LeVeque
    1979: :math:`M_2 \mathrel{+}= M_{2,b} + \delta\delta^\top n n_b / (n + n_b)`), then the
    ranks' by the same rule through two all-reduces: the sums of :math:`x` and
    :math:`x x^\top` without their cancellation. Bad batches (not finite, wrong widths) are a
    ``ValueError`` on every rank."""
    errors = _Errors(rows)
    n, mean, m2, steps = 0, None, None, 0
    for batch in batches(0, None, errors):
        steps += 1  # (a rank's empty share too: a step of the others)
        if batch is None:
            continue
        y, c = batch
        if batches.dim is None:
            batches.dim, batches.context_dim = y.shape[1], None if c is None else c.shape[1]
        z = (y if c is None else torch.cat([y, c], 1)).to(torch.float64)
        nb = z.shape[0]
        if nb == 0 or errors.message is not None:
            continue
        mb = z.mean(0)
        centred = z - mb
        m2b = centred.T @ centred
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        mean = mean + delta * (nb / (n + nb))
        m2 = m2 + m2b + torch.outer(delta, delta) * (n * nb / (n + nb))
        n += nb
    errors.raise_any()
    if rows.parallel:
        _agree(batches, rows)
    if batches.dim is None:
        raise ValueError(f"{batches.name} has no rows")
    width = batches.dim + (batches.context_dim or 0)
    device = rows.device if rows.parallel else (mean.device if mean is not None else "cpu")
    if mean is None:
        mean = torch.zeros(width, dtype=torch.float64, device=device)
        m2 = torch.zeros(width, width, dtype=torch.float64, device=device)
    mean, m2 = mean.to(device), m2.to(device)
    counts = torch.tensor([float(n)], dtype=torch.float64, device=device)
    total = rows.sum(torch.cat([counts, mean * n]))
    count = int(total[0])
    if count == 0:
        raise ValueError(f"{batches.name} has no rows")
    global_mean = total[1:] / count
    delta = mean - global_mean
    m2 = rows.sum(m2 + torch.outer(delta, delta) * n)
    if rows.parallel:  # a step takes one batch of every rank that has one
        steps = int(rows.max(torch.tensor([float(steps)], device=device)))
    return count, global_mean, m2 / count, batches.dim, batches.context_dim, steps


def _cholesky(cov: Tensor, what: str) -> Tensor:
    """The Cholesky factor of ``cov``; where it is singular, of ``cov`` plus the smallest
    ridge :math:`10^{k-12}` times the mean variance that makes the factor invertible, with a
    warning (as the in-memory fit's ``ml_gaussian``)."""
    scale = float(cov.diagonal().mean()) if float(cov.diagonal().mean()) > 0 else 1.0
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    ridge = 0.0
    while True:
        tril, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        if int(info) == 0 and bool((tril.diagonal() > 0).all()):
            if ridge > 0:
                warnings.warn(f"the {what} covariance is singular (collinear columns, or fewer "
                              f"rows than columns); added {ridge:.3g} to its diagonal, and "
                              "held-out log-likelihoods may be very low", stacklevel=4)
            return tril
        ridge = 1e-12 * scale if ridge == 0.0 else 10 * ridge


@torch.no_grad()
def start_model(model: DensityModel, precondition: str | None, mean: Tensor, cov: Tensor) -> None:
    r"""Set the model's fixed stages, context standardization and base start from the mean and
    ML covariance of the joined rows :math:`[y, c]` (:func:`stream_moments`), as the in-memory
    fit sets them from the rows: with :math:`s` the ML standard deviations, the
    standardized :math:`u = (y - m_y)/s_y` and :math:`h = (c - m_c)/s_c` have covariances
    :math:`\Sigma_{uu} = S_y^{-1}\Sigma_{yy}S_y^{-1}` (and likewise :math:`\Sigma_{hh}`,
    :math:`\Sigma_{uh}`); ``"cholesky"``'s whitening and ``"whiten"``'s base are the Cholesky
    factor of :math:`\Sigma_{uu}`; with a context ``"whiten"``'s base is the regression
    :math:`W = \Sigma_{uh}\Sigma_{hh}^{-1}` and the Cholesky factor of the residual covariance
    :math:`\Sigma_{uu} - W \Sigma_{hu}`."""
    dim = model.dim
    c_dim = model.context_dim or 0
    for_y = slice(0, dim)
    for_c = slice(dim, dim + c_dim)
    s_uu = cov[for_y, for_y]
    s_uh = cov[for_y, for_c]
    s_hh = cov[for_c, for_c]
    if c_dim:
        loc_c, scale_c = mean[for_c], s_hh.diagonal().sqrt()
        if not bool((scale_c > 0).all()):
            columns = (scale_c == 0).nonzero().flatten().tolist()
            raise ValueError(f"context's columns {columns[:10]} are constant in the training "
                             "rows: they carry no information and cannot be standardized; drop "
                             "them")
        model.context_stage.loc.copy_(loc_c)
        model.context_stage.scale.copy_(scale_c)
        s_hh = s_hh / torch.outer(scale_c, scale_c)
        s_uh = s_uh / scale_c
    scale_y = s_uu.diagonal().sqrt()
    if not bool((scale_y > 0).all()):
        columns = (scale_y == 0).nonzero().flatten().tolist()
        raise ValueError(f"x's columns {columns[:10]} are constant (every row holds one "
                         "value): their density is a point mass, which no flow fits; drop them")
    for stage in model.stages:
        if isinstance(stage, pipeline.Standardize):
            stage.loc.copy_(mean[for_y])
            stage.scale.copy_(scale_y)
            s_uu = s_uu / torch.outer(scale_y, scale_y)
            s_uh = s_uh / scale_y[:, None]
    for stage in model.stages:
        if isinstance(stage, pipeline.Whiten):  # after the standardization: u has mean 0
            stage.loc.zero_()
            stage.scale_tril.copy_(_cholesky(s_uu, "training"))
    if model.base_from_data:
        residual = s_uu
        if c_dim:
            gram = _cholesky(s_hh, "context")
            weight = torch.cholesky_solve(s_uh.T, gram).T
            model.flow.parts[1].weight.copy_(weight)
            residual = s_uu - weight @ s_uh.T
            residual = (residual + residual.T) / 2
        model.flow.parts[0].set_scale_tril_(_cholesky(residual, "training").to(
            model.flow.parts[0].packed.dtype))


class StreamTrainer(Trainer):
    """Training of ``model``'s flow on streamed batches, preconditioned one batch at a time:
    in one process, :func:`~pyroflows.density.training.training_step`; data-parallel
    (``rows.parallel``), :func:`~pyroflows.density.training.parallel_step`, every rank
    stepping until all ranks' batches are spent, and the validation sums all-reduced, so
    every rank takes the same steps and early stopping decides alike. The untrained model's
    training score is not computed (a pass over the data): ``history["train_log_prob"][0]``
    is NaN.

    Arguments:
        model: the model, its stages started (:func:`start_model`).
        train, val: the training and validation batches.
        gen: the generator of the minibatch order of an indexed source.
        rows: the process group the data is sharded over.
        num_train: all ranks' training rows.
        steps_per_epoch: the steps of an epoch (:func:`stream_moments` counts them: a
            DataLoader's or a list's own batches, whatever ``batch_size`` says).
        lr, weight_decay, averaging_epochs, clip_factor: as ``DensityEstimator.fit`` takes
            them.
    """

    def __init__(self, model: DensityModel, train: _Batches, val: _Batches, gen: torch.Generator,
                 rows: Rows, *, num_train: int, steps_per_epoch: int, lr: float,
                 weight_decay: float, averaging_epochs: float,
                 clip_factor: float | None = None) -> None:
        self.model, self.rows, self.train, self.val = model, rows, train, val
        self.num_val = 0
        val0 = self.val_score(check=True)
        self.setup(model, gen, float("nan"), val0, num_train, self.num_val,
                   max(1, steps_per_epoch), lr=lr,
                   weight_decay=weight_decay, averaging_epochs=averaging_epochs, rows=rows,
                   clip_factor=clip_factor)

    def _inputs(self, batch: tuple[Tensor, Tensor | None] | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A batch preconditioned: ``(u, log|det du/dy|, h)`` (an empty share: no rows)."""
        if batch is None:
            empty = torch.empty(0, self.model.dim, device=self.val.device, dtype=self.val.dtype)
            h = None if self.model.context_dim is None else empty.new_empty(
                0, self.model.context_dim)
            return empty, empty.new_empty(0), h
        y, c = batch
        with torch.no_grad():
            u, ld = self.model.precondition(y)
            h = self.model.features(c)
        return u, ld, h

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        model, rows = self.model, self.rows
        dtype, device = self.val.dtype, self.val.device
        total = torch.zeros((), dtype=dtype, device=device)
        count = torch.zeros((), dtype=dtype, device=device)
        skips = torch.zeros((), dtype=torch.int64, device=device)
        model.train()
        # a source whose batches change between passes may bring a bad one here: the fit's
        # own message (on every rank) instead of a distribution's about its support
        errors = _Errors(rows, deferred=True)
        batches = self.train(epoch, self.gen, errors)
        while True:
            batch = next(batches, False)
            if batch is False and not rows.parallel:
                break
            if errors.message is not None:  # (a malformed batch: known at once)
                if not rows.parallel:
                    break
                batch = None  # (an empty share: the other ranks' steps go on to the end)
            u, ld, h = self._inputs(None if batch is False else batch)
            if rows.parallel:
                lp, skipped, global_count = parallel_step(model, u, self.optimizer, self.params,
                                                          self.average, rows, h, self.clip)
                if global_count == 0:
                    break
            else:
                if u.shape[0] == 0:
                    continue
                lp, skipped = training_step(model, u, self.optimizer, self.params, self.average, h,
                                            self.clip)
            kept = ~skipped
            total += torch.where(kept, lp.sum() + ld.sum(), 0.0)
            count += kept * u.shape[0]
            skips += skipped
        model.eval()
        errors.raise_any()
        sums = rows.sum(torch.stack([total, count]))
        # (a step is skipped on every rank or none: each rank's count is the global one)
        self.history["skipped_steps"] += int(skips)
        seen = float(sums[1])
        return float(sums[0]) / seen if seen else float("nan"), int(seen)

    def val_score(self, check: bool = False) -> float:
        """The flow's mean validation log-likelihood over all ranks' rows; a bad batch is a
        ``ValueError`` on every rank (``check``: the first pass, known batch by batch; later
        ones, a source that changed, after the pass without a synchronization per batch)."""
        errors = _Errors(self.rows, deferred=not check)
        total = torch.zeros((), dtype=torch.float64, device=self.val.device)
        count = 0
        with torch.no_grad(), validation(False):
            for batch in self.val(0, None, errors):
                if batch is None or errors.message is not None:
                    continue
                u, ld, h = self._inputs(batch)
                total += (self.model.flow_log_prob(u, h) + ld).sum().to(torch.float64)
                count += u.shape[0]
        errors.raise_any()
        sums = self.rows.sum(torch.stack([total, total.new_tensor(float(count))]))
        self.num_val = int(sums[1])
        if self.num_val == 0:
            raise ValueError(f"{self.val.name} has no rows")
        return float(sums[0] / sums[1])


def _source(data: Any, name: str, *, dataset_indices: _Subset | None, batch_size: int,
            rank: int, world: int, shuffle: bool) -> Any:
    """``data`` as a source of batches: a map-style dataset by index (sharded over the
    ranks), anything else iterated as it comes."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return _Indexed(data, dataset_indices, batch_size, rank, world, shuffle)
    if isinstance(data, (list, tuple)) and not is_stream(data):
        raise ValueError(f"{name}: a list of batches holds 2-D arrays or (y, context) pairs")
    return _Iterable(data, name)


def fit_streamed(est: Any, x: Any, x_val: Any, *, max_epochs: int, batch_size: int, lr: float,
                 patience: int, val_fraction: float, weight_decay: float,
                 averaging_epochs: float, clip_factor: float | None, progress: bool,
                 distributed: bool | None,
                 checkpoint: Any, checkpoint_every: int, resume: Any, context: Any,
                 context_val: Any) -> Any:
    """``DensityEstimator.fit`` on streamed data, or data-parallel (see its docstring): the
    sources, one pass for the statistics, the model, :class:`StreamTrainer`; returns ``est``."""
    start = time.perf_counter()
    parallel = is_data_parallel(distributed)
    if est.precondition not in STREAMED_PRECONDITIONERS or est.refine is not None:
        what = (f"precondition={est.precondition!r}" if est.refine is None
                else f"refine={est.refine!r}")
        raise ValueError(
            f"{what} needs the rows in memory in one process (Tabak's fit revisits every row "
            "at every step): streamed and data-parallel fits take precondition="
            f"{STREAMED_PRECONDITIONERS}. Fit on an in-memory subsample, or fit "
            "pyroflows.transforms.Tabak data-parallel on each rank's rows yourself")
    if context is not None or context_val is not None:
        raise ValueError("with streamed or data-parallel data the contexts travel with the rows: "
                         "batches (or Dataset items) are (y, context) pairs; ArrayDataset(y, "
                         "context) pairs up arrays")
    backend = dist.get_backend() if parallel else None
    world = dist.get_world_size() if parallel else 1
    rank = dist.get_rank() if parallel else 0
    device = est.device or torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("an NCCL process group trains on GPUs: pass device='cuda:<local rank>'")
    from .estimator import usable_device

    device = usable_device(device, "fit")
    rows = Rows(parallel, 0, device if backend == "nccl" else "cpu")
    seed = rows.broadcast_seed(est.seed)
    gen = generator(seed)
    model_seed = int(torch.randint(2**62, (1,), generator=gen))  # the same on every rank

    # Arrays (in memory) are this rank's own shard, as Tabak.fit takes them, batched alone; a
    # Dataset is every rank's, each global batch shared out; other sources are as they come.
    arrays = not is_stream(x)
    if arrays:
        x = ArrayDataset(x)
    local_val = x_val is not None and not is_stream(x_val)
    if local_val:
        x_val = ArrayDataset(x_val)
    indexed = isinstance(x, Dataset) and not isinstance(x, IterableDataset)  # (batch_size's)
    if indexed:
        n = len(x)
        train_share = (-(-batch_size // world), 0, 1) if arrays else (batch_size, rank, world)
        if x_val is None:
            split = Permutation(n, gen)
            num_val = min(n, max(1, round(val_fraction * n)))  # (a rank's shard may be empty)
            train_idx, val_idx = _Subset(split, num_val, n - num_val), _Subset(split, 0, num_val)
            val_share = train_share
            x_val = x
        else:
            train_idx, val_idx = None, None
            val_share = (EVAL_BATCH, 0, 1) if local_val else (EVAL_BATCH, rank, world)
        train = _source(x, "x", dataset_indices=train_idx, batch_size=train_share[0],
                        rank=train_share[1], world=train_share[2], shuffle=True)
    else:
        if x_val is None:
            raise ValueError("a streamed fit of batches needs x_val, the held-out batches, given "
                             "the same way (a DataLoader, a Dataset, a list of batches): an "
                             "iterable cannot be split")
        train = _source(x, "x", dataset_indices=None, batch_size=batch_size, rank=rank,
                        world=world, shuffle=True)
        val_idx = None
        val_share = (EVAL_BATCH, 0, 1) if local_val else (EVAL_BATCH, rank, world)
    val = _source(x_val, "x_val", dataset_indices=val_idx, batch_size=EVAL_BATCH,
                  rank=val_share[1], world=val_share[2], shuffle=False)
    train_batches = _Batches(train, "x", device, est.dtype)
    num_train, mean, cov, dim, context_dim, steps = stream_moments(train_batches, rows)
    dtype = train_batches.dtype or torch.float32
    if est.context_dim is not None and context_dim != est.context_dim:
        raise ValueError(f"this DensityEstimator was built with context_dim={est.context_dim}, "
                         f"but the batches carry {context_dim or 0} context columns")
    if num_train < dim + 1:
        raise ValueError(f"x has {num_train} training rows: a fit needs at least D + 1 = "
                         f"{dim + 1} (fewer lie on a hyperplane, where the likelihood is "
                         "unbounded)")
    val_batches = _Batches(val, "x_val", device, dtype, dim, context_dim)

    precondition = est.precondition
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        model = est._build(precondition, dim, device, dtype,
                           seed=int(torch.randint(2**31, (1,))), context_dim=context_dim)
    start_model(model, precondition, mean, cov)
    if arrays and rows.parallel:  # the ranks' shards differ: each its own order
        gen.manual_seed((seed or 0) + 7919 * rank)
    trainer = StreamTrainer(model, train_batches, val_batches, gen, rows, num_train=num_train,
                            steps_per_epoch=steps, lr=lr,
                            weight_decay=weight_decay, averaging_epochs=averaging_epochs,
                            clip_factor=clip_factor)
    signature = fit_signature(est, precondition, dim, context_dim, dtype, batch_size, num_train,
                              trainer.history["num_val"], world, training=trainer.options,
                              mean=mean, sd=cov.diagonal().sqrt())
    if resume is not None:  # before the estimator lets go of its model: a refusal loses nothing
        trainer.restore(resume, signature)
    est._model, est.dim_, est.history_ = model, dim, trainer.history
    est.context_dim_, est.precondition_ = context_dim, precondition
    est.student_ = None  # a distilled student of the model this fit replaces
    history = trainer.history
    history["precondition"] = precondition
    history["processes"] = world
    # the global batch, shared out among the ranks (None: the source's own batches)
    history["batch_size"] = batch_size if indexed else None
    trainer.run(max_epochs, patience, progress, start, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, signature=signature)
    history = est.history_
    history["final_val_log_prob"] = history["best_val_log_prob"]
    if history["stopped"] == "interrupted":
        history.setdefault("interrupted_in", f"{precondition}: flow")
    history["seconds"] = time.perf_counter() - start
    return est
