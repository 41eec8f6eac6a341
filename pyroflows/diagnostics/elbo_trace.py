"""The ELBO trace of a fit: has it stopped rising, and y-limits that keep a plot of it readable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ConvergenceCheck", "elbo_convergence", "elbo_trace_ylim"]


def as_trace(elbo_trace: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    """An ELBO trace (a sequence, array or tensor) as a flat float64 numpy array."""
    if torch.is_tensor(elbo_trace):
        elbo_trace = elbo_trace.detach().cpu()
    return np.asarray(elbo_trace, dtype=np.float64).reshape(-1)


@dataclass
class ConvergenceCheck:
    """The ELBO-trace check of :func:`elbo_convergence`."""

    verdict: str  # "converged", "still rising", "falling" or "too short"
    difference: float  # mean of the last window minus mean of the window before
    standard_error: float
    window: int

    def __str__(self) -> str:
        if self.verdict == "too short":
            return "too short to judge"
        return (f"{self.verdict} (last {self.window} - previous {self.window}: "
                f"{self.difference:+.3g} ± {self.standard_error:.2g})")


def elbo_convergence(
    elbo_trace: Sequence[float] | np.ndarray | Tensor, window: float = 0.1, tol: float = 0.01,
) -> ConvergenceCheck:
    """Has the ELBO stopped rising? Compares the mean :math:`\\bar a` of the last ``window``
    fraction of the trace with the mean :math:`\\bar b` of the same number of steps before it:

    .. math:: d = \\bar a - \\bar b, \\qquad
              \\mathrm{se} = \\sqrt{s_a^2 / m + s_b^2 / m},

    with :math:`s^2` the sample variances and :math:`m` the window length (at least 5 steps).
    Verdict: ``"still rising"`` if :math:`d > \\max(2\\,\\mathrm{se}, \\mathrm{tol})`,
    ``"falling"`` if :math:`d < -\\max(2\\,\\mathrm{se}, \\mathrm{tol})` (an unstable optimizer),
    else ``"converged"``; ``"too short"`` below 20 steps. The standard error treats the steps as
    independent, which SVI's noisy estimates nearly are.

    Arguments:
        elbo_trace: ELBO values in step order (Pyro's ``svi.step`` returns the loss: pass its
            negative).
        window: the fraction of the trace in each window.
        tol: rises smaller than this many nats count as converged.

    Example:
        >>> import numpy as np
        >>> from pyroflows.diagnostics import elbo_convergence
        >>> steps = np.arange(1000)
        >>> elbo_convergence(-100 * np.exp(-steps / 50)).verdict
        'converged'
        >>> elbo_convergence(-100 * np.exp(-steps / 2000)).verdict
        'still rising'
    """
    trace = as_trace(elbo_trace)
    m = max(5, int(round(window * trace.size)))
    if trace.size < max(20, 2 * m):
        return ConvergenceCheck("too short", math.nan, math.nan, m)
    last, previous = trace[-m:], trace[-2 * m:-m]
    difference = float(last.mean() - previous.mean())
    se = float(math.sqrt(last.var(ddof=1) / m + previous.var(ddof=1) / m))
    threshold = max(2.0 * se, tol)
    if not math.isfinite(difference):
        verdict = "falling"  # non-finite ELBO values: the optimizer went astray
    elif difference > threshold:
        verdict = "still rising"
    elif difference < -threshold:
        verdict = "falling"
    else:
        verdict = "converged"
    return ConvergenceCheck(verdict, difference, se, m)


def elbo_trace_ylim(
    elbo_trace: Sequence[float] | np.ndarray | Tensor, quantile: float = 5.0,
) -> tuple[float, float] | None:
    r"""y-limits that keep an ELBO trace readable when its first steps are far below the rest,
    or ``None`` when the full range is fine.

    With :math:`q` the ``quantile``-th percentile of the finite values and :math:`M` their
    maximum, the trace is clipped when its minimum lies below :math:`q - 5 (M - q)` (the early
    steps would squeeze the rest into a sixth of the axis, or less); the limits are then
    :math:`(q - (M - q)/2,\ M + (M - q)/20)`, so the last 95% of the steps fill the axis and
    the early transient leaves it at the bottom.

    Example:
        >>> import numpy as np
        >>> from pyroflows.diagnostics import elbo_trace_ylim
        >>> trace = -10.0 + 0.1 * np.random.default_rng(0).standard_normal(1000)
        >>> trace[:20] = -1e6  # the first steps of a badly started fit
        >>> lo, hi = elbo_trace_ylim(trace)
        >>> bool(-11 < lo < -10 < hi < -9)
        True
        >>> elbo_trace_ylim(-10 - np.exp(-np.arange(1000) / 200)) is None
        True
    """
    trace = as_trace(elbo_trace)
    finite = trace[np.isfinite(trace)]
    if finite.size < 2:
        return None
    low, top = float(np.percentile(finite, quantile)), float(finite.max())
    span = top - low
    if not span > 0 or finite.min() >= low - 5 * span:
        return None
    return low - 0.5 * span, top + 0.05 * span
