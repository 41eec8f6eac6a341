"""The ``pyroflows`` command line: ``pyroflows demo``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from . import __version__
from .datasets import LOG_Z, rezende_u1, student_t

__all__ = ["main", "run_demo", "check_demo_args"]

_DEMO_DESCRIPTION = """\
Show what pyroflows does, on built-in data, in about two minutes on a 2-core CPU:

 1. VI: fit Pyro's AutoNormal, a planar flow guide and an IAF flow guide to a Pyro model of the
    two-mode Rezende & Mohamed U1 energy, whose log evidence is known exactly, and print for
    each the ELBO, KL(q || p) = log Z - ELBO (the error against the exact posterior) and the
    PSIS k-hat diagnostic.
 2. Density estimation where the Tabak transform helps: 300 rows of a heavy-tailed 2-D Student
    t (3 degrees of freedom, exact density known). Fit a MAF DensityEstimator, plain and
    Tabak-preconditioned, and print each one's gap to the true density on 10000 held-out draws
    next to the maximum-likelihood Gaussian's.
 3. Plots: write PNG files (guide samples over the true density, ELBO traces, fitted
    log-density contours and samples) into the output folder, and print where.

Progress bars show on a terminal only; Pyro's INFO lines and ArviZ's FutureWarnings are
silenced while the demo runs.
"""


def _u1_model(device: torch.device):
    """The Rezende U1 energy as a Pyro model: a N(0, I) carrier site whose log density is
    cancelled inside ``pyro.factor``, so the joint is exactly -U1 and ELBO = log Z - KL."""
    import pyro
    import pyro.distributions as dist

    zeros = torch.zeros(2, device=device)
    carrier = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def model():
        z = pyro.sample("z", carrier)
        pyro.factor("energy", -rezende_u1(z) - carrier.log_prob(z))

    return model


def _guide_candidates(model, steps: int) -> dict[str, Callable[[], tuple]]:
    """The demo's guides by name, each ``make() -> (guide, elbo, optimizer(guide))``."""
    import pyro
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from . import guides

    # The flow guides start wide (init_scale=1) and anneal the energy over the first half of the
    # steps, which lets them cover both modes of U1; their step sizes (the family's, the IAF
    # affine layer's 5e-3) hold through the annealing and then fall 50-fold
    # (benchmarks/results/vi-schedules.md).
    def flow_elbo():
        return guides.FlowELBO(num_particles=64, vectorize_particles=True,
                               anneal_steps=steps // 2)

    def recommended(lr=None):
        return lambda guide: guides.recommended_optimizer(guide, steps, lr=lr,
                                                          hold_steps=steps // 2)

    return {
        "AutoNormal (Pyro)": lambda: (AutoNormal(model), Trace_ELBO(num_particles=64,
                                      vectorize_particles=True),
                                      lambda guide: pyro.optim.Adam({"lr": 1e-2})),
        "AutoPlanar x16": lambda: (guides.AutoPlanar(model, num_layers=16, init_scale=1.0),
                                   flow_elbo(), recommended()),
        "AutoIAF x4": lambda: (guides.AutoIAF(model, num_layers=4, hidden_dims=(32, 32),
                                              init_scale=1.0), flow_elbo(), recommended(5e-3)),
    }


def _fit_guides(args, device):
    """Part 1: each guide fitted to U1 by Adam from the same seed, its ELBO, KL and k-hat
    printed; returns the model, the fitted guides and their ELBO traces."""
    import pyro
    from pyro.infer import SVI
    from tqdm.auto import tqdm

    from . import diagnostics

    log_z = LOG_Z["U1"]
    model = _u1_model(device)
    results, traces, fitted = [], {}, {}
    for name, make in _guide_candidates(model, args.steps).items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide, elbo, optimizer = make()
        start = time.perf_counter()
        svi = SVI(model, guide, optimizer(guide), elbo)
        losses = []
        with tqdm(range(args.steps), desc=f"  {name}", leave=False, disable=not args.progress,
                  mininterval=0.5) as bar:
            for step in bar:
                losses.append(svi.step())
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        values = diagnostics.vi_report(model, guide, num_samples=args.draws).to_dict()
        results.append((name, values["elbo"], values["elbo_se"], log_z - values["elbo"],
                        values["khat"], values["khat_verdict"], seconds))
        traces[name] = [-v for v in losses]
        fitted[name] = guide
    print(f"\n[1] VI on the Rezende U1 energy (two modes; exact log Z = {log_z}), "
          f"{args.steps} steps each, 64 particles")
    print(f"    {'guide':<20} {'ELBO':>16} {'KL to exact':>12} {'k-hat':>7}  "
          f"{'verdict':<13} {'seconds':>7}")
    for name, elbo_value, se, kl, khat, verdict, seconds in results:
        print(f"    {name:<20} {elbo_value:>9.4f} ± {se:.4f} {kl:>12.4f} {khat:>7.2f}  "
              f"{verdict:<13} {seconds:>7.1f}")
    print("    KL = log Z - ELBO is the error against the exact posterior (0 is perfect; one "
          "mode alone gives log 2 = 0.69);\n    k-hat < 0.5 good, 0.5-0.7 usable, > 0.7 do not "
          "trust (Yao et al. 2018).")
    return model, fitted, traces


def _fit_densities(args, device):
    """Part 2: MAF estimators, plain and Tabak-preconditioned, fitted to a few hundred rows of a
    heavy-tailed Student t; each one's gap to the exact density on held-out draws printed
    beside the ML Gaussian's. Returns the training rows, the true distribution, the Gaussian
    and the estimators."""
    from . import density

    n_train, n_test = 300, (2000 if args.quick else 10000)
    x, truth = student_t(n_train + n_test, dim=2, df=3.0, seed=args.seed)
    x = x.to(device=device, dtype=torch.float32)
    truth = type(truth)(truth.df.to(device), truth.loc.to(device), truth.scale_tril.to(device))
    x_train, x_test = x[:n_train], x[n_train:]
    true_lp = truth.log_prob(x_test.double())
    mean, cov = x_train.double().mean(0), torch.cov(x_train.double().T, correction=0)
    gaussian = torch.distributions.MultivariateNormal(mean, cov)
    rows = [("full-covariance Gaussian (ML)", gaussian.log_prob(x_test.double()), 0.0)]
    estimators = {
        "MAF x5 (whitened)": dict(precondition="whiten"),
        "MAF x5, Tabak-preconditioned": dict(precondition="tabak"),
    }
    fitted = {}
    for name, options in estimators.items():
        print(f"  fitting {name} ...", flush=True)
        est = density.DensityEstimator("maf", num_layers=5, hidden_dims=(64, 64),
                                       device=device, seed=args.seed, **options)
        start = time.perf_counter()
        est.fit(x_train, max_epochs=args.epochs, progress=args.progress)  # fit's defaults
        seconds = time.perf_counter() - start
        with torch.no_grad():
            rows.append((name, est.log_prob(x_test).double(), seconds))
        fitted[name] = est
    print(f"\n[2] Density estimation on a heavy-tailed 2-D Student t (3 degrees of freedom; "
          f"{n_train} training rows,\n    {n_test} held-out draws, at most {args.epochs} epochs)")
    print(f"    {'model':<32} {'held-out log-lik':>18} {'gap to truth':>13} {'seconds':>8}")
    for name, lp, seconds in rows:
        gap = true_lp - lp
        se = float(gap.std()) / math.sqrt(len(gap))
        print(f"    {name:<32} {float(lp.mean()):>18.4f} {float(gap.mean()):>7.4f} ± {se:.4f}"
              f" {seconds:>7.1f}")
    print("    gap to truth = mean(log p - log q) on the held-out draws, in nats (0 is perfect). "
          "Tabak's monotone\n    1-D maps Gaussianize heavy tails that 300 rows show a flow "
          "too little of; with thousands of rows of\n    lighter-tailed data the plain flow is "
          "as good (benchmarks/results/density.md).")
    return x_train, truth, gaussian, fitted


def _plot_guides(plt, device, model, fitted_guides):
    """Guide draws over the exact U1 density, one panel per guide."""
    from pyro.infer import Predictive

    g = torch.linspace(-4, 4, 200, device=device)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1)
    true_density = torch.exp(-rezende_u1(grid)).reshape(gx.shape).cpu()
    fig, axes = plt.subplots(1, len(fitted_guides), figsize=(4 * len(fitted_guides), 4))
    for ax, (name, guide) in zip(axes, fitted_guides.items(), strict=True):
        draws = Predictive(model, guide=guide, num_samples=2000, return_sites=["z"])()
        z = draws["z"].detach().reshape(-1, 2).cpu()
        ax.contourf(gx.cpu(), gy.cpu(), true_density, levels=20, cmap="Greys")
        ax.scatter(z[:, 0], z[:, 1], s=1.5, alpha=0.4, color="tab:red")
        ax.set(title=name, xlim=(-4, 4), ylim=(-4, 4))
    fig.suptitle("guide draws (red) over the exact U1 density (grey)")
    return fig


def _plot_elbo_traces(plt, traces):
    """The training ELBO of each guide, averaged over 50 windows, against the exact log Z."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, trace in traces.items():
        t = torch.tensor(trace)
        window = max(1, len(t) // 50)
        smooth = t.unfold(0, window, window).mean(-1) if len(t) >= window else t
        ax.plot(torch.arange(len(smooth)) * window, smooth, label=name)
    ax.axhline(LOG_Z["U1"], color="k", ls="--", lw=1, label="log Z (exact)")
    ax.set(ylim=(-2, None), xlabel="step", ylabel="ELBO (training estimate)",
           title="ELBO traces (annealed flows rise late by design)")
    ax.legend()
    return fig


def _plot_densities(plt, device, x_train, truth, gaussian, estimators):
    """Log-density contours (top row) and draws (bottom row) of the truth, the Gaussian and
    each estimator, on the central 98% of the training rows' range."""
    lo = torch.quantile(x_train.double(), 0.01, dim=0) - 1
    hi = torch.quantile(x_train.double(), 0.99, dim=0) + 1
    gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), 160, device=device),
                            torch.linspace(float(lo[1]), float(hi[1]), 120, device=device),
                            indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1)
    panels = [("truth (Student t)", truth.log_prob(grid.double()), truth.sample((1500,))),
              ("Gaussian (ML)", gaussian.log_prob(grid.double()), gaussian.sample((1500,)))]
    for name, est in estimators.items():
        with torch.no_grad():
            panels.append((name, est.log_prob(grid.to(x_train.dtype)), est.sample(1500)))
    top = max(float(lp.max()) for _, lp, _ in panels)
    levels = torch.linspace(-12, top, 25).tolist()
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7))
    for col, (name, lp, samples) in enumerate(panels):
        axes[0, col].contourf(gx.cpu(), gy.cpu(), lp.clamp_min(-12).reshape(gx.shape).cpu(),
                              levels=levels)
        axes[0, col].set_title(name)
        s = samples.cpu()
        axes[1, col].scatter(s[:, 0], s[:, 1], s=1.5, alpha=0.4)
        axes[1, col].set(xlim=(float(lo[0]), float(hi[0])), ylim=(float(lo[1]), float(hi[1])))
    axes[1, 0].set_ylabel("samples")
    axes[0, 0].set_ylabel("log density (clipped at -12)")
    return fig


def _plots(out, device, model, fitted_guides, traces, x_train, truth, gaussian, estimators
           ) -> list[str]:
    """Part 3: write the three figures into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "u1_guides.png": _plot_guides(plt, device, model, fitted_guides),
        "elbo_traces.png": _plot_elbo_traces(plt, traces),
        "student_t_density.png": _plot_densities(plt, device, x_train, truth, gaussian,
                                                 estimators),
    }
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
    return [os.path.join(out, name) for name in figures]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """For the demo only: Pyro's INFO log lines ("Guessed max_plate_nesting") and ArviZ's
    FutureWarnings are not shown; the logger's level and the warning filters are restored."""
    logger = logging.getLogger("pyro")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*[Aa]rvi[Zz].*")
            yield
    finally:
        logger.setLevel(level)


def check_demo_args(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The demo's device and output folder (absolute, created if missing), checked before any
    work: a ``ValueError`` saying what is wrong where the counts are not positive (the draws:
    at least 2), the seed is not in ``[0, 2**32)``, the device
    is not one this machine has, or ``--out`` is a file or a folder that cannot be written."""
    from .density.estimator import usable_device

    if min(args.steps, args.epochs) < 1:
        raise ValueError("--steps and --epochs must be positive")
    if args.draws < 2:  # (PSIS fits a tail to them)
        raise ValueError(f"--draws must be at least 2, got {args.draws}")
    if not 0 <= args.seed < 2**32:  # (numpy's seeds, which Pyro sets too)
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    device = usable_device(args.device, "--device")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the plots are written last: find out now
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    return device, out


def run_demo(args: argparse.Namespace) -> dict:
    """The three parts of the demo, with the options of ``pyroflows demo`` (checked first by
    :func:`check_demo_args`); returns ``{"plots": [the paths written]}``."""
    from ._config import validation

    device, out = check_demo_args(args)
    # progress bars on a terminal only: redirected to a file, every refresh would be a line
    args.progress = not args.no_progress and sys.stderr.isatty()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"pyroflows {__version__} demo on {device}; plots go to {out}")
    # Tiny networks: a second intra-op thread only adds synchronization (or spin-waits).
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        with validation(False), _quiet():  # every input below is our own, finite data
            model, fitted_guides, traces = _fit_guides(args, device)
            x_train, truth, gaussian, estimators = _fit_densities(args, device)
            written = _plots(out, device, model, fitted_guides, traces, x_train, truth,
                             gaussian, estimators)
    finally:
        torch.set_num_threads(threads)
    print("\n[3] Plots written:")
    for path in written:
        print(f"    {path}")
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return {"plots": written}


def main(argv: list[str] | None = None) -> int:
    """The ``pyroflows`` command with the arguments ``argv`` (default ``sys.argv[1:]``); returns
    the exit status."""
    parser = argparse.ArgumentParser(prog="pyroflows", description="Normalizing flows for Pyro: "
                                     "flow layers, SVI guides, density estimation and the Tabak "
                                     "transform.")
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", description=_DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fit flow guides and density estimators on built-in data; print and plot results")
    demo.add_argument("--out", default="pyroflows-demo",
                      help="folder for the PNG plots, created if missing (default "
                      "./pyroflows-demo)")
    demo.add_argument("--device", default="cpu",
                      help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--steps", type=int, default=1500, help="SVI steps per guide (default 1500)")
    demo.add_argument("--epochs", type=int, default=500,
                      help="most training epochs per density estimator (default 500, fit's "
                      "default; early stopping ends sooner)")
    demo.add_argument("--draws", type=int, default=4000,
                      help="draws behind each ELBO and k-hat estimate (default 4000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quick", action="store_true",
                      help="fewer held-out draws, for a smoke test")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads while fitting (default 1: the models are tiny; "
                      "0 keeps torch's setting)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars (shown on a terminal only)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            check_demo_args(args)
        except ValueError as e:  # one line and argparse's status, before any work
            demo.exit(2, f"{demo.prog}: error: {e}\n")
        run_demo(args)
        return 0
    parser.print_help()
    return 0

