"""Simulation-based inference (issue 22): neural posterior estimation (NPE) with pyroflows'
conditional ``DensityEstimator`` against the ``sbi`` package's NPE with its default density
estimator, on two tasks of the SBI benchmark with reference posteriors.

Run from the repository root (one torch thread; sbi is a ``[bench]`` extra)::

    nice -n 5 python -m benchmarks.sbi --jsonl sbi-runs.jsonl --out sbi-table.md

The full grid (2 tasks, 2 budgets, 3 seeds, 5 observations, C2ST everywhere) is hours of CPU:
the sbi fit at 10^4 two_moons simulations alone took 7 minutes on the committed table's
loaded machine, each two_moons C2ST (10,000 against 10,000 draws) 40-100 seconds, each
gaussian_linear C2ST (a (100, 100) classifier) several minutes. The committed table's
commands, and what they leave out, head ``benchmarks/results/sbi.md``.

``--quick`` is a smoke run (one seed, 10^3 simulations, observation 1, 2,000 draws, a few
epochs). ``--trial 'lr=3e-3; batch_size=128'`` (repeatable) fits pyroflows alone with those
options and scores the mean log q(theta | x) of 20,000 fresh pairs (and the C2ST of the
observations ``--c2st-cells`` names): the trials behind the recipe, rows in
``benchmarks/results/sbi-trials.jsonl``. Rows append to ``--jsonl`` as they finish, so a grid
can run in parts (``--tasks``, ``--budgets``, ``--seeds``) and ``--summary-only`` writes the
table from the file.

Tasks (Lueckmann et al., "Benchmarking Simulation-Based Inference", AISTATS 2021; the sbibm
package, MIT licence; observations 1-5 and their 10,000 reference posterior draws each in
``benchmarks/data/sbi/<task>.npz``), priors and simulators written out below, vectorized:

- ``two_moons``: theta ~ U([-1, 1]^2); a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01^2),
  p = (r cos a + 0.25, r sin a); z = R(-pi/4) theta; x = p + (-|z_0|, z_1). The posterior has two
  thin crescents (one per sign of z_0) cut by the prior's box.
- ``gaussian_linear``: theta ~ N(0, 0.1 I_10), x ~ N(theta, 0.1 I_10); the posterior is
  N(x / 2, 0.05 I) (:func:`gaussian_linear_posterior`).

Protocol, for each task, budget (10^3 and 10^4 simulations) and seed (0, 1, 2): the seed's
generator draws the budget's (theta, x) pairs once; both methods train on these same pairs
(each holding out its own share for early stopping), one after the other in an order that
alternates with the seed (the machine is shared: interleaving keeps load drift out of the
ratios); each trained posterior then draws 10,000 samples for each observation 1-5 (both
methods amortize: one fit serves every observation). Seconds are wall-clock with one torch
thread. The C2ST classifiers run after both fits, outside the timings.

- **pyroflows**: ``pf.DensityEstimator(**OURS)`` and ``fit(theta, context=x, **OURS_FIT)``
  (the settings below, from the trials in the results' "Measured choices": 3 neural spline
  flow layers, ``"nsf"``, of MADEs of two hidden layers of 64 units, 8 bins on [-3, 3] of
  the standardized theta (the box prior lies within 1.73 standard deviations; the estimator's
  default for other data is [-6, 6]), and the estimator's conditional
  training defaults, the step size 3e-3, the minibatch rule of
  :func:`pyroflows.density.training.default_batch_size`, 128 at 10^3 and 512 at 10^4, and
  gradients clipped at twice their running norm);
  draws by ``sample(10_000, context=x_o, bounds=(low, high))`` for two_moons (rejection of draws
  outside the prior's box), ``sample(10_000, context=x_o)`` for gaussian_linear.
- **sbi**: ``sbi.inference.NPE(prior, density_estimator="maf")`` (its default: nflows MAF of 5
  transforms, 50 hidden features, z-scored theta and x) and ``.append_simulations(theta,
  x).train()`` with its defaults (batch 200, lr 5e-4, 10% validation, stop after 20 epochs
  without improvement), ``build_posterior()``; draws by ``posterior.sample((10_000,), x=x_o)``
  (sbi rejects draws outside the prior's support itself). sbi logs through a tracker that
  stores nothing (its default writes TensorBoard files into the working folder).

C2ST (sbibm's ``c2st``): reference draws X and method draws Y, both z-scored with X's mean and
standard deviation, in float32; ``MLPClassifier(activation="relu", hidden_layer_sizes=(10 d,
10 d), max_iter=1000, solver="adam", random_state=1)``, the mean accuracy of
``cross_val_score`` over ``KFold(5, shuffle=True, random_state=1)``. 0.5: indistinguishable,
1.0: disjoint. In 10-D the classifier (100, 100) runs to hundreds of epochs on 16,000 rows
per fold: minutes per score on one core, so ``--c2st-cells`` limits which gaussian_linear
rows get it (the table's header says which). Every gaussian_linear row also gets **Bayes
C2ST**, 0.5 + TV(q, p) / 2, the accuracy of the best possible classifier (no trained classifier
beats it in expectation), with TV(q, p) = E_q[(1 - p / q)_+] estimated from the method's
10,000 draws, its own log q and the exact posterior p.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import pyroflows as pf
from benchmarks import peers
from benchmarks.targets import bench_dir

DTYPE = torch.float32
NUM_DRAWS = 10_000
TASKS = ("two_moons", "gaussian_linear")
BUDGETS = (1_000, 10_000)
SEEDS = (0, 1, 2)
OBSERVATIONS = (1, 2, 3, 4, 5)
METHODS = ("pyroflows", "sbi")
#: the methods run by a package outside pyroflows' dependencies (the ``[bench]`` extra): a run
#: leaves a missing one out
PEERS = ("sbi",)

#: pyroflows' estimator settings for NPE (constructor, then fit; the fit's batch size, step
#: size and gradient clipping are the estimator's conditional defaults); see the results'
#: "Measured choices" for the trials that chose them.
OURS = {"flow": "nsf", "num_layers": 3, "hidden_dims": (64, 64),
        "flow_options": {"bound": 3.0}}
OURS_FIT: dict = {}
#: What the rows of this recipe are marked with in the JSON lines (rows of earlier recipes stay
#: in the file under their own marks; the table shows one recipe).
RECIPE = "nsf-1"
#: The earlier recipes' rows: ``--summary-only --recipe <name>`` gives their tables.
RECIPES = {"v1": "5 layers of MADE (64, 64); lr 1e-3, batch 256 (64 up to 2,000 pairs), "
                 "patience 20, max_epochs 1000",
           "defaults-2": "5 layers of MADE (64, 64); the conditional defaults of 1c8ca13: lr "
                         "3e-3, batch 128 at 10^3 and 256 at 10^4, patience 20, max_epochs 500, "
                         "no adaptive clipping",
           "defaults-3": "8 MAF layers of MADE (64,); the conditional defaults of 5379b2e: lr "
                         "3e-3, batch 128 at 10^3 and 256 at 10^4, gradients clipped at twice "
                         "their running norm, patience 20, max_epochs 500",
           RECIPE: "3 spline (NSF) layers of MADE (64, 64), 8 bins on [-3, 3]; the conditional "
                   "defaults: lr 3e-3, batch 128 at 10^3 and 512 at 10^4, gradients clipped "
                   "at twice their running norm, patience 20, max_epochs 500"}


# ---- tasks -------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    theta_dim: int
    prior: Callable[..., torch.Tensor]  # (n, generator, dtype) -> (n, theta dim)
    simulator: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    bounds: tuple[float, float] | None  # the prior's box, where it has one


def two_moons_prior(n: int, gen: torch.Generator, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """theta ~ U([-1, 1]^2), shape (n, 2), on the generator's device."""
    return 2 * torch.rand(n, 2, generator=gen, dtype=dtype, device=gen.device) - 1


def two_moons_simulator(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x given theta (n, 2): a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01^2), p = (r cos a + 0.25,
    r sin a); z = R(-pi/4) theta; x = p + (-|z_0|, z_1)."""
    n = theta.shape[0]
    like = {"generator": gen, "dtype": theta.dtype, "device": theta.device}
    a = (torch.rand(n, **like) - 0.5) * math.pi
    r = 0.1 + 0.01 * torch.randn(n, **like)
    z0, z1 = _two_moons_rotation(theta)
    return torch.stack([r * torch.cos(a) + 0.25 - z0.abs(), r * torch.sin(a) + z1], dim=-1)


def _two_moons_rotation(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = math.cos(-math.pi / 4), math.sin(-math.pi / 4)
    return c * theta[..., 0] - s * theta[..., 1], s * theta[..., 0] + c * theta[..., 1]


def two_moons_log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | theta), theta and x broadcasting over (..., 2): with v = x - (0.25 - |z_0|,
    z_1) = (r cos a, r sin a), the polar change of variables gives
    p(x | theta) = N(|v|; 0.1, 0.01^2) / (pi |v|) where v_1 > 0 (a in (-pi/2, pi/2)), else 0."""
    z0, z1 = _two_moons_rotation(theta)
    v0 = x[..., 0] - 0.25 + z0.abs()
    v1 = x[..., 1] - z1
    r = torch.sqrt(v0**2 + v1**2)
    log_normal = -0.5 * ((r - 0.1) / 0.01) ** 2 - math.log(0.01 * math.sqrt(2 * math.pi))
    out = log_normal - math.log(math.pi) - torch.log(r)
    return torch.where(v0 > 0, out, torch.full_like(out, -math.inf))


def gaussian_linear_prior(n: int, gen: torch.Generator, dtype: torch.dtype = DTYPE
                          ) -> torch.Tensor:
    """theta ~ N(0, 0.1 I_10), shape (n, 10), on the generator's device."""
    return math.sqrt(0.1) * torch.randn(n, 10, generator=gen, dtype=dtype, device=gen.device)


def gaussian_linear_simulator(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x ~ N(theta, 0.1 I)."""
    return theta + math.sqrt(0.1) * torch.randn(theta.shape, generator=gen, dtype=theta.dtype,
                                                device=theta.device)


def gaussian_linear_posterior(x_o: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The exact posterior N(mean, var I) of theta given one x_o: precisions add,
    1 / var = 1 / 0.1 + 1 / 0.1, mean = var x_o / 0.1 = x_o / 2."""
    var = 1.0 / (1.0 / 0.1 + 1.0 / 0.1)
    return var * x_o / 0.1, var


TASK = {
    "two_moons": Task("two_moons", 2, two_moons_prior, two_moons_simulator, (-1.0, 1.0)),
    "gaussian_linear": Task("gaussian_linear", 10, gaussian_linear_prior,
                            gaussian_linear_simulator, None),
}


def load_task(name: str) -> dict[str, np.ndarray]:
    """The task's ``observations`` (5, x dim), ``true_parameters``, ``observation_seeds`` and
    ``reference_draws`` (5, 10000, theta dim), observation k at index k - 1."""
    with np.load(os.path.join(bench_dir(), "sbi", f"{name}.npz")) as data:
        return {key: data[key] for key in data.files}


def simulate(task: Task, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs (theta, x) from the prior and the simulator, one generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    theta = task.prior(n, gen)
    return theta, task.simulator(theta, gen)


# ---- scores ------------------------------------------------------------------------------------
def c2st(reference: np.ndarray, draws: np.ndarray, seed: int = 1, folds: int = 5) -> float:
    """sbibm's classifier two-sample test: the 5-fold cross-validated accuracy of an MLP told
    to separate ``reference`` (X) from ``draws`` (Y), both z-scored with X's mean and (n - 1)
    standard deviation, in float32 (as sbibm's torch tensors)."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    x = np.asarray(reference, dtype=np.float32)
    y = np.asarray(draws, dtype=np.float32)
    mean, sd = x.mean(0), x.std(0, ddof=1)
    data = np.concatenate([(x - mean) / sd, (y - mean) / sd]).astype(np.float32)
    target = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    dim = x.shape[1]
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim),
                        max_iter=1000, solver="adam", random_state=seed)
    scores = cross_val_score(clf, data, target, cv=KFold(folds, shuffle=True, random_state=seed),
                             scoring="accuracy")
    return float(np.mean(scores))


def bayes_c2st(log_q: torch.Tensor, log_p: torch.Tensor) -> tuple[float, float]:
    """0.5 + TV(q, p) / 2 and its standard error, from draws of q: TV = E_q[(1 - p / q)_+]."""
    terms = (1 - torch.exp(log_p.double() - log_q.double())).clamp(min=0)
    n = terms.numel()
    return float(0.5 + terms.mean() / 2), float(terms.std() / 2 / math.sqrt(n))


# ---- methods -----------------------------------------------------------------------------------
@dataclass
class Fitted:
    sample: Callable[[torch.Tensor, int, int], torch.Tensor]  # (x_o, n, seed) -> (n, D)
    log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (theta (n, D), x_o)
    seconds: float
    epochs: int
    cpu_seconds: float = math.nan  # the process's CPU time during the fit (one torch thread)


def fit_pyroflows(task: Task, theta: torch.Tensor, x: torch.Tensor, seed: int,
                  quick: bool = False) -> Fitted:
    fit_options = dict(OURS_FIT)
    if quick:
        fit_options["max_epochs"] = 5
    est = pf.DensityEstimator(seed=seed, **OURS)
    start, cpu = time.perf_counter(), time.process_time()
    est.fit(theta, context=x, progress=False, **fit_options)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    bounds = task.bounds

    def sample(x_o, n, draw_seed):
        return est.sample(n, seed=draw_seed, context=x_o, bounds=bounds)

    def log_prob(t, x_o):
        return est.log_prob(t, context=x_o.expand(t.shape[0], -1))

    return Fitted(sample, log_prob, seconds, int(est.history_["epoch"][-1]), cpu)


class _NoTracker:
    """sbi's ``Tracker`` protocol, storing nothing."""

    log_dir = None

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass


def sbi_prior(task: Task) -> torch.distributions.Distribution:
    from sbi.utils import BoxUniform

    if task.name == "two_moons":
        return BoxUniform(-torch.ones(2), torch.ones(2))
    return torch.distributions.MultivariateNormal(torch.zeros(10), 0.1 * torch.eye(10))


def fit_sbi(task: Task, theta: torch.Tensor, x: torch.Tensor, seed: int,
            quick: bool = False) -> Fitted:
    from sbi.inference import NPE

    torch.manual_seed(seed)  # sbi draws its initialization, split and batches from torch's RNG
    start, cpu = time.perf_counter(), time.process_time()
    inference = NPE(prior=sbi_prior(task), density_estimator="maf", show_progress_bars=False,
                    tracker=_NoTracker())
    estimator = inference.append_simulations(theta, x).train(
        **({"max_num_epochs": 5} if quick else {}))
    posterior = inference.build_posterior()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    def sample(x_o, n, draw_seed):
        torch.manual_seed(draw_seed)
        return posterior.sample((n,), x=x_o, show_progress_bars=False)

    def log_prob(t, x_o):
        # The density estimator's own log q (for gaussian_linear's unbounded prior, the
        # posterior's density; no truncation to correct for).
        with torch.no_grad():
            return estimator.log_prob(t.unsqueeze(1), condition=x_o.unsqueeze(0)).squeeze(1)

    return Fitted(sample, log_prob, seconds, int(inference.summary["epochs_trained"][-1]), cpu)


FIT = {"pyroflows": fit_pyroflows, "sbi": fit_sbi}


def installed_methods() -> tuple[str, ...]:
    """:data:`METHODS` less a peer (:data:`PEERS`) that is not installed."""
    return tuple(m for m in METHODS if m not in PEERS or peers.available(m))


# ---- the grid ----------------------------------------------------------------------------------
def run_cell(task_name: str, budget: int, seed: int, observations: tuple[int, ...],
             c2st_here: Callable[[int], bool], num_draws: int, quick: bool, out) -> None:
    """Fit both methods on one set of simulations, draw for each observation, score; one JSON
    line per (method, observation) to ``out``."""
    task = TASK[task_name]
    data = load_task(task_name)
    theta, x = simulate(task, budget, seed)
    methods = installed_methods()
    order = methods if seed % 2 == 0 else methods[::-1]
    fitted = {}
    for method in order:
        fitted[method] = FIT[method](task, theta, x, seed, quick)
        print(f"{task_name} {budget} seed {seed} {method}: trained in "
              f"{fitted[method].seconds:.1f} s, {fitted[method].epochs} epochs", flush=True)
    draws = {}
    for k in observations:
        x_o = torch.as_tensor(data["observations"][k - 1], dtype=DTYPE)
        for method in order:
            start = time.perf_counter()
            d = fitted[method].sample(x_o, num_draws, 1000 * seed + k)
            draws[method, k] = (d.detach(), time.perf_counter() - start)
    for k in observations:
        x_o = torch.as_tensor(data["observations"][k - 1], dtype=DTYPE)
        reference = data["reference_draws"][k - 1][:num_draws]
        for method in order:
            d, sample_seconds = draws[method, k]
            row = {"task": task_name, "budget": budget, "seed": seed, "observation": k,
                   "method": method, "recipe": RECIPE, "train_seconds": fitted[method].seconds,
                   "train_cpu_seconds": fitted[method].cpu_seconds,
                   "epochs": fitted[method].epochs, "sample_seconds": sample_seconds,
                   "num_draws": num_draws, "quick": quick,
                   "outside_prior": float(((d.abs() > 1).any(-1)).float().mean())
                   if task.bounds else 0.0}
            if task_name == "gaussian_linear":
                mean, var = gaussian_linear_posterior(x_o)
                log_p = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(d).sum(-1)
                with torch.no_grad():
                    log_q = fitted[method].log_prob(d, x_o)
                row["bayes_c2st"], row["bayes_c2st_se"] = bayes_c2st(log_q, log_p)
            if c2st_here(k):
                start = time.perf_counter()
                row["c2st"] = c2st(reference, d.numpy())
                row["c2st_seconds"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()


#: The held-out pairs a trial scores: simulated with this seed, never a training seed.
TRIAL_TEST_SEED, TRIAL_TEST_PAIRS = 999, 20_000
_CONSTRUCTOR = ("flow", "num_layers", "hidden_dims", "precondition", "flow_options")


def trial(task_name: str, budget: int, seed: int, options: dict,
          c2st_observations: tuple[int, ...] = ()) -> dict:
    """One pyroflows fit with ``options`` (constructor keywords ``_CONSTRUCTOR``, the rest
    ``fit``'s, over ``OURS`` and the estimator's defaults) on the cell's simulations: training
    seconds, epochs and the mean log q(theta | x) of ``TRIAL_TEST_PAIRS`` fresh pairs (the
    expected KL to the true posterior up to a constant: higher is better), and the C2ST of
    ``c2st_observations``. The trials behind the recipe's choices ("Measured choices")."""
    task = TASK[task_name]
    theta, x = simulate(task, budget, seed)
    test_theta, test_x = simulate(task, TRIAL_TEST_PAIRS, TRIAL_TEST_SEED)
    built = {**OURS, **{k: v for k, v in options.items() if k in _CONSTRUCTOR}}
    fit_options = {**OURS_FIT, **{k: v for k, v in options.items() if k not in _CONSTRUCTOR}}
    est = pf.DensityEstimator(seed=seed, **built)
    start, cpu = time.perf_counter(), time.process_time()
    est.fit(theta, context=x, progress=False, **fit_options)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    row = {"task": task_name, "budget": budget, "seed": seed, "options": options,
           "lr": est.history_["lr"], "batch_size": est.history_["batch_size"],
           "train_seconds": seconds, "train_cpu_seconds": cpu,
           "epochs": est.history_["epoch"][-1], "best_epoch": est.history_["best_epoch"],
           "test_log_prob": est.score(test_theta, context=test_x), "c2st": {}}
    data = load_task(task_name)
    for k in c2st_observations:
        x_o = torch.as_tensor(data["observations"][k - 1], dtype=DTYPE)
        d = est.sample(NUM_DRAWS, seed=1000 * seed + k, context=x_o, bounds=task.bounds)
        row["c2st"][k] = c2st(data["reference_draws"][k - 1][:NUM_DRAWS], d.numpy())
    return row


def _trial_options(text: str) -> dict:
    """``"lr=3e-3,hidden_dims=(128, 128)"`` as a dict of Python literals."""
    import ast

    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def warm_up() -> None:
    """One small fit and draw per method and task, untimed: first calls' costs (imports, lazy
    initialization) stay out of the first rows."""
    for task in TASK.values():
        theta, x = simulate(task, 200, 12345)
        for method in installed_methods():
            fitted = FIT[method](task, theta, x, 0, quick=True)
            fitted.sample(x[0], 10, 0)


# ---- the table ---------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, se = _mean_se(values)
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def summary(rows: list[dict]) -> str:
    """The table: one line per task, budget and method (means ± standard errors over the
    seeds' and observations' rows), then the goals."""
    lines = ["| task | budget | method | C2ST | C2ST rows | Bayes C2ST | train s | train CPU s | "
             "epochs | sample s (10,000) | outside prior |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["budget"]) for r in rows}, key=lambda k: (TASKS.index(k[0]), k[1]))
    verdicts = []
    for task, budget in keys:
        cell = {m: [r for r in rows if (r["task"], r["budget"], r["method"]) == (task, budget, m)]
                for m in METHODS}
        for method in METHODS:
            rs = cell[method]
            if not rs:
                continue
            fits = {r["seed"]: r for r in rs}.values()  # one training per seed
            c = [r["c2st"] for r in rs if "c2st" in r]
            b = [r["bayes_c2st"] for r in rs if "bayes_c2st" in r]
            lines.append(
                f"| {task} | {budget} | {method} | {_fmt(c)} | {len(c)} | {_fmt(b)} | "
                f"{_fmt([r['train_seconds'] for r in fits], 1)} | "
                f"{_fmt(_cpu(fits), 1)} | "
                f"{_fmt([r['epochs'] for r in fits], 0)} | "
                f"{_fmt([r['sample_seconds'] for r in rs], 2)} | "
                f"{_fmt([r['outside_prior'] for r in rs], 4)} |")
        verdicts += _goals(task, budget, cell)
    return "\n".join(lines + [""] + verdicts)


def _cpu(rows) -> list[float]:
    """The fits' CPU seconds where recorded (rows before the column have none)."""
    return [r["train_cpu_seconds"] for r in rows
            if not math.isnan(r.get("train_cpu_seconds", math.nan))]


def _paired(cell: dict, key: str) -> list[float]:
    ours = {(r["seed"], r["observation"]): r[key] for r in cell["pyroflows"] if key in r}
    theirs = {(r["seed"], r["observation"]): r[key] for r in cell["sbi"] if key in r}
    return [ours[k] - theirs[k] for k in sorted(ours.keys() & theirs.keys())]


def _goals(task: str, budget: int, cell: dict) -> list[str]:
    if not cell["pyroflows"] or not cell["sbi"]:
        return []
    out = []
    for key, label in (("c2st", "C2ST"), ("bayes_c2st", "Bayes C2ST")):
        diff = _paired(cell, key)
        if diff:
            mean, se = _mean_se(diff)
            met = "met" if mean <= 0 or (not math.isnan(se) and mean <= 2 * se) else "NOT met"
            out.append(f"- {task}, {budget}: {label} pyroflows - sbi = {mean:+.3f} ± "
                       f"{se:.3f} over {len(diff)} paired rows: at or below sbi's: **{met}**"
                       + ("" if mean <= 0 else " (within 2 standard errors)"
                          if met == "met" else ""))
    ours = {r["seed"]: r["train_seconds"] for r in cell["pyroflows"]}
    theirs = {r["seed"]: r["train_seconds"] for r in cell["sbi"]}
    ratios = [theirs[s] / ours[s] for s in sorted(ours.keys() & theirs.keys())]
    if ratios:
        geo = math.exp(np.mean(np.log(ratios)))
        out.append(f"- {task}, {budget}: training time sbi / pyroflows = {geo:.2f} (geometric "
                   f"mean of {', '.join(f'{r:.2f}' for r in ratios)}): at least 2x: "
                   f"**{'met' if geo >= 2 else 'NOT met'}**")
    ours = {r["seed"]: r.get("train_cpu_seconds", math.nan) for r in cell["pyroflows"]}
    theirs = {r["seed"]: r.get("train_cpu_seconds", math.nan) for r in cell["sbi"]}
    cpu = [theirs[s] / ours[s] for s in sorted(ours.keys() & theirs.keys())
           if not (math.isnan(ours[s]) or math.isnan(theirs[s]))]
    if cpu:
        geo = math.exp(np.mean(np.log(cpu)))
        out.append(f"- {task}, {budget}: training CPU time sbi / pyroflows = {geo:.2f} "
                   f"(geometric mean of {', '.join(f'{r:.2f}' for r in cpu)}; the wall-clock "
                   "ratio above is the goal's)")
    if task == "two_moons" and budget == 10_000:
        c = [r["c2st"] for r in cell["pyroflows"] if "c2st" in r]
        if c:
            mean = float(np.mean(c))
            out.append(f"- two_moons, 10000: pyroflows' C2ST {mean:.3f}, within 0.05 of 0.5: "
                       f"**{'met' if mean <= 0.55 else 'NOT met'}**")
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import sklearn

    sbi_version = peers.version("sbi")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return (f"{cpu}, {os.cpu_count()} CPUs (shared), one torch thread; Python "
            f"{platform.python_version()}, torch {torch.__version__}, pyroflows "
            f"{pf.__version__} (commit {commit}), sbi {sbi_version}, scikit-learn "
            f"{sklearn.__version__}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--observations", default=",".join(map(str, OBSERVATIONS)))
    parser.add_argument("--c2st-cells", default="all",
                        help="the observations whose rows get the (slow) C2ST: 'all', 'none', "
                             "or a list such as '1' or '1,2'")
    parser.add_argument("--jsonl", default="sbi-runs.jsonl", help="rows are appended here")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--trial", action="append", default=[],
                        help="instead of the grid: a pyroflows fit with these options per task, "
                             "budget and seed, e.g. 'lr=3e-3; batch_size=128' (repeatable); "
                             "its held-out log q and the C2ST of --c2st-cells (default none)")
    parser.add_argument("--recipe", default=RECIPE, choices=sorted(RECIPES),
                        help="the table shows the rows of this recipe (runs always write "
                             f"{RECIPE!r}): " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.budgets, args.seeds, args.observations = "1000", "0", "1"
    if args.trial:
        chosen = () if args.c2st_cells in ("all", "none") else tuple(
            int(k) for k in args.c2st_cells.split(","))
        with open(args.jsonl, "a") as out:
            for text in args.trial:
                for task in args.tasks.split(","):
                    for budget in map(int, args.budgets.split(",")):
                        for seed in map(int, args.seeds.split(",")):
                            row = trial(task, budget, seed, _trial_options(text), chosen)
                            print(json.dumps(row), flush=True)
                            out.write(json.dumps(row) + "\n")
                            out.flush()
        return
    if args.c2st_cells == "all":
        c2st_here = lambda k: True  # noqa: E731
    elif args.c2st_cells == "none":
        c2st_here = lambda k: False  # noqa: E731
    else:
        chosen = {int(k) for k in args.c2st_cells.split(",")}
        c2st_here = lambda k: k in chosen  # noqa: E731
    if not args.summary_only:
        peers.note_missing(PEERS)
        warm_up()
        with open(args.jsonl, "a") as out:
            for task in args.tasks.split(","):
                for budget in map(int, args.budgets.split(",")):
                    for seed in map(int, args.seeds.split(",")):
                        run_cell(task, budget, seed,
                                 tuple(map(int, args.observations.split(","))), c2st_here,
                                 2_000 if args.quick else NUM_DRAWS, args.quick, out)
    with open(args.jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    table = summary([r for r in rows if r.get("quick", False) == args.quick
                     and r.get("recipe", "v1") == args.recipe])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- {' '.join(sys.argv)} -->\n{machine()}\n\n{table}\n")


if __name__ == "__main__":
    main()
