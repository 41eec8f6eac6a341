r"""A flow guide's best state: training never leaves it worse than where it started.

While it trains, a guide keeps three states of its parameters: its start (set at set-up, or
by ``load_state_dict``), the best state of training by a running ELBO estimate, and the
current one. The running estimate is the mean training loss (:math:`-\widehat{\mathrm{ELBO}}`)
over blocks of :data:`BEST_WINDOW` recorded steps; at the end of a block whose mean is the
lowest so far, the parameters are copied. :class:`~pyroflows.guides.FlowELBO` records every
finite, untempered step of a pyroflows guide itself; in a loop with another ELBO, pass
``svi.step``'s loss to ``guide.record_loss``. ``guide.keep_best(*args)``, at the end, scores
the three states on the same :data:`BEST_DRAWS` base draws (common random numbers, so their
difference is estimated far better than either ELBO) and keeps the one with the highest
estimate, unless its gain over the start is within :data:`BEST_MARGIN_SE` standard errors of
the paired per-draw differences: then the start is kept (a state scored a little higher by
chance must not replace an exact start).

Why both: a running mean of noisy single-step losses picks a state by its noise as much as by
its quality (the minimum of many noisy block means is biased low), so it only nominates a
candidate; the final choice is a fresh estimate, and it includes the start, so a guide whose
start was exact (the Laplace start of a Gaussian posterior, whose ELBO estimate is exact and
of zero variance) cannot end worse than it began by more than that estimate's error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["BestState", "BEST_WINDOW", "BEST_DRAWS", "BEST_MARGIN_SE"]

#: Recorded steps per block of the running ELBO estimate.
BEST_WINDOW = 25
#: Base draws behind ``keep_best``'s comparison of the states.
BEST_DRAWS = 256
#: A state replaces the start only where it beats it by more than this many standard errors of
#: the mean paired difference of the log weights.
BEST_MARGIN_SE = 2.0


def snapshot(params: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Detached copies of named parameters."""
    return {name: p.detach().clone() for name, p in params}


@torch.no_grad()
def restore(params: Iterable[tuple[str, Tensor]], state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the parameters in place (their device and dtype), so optimizers and
    Pyro's param store keep the same tensors."""
    for name, p in params:
        saved = state.get(name)
        if saved is not None and saved.shape == p.shape:
            p.copy_(saved.to(p))


class BestState:
    """The start, the best state by a running ELBO estimate, and the record behind it.

    Arguments:
        params: the named parameters whose state is kept (the start is copied now).
        window: recorded steps per block of the running estimate.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> best = BestState([("w", w)], window=2)
        >>> for loss in (3.0, 3.0, 1.0, 1.0, 2.0, 2.0):  # block means 3, 1, 2
        ...     with torch.no_grad():
        ...         _ = w.add_(1.0)
        ...     best.record(loss, [("w", w)])
        >>> best.best_loss, best.best["w"].tolist(), best.start["w"].tolist()
        (1.0, [4.0, 4.0], [0.0, 0.0])
    """

    def __init__(self, params: Iterable[tuple[str, Tensor]], window: int = BEST_WINDOW) -> None:
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.start = snapshot(params)
        #: the parameters at the end of the block with the lowest mean loss (None: no block yet)
        self.best: dict[str, Tensor] | None = None
        self.best_loss = math.inf
        #: recorded steps, and those skipped for a non-finite loss
        self.steps = self.non_finite = 0
        self._block: list[float] = []

    def record(self, loss: float, params: Iterable[tuple[str, Tensor]]) -> None:
        """One training step's loss (:math:`-\\widehat{\\mathrm{ELBO}}`) of the current
        parameters; a non-finite loss discards its block."""
        loss = float(loss)
        self.steps += 1
        if not math.isfinite(loss):
            self.non_finite += 1
            self._block.clear()
            return
        self._block.append(loss)
        if len(self._block) < self.window:
            return
        mean = sum(self._block) / len(self._block)
        self._block.clear()
        if mean < self.best_loss:
            self.best_loss = mean
            self.best = snapshot(params)


def choose(candidates: list[tuple[str, dict[str, Tensor] | None]],
           params: Callable[[], Iterable[tuple[str, Tensor]]],
           log_weights: Callable[[], Tensor | None]) -> tuple[str, dict[str, float]]:
    """Load each candidate state in turn (the first is the start), score it by the mean of
    ``log_weights()``, its per-draw log weights on common draws (``None``, non-finite or a
    failure: :math:`-\\infty`), and leave loaded the best, or the start where the best's gain
    over it is within :data:`BEST_MARGIN_SE` standard errors of the paired differences:
    ``(its name, every score)``. On a tie the later candidate wins (oldest first)."""
    scores: dict[str, float] = {}
    states: dict[str, dict[str, Tensor]] = {}
    weights: dict[str, Tensor] = {}
    for name, state in candidates:
        if state is None:
            continue
        restore(params(), state)
        try:
            lw = log_weights()
        except (ValueError, RuntimeError):  # a state whose draws the model or flow rejects
            lw = None
        value = float(lw.mean()) if lw is not None else -math.inf
        scores[name] = value if math.isfinite(value) else -math.inf
        states[name] = state
        if math.isfinite(scores[name]):
            weights[name] = lw
    kept = max(reversed(list(scores)), key=lambda name: scores[name])
    start = next(iter(states))
    if kept != start and start in weights and kept in weights:
        diff = (weights[kept] - weights[start]).double()
        se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else math.inf
        if not float(diff.mean()) > BEST_MARGIN_SE * se:
            kept = start
    restore(params(), states[kept])
    return kept, scores
