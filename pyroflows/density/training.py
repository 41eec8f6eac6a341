"""Training a density model's flow (conditional or not): minibatch Adam, a validated moving
average of the parameters, early stopping, and a best state that survives interrupts and
errors."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._config import validation
from .pipeline import DensityModel, evaluate

__all__ = ["Trainer", "ParameterAverage", "run_epoch", "training_state", "training_step",
           "adam", "snapshot"]

# Gradients are clipped to this norm: a rare huge gradient must not throw the flow far away.
MAX_GRAD_NORM = 1e3


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
                  h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One Adam step on the mean negative log-likelihood of the preconditioned rows ``u``
    (given their standardized contexts ``h``, where the model has a context; gradients
    clipped to ``MAX_GRAD_NORM``), then the moving average; returns the rows'
    log-likelihoods and a 0-dim bool, true where a non-finite loss or gradient skipped the step.
    With the fused Adam the skip is the optimizer's ``found_inf`` (as ``torch.amp.GradScaler``
    sets it), decided on the device, so a step makes no host synchronization."""
    lp = model.flow_log_prob(u, h)
    loss = -lp.mean()
    optimizer.zero_grad(set_to_none=True)
    fused = optimizer.defaults.get("fused")
    if not fused and not bool(torch.isfinite(loss)):
        return lp.detach(), torch.ones((), dtype=torch.bool, device=lp.device)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    skipped = ~(torch.isfinite(loss) & torch.isfinite(norm))
    if fused:
        optimizer.found_inf = skipped.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(skipped):
        return lp.detach(), skipped
    else:
        optimizer.step()
    average.update(skipped)
    return lp.detach(), skipped


def run_epoch(model: DensityModel, u_train: Tensor, ld_train: Tensor,
              optimizer: torch.optim.Optimizer, params: list[Tensor], batch_size: int,
              gen: torch.Generator, history: dict, average: ParameterAverage,
              h_train: Tensor | None = None) -> float:
    """One pass of minibatch Adam over the rows in a random order; counts the skipped steps in
    ``history`` and returns the kept steps' mean log-likelihood (``ld_train``: the stages';
    ``h_train``: the rows' standardized contexts, where the model has a context)."""
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
        lp, skipped = training_step(model, u_train[idx], optimizer, params, average, h)
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


class Trainer:
    """Training of ``model``'s flow: set up with the untrained model's scores in
    :attr:`history` and its state as the best so far, then :meth:`run`.

    Arguments:
        model: the model, its stages fitted.
        u_train, ld_train, u_val, ld_val: the preconditioned rows and the stages' log-dets.
        gen: the generator of the minibatch order.
        batch_size, lr, weight_decay, averaging_epochs: as ``DensityEstimator.fit`` takes them.
        h_train, h_val: the rows' standardized contexts, where the model has a context.
    """

    def __init__(self, model: DensityModel, u_train: Tensor, ld_train: Tensor, u_val: Tensor,
                 ld_val: Tensor, gen: torch.Generator, *, batch_size: int, lr: float,
                 weight_decay: float, averaging_epochs: float, h_train: Tensor | None = None,
                 h_val: Tensor | None = None) -> None:
        self.model, self.gen = model, gen
        self.u_train, self.ld_train, self.u_val, self.ld_val = u_train, ld_train, u_val, ld_val
        self.h_train, self.h_val = h_train, h_val
        n_train = u_train.shape[0]
        self.batch_size = min(batch_size, n_train)
        with validation(False), torch.no_grad():
            train0 = float((evaluate(model.flow_log_prob, u_train, h_train) + ld_train).mean())
        val0 = self.val_score()
        self.history: dict[str, Any] = {
            "epoch": [0], "train_log_prob": [train0], "val_log_prob": [val0],
            "best_epoch": 0, "best_val_log_prob": val0, "initial_val_log_prob": val0,
            "stopped": "max_epochs", "skipped_steps": 0, "seconds": 0.0,
            "num_train": n_train, "num_val": int(u_val.shape[0]),
        }
        self.best_state = snapshot(model.flow)
        steps_per_epoch = -(-n_train // self.batch_size)
        horizon = max(10.0, steps_per_epoch * averaging_epochs) if averaging_epochs > 0 else 1.0
        self.optimizer, self.params, self.average = training_state(model, lr, weight_decay,
                                                                   1.0 / horizon)

    def val_score(self) -> float:
        """The flow's mean validation log-likelihood as the parameters stand."""
        with torch.no_grad():
            lp = evaluate(self.model.flow_log_prob, self.u_val, self.h_val) + self.ld_val
        return float(lp.mean())

    def run(self, max_epochs: int, patience: int, progress: bool, start: float) -> None:
        """Up to ``max_epochs`` epochs until ``patience`` bring no better validation score; the
        flow ends in its best state, also after an error or a ``KeyboardInterrupt`` (a warning).
        ``start``: the fit's ``time.perf_counter()``."""
        from tqdm.auto import tqdm

        history, model = self.history, self.model
        bar = None
        try:
            bar = tqdm(range(1, max_epochs + 1), disable=not progress, desc="fit", leave=False)
            since_best = 0
            for epoch in bar:
                with validation(False):
                    train_lp = run_epoch(model, self.u_train, self.ld_train, self.optimizer,
                                         self.params, self.batch_size, self.gen, history,
                                         self.average, self.h_train)
                with validation(False), self.average.swapped_in():
                    val_lp = self.val_score()
                    improved = val_lp > history["best_val_log_prob"]  # NaN is never better
                    if improved:
                        self.best_state = snapshot(model.flow)
                history["epoch"].append(epoch)
                history["train_log_prob"].append(train_lp)
                history["val_log_prob"].append(val_lp)
                if improved:
                    history["best_epoch"], history["best_val_log_prob"] = epoch, val_lp
                    since_best = 0
                else:
                    since_best += 1
                bar.set_postfix(train=f"{train_lp:.3f}", val=f"{val_lp:.3f}",
                                best=f"{history['best_val_log_prob']:.3f}")
                if since_best > patience:
                    history["stopped"] = "early_stopping"
                    break
        except KeyboardInterrupt:
            history["stopped"] = "interrupted"
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
