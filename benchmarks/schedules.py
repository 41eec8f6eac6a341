"""Step-size schedules under annealing: ``pyroflows demo``'s flow guides on the two-mode Rezende
U1 energy (FlowELBO with 64 vectorized particles, the energy tempered over the first half of
the run), trained by SVI with constant Adam steps at the family's step sizes (the demo's choice
before this measurement), with :func:`~pyroflows.guides.recommended_optimizer` decaying from
the first step, and with it holding the step sizes through the annealing (``hold_steps``, the
demo's choice since); the IAF guide's affine layer at 5e-3 throughout, as in the demo. KL to
the exact posterior (log Z - ELBO, from :func:`~pyroflows.diagnostics.vi_report`'s 4000
draws) per seed.

Run from the repository root (about 2 minutes on one core)::

    python -m benchmarks.schedules --out benchmarks/results/vi-schedules.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import pyro
import torch

from benchmarks import emit
from pyroflows import cli, diagnostics, guides

SCHEDULES = ("constant (Adam)", "decayed from the start", "held through the annealing")


def kl(name: str, make, schedule: str, steps: int, seed: int, model) -> float:
    """Train one of the demo's guides under ``schedule``; its KL to the exact posterior."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide, elbo, _ = make()
    lr = 5e-3 if "IAF" in name else None  # the demo's affine step for its IAF guide
    if schedule == SCHEDULES[0]:
        optimizer = pyro.optim.Adam(guides.optim_args(guide, lr=lr))
    else:
        hold = steps // 2 if schedule == SCHEDULES[2] else 0
        optimizer = guides.recommended_optimizer(guide, steps, lr=lr, hold_steps=hold)
    svi = pyro.infer.SVI(model, guide, optimizer, elbo)
    for _ in range(steps):
        svi.step()
    report = diagnostics.vi_report(model, guide, num_samples=4000).to_dict()
    return cli.LOG_Z["U1"] - report["elbo"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="write the Markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = cli._u1_model(torch.device("cpu"))
    flows = list(cli._guide_candidates(model, args.steps).items())[1:]  # not AutoNormal
    given = sys.argv[1:] if argv is None else argv
    lines = [f"Command: `python -m benchmarks.schedules{' ' + ' '.join(given) if given else ''}`",
             "", f"torch {torch.__version__}, pyro {pyro.__version__}, {os.cpu_count()} cores, "
             f"{args.steps} steps, annealing over the first {args.steps // 2}.", "",
             "| guide | schedule | KL per seed | median |", "|---|---|---|---:|"]
    for name, make in flows:
        for schedule in SCHEDULES:
            kls = [kl(name, make, schedule, args.steps, seed, model) for seed in args.seeds]
            lines.append(f"| {name} | {schedule} | {', '.join(f'{v:.3f}' for v in kls)} | "
                         f"{statistics.median(kls):.3f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
