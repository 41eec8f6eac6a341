"""Probability density distillation (issue 23, seed section 3.3.4): a MAF teacher fitted by
``DensityEstimator``, an IAF student by ``est.distill()``, against zuko's and nflows' MAF.

Run from the repository root (about 15 minutes on a quiet core with the defaults, 30 with the
frontier below)::

    nice -n 10 python -m benchmarks.distill --out benchmarks/results/distill.md \
        --frontier 5x64,64 3x128,128 5x256,256

Data with a known density, for D = 2, 8, 32, 64: ``banana{D}``, D/2 independent bananas
``b ~ N(a^2 - 1, 0.5^2)``, ``a ~ N(0, 1)``, rotated by a fixed random rotation of R^D (unit
Jacobian, so the true log density of every test row is exact); 20000 training rows (10% held
out for early stopping), 5000 test rows. All in float32 with one intra-op thread.

Teacher: ``DensityEstimator("maf", num_layers=5, hidden_dims=(128, 128))`` (whitening
preconditioner), fitted for at most ``--epochs`` epochs. Student: ``est.distill()`` with its
defaults (as many IAF layers of the same widths, at most ``DISTILL_DEFAULTS["max_steps"]`` Adam
steps of 512 draws, stopped earlier by the convergence rule).

``--frontier LxH1,H2 ...``: after the last D, students of those shapes (L IAF layers of
MADE widths (H1, H2)) are distilled from the same teacher with the same settings, and the
teacher's and every student's sampler (the main row's included) timed in one interleaved run:
the trade between KL(student || teacher) and draws per second.

Columns:

- ``true``: the mean true log density of the test rows (nats); ``teacher gap`` and ``student
  gap``: ``true`` minus each model's mean test log-likelihood (the student's by its D-pass
  inverse), with the standard error of the paired differences;
- ``KL(q||p)``: the Monte-Carlo estimate of KL(student || teacher) on 8192 student draws,
  scored in data space (``history_["distill"]["fidelity"]``), raw and per dimension;
- ``student - teacher``: the paired difference of the held-out log-likelihoods;
- samples per second of 4096 draws: the teacher (``est.sample(n, exact=True)``: D passes per
  MAF layer), the student (``est.sample(n)``: one fused pass), zuko's ``MAF`` and nflows' MAF of
  the same size (5 layers, hidden (128, 128), reverse permutations; their sampling speed does
  not depend on the weights, so they are not trained). Timed in one process, interleaved: every
  round times every sampler once in a shuffled order; the best round's process CPU time.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import numpy as np
import torch

import pyroflows as pf
from pyroflows.density.distill import DISTILL_DEFAULTS

try:
    from benchmarks import peers
except ImportError:  # run as a script, ``python benchmarks/distill.py``
    import peers

DTYPE = torch.float32
LAYERS, HIDDEN = 5, (128, 128)


def bananas(dim: int, n: int, rng: np.random.Generator, rotation: np.ndarray) -> np.ndarray:
    y = np.empty((n, dim))
    y[:, 0::2] = rng.normal(size=(n, dim // 2))
    y[:, 1::2] = y[:, 0::2] ** 2 - 1 + 0.5 * rng.normal(size=(n, dim // 2))
    return y @ rotation.T


def bananas_log_prob(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    y = x @ rotation  # the rotation is orthogonal: y = R^T x
    a, b = y[:, 0::2], y[:, 1::2]
    lp = (-0.5 * a**2 - 0.5 * ((b - a**2 + 1) / 0.5) ** 2 - math.log(0.5)
          - math.log(2 * math.pi))
    return lp.sum(1)


def zuko_sampler(dim: int):
    import zuko

    flow = zuko.flows.MAF(features=dim, transforms=LAYERS, hidden_features=HIDDEN)
    return lambda n: flow().sample((n,))


def nflows_sampler(dim: int):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import CompositeTransform, ReversePermutation
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform

    layers = []
    for i in range(LAYERS):
        if i > 0:
            layers.append(ReversePermutation(features=dim))
        layers.append(MaskedAffineAutoregressiveTransform(
            features=dim, hidden_features=HIDDEN[0], num_blocks=len(HIDDEN) - 1,
            use_residual_blocks=False))
    flow = Flow(CompositeTransform(layers), StandardNormal([dim]))
    return lambda n: flow.sample(n)


#: the peers' samplers (the ``[bench]`` extra): column, package, maker; a missing package's
#: column shows "–"
PEERS = (("zuko MAF", "zuko", zuko_sampler), ("nflows MAF", "nflows", nflows_sampler))


def time_samplers(samplers: dict, n: int, rounds: int) -> dict[str, float]:
    """Samples per second of process CPU time: the best of ``rounds`` interleaved rounds."""
    best = {name: math.inf for name in samplers}
    order = list(samplers)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            with torch.no_grad():
                start = time.process_time()
                out = samplers[name](n)
                seconds = time.process_time() - start
            assert out.shape[-1] == out.shape[-1] and out.shape[0] == n
            best[name] = min(best[name], seconds)
    return {name: n / s for name, s in best.items()}


def run_dim(dim: int, args) -> dict:
    rng = np.random.default_rng(dim)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x_train = torch.as_tensor(bananas(dim, args.n_train, rng, rotation), dtype=DTYPE)
    test = bananas(dim, args.n_test, rng, rotation)
    truth = torch.as_tensor(bananas_log_prob(test, rotation), dtype=torch.float64)
    x_test = torch.as_tensor(test, dtype=DTYPE)
    est = pf.density.DensityEstimator("maf", num_layers=LAYERS, hidden_dims=HIDDEN, seed=0,
                                      dtype=DTYPE)
    start = time.perf_counter()
    est.fit(x_train, max_epochs=args.epochs, patience=args.patience, progress=False)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    est.distill(max_steps=args.steps, x_val=x_test, num_draws=8192, progress=False)
    distill_seconds = time.perf_counter() - start
    record = est.history_["distill"]
    report = record["fidelity"]
    with torch.no_grad():
        lp_teacher = est.log_prob(x_test).double()
        u, log_det = est._model.precondition(x_test)
        lp_student = (est.student_.log_prob(u) + log_det).double()

    def gap(lp):
        d = truth - lp
        return float(d.mean()), float(d.std() / math.sqrt(d.numel()))

    samplers = {
        "teacher": lambda n: est.sample(n, exact=True),
        "student": lambda n: est.sample(n),
        **{name: make(dim) for name, package, make in PEERS if peers.available(package)},
    }
    rates = time_samplers(samplers, args.draws, args.rounds)
    return {
        "dim": dim, "true": float(truth.mean()), "teacher_gap": gap(lp_teacher),
        "student_gap": gap(lp_student), "kl": report["kl"], "kl_se": report["kl_se"],
        "kl_per_dim": report["kl_per_dim"], "heldout_gap": report["log_prob_gap"],
        "heldout_gap_se": report["log_prob_gap_se"], "rates": rates,
        "fit_seconds": fit_seconds, "best_epoch": est.history_["best_epoch"],
        "distill_seconds": distill_seconds, "best_step": record["best_step"],
        "stopped": record["stopped"], "est": est, "x_test": x_test,
    }


def frontier(est, dim: int, x_test: torch.Tensor, shapes: list[tuple[int, tuple[int, ...]]],
             args) -> list[dict]:
    """The speed-fidelity trade at one D: students of each ``(layers, hidden)`` shape distilled
    from the same teacher with the same settings, then the teacher's and every student's
    sampler timed in one interleaved run; the first row is the main row's student (the
    defaults: the teacher's shape)."""
    record = est.history_["distill"]
    main = (record["num_layers"], tuple(record["hidden_dims"]))
    students = {main: est.student_}
    rows = [{"layers": main[0], "hidden": main[1], "kl": record["fidelity"]["kl"],
             "kl_se": record["fidelity"]["kl_se"],
             "heldout_gap": record["fidelity"]["log_prob_gap"],
             "heldout_gap_se": record["fidelity"]["log_prob_gap_se"],
             "best_step": record["best_step"], "stopped": record["stopped"],
             "seconds": record["seconds"]}]
    for layers, hidden in shapes:
        est.distill(num_layers=layers, hidden_dims=hidden, max_steps=args.steps, x_val=x_test,
                    num_draws=8192, progress=False)
        record = est.history_["distill"]
        students[(layers, hidden)] = est.student_
        rows.append({"layers": layers, "hidden": hidden, "kl": record["fidelity"]["kl"],
                     "kl_se": record["fidelity"]["kl_se"],
                     "heldout_gap": record["fidelity"]["log_prob_gap"],
                     "heldout_gap_se": record["fidelity"]["log_prob_gap_se"],
                     "best_step": record["best_step"], "stopped": record["stopped"],
                     "seconds": record["seconds"]})

    def student_sampler(student):
        def draw(n):
            est.student_ = student
            return est.sample(n)
        return draw

    samplers = {"teacher": lambda n: est.sample(n, exact=True),
                **{key: student_sampler(s) for key, s in students.items()}}
    rates = time_samplers(samplers, args.draws, args.rounds)
    for row in rows:
        row["rate"] = rates[(row["layers"], row["hidden"])]
        row["teacher_rate"] = rates["teacher"]
    return rows


def frontier_table(dim: int, rows: list[dict]) -> list[str]:
    out = [f"Frontier at D = {dim}:", "",
           "| student (layers × hidden) | KL(q‖p) nats | KL/dim | student − teacher | best step "
           "| stopped | distill (s) | student /s | student ÷ teacher |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['layers']} × {r['hidden']} | {r['kl']:.3f} ± {r['kl_se']:.3f} | "
            f"{r['kl'] / dim:.4f} | {-r['heldout_gap']:.3f} ± {r['heldout_gap_se']:.3f} | "
            f"{r['best_step']} | {r['stopped']} | {r['seconds']:.0f} | {r['rate']:,.0f} | "
            f"{r['rate'] / r['teacher_rate']:.1f}x |")
    return out


def table(rows: list[dict]) -> list[str]:
    out = [
        "| D | true | teacher gap | student gap | KL(q‖p) nats | KL/dim | student − teacher "
        "| teacher /s | student /s | zuko MAF /s | nflows MAF /s | student ÷ teacher "
        "| student ÷ best peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rates = r["rates"]
        present = [rates[name] for name, _, _ in PEERS if name in rates]
        vs_peer = f"{rates['student'] / max(present):.1f}x" if present else peers.MISSING
        zuko, nflows = (f"{rates[name]:,.0f}" if name in rates else peers.MISSING
                        for name, _, _ in PEERS)
        out.append(
            f"| {r['dim']} | {r['true']:.3f} | {r['teacher_gap'][0]:.3f} ± "
            f"{r['teacher_gap'][1]:.3f} | {r['student_gap'][0]:.3f} ± {r['student_gap'][1]:.3f} "
            f"| {r['kl']:.4f} ± {r['kl_se']:.4f} | {r['kl_per_dim']:.4f} | "
            f"{-r['heldout_gap']:.3f} ± {r['heldout_gap_se']:.3f} | {rates['teacher']:,.0f} | "
            f"{rates['student']:,.0f} | {zuko} | {nflows} | "
            f"{rates['student'] / rates['teacher']:.1f}x | {vs_peer} |")
    out += ["", "| D | teacher fit (s) | best epoch | distill (s) | best step | stopped |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['dim']} | {r['fit_seconds']:.0f} | {r['best_epoch']} | "
            f"{r['distill_seconds']:.0f} | {r['best_step']} | {r['stopped']} |" for r in rows]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--steps", type=int, default=DISTILL_DEFAULTS["max_steps"],
                        help="at most this many distillation steps")
    parser.add_argument("--draws", type=int, default=4096, help="draws per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frontier", type=str, nargs="*", default=[],
                        help="student shapes LAYERSxH1,H2 (e.g. 5x64,64) distilled from the "
                             "last D's teacher for the speed-fidelity frontier")
    parser.add_argument("--out", default=None, help="write the table (Markdown) here too")
    args = parser.parse_args(argv)
    shapes = []
    for spec in args.frontier:
        layers, hidden = spec.split("x")
        shapes.append((int(layers), tuple(int(h) for h in hidden.split(","))))
    peers.note_missing([package for _, package, _ in PEERS], f"columns show {peers.MISSING}")
    torch.set_num_threads(1)
    random.seed(0)
    rows = []
    for dim in args.dims:
        rows.append(run_dim(dim, args))
        print("\n".join(table(rows[-1:])), flush=True)
    lines = table(rows)
    if shapes:
        last = rows[-1]
        fr = frontier(last["est"], last["dim"], last["x_test"], shapes, args)
        lines += ["", *frontier_table(last["dim"], fr)]
    print("\n".join(lines))
    if args.out:
        command = "python -m benchmarks.distill " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
        with open(args.out, "w") as f:
            f.write("\n".join([f"Command: `{command.strip()}`", "", *lines, ""]))


if __name__ == "__main__":
    main()
