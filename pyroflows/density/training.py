"""Training a density model's flow (conditional or not): minibatch Adam, a validated moving
average of the parameters, early stopping, and a best state that survives interrupts and
errors."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._config import validation
from .._distributed import Rows
from .pipeline import DensityModel, evaluate

__all__ = ["Trainer", "ParameterAverage", "GradientClip", "run_epoch", "training_state",
           "training_step", "parallel_step", "adam", "snapshot", "read_checkpoint", "fit_signature",
           "default_lr", "default_batch_size", "default_clip_factor", "CHECKPOINT_FORMAT"]

#: What a fit's checkpoint file says it is (``read_checkpoint`` refuses anything else).
CHECKPOINT_FORMAT = "pyroflows.DensityEstimator.checkpoint"
CHECKPOINT_VERSION = 2  # 2: the signature holds every option and the data's moments

# Gradients are clipped to this norm: a rare huge gradient must not throw the flow far away.
MAX_GRAD_NORM = 1e3

#: Adam's step size where ``fit`` is given none: without a context, and with one (a
#: conditional density; see :func:`default_lr`).
DEFAULT_LR = 1e-3
CONDITIONAL_LR = 3e-3
#: The minibatch size where ``fit`` is given none; with a context, the largest one and the
#: fewest steps an epoch should take (see :func:`default_batch_size`).
DEFAULT_BATCH_SIZE = 256
CONDITIONAL_MAX_BATCH_SIZE = 512
MIN_STEPS_PER_EPOCH = 6
#: With a context, each step's gradient is also clipped at this multiple of the running norm
#: (see :func:`default_clip_factor` and :class:`GradientClip`).
CONDITIONAL_CLIP_FACTOR = 2.0


def default_lr(conditional: bool) -> float:
    """Adam's step size of a fit given none: ``CONDITIONAL_LR`` (3e-3) for a conditional
    density, ``DEFAULT_LR`` (1e-3) without a context.

    The conditional value is measured (``benchmarks/results/sbi.md``, "Measured choices"): on
    two_moons NPE at 10^4 simulations 3e-3 reached a higher held-out log-likelihood than 1e-3 in
    about 190 epochs instead of 440; 5e-3 stalled. The unconditional default is that of the
    density benchmarks (``benchmarks/results/density.md``), not remeasured.

    Example:
        >>> default_lr(True), default_lr(False)
        (0.003, 0.001)
    """
    return CONDITIONAL_LR if conditional else DEFAULT_LR


def default_batch_size(num_train: int, conditional: bool) -> int:
    """The minibatch size of a fit given none: ``DEFAULT_BATCH_SIZE`` (256) without a context;
    with one, the largest of 512, 256, 128, 64 and 32 that still makes ``MIN_STEPS_PER_EPOCH``
    (6) steps an epoch over ``num_train`` rows (512 from 3,072 rows up, 256 from 1,536, 128
    from 768, 64 from 384, else 32).

    Measured (``benchmarks/results/sbi.md``, "Measured choices"): a conditional fit stops early
    on a validation split that is small when the simulations are few; with 4 steps an epoch
    (batch 256 at 900 training rows) early stopping ended NPE fits of two_moons before they had
    learned the crescents, 7 (batch 128) did not. With many rows the steps of small networks
    cost about the same at 512 rows as at 256 (the time goes to the kernel launches), so an
    epoch of 512 costs about half: at 9,000 rows of two_moons the spline recipe's fit took 157
    epochs of 512 (30 s) to a held-out log-likelihood 0.02 nats below what 179 epochs of 256
    reached in twice the time. Streamed fits, sized for large data, take 256.

    Example:
        >>> [default_batch_size(n, True) for n in (900, 9000)], default_batch_size(900, False)
        ([128, 512], 256)
    """
    if not conditional:
        return DEFAULT_BATCH_SIZE
    batch = CONDITIONAL_MAX_BATCH_SIZE
    while batch > 32 and num_train < MIN_STEPS_PER_EPOCH * batch:
        batch //= 2
    return batch


def default_clip_factor(conditional: bool) -> float:
    """The adaptive clipping of a fit given none (:class:`GradientClip`):
    ``CONDITIONAL_CLIP_FACTOR`` (2) for a conditional density, 0 (only the fixed cap
    ``MAX_GRAD_NORM``) without a context.

    The conditional value is measured (``benchmarks/results/sbi.md``, "Measured choices"): on
    two_moons NPE at 10^4 simulations the unclipped fits of 8 one-hidden-layer MADEs met
    gradient spikes (norms 100 times the median) that threw the validation score back by
    several nats, and early stopping then ended two seeds of three far from their optimum;
    clipped at twice the running norm, the same fits climbed steadily on all three seeds. The
    unconditional fits keep the fixed cap: nothing measured them.

    Example:
        >>> default_clip_factor(True), default_clip_factor(False)
        (2.0, 0.0)
    """
    return CONDITIONAL_CLIP_FACTOR if conditional else 0.0


class GradientClip:
    r"""Gradient clipping at the fixed cap ``MAX_GRAD_NORM`` and, with ``factor > 0``, at
    ``factor`` times the running norm: a step's gradient :math:`g` is scaled to norm at most
    :math:`\min(\text{MAX\_GRAD\_NORM}, f\,\bar n)`, where :math:`\bar n \leftarrow \bar n
    + r(\min(\lVert g\rVert, f\,\bar n) - \bar n)` (``rate`` :math:`r`, about the last
    :math:`1/r` steps; the first finite norm starts it). A spike (one huge gradient, or a run
    of them as the flow leaves a good region) moves the flow no farther than a typical step;
    steady growth of the norms passes, by up to ``factor`` a step of the average. A non-finite
    norm leaves the running norm alone (that step is skipped). All on the device: no host
    synchronization.
    """

    def __init__(self, factor: float = 0.0, rate: float = 0.01) -> None:
        if not float(factor) >= 0:
            raise ValueError(f"clip_factor must be >= 0 (0: no adaptive clipping), got {factor}")
        self.factor, self.rate = float(factor), float(rate)
        self.running: Tensor | None = None  # NaN until the first finite norm

    def __call__(self, params: list[Tensor]) -> Tensor:
        """Clip the gradients of ``params`` in place; returns their norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if self.factor <= 0 or not params:
            return norm
        capped = norm.detach().clamp(max=MAX_GRAD_NORM)
        if self.running is None:
            self.running = torch.full_like(capped, float("nan"))
        running = torch.where(torch.isnan(self.running), capped, self.running)
        limit = self.factor * running
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, (limit / (capped + 1e-12)).clamp(max=1.0).to(grads[0].dtype))
        updated = running + self.rate * (torch.minimum(capped, limit) - running)
        self.running = torch.where(torch.isfinite(norm), updated, self.running)
        return norm

    def state(self) -> Tensor | None:
        """The running norm, for a checkpoint (``None``: not started)."""
        return None if self.running is None else self.running.detach().cpu()

    def load(self, running: Tensor | None, device: torch.device) -> None:
        """Continue from :meth:`state`'s value."""
        self.running = None if running is None else running.to(device)


class ParameterAverage:
    r"""An exponential moving average of parameters, :math:`\bar\theta \leftarrow \bar\theta +
    r(\theta - \bar\theta)` after every step: validated and kept, as Adam's last iterate is noisy.
    """

    def __init__(self, params: list[Tensor], rate: float) -> None:
        self.params = params
        self.rate = float(rate)
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, skipped: Tensor) -> None:
        """One step of the average, or none where ``skipped`` (0-dim bool, decided on device)."""
        if not self.average:
            return
        weight = (~skipped).to(self.average[0].dtype) * self.rate
        for a, p in zip(self.average, self.params, strict=True):
            a.lerp_(p, weight.to(a.dtype))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Load the average into the parameters for the duration, then restore them."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)


def adam(params: Iterable[Tensor], **kwargs: Any) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused (one kernel per step) where torch has the kernel."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, **kwargs)


def training_state(model: DensityModel, lr: float, weight_decay: float,
                   rate: float) -> tuple[torch.optim.Optimizer, list[Tensor], ParameterAverage]:
    """The flow's optimizer (:func:`adam`), its trainable parameters and their moving average."""
    optimizer = adam(model.flow.parameters(), lr=lr, weight_decay=weight_decay)
    params = [p for p in model.flow.parameters() if p.requires_grad]
    return optimizer, params, ParameterAverage(params, rate=rate)


def training_step(model: DensityModel, u: Tensor, optimizer: torch.optim.Optimizer,
                  params: list[Tensor], average: ParameterAverage,
                  h: Tensor | None = None, clip: GradientClip | None = None
                  ) -> tuple[Tensor, Tensor]:
    """One Adam step on the mean negative log-likelihood of the preconditioned rows ``u``
    (given their standardized contexts ``h``, where the model has a context; gradients
    clipped by ``clip``, default the fixed cap ``MAX_GRAD_NORM``), then the moving average;
    returns the rows' log-likelihoods and a 0-dim bool, true where a non-finite loss or
    gradient skipped the step.
    With the fused Adam the skip is the optimizer's ``found_inf`` (as ``torch.amp.GradScaler``
    sets it), decided on the device, so a step makes no host synchronization."""
    lp = model.flow_log_prob(u, h)
    loss = -lp.mean()
    optimizer.zero_grad(set_to_none=True)
    fused = optimizer.defaults.get("fused")
    if not fused and not bool(torch.isfinite(loss)):
        return lp.detach(), torch.ones((), dtype=torch.bool, device=lp.device)
    loss.backward()
    return lp.detach(), clipped_step(loss, optimizer, params, average, clip)


def clipped_step(loss: Tensor, optimizer: torch.optim.Optimizer, params: list[Tensor],
                 average: ParameterAverage, clip: GradientClip | None = None) -> Tensor:
    """Clip the gradients (``clip``, default the fixed cap ``MAX_GRAD_NORM``), take the
    optimizer's step unless ``loss`` or a gradient is not finite, then the moving average;
    returns the 0-dim skip flag (with the fused Adam decided on the device: no host
    synchronization)."""
    norm = (clip or GradientClip())(params)
    skipped = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(skipped):
        return skipped
    else:
        optimizer.step()
    average.update(skipped)
    return skipped


def parallel_step(model: DensityModel, u: Tensor, optimizer: torch.optim.Optimizer,
                  params: list[Tensor], average: ParameterAverage, rows: Rows,
                  h: Tensor | None = None, clip: GradientClip | None = None
                  ) -> tuple[Tensor, Tensor, int]:
    """:func:`training_step` on the rows ``u`` of every rank together (``rows``: the process
    group; ``u`` this rank's part of the global batch, possibly empty): the gradients of the
    sum of the log-likelihoods, the sum and the row count go through one all-reduce, then are
    divided by the global count, so every rank holds the gradient of the global batch's mean
    and takes the identical step (skipped on every rank where the global loss or gradient is
    not finite). Returns the local log-likelihoods, the skip flag and the global row count
    (0: every rank's data is spent, and no step was taken)."""
    optimizer.zero_grad(set_to_none=True)
    if u.shape[0]:
        lp = model.flow_log_prob(u, h)
        total = lp.sum()
        total.neg().backward()
    else:
        lp = u.new_zeros(0)
        total = u.new_zeros(())
    flat = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
            for p in params]
    flat.append(torch.stack([total.detach(), total.new_tensor(float(u.shape[0]))]))
    flat = rows.sum(torch.cat(flat))
    count = int(flat[-1])
    skipped = torch.zeros((), dtype=torch.bool, device=u.device)
    if count == 0:
        return lp.detach(), skipped, 0
    flat = flat / count
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)  # views of the one reduced buffer
        offset += p.numel()
    return lp.detach(), clipped_step(-flat[-2], optimizer, params, average, clip), count


def run_epoch(model: DensityModel, u_train: Tensor, ld_train: Tensor,
              optimizer: torch.optim.Optimizer, params: list[Tensor], batch_size: int,
              gen: torch.Generator, history: dict, average: ParameterAverage,
              h_train: Tensor | None = None, clip: GradientClip | None = None) -> float:
    """One pass of minibatch Adam over the rows in a random order; counts the skipped steps in
    ``history`` and returns the kept steps' mean log-likelihood (``ld_train``: the stages';
    ``h_train``: the rows' standardized contexts, where the model has a context; ``clip``: as
    :func:`training_step` takes it)."""
    n = u_train.shape[0]
    perm = torch.randperm(n, generator=gen).to(u_train.device)
    # Running sums on the device, read once at the end of the epoch: a read per step would make
    # the host wait for the device every step.
    total = torch.zeros((), dtype=u_train.dtype, device=u_train.device)
    count = torch.zeros((), dtype=torch.int64, device=u_train.device)
    skips = torch.zeros((), dtype=torch.int64, device=u_train.device)
    model.train()
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        h = None if h_train is None else h_train[idx]
        lp, skipped = training_step(model, u_train[idx], optimizer, params, average, h, clip)
        kept = ~skipped
        total += torch.where(kept, lp.sum() + ld_train[idx].sum(), 0.0)
        count += kept * idx.numel()
        skips += skipped
    model.eval()
    history["skipped_steps"] += int(skips)
    count = int(count)
    return float(total) / count if count else float("nan")


def snapshot(module: nn.Module, device: torch.device | str | None = None) -> dict:
    """A copy of ``module.state_dict()`` (on ``device``, default its own) copying each tensor
    once (a bank of stacked parameters appears under every layer's key)."""
    clones: dict = {}
    out = {}
    for key, value in module.state_dict().items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                 tuple(value.shape), tuple(value.stride()), value.dtype)
        if ident not in clones:
            clones[ident] = value.detach().to(device or value.device, copy=True)
        out[key] = clones[ident]
    return out


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The contents of a fit's checkpoint, read with ``torch.load(weights_only=True)`` (no
    pickled code runs); a ``ValueError`` saying what is wrong for a missing, empty, foreign or
    damaged file."""
    from .persistence import read_torch_file  # (persistence imports this module)

    path = os.fspath(path)
    try:
        payload = read_torch_file(path, "a checkpoint", prefix="resume: ")
    except FileNotFoundError:
        raise ValueError(f"resume: no checkpoint at {path}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"resume: {path} is a torch file but not a DensityEstimator fit's "
                         "checkpoint (a saved estimator is loaded with DensityEstimator.load)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"resume: {path} has checkpoint version {payload.get('version')!r}; "
                         f"this pyroflows reads version {CHECKPOINT_VERSION}")
    return payload


def row_moments(rows: Tensor | tuple[Tensor, ...], chunk: int = 65536
                ) -> tuple[Tensor, Tensor]:
    """The float64 mean and ML standard deviation of the columns of ``rows`` (a tuple: its
    parts side by side, as the rows joined with their contexts), ``chunk`` rows at a time,
    without a float64 copy of the data."""
    parts = rows if isinstance(rows, tuple) else (rows,)
    n = parts[0].shape[0]

    def blocks() -> Iterator[Tensor]:
        for start in range(0, n, chunk):
            yield torch.cat([p[start:start + chunk] for p in parts], 1).to(torch.float64)

    mean = sum(block.sum(0) for block in blocks()) / n
    var = sum(((block - mean) ** 2).sum(0) for block in blocks()) / n
    return mean, var.sqrt()


def fit_signature(est: Any, precondition: str | None, dim: int, context_dim: int | None,
                  dtype: torch.dtype, batch_size: int, num_train: int, num_val: int,
                  processes: int, *, training: dict, mean: Tensor, sd: Tensor) -> dict:
    """What a checkpoint and the fit resuming from it must share, as plain values: the
    estimator's options (``get_params`` but the device), the fit's (``training``: the step
    size and clip factor used, the weight decay, the averaging horizon), the model's build,
    the data (the count and the float64 ``mean`` and ML ``sd`` of the training rows joined
    with their contexts, to 8 significant digits), the batches and the processes."""
    options = {k: v for k, v in est.get_params().items() if k != "device"}
    moments = torch.cat([mean.reshape(-1), sd.reshape(-1)]).to("cpu", torch.float64)
    return {**_plain(options), **_plain(training),
            "fit_precondition": precondition, "dim": int(dim), "fit_context_dim": context_dim,
            "fit_dtype": str(dtype), "batch_size": int(batch_size), "num_train": int(num_train),
            "num_val": int(num_val), "processes": int(processes),
            "data_moments": [float(f"{v:.8g}") for v in moments.tolist()]}


def _plain(value: Any) -> Any:
    """``value`` as what a checkpoint read with ``weights_only=True`` holds and ``==``
    compares across processes: dicts and lists of numbers and strings; a class or function
    by its qualified name, any other object by its ``repr``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


class Trainer:
    """Training of ``model``'s flow: set up with the untrained model's scores in
    :attr:`history` and its state as the best so far, then :meth:`run`. This class trains on
    preconditioned rows held in memory, in one process;
    :class:`~pyroflows.density.streaming.StreamTrainer` on streamed batches, data-parallel
    where asked. Both share :meth:`run`: the epochs, early stopping, the best state,
    checkpoints and resuming.

    Arguments:
        model: the model, its stages fitted.
        u_train, ld_train, u_val, ld_val: the preconditioned rows and the stages' log-dets.
        gen: the generator of the minibatch order.
        batch_size, lr, weight_decay, averaging_epochs, clip_factor: as ``DensityEstimator.fit``
            takes them (``lr=None``: :func:`default_lr`; ``clip_factor=None``:
            :func:`default_clip_factor`).
        h_train, h_val: the rows' standardized contexts, where the model has a context.
    """

    def __init__(self, model: DensityModel, u_train: Tensor, ld_train: Tensor, u_val: Tensor,
                 ld_val: Tensor, gen: torch.Generator, *, batch_size: int, lr: float | None,
                 weight_decay: float, averaging_epochs: float,
                 clip_factor: float | None = None, h_train: Tensor | None = None,
                 h_val: Tensor | None = None) -> None:
        self.u_train, self.ld_train, self.u_val, self.ld_val = u_train, ld_train, u_val, ld_val
        self.h_train, self.h_val = h_train, h_val
        n_train = u_train.shape[0]
        self.batch_size = min(batch_size, n_train)
        self.model = model
        with validation(False), torch.no_grad():
            train0 = float((evaluate(model.flow_log_prob, u_train, h_train) + ld_train).mean())
        self.setup(model, gen, train0, self.val_score(), n_train, int(u_val.shape[0]),
                   -(-n_train // self.batch_size), lr=lr, weight_decay=weight_decay,
                   averaging_epochs=averaging_epochs, clip_factor=clip_factor,
                   rows=Rows(False, n_train))

    def setup(self, model: DensityModel, gen: torch.Generator, train0: float, val0: float,
              n_train: int, n_val: int, steps_per_epoch: int, *, lr: float | None,
              weight_decay: float, averaging_epochs: float, rows: Rows,
              clip_factor: float | None = None) -> None:
        """The state every trainer shares: the history with the untrained scores, the best
        state, the optimizer, the moving average (its rate from ``steps_per_epoch``) and the
        gradient clipping, and ``rows``, the process group the data is sharded over (not
        parallel: one process). ``lr=None``: :func:`default_lr` of the model (conditional or
        not), ``clip_factor=None``: :func:`default_clip_factor`; the values used are
        ``history["lr"]`` and ``history["clip_factor"]``."""
        self.model, self.gen, self.rows = model, gen, rows
        if lr is None:
            lr = default_lr(model.context_dim is not None)
        if clip_factor is None:
            clip_factor = default_clip_factor(model.context_dim is not None)
        self.clip = GradientClip(clip_factor)
        self.history: dict[str, Any] = {
            "epoch": [0], "train_log_prob": [train0], "val_log_prob": [val0],
            "best_epoch": 0, "best_val_log_prob": val0, "initial_val_log_prob": val0,
            "stopped": "max_epochs", "skipped_steps": 0, "seconds": 0.0,
            "num_train": n_train, "num_val": n_val, "rows_per_second": [], "lr": float(lr),
            "clip_factor": self.clip.factor,
        }
        #: the training options used, which a checkpoint's resumption must share
        self.options = {"lr": float(lr), "clip_factor": self.clip.factor,
                        "weight_decay": float(weight_decay),
                        "averaging_epochs": float(averaging_epochs)}
        self.best_state = snapshot(model.flow)
        horizon = max(10.0, steps_per_epoch * averaging_epochs) if averaging_epochs > 0 else 1.0
        self.optimizer, self.params, self.average = training_state(model, lr, weight_decay,
                                                                   1.0 / horizon)

    @property
    def is_main(self) -> bool:
        """Whether this process shows progress and writes files (rank 0, or the only one)."""
        return self.rows.rank == 0

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training rows: the kept steps' mean log-likelihood and the number
        of rows trained on (all ranks')."""
        lp = run_epoch(self.model, self.u_train, self.ld_train, self.optimizer, self.params,
                       self.batch_size, self.gen, self.history, self.average, self.h_train,
                       self.clip)
        return lp, int(self.u_train.shape[0])

    def val_score(self) -> float:
        """The flow's mean validation log-likelihood as the parameters stand."""
        with torch.no_grad():
            lp = evaluate(self.model.flow_log_prob, self.u_val, self.h_val) + self.ld_val
        return float(lp.mean())

    def _rng_states(self) -> dict:
        """Every generator the fit draws from, per rank: the fit's own (the minibatch order),
        torch's global CPU one (a ``DataLoader``'s shuffling and
        workers' seeds) and, on a GPU, the device's, and Python's."""
        version, internal, gauss = random.getstate()
        ints = self.rows.gather_all(torch.tensor([version, *internal], dtype=torch.int64))
        gausses = self.rows.gather_all(torch.tensor(
            [math.nan if gauss is None else gauss], dtype=torch.float64))
        states = {"generator": [t.cpu() for t in self.rows.gather_all(self.gen.get_state())],
                  "torch": [t.cpu() for t in self.rows.gather_all(torch.get_rng_state())],
                  "python": [(int(i[0]), tuple(i[1:].tolist()),
                              None if math.isnan(float(g)) else float(g))
                             for i, g in zip(ints, gausses, strict=True)]}
        device = self.params[0].device if self.params else torch.device("cpu")
        if device.type == "cuda":
            cuda = torch.cuda.get_rng_state(device)
            states["cuda"] = [t.cpu() for t in self.rows.gather_all(cuda)]
        return states

    def write_checkpoint(self, path: str | os.PathLike, epoch: int, since_best: int,
                         signature: dict) -> None:
        """Write the training state after ``epoch`` to ``path`` atomically (rank 0 writes;
        every rank takes part in gathering the random states)."""
        from .persistence import write_atomic

        rng = self._rng_states()
        if not self.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "signature": dict(signature), "epoch": int(epoch), "since_best": int(since_best),
            "history": copy.deepcopy(self.history),
            "model": snapshot(self.model, "cpu"),
            "best_state": {k: v.detach().cpu() for k, v in self.best_state.items()},
            "optimizer": self.optimizer.state_dict(),
            "average": [a.detach().cpu() for a in self.average.average],
            "clip": self.clip.state(),
            "rng": rng,
        }
        write_atomic(payload, path)

    #: ``(epoch, epochs since the best)`` of the checkpoint :meth:`restore` read; :meth:`run`
    #: continues from there.
    resumed: tuple[int, int] | None = None

    def restore(self, path: str | os.PathLike, signature: dict) -> None:
        """Load the training state of a checkpoint written by :meth:`write_checkpoint` for a
        fit of the same ``signature`` (else a ``ValueError`` naming what differs), so that
        :meth:`run` continues it (:attr:`resumed`). A fit restores before it hands the model
        to the estimator: a refused checkpoint leaves the estimator's fitted model as it was."""
        payload = read_checkpoint(path)
        saved = payload.get("signature", {})
        if not isinstance(saved, dict):
            raise ValueError(f"resume: {os.fspath(path)} is damaged: its signature is a "
                             f"{type(saved).__name__}, not a dict")
        differ = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
        if differ:
            shown = ", ".join("the training rows (their moments differ)" if k == "data_moments"
                              else f"{k}: {a!r} in the checkpoint, {b!r} now"
                              for k, (a, b) in differ.items())
            hint = ("; a fit without seed= holds out other rows at every call, so pass the "
                    "same seed= to fit and to resume" if "data_moments" in differ
                    and signature.get("seed") is None else "")
            raise ValueError(f"resume: {os.fspath(path)} is the checkpoint of another fit ("
                             f"{shown}); resume with the same data, options and processes"
                             f"{hint}")
        try:
            device = self.params[0].device if self.params else torch.device("cpu")
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            with torch.no_grad():
                for a, saved_a in zip(self.average.average, payload["average"], strict=True):
                    a.copy_(saved_a)
            self.clip.load(payload.get("clip"), device)  # (absent in older checkpoints)
            self.best_state = {k: v.to(device) for k, v in payload["best_state"].items()}
            self.history.clear()  # in place: the estimator holds this dict
            self.history.update(payload["history"])
            rng = payload["rng"]
            rank = self.rows.rank
            self.gen.set_state(rng["generator"][min(rank, len(rng["generator"]) - 1)])
            torch.set_rng_state(rng["torch"][min(rank, len(rng["torch"]) - 1)])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][min(rank, len(rng["cuda"]) - 1)], device)
            python = rng["python"]
            if isinstance(python[0], int):  # (one state, rank 0's: older checkpoints)
                python = [python]
            version, state, gauss = python[min(rank, len(python) - 1)]
            random.setstate((int(version), tuple(state), gauss))
            self.resumed = int(payload["epoch"]), int(payload["since_best"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            reason = " ".join(str(e).split())
            raise ValueError(f"resume: {os.fspath(path)} is damaged: {type(e).__name__}: "
                             f"{reason}") from e

    def run(self, max_epochs: int, patience: int, progress: bool, start: float, *,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1,
            signature: dict | None = None) -> None:
        """Up to ``max_epochs`` epochs until ``patience`` bring no better validation score; the
        flow ends in its best state, also after an error or a ``KeyboardInterrupt`` (a warning;
        data-parallel, the interrupt is raised again: the other ranks may wait in a collective
        this rank has left, and only ending the process (the launcher then ends the others)
        frees them; ``resume`` from the checkpoint continues the fit).
        ``start``: the fit's ``time.perf_counter()``. Every ``checkpoint_every`` epochs (and
        after the last) the training state is written to ``checkpoint`` with ``signature``;
        after :meth:`restore`, the fit continues from the restored epoch. Progress (rank 0
        only) shows the scores and the rows trained per second."""
        from tqdm.auto import tqdm

        signature = dict(signature or {})
        first, since_best = 1, 0
        if self.resumed is not None:
            done, since_best = self.resumed
            first = done + 1
            if self.history["stopped"] == "early_stopping":
                first = max(first, max_epochs + 1)
        history, model = self.history, self.model
        bar = None
        try:
            bar = tqdm(range(first, max_epochs + 1), disable=not (progress and self.is_main),
                       desc="fit", leave=False)
            for epoch in bar:
                tick = time.perf_counter()
                with validation(False):
                    train_lp, seen = self.train_epoch(epoch)
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                with validation(False), self.average.swapped_in():
                    val_lp = self.val_score()
                    improved = val_lp > history["best_val_log_prob"]  # NaN is never better
                    if improved:
                        self.best_state = snapshot(model.flow)
                history["epoch"].append(epoch)
                history["train_log_prob"].append(train_lp)
                history["val_log_prob"].append(val_lp)
                history.setdefault("rows_per_second", []).append(rate)
                if improved:
                    history["best_epoch"], history["best_val_log_prob"] = epoch, val_lp
                    since_best = 0
                else:
                    since_best += 1
                bar.set_postfix(train=f"{train_lp:.3f}", val=f"{val_lp:.3f}",
                                best=f"{history['best_val_log_prob']:.3f}",
                                rows_s=f"{rate:.3g}")
                stop = since_best > patience
                if stop:
                    history["stopped"] = "early_stopping"
                if checkpoint is not None and (stop or epoch == max_epochs
                                               or epoch % checkpoint_every == 0):
                    self.write_checkpoint(checkpoint, epoch, since_best, signature)
                if stop:
                    break
        except KeyboardInterrupt:
            history["stopped"] = "interrupted"
            if self.rows.parallel:  # the other ranks may wait in a collective this rank left
                raise
            warnings.warn(
                "fit interrupted: keeping the best state so far (epoch "
                f"{history['best_epoch']}, validation log-likelihood "
                f"{history['best_val_log_prob']:.4f})",
                stacklevel=3,
            )
        except BaseException:
            history["stopped"] = "error"
            raise
        finally:
            if bar is not None:
                bar.close()
            model.flow.load_state_dict(self.best_state)
            history["seconds"] = time.perf_counter() - start
