"""The VI report of a fit: ELBO, log evidence, PSIS k-hat and importance ESS of one guide from one
set of draws, and whether the ELBO trace has stopped rising; as a table, a dict or a figure."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .pareto import KHAT_GOOD, KHAT_USABLE, importance_ess, khat_verdict, psis
from .weights import guide_name, log_importance_weights

__all__ = ["ConvergenceCheck", "elbo_convergence", "elbo_trace_ylim", "VIReport", "vi_report",
           "BULK_SPREAD_CLOSE", "robust_spread", "approximation_verdict"]

#: Up to this robust spread of the log weights (nats) the bulk of the guide matches the
#: posterior's: for log-normal weights the bulk's KL is about spread^2 / 2, here 0.125 nats.
BULK_SPREAD_CLOSE = 0.5


def _as_trace(elbo_trace: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
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


def elbo_convergence(elbo_trace: Sequence[float] | np.ndarray | Tensor, window: float = 0.1,
                     tol: float = 0.01) -> ConvergenceCheck:
    """Has the ELBO stopped rising? With :math:`\\bar a` the mean of the last ``window`` fraction
    of the trace (:math:`m \\ge 5` steps) and :math:`\\bar b` the mean of the :math:`m` before it,

    .. math:: d = \\bar a - \\bar b, \\qquad \\mathrm{se} = \\sqrt{(s_a^2 + s_b^2) / m}

    (sample variances, the steps taken as independent, which SVI's noisy estimates nearly are):
    ``"still rising"`` if :math:`d > \\max(2\\,\\mathrm{se}, \\mathrm{tol})`, ``"falling"`` (an
    unstable optimizer) if :math:`d < -\\max(2\\,\\mathrm{se}, \\mathrm{tol})`, else
    ``"converged"``; ``"too short"`` below 20 steps.

    Arguments:
        elbo_trace: ELBO values in step order (the negated losses of ``svi.step``).
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
    trace = _as_trace(elbo_trace)
    m = max(5, int(round(window * trace.size)))
    if trace.size < max(20, 2 * m):
        return ConvergenceCheck("too short", math.nan, math.nan, m)
    last, previous = trace[-m:], trace[-2 * m:-m]
    difference = float(last.mean() - previous.mean())
    se = float(math.sqrt(last.var(ddof=1) / m + previous.var(ddof=1) / m))
    threshold = max(2.0 * se, tol)
    if not math.isfinite(difference) or difference < -threshold:  # non-finite: gone astray
        verdict = "falling"
    elif difference > threshold:
        verdict = "still rising"
    else:
        verdict = "converged"
    return ConvergenceCheck(verdict, difference, se, m)


def elbo_trace_ylim(elbo_trace: Sequence[float] | np.ndarray | Tensor,
                    quantile: float = 5.0) -> tuple[float, float] | None:
    r"""y-limits that keep an ELBO trace readable when its first steps are far below the rest,
    or ``None`` when the full range is fine. With :math:`q` the ``quantile``-th percentile of the
    finite values and :math:`M` their maximum, a trace whose minimum lies below
    :math:`q - 5 (M - q)` gets :math:`(q - (M - q)/2,\ M + (M - q)/20)`: the steps above the
    ``quantile`` fill the axis, the early transient leaves it at the bottom.

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
    trace = _as_trace(elbo_trace)
    finite = trace[np.isfinite(trace)]
    if finite.size < 2:
        return None
    low, top = float(np.percentile(finite, quantile)), float(finite.max())
    span = top - low
    if not span > 0 or finite.min() >= low - 5 * span:
        return None
    return low - 0.5 * span, top + 0.05 * span


def robust_spread(log_weights: np.ndarray) -> float:
    r"""The spread of the bulk of the log weights, :math:`\mathrm{IQR}(\log w) / 1.349`: their
    standard deviation were they normal, and, unlike it, blind to the few largest weights
    (those are :math:`\hat k`'s business). For :math:`q` close to :math:`p` the log weights
    are nearly normal with variance :math:`\sigma^2` and
    :math:`\mathrm{KL}(q \,\|\, p) \approx \sigma^2 / 2`.

    Example:
        >>> import numpy as np
        >>> from pyroflows.diagnostics import robust_spread
        >>> lw = np.random.default_rng(0).normal(0.0, 0.3, 100000)
        >>> round(robust_spread(lw), 2)
        0.3
        >>> lw[:20] = 50.0  # a few huge weights leave the bulk's spread alone
        >>> round(robust_spread(lw), 2)
        0.3
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    lw = lw[np.isfinite(lw)]
    if lw.size < 4:
        return math.nan
    q25, q75 = np.percentile(lw, [25.0, 75.0])
    return float((q75 - q25) / 1.349)


def approximation_verdict(khat: float, spread: float,
                          close: float = BULK_SPREAD_CLOSE) -> tuple[str, str]:
    r"""What the weights say of the guide :math:`q`, in two parts (Yao et al. 2018, "Yes, but
    did it work?"; Vehtari et al. 2024, "Pareto smoothed importance sampling"): the right tail
    of :math:`w = p/q`, measured by :math:`\hat k`, tells whether importance sampling can be
    trusted; the bulk of :math:`\log w`, measured by :func:`robust_spread` :math:`\sigma`,
    tells whether :math:`q` is close where most of its mass is. The verdicts:

    - ``"good"``: :math:`\hat k < 0.5` and :math:`\sigma \le` ``close``.
    - ``"usable"``: :math:`\hat k \le 0.7` and :math:`\sigma \le` ``close``; PSIS-corrected
      estimates are reliable.
    - ``"tails too light"``: :math:`\hat k > 0.7` while :math:`\sigma \le` ``close``: the
      approximation's bulk is right (moments and quantiles of :math:`q` are close), but the
      posterior has mass far out where :math:`q` has almost none, so importance sampling
      (and the PSIS-corrected estimates) is unreliable. A heavy-tailed base
      (``base="studentt"``) is the remedy.
    - ``"poor"``: :math:`\sigma >` ``close``: the approximation itself is off (its KL to
      the posterior is about :math:`\sigma^2/2` or more); with :math:`\hat k \le 0.7`
      PSIS can still correct it.
    - ``"unknown"``: :math:`\hat k` or :math:`\sigma` is NaN.

    Returns:
        ``(verdict, reason)``: the label and a sentence that says why.

    Example:
        >>> from pyroflows.diagnostics import approximation_verdict
        >>> approximation_verdict(1.08, 0.05)[0], approximation_verdict(0.3, 2.0)[0]
        ('tails too light', 'poor')
    """
    if math.isnan(khat) or math.isnan(spread):  # (k-hat is -inf for constant weights: exact)
        return "unknown", "k-hat or the log weights' spread is NaN"
    if spread > close:
        fix = ("PSIS can still correct its estimates" if khat <= KHAT_USABLE
               else "and importance sampling cannot correct it")
        return "poor", (f"the bulk of the log weights spreads {spread:.2f} > {close:g} nats "
                        f"(KL(q || p) about {spread ** 2 / 2:.2g} nats or more): the approximation "
                        f"is off; {fix}")
    if khat > KHAT_USABLE:
        return "tails too light", (
            f"k-hat {khat:.2f} > {KHAT_USABLE} while the bulk of the log weights spreads only "
            f"{spread:.2f} nats: the approximation's bulk is right but its tails are lighter "
            "than the posterior's, so importance sampling is unreliable (try base='studentt')")
    label = "good" if khat < KHAT_GOOD else "usable"
    return label, (f"k-hat {khat:.2f} and a bulk spread of {spread:.2f} nats: the approximation "
                   "is close and importance sampling is reliable")


@dataclass
class VIReport:
    """Diagnostics of one guide, made by :func:`vi_report`. Prints as a compact table;
    :meth:`to_dict` gives the numbers, :meth:`plot` draws them."""

    num_samples: int
    elbo: float  # mean log weight
    elbo_se: float  # its Monte Carlo standard error
    log_evidence: float  # importance-sampling estimate log mean w
    khat: float
    ess: float  # (sum w)^2 / sum w^2 of the smoothed weights
    guide: str = ""
    convergence: ConvergenceCheck | None = None
    log_weights: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    elbo_trace: np.ndarray | None = field(default=None, repr=False)

    @property
    def khat_verdict(self) -> str:
        return khat_verdict(self.khat)

    @property
    def log_weight_spread(self) -> float:
        """The bulk's spread of the log weights (:func:`robust_spread`)."""
        return robust_spread(self.log_weights)

    @property
    def verdict(self) -> str:
        """:func:`approximation_verdict`'s label: is importance sampling unreliable (``"tails
        too light"``) or the approximation poor (``"poor"``)?"""
        return approximation_verdict(self.khat, self.log_weight_spread)[0]

    @property
    def verdict_reason(self) -> str:
        return approximation_verdict(self.khat, self.log_weight_spread)[1]

    @property
    def ess_fraction(self) -> float:
        return self.ess / self.num_samples

    def to_dict(self) -> dict[str, Any]:
        """The numbers, as plain Python values (for benchmark tables)."""
        c = self.convergence
        return {
            "guide": self.guide, "num_samples": self.num_samples, "elbo": self.elbo,
            "elbo_se": self.elbo_se, "log_evidence": self.log_evidence, "khat": self.khat,
            "khat_verdict": self.khat_verdict, "ess": self.ess, "ess_fraction": self.ess_fraction,
            "log_weight_spread": self.log_weight_spread, "verdict": self.verdict,
            "convergence": None if c is None else c.verdict,
            "elbo_trace_difference": None if c is None else c.difference,
            "elbo_trace_se": None if c is None else c.standard_error,
        }

    def __str__(self) -> str:
        rows = [
            ("ELBO", f"{self.elbo:.4g} ± {self.elbo_se:.2g}"),
            ("log evidence (IS)", f"{self.log_evidence:.4g}"),
            ("PSIS k-hat", f"{self.khat:.2f}  {self.khat_verdict}  (< 0.5 good, 0.5-0.7 "
                           "usable, > 0.7 do not trust)"),
            ("IS ESS", f"{self.ess:.0f} / {self.num_samples} ({100 * self.ess_fraction:.1f}%)"),
            ("log w spread (bulk)", f"{self.log_weight_spread:.3g} nats"),
            ("verdict", f"{self.verdict}: {self.verdict_reason}"),
        ]
        if self.convergence is not None:
            rows.append(("ELBO trace", str(self.convergence)))
        title = f"VI diagnostics{f' for {self.guide}' if self.guide else ''}"
        width = max(len(r[0]) for r in rows)
        return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the table
        printer.text(str(self))

    def plot(self, fig=None):
        """Draw the ELBO trace (with the two windows of the convergence check), the log-weight
        histogram and :math:`\\hat k` against its thresholds. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        if fig is None:
            fig = plt.figure(figsize=(12, 3.2))
        ax_trace, ax_weights, ax_khat = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 2, 1]})
        _plot_trace(ax_trace, self.elbo_trace, self.convergence)
        lw = self.log_weights[np.isfinite(self.log_weights)]
        ax_weights.hist(lw - lw.max(), bins=50, color="C0")
        ax_weights.set(xlabel="log w - max log w",
                       title=f"importance weights, ESS {100 * self.ess_fraction:.1f}%")
        _plot_khat(ax_khat, self.khat)
        fig.tight_layout()
        return fig


def _plot_trace(ax, trace: np.ndarray | None, check: ConvergenceCheck | None) -> None:
    """The ELBO trace, with the two windows of the convergence check and their means."""
    if trace is None or not len(trace):
        ax.text(0.5, 0.5, "no ELBO trace given", ha="center", va="center")
        ax.set_axis_off()
        return
    ax.plot(np.arange(len(trace)), trace, lw=0.8, color="C0")
    limits = elbo_trace_ylim(trace)
    if limits is not None:
        ax.set_ylim(*limits)
    title = "ELBO trace"
    if check is not None and check.verdict != "too short":
        n, m = len(trace), check.window
        for lo, hi, color in ((n - 2 * m, n - m, "C1"), (n - m, n, "C2")):
            ax.axvspan(lo, hi, color=color, alpha=0.2)
            ax.hlines(np.mean(trace[lo:hi]), lo, hi, color=color)
        title = f"ELBO trace: {check.verdict}"
    if limits is not None:
        title += " (early steps below the axis)"
    ax.set(title=title, xlabel="step", ylabel="ELBO")


def _plot_khat(ax, khat: float) -> None:
    """:math:`\\hat k` as a dot over the verdict's bands, clipped to [-0.5, 1.5]."""
    bands = ((-0.5, KHAT_GOOD, "tab:green"), (KHAT_GOOD, KHAT_USABLE, "tab:orange"),
             (KHAT_USABLE, 1.5, "tab:red"))
    for lo, hi, color in bands:
        ax.axhspan(lo, hi, color=color, alpha=0.25)
    shown = min(max(khat, -0.5), 1.5) if math.isfinite(khat) else (-0.5 if khat < 0 else 1.5)
    ax.plot([0], [shown], "ko")
    ax.set(xlim=(-1, 1), ylim=(-0.5, 1.5), xticks=[],
           title=f"k-hat {khat:.2f}: {khat_verdict(khat)}")


def vi_report(model: Callable, guide: Callable, *args: Any,
              elbo_trace: Sequence[float] | np.ndarray | Tensor | None = None,
              num_samples: int = 2000, max_plate_nesting: int | None = None,
              chunk_size: int | None = None, **kwargs: Any) -> VIReport:
    """Is this guide trustworthy? From one set of S guide draws: the ELBO
    :math:`\\frac1S\\sum_s \\log w_s` with its standard error, the log evidence
    :math:`\\log \\frac1S \\sum_s w_s`, the PSIS :math:`\\hat k` with its verdict, the
    importance ESS :math:`(\\sum_s \\tilde w_s)^2 / \\sum_s \\tilde w_s^2` of the smoothed
    weights, the bulk's spread of the log weights and :func:`approximation_verdict` (are the
    tails too light for importance sampling, or is the approximation poor?); with
    ``elbo_trace`` also :func:`elbo_convergence`.

    Arguments:
        model, guide, args, kwargs, num_samples, max_plate_nesting, chunk_size: as for
            :func:`~pyroflows.diagnostics.log_importance_weights`.
        elbo_trace: ELBO values recorded during training (the negated SVI losses).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import vi_report
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.1, 0.9))
        >>> report = vi_report(model, guide, elbo_trace=[-1.0] * 50)
        >>> report.khat_verdict, report.convergence.verdict
        ('good', 'converged')
        >>> sorted(report.to_dict())[:4]
        ['convergence', 'elbo', 'elbo_se', 'elbo_trace_difference']
    """
    log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size, **kwargs)
    smoothed, khat = psis(log_weights)
    lw = log_weights.detach().to("cpu", torch.float64).numpy()
    trace = None if elbo_trace is None else _as_trace(elbo_trace)
    with np.errstate(invalid="ignore"):  # -inf weights give a -inf ELBO, honestly
        elbo = float(lw.mean())
        elbo_se = float(lw.std(ddof=1) / math.sqrt(lw.size)) if lw.size > 1 else math.nan
    log_evidence = float(np.logaddexp.reduce(lw) - math.log(lw.size))
    return VIReport(
        num_samples=num_samples, elbo=elbo, elbo_se=elbo_se, log_evidence=log_evidence,
        khat=khat, ess=importance_ess(smoothed), guide=guide_name(guide),
        convergence=None if trace is None else elbo_convergence(trace),
        log_weights=lw, elbo_trace=trace)
