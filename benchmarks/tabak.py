"""The Tabak transform on densities with a known truth: held-out log-likelihood gap and fit time.

Run from the repository root (a few minutes on two busy cores)::

    nice -n 5 python -m benchmarks.tabak --out benchmarks/results/tabak.md

Targets (exact draws, exact log-densities):

- ``U1`` .. ``U4``: the Rezende & Mohamed (2015) energies, 20000 exact draws each
  (``benchmarks/data/rezende/box_draws.npz``); ``log p = -U - log Z`` (U1 on R^2, U2-U4 on the
  box [-4, 4]^2, whose sharp edges no smooth flow can match exactly).
- ``gmm2``, ``gmm5``: :func:`pyroflows.datasets.gaussian_mixture` (3 components), 20000 draws,
  exact mixture ``log_prob``.

Every target is split 14000 train / 2000 validation (early stopping) / 4000 test, and fitted
with each ``--num-candidates`` value (default 16, then 1: the plain algorithm). Columns: mean
test log-likelihood per sample (nats), the truth's mean on the same points, the gap
``mean(log p - log q)`` (an unbiased estimate of KL(p || q)) with the standard error of the
paired differences, the gap of the whitened Gaussian alone (step 0, what the steps improve on),
the kept step count, fit wall-clock and CPU seconds (process time: on a shared machine the
wall clock mostly measures the other users) and CPU milliseconds per step (steps taken, those
after the kept one included). Then a speed table: fixed step
counts on 20000 x 10 data (no early stopping), float64 and float32; then the fitted
transform's passes: ``log_prob`` (Gaussianizing direction) and ``sample`` (its inverse) on
``--apply-rows`` rows after ``--apply-steps`` steps on 20000 x 10 data. Benchmarks print
tables; they never assert times.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from benchmarks.targets import bench_dir
from pyroflows import datasets
from pyroflows.transforms.tabak import Tabak


def load_target(name: str, seed: int):
    """``(x, log_p)``: 20000 exact draws (float64) and the exact log-density function."""
    if name.startswith("U"):
        path = os.path.join(bench_dir(), "rezende", "box_draws.npz")
        x = torch.as_tensor(np.load(path)[name], dtype=torch.float64)
        energy, log_z = datasets.ENERGIES[name], datasets.LOG_Z[name]
        return x, lambda v: -energy(v) - log_z
    dim = int(name.removeprefix("gmm"))
    x, mix = datasets.gaussian_mixture(20000, dim=dim, seed=seed)
    return x, mix.log_prob


def run_target(name: str, num_candidates: int, args) -> dict:
    x, log_p = load_target(name, args.seed)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x = x[perm]
    train, val, test = x[:14000], x[14000:16000], x[16000:20000]
    dtype = getattr(torch, args.dtype)
    t = Tabak(x.shape[1], max_steps=args.max_steps, seed=args.seed, width=args.width,
              num_candidates=num_candidates)
    start, cpu_start = time.perf_counter(), time.process_time()
    t.fit(train.to(dtype), x_val=val.to(dtype), progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    with torch.no_grad():
        lq = t.log_prob(test.to(dtype)).double()
    lp = log_p(test)
    diff = lp - lq
    with torch.no_grad():  # the same gap on the training draws: estimation vs optimization
        train_gap = float((log_p(train) - t.log_prob(train.to(dtype)).double()).mean())
    # Step 0: the Gaussian the whitening alone fits (what the ascent steps improve on).
    whitened = torch.distributions.MultivariateNormal(t.loc.double(),
                                                      scale_tril=t.scale_tril.double())
    done = t.history["step"][-1]
    return {
        "target": name, "m": num_candidates, "train_gap": train_gap,
        "dim": x.shape[1], "test_ll": float(lq.mean()), "truth": float(lp.mean()),
        "gap": float(diff.mean()), "gap_se": float(diff.std() / math.sqrt(diff.numel())),
        "gap0": float((lp - whitened.log_prob(test)).mean()),
        "steps": t.best_step, "seconds": seconds, "cpu": cpu,
        "ms_per_step": 1000 * cpu / max(done, 1),
    }


def run_speed(dtype_name: str, steps: int, seed: int) -> dict:
    x, _ = datasets.gaussian_mixture(20000, dim=10, seed=seed)
    x = x.to(getattr(torch, dtype_name))
    t = Tabak(10, max_steps=steps, patience=10**6, seed=seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    t.fit(x[:18000], x_val=x[18000:], progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"dtype": dtype_name, "steps": steps, "seconds": seconds, "cpu": cpu,
            "ms_per_step": 1000 * cpu / steps}


def run_apply(dtype_name: str, steps: int, rows: list[int], seed: int) -> list[dict]:
    """CPU seconds of ``log_prob`` and ``sample`` on each row count, for a transform fitted
    with ``steps`` steps (no early stopping) on 20000 x 10 mixture draws."""
    dtype = getattr(torch, dtype_name)
    x, _ = datasets.gaussian_mixture(max(rows + [20000]), dim=10, seed=seed)
    x = x.to(dtype)
    t = Tabak(10, max_steps=steps, patience=10**6, seed=seed)
    t.fit(x[:18000], x_val=x[18000:20000], progress=False)
    out = []
    with torch.no_grad():
        for n in rows:
            cpu = time.process_time()
            t.log_prob(x[:n])
            log_prob_cpu = time.process_time() - cpu
            cpu = time.process_time()
            t.sample((n,))
            sample_cpu = time.process_time() - cpu
            out.append({"dtype": dtype_name, "steps": t.num_steps, "rows": n,
                        "log_prob": log_prob_cpu, "sample": sample_cpu})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="U1,U2,U3,U4,gmm2,gmm5")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--width", type=float, default=0.1)
    p.add_argument("--num-candidates", default="16,1",
                   help="comma-separated; one row per target and value (16 is the default)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--speed-steps", type=int, default=2000, help="0 skips the speed table")
    p.add_argument("--apply-steps", type=int, default=300,
                   help="steps of the transform timed in the passes table (0 skips it)")
    p.add_argument("--apply-rows", default="20000,200000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    command = "nice -n 5 python -m benchmarks.tabak " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        "# Tabak transform: held-out log-likelihood against the truth",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"torch {torch.__version__}, {args.dtype}, {args.threads} thread(s), CPU; "
        f"Tabak(max_steps={args.max_steps}, width={args.width}, "
        "num_candidates=m, other defaults); "
        "14000 train / 2000 validation / 4000 test draws. Gap = mean(log p - log q) on the "
        "test draws (nats/sample, +- standard error); 'train gap' the same on the training "
        "draws (small train gap, large test gap: estimation error, not a short fit); "
        "'whitened' is the test gap of step 0 (the Gaussian fitted by the whitening alone).",
        "",
        "| target | D | m | test log q | truth log p | gap | train gap | whitened gap | steps kept "
        "| fit wall s | fit CPU s | CPU ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def emit(*new: str) -> None:  # print as the table grows, and keep it for --out
        print("\n".join(new), flush=True)
        lines.extend(new)

    for name in filter(None, args.targets.split(",")):
        for m in (int(v) for v in args.num_candidates.split(",")):
            r = run_target(name, m, args)
            emit(
                f"| {r['target']} | {r['dim']} | {r['m']} | {r['test_ll']:.4f} | "
                f"{r['truth']:.4f} | {r['gap']:.4f} +- {r['gap_se']:.4f} | "
                f"{r['train_gap']:.4f} | {r['gap0']:.3f} | {r['steps']} | "
                f"{r['seconds']:.1f} | {r['cpu']:.1f} | {r['ms_per_step']:.2f} |"
            )
    if args.speed_steps > 0:
        emit(
            "",
            f"Speed: {args.speed_steps} steps (no early stopping) on 20000 x 10 data "
            "(18000 train, 2000 validation tracked every step).",
            "",
            "| dtype | steps | fit wall s | fit CPU s | CPU ms/step |",
            "|---|---|---|---|---|",
        )
        for dt in ("float64", "float32"):
            r = run_speed(dt, args.speed_steps, args.seed)
            emit(f"| {r['dtype']} | {r['steps']} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
                 f"{r['ms_per_step']:.2f} |")
    if args.apply_steps > 0:
        rows = [int(v) for v in args.apply_rows.split(",")]
        emit(
            "",
            f"Passes of the fitted transform ({args.apply_steps} steps, fitted on 20000 x 10 "
            "data): CPU seconds of `log_prob` (the Gaussianizing direction) and `sample` (its "
            "inverse).",
            "",
            "| dtype | steps | rows | log_prob CPU s | sample CPU s |",
            "|---|---|---|---|---|",
        )
        for dt in ("float64", "float32"):
            for r in run_apply(dt, args.apply_steps, rows, args.seed):
                emit(f"| {r['dtype']} | {r['steps']} | {r['rows']} | {r['log_prob']:.2f} | "
                     f"{r['sample']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
