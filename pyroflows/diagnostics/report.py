"""The VI report: ELBO, log evidence, PSIS k-hat and importance ESS of one guide from one set of
draws, with the ELBO trace's convergence check; as a table, a dict or a figure."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .elbo_trace import ConvergenceCheck, as_trace, elbo_convergence, elbo_trace_ylim
from .pareto import KHAT_GOOD, KHAT_USABLE, importance_ess, khat_verdict, psis
from .weights import guide_name, log_importance_weights

__all__ = ["VIReport", "vi_report"]


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
    def ess_fraction(self) -> float:
        return self.ess / self.num_samples

    def to_dict(self) -> dict[str, Any]:
        """The numbers, as plain Python values (for benchmark tables)."""
        c = self.convergence
        return {
            "guide": self.guide,
            "num_samples": self.num_samples,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "log_evidence": self.log_evidence,
            "khat": self.khat,
            "khat_verdict": self.khat_verdict,
            "ess": self.ess,
            "ess_fraction": self.ess_fraction,
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
        ax_weights.set_xlabel("log w - max log w")
        ax_weights.set_title(f"importance weights, ESS {100 * self.ess_fraction:.1f}%")
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
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")


def _plot_khat(ax, khat: float) -> None:
    """:math:`\\hat k` as a dot over the good / usable / do-not-trust bands, clipped to
    [-0.5, 1.5]."""
    bands = ((-0.5, KHAT_GOOD, "tab:green"), (KHAT_GOOD, KHAT_USABLE, "tab:orange"),
             (KHAT_USABLE, 1.5, "tab:red"))
    for lo, hi, color in bands:
        ax.axhspan(lo, hi, color=color, alpha=0.25)
    shown = min(max(khat, -0.5), 1.5) if math.isfinite(khat) else (-0.5 if khat < 0 else 1.5)
    ax.plot([0], [shown], "ko")
    ax.set_xlim(-1, 1)
    ax.set_ylim(-0.5, 1.5)
    ax.set_xticks([])
    ax.set_title(f"k-hat {khat:.2f}: {khat_verdict(khat)}")


def vi_report(
    model: Callable, guide: Callable, *args: Any,
    elbo_trace: Sequence[float] | np.ndarray | Tensor | None = None, num_samples: int = 2000,
    max_plate_nesting: int | None = None, chunk_size: int | None = None, **kwargs: Any,
) -> VIReport:
    """Is this guide trustworthy? One set of ``num_samples`` guide draws gives the ELBO
    :math:`\\frac1S\\sum_s \\log w_s` with its standard error, the importance-sampling log
    evidence :math:`\\log \\frac1S \\sum_s w_s`, the PSIS :math:`\\hat k` with its verdict and the
    importance-sampling effective sample size :math:`(\\sum_s \\tilde w_s)^2 / \\sum_s \\tilde
    w_s^2` of the smoothed weights; with ``elbo_trace`` also
    :func:`~pyroflows.diagnostics.elbo_convergence`.

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
        chunk_size=chunk_size, **kwargs,
    )
    smoothed, khat = psis(log_weights)
    lw = log_weights.detach().to("cpu", torch.float64).numpy()
    trace = None if elbo_trace is None else as_trace(elbo_trace)
    with np.errstate(invalid="ignore"):  # -inf weights give a -inf ELBO, honestly
        elbo = float(lw.mean())
        elbo_se = float(lw.std(ddof=1) / math.sqrt(lw.size)) if lw.size > 1 else math.nan
    log_evidence = float(np.logaddexp.reduce(lw) - math.log(lw.size))
    return VIReport(
        num_samples=num_samples, elbo=elbo, elbo_se=elbo_se, log_evidence=log_evidence,
        khat=khat, ess=importance_ess(smoothed), guide=guide_name(guide),
        convergence=None if trace is None else elbo_convergence(trace),
        log_weights=lw, elbo_trace=trace,
    )
