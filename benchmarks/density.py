"""Density estimation: pyroflows' DensityEstimator against zuko, nflows and Pyro flows.

Run from the repository root (about 7 minutes on a quiet core with the defaults; 15-20 on two
busy cores)::

    nice -n 5 python -m benchmarks.density --out benchmarks/results/density.md

Every model gets the same capacity (5 layers, conditioners with hidden widths (128, 128)), the
same data, split and epoch budget, and the same training protocol: minibatch Adam, the mean
validation log-likelihood after every epoch, early stopping after ``--patience`` epochs without
improvement, and the best state (the untrained one included) restored. Ours runs through
``DensityEstimator.fit`` (whitening preconditioner, flow layers starting at the identity); the
peers run through :func:`fit_peer`, the same loop written out. All in float32, one intra-op
thread (on a shared two-core machine, contended threads make small networks several times
slower for everyone).

Peers: zuko ``MAF`` and ``RealNVP``; nflows MAF (``MaskedAffineAutoregressiveTransform`` with
two hidden layers, no residual blocks, reverse permutations between layers); Pyro's
``affine_autoregressive`` used in the density direction (each layer's ``.inv``, so scoring data
is one pass, as in MAF) and ``affine_coupling`` with reverse permutations between layers.

Data (every set z-scored with its training split's mean and standard deviation before anyone
sees it; log-likelihoods of the sets with a known density are reported in their original space,
adding the z-score's log-Jacobian, so the gap to the truth is exact):

- ``U2``, ``U3``, ``U4``: 20000 exact draws of the Rezende energies on the box [-4, 4]^2
  (``benchmarks/data/rezende/box_draws.npz``); true density ``exp(-U) / Z`` on the box.
- ``mixture8``: an 8-D mixture of five correlated Gaussians.
- ``banana6``: three 2-D bananas ``x_2 ~ N(x_1^2 - 1, 0.5^2)``, ``x_1 ~ N(0, 1)``, rotated by
  a fixed random rotation of R^6 (density exact: the rotation has unit Jacobian).
- ``student5``: a 5-D multivariate Student t with 4 degrees of freedom and correlations.
- ``digits``: sklearn's 8x8 digits (1797 x 64), dequantized by adding U[0, 1) noise.
- ``breast_cancer``: sklearn's breast cancer data (569 x 30), log1p; 400 rows for training
  (360 train + 40 validation), 169 for testing.

``--whiten-table`` compares the kinds of ``precondition="whiten"`` pipeline (learned Cholesky
base, fixed whitening, fixed whitening + learned base; see ``WHITEN_KINDS``) on the same data,
MAF and RealNVP, paired over training seeds.

Columns: mean test log-likelihood per sample (nats) with its standard error; the gap
``mean(log p - log q)`` on the test draws (an unbiased estimate of KL(p || q)) with the standard
error of the paired differences; fit wall-clock in seconds; the best and last epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import multivariate_normal, multivariate_t
from torch import nn

import pyroflows as pf
from benchmarks import peers
from benchmarks.targets import bench_dir
from pyroflows.density import DensityEstimator, pipeline

DTYPE = torch.float32


@dataclass
class Budget:
    num_layers: int = 5
    hidden: tuple[int, ...] = (128, 128)
    max_epochs: int = 120
    patience: int = 15
    batch_size: int = 256
    lr: float = 1e-3


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # z-scored
    x_val: np.ndarray
    x_test: np.ndarray
    log_jacobian: float  # log|det dz/dx| of the z-score where we report in the original space
    true_log_prob: np.ndarray | None  # log p(x_test) in the original space, where known
    note: str


# ---- data ------------------------------------------------------------------------------------
def _zscore(name, train, val, test, truth, note) -> Dataset:
    mean, sd = train.mean(0), train.std(0)
    f = lambda a: ((a - mean) / sd).astype(np.float32)  # noqa: E731
    # Known densities are compared in their original space; real data is scored z-scored.
    log_jacobian = float(-np.log(sd).sum()) if truth is not None else 0.0
    return Dataset(name, f(train), f(val), f(test), log_jacobian, truth, note)


def _split(x: np.ndarray, n_train: int, n_val: int, rng) -> tuple[np.ndarray, ...]:
    idx = rng.permutation(len(x))
    return x[idx[:n_train]], x[idx[n_train : n_train + n_val]], x[idx[n_train + n_val :]]


def rezende(key: str, n_train: int, n_val: int, n_test: int) -> Dataset:
    draws = np.load(os.path.join(bench_dir(), "rezende", "box_draws.npz"))[key]
    draws = draws.astype(np.float64)
    train, val, test = _split(draws, n_train, n_val, np.random.default_rng(0))
    test = test[:n_test]
    energy = pf.datasets.ENERGIES[key]
    truth = -energy(torch.as_tensor(test)).numpy() - pf.datasets.LOG_Z[key]
    return _zscore(key, train, val, test, truth, "2-D, box [-4, 4]^2")


def check_log_z(key: str, n: int = 2001) -> float:
    """log of the integral of exp(-U) over the box by the trapezoid rule, to check log Z."""
    g = torch.linspace(-4, 4, n, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    dens = torch.exp(-pf.datasets.ENERGIES[key](grid)).reshape(n, n)
    h = float(g[1] - g[0])
    w = torch.ones(n, dtype=torch.float64)
    w[0] = w[-1] = 0.5
    return math.log(float(w @ dens @ w) * h * h)


def mixture8(n_train: int, n_val: int, n_test: int) -> Dataset:
    rng = np.random.default_rng(1)
    d, k = 8, 5
    means = rng.normal(0, 2.0, (k, d))
    covs = []
    for _ in range(k):
        a = rng.normal(0, 1, (d, d)) / math.sqrt(d)
        covs.append(a @ a.T + 0.1 * np.eye(d))
    weights = rng.dirichlet(np.full(k, 3.0))

    def draw(n):
        comp = rng.choice(k, size=n, p=weights)
        out = np.empty((n, d))
        for j in range(k):
            idx = comp == j
            out[idx] = rng.multivariate_normal(means[j], covs[j], size=int(idx.sum()))
        return out

    def log_p(x):
        parts = np.stack([
            np.log(w) + multivariate_normal(m, c).logpdf(x)
            for w, m, c in zip(weights, means, covs, strict=True)
        ])
        top = parts.max(0)
        return top + np.log(np.exp(parts - top).sum(0))

    train, val, test = draw(n_train), draw(n_val), draw(n_test)
    return _zscore("mixture8", train, val, test, log_p(test), "8-D, 5 correlated Gaussians")


def banana6(n_train: int, n_val: int, n_test: int) -> Dataset:
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # a fixed rotation (|det| = 1)

    def draw(n):
        y = np.empty((n, 6))
        y[:, 0::2] = rng.normal(size=(n, 3))
        y[:, 1::2] = y[:, 0::2] ** 2 - 1 + 0.5 * rng.normal(size=(n, 3))
        return y @ q.T

    def log_p(x):
        y = x @ q  # q orthogonal: y = q^T x
        a, b = y[:, 0::2], y[:, 1::2]
        lp = -0.5 * a**2 - 0.5 * ((b - a**2 + 1) / 0.5) ** 2 - np.log(0.5) - math.log(2 * math.pi)
        return lp.sum(1)

    train, val, test = draw(n_train), draw(n_val), draw(n_test)
    return _zscore("banana6", train, val, test, log_p(test), "6-D, 3 rotated bananas")


def student5(n_train: int, n_val: int, n_test: int) -> Dataset:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5))
    shape = a @ a.T / 5 + 0.2 * np.eye(5)
    dist = multivariate_t(loc=rng.normal(size=5), shape=shape, df=4, seed=rng)
    train, val, test = dist.rvs(n_train), dist.rvs(n_val), dist.rvs(n_test)
    return _zscore("student5", train, val, test, dist.logpdf(test), "5-D, Student t, df=4")


def digits() -> Dataset:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(4)
    x = load_digits().data.astype(np.float64)
    x = x + rng.uniform(size=x.shape)  # dequantize: a density on R^64, not on a lattice
    train, val, test = _split(x, 1200, 150, rng)
    return _zscore("digits", train, val, test, None, "64-D, dequantized, 1200/150/447 rows")


def breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    rng = np.random.default_rng(5)
    x = np.log1p(load_breast_cancer().data.astype(np.float64))
    train, val, test = _split(x, 360, 40, rng)
    return _zscore("breast_cancer", train, val, test, None, "30-D, log1p, 360/40/169 rows")


# ---- peers -----------------------------------------------------------------------------------
def zuko_flow(kind: str, dim: int, b: Budget):
    import zuko

    cls = {"maf": zuko.flows.MAF, "realnvp": zuko.flows.RealNVP, "nsf": zuko.flows.NSF}[kind]
    flow = cls(features=dim, transforms=b.num_layers, hidden_features=b.hidden)
    return flow, lambda x: flow().log_prob(x)


def nflows_maf(dim: int, b: Budget):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import CompositeTransform, ReversePermutation
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform

    assert len(set(b.hidden)) == 1, "nflows' MADE has one hidden width"
    layers = []
    for i in range(b.num_layers):
        if i > 0:
            layers.append(ReversePermutation(features=dim))
        layers.append(MaskedAffineAutoregressiveTransform(
            features=dim, hidden_features=b.hidden[0], num_blocks=len(b.hidden) - 1,
            use_residual_blocks=False,
        ))
    flow = Flow(CompositeTransform(layers), StandardNormal([dim]))
    return flow, flow.log_prob


def pyro_flow(kind: str, dim: int, b: Budget):
    import pyro.distributions as dist
    import pyro.distributions.transforms as T

    parts, modules = [], nn.ModuleList()
    reverse = torch.arange(dim - 1, -1, -1)
    for i in range(b.num_layers):
        if kind == "autoregressive":
            t = T.affine_autoregressive(dim, hidden_dims=list(b.hidden))
            parts.append(t.inv)  # the density direction: data -> base is one pass
        else:
            if i > 0:
                parts.append(T.Permute(reverse))
            t = T.affine_coupling(dim, hidden_dims=list(b.hidden))
            parts.append(t)
        modules.append(t)
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    flow = dist.TransformedDistribution(base, parts)
    return modules, flow.log_prob


def fit_peer(module: nn.Module, log_prob: Callable, x_train: torch.Tensor, x_val: torch.Tensor,
             b: Budget, seed: int) -> dict:
    """The protocol of ``DensityEstimator.fit``, for any module with a ``log_prob``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=b.lr)

    def val_score():
        with torch.no_grad():
            return float(log_prob(x_val).mean())

    best, best_epoch = val_score(), 0
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    epoch = 0
    for epoch in range(1, b.max_epochs + 1):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), b.batch_size):
            loss = -log_prob(x_train[perm[i : i + b.batch_size]]).mean()
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1e3)
            opt.step()
        score = val_score()
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif epoch - best_epoch > b.patience:
            break
    module.load_state_dict(best_state)
    return {"best_epoch": best_epoch, "epochs": epoch}


# ---- one run ---------------------------------------------------------------------------------
MODELS = ["ours MAF", "ours RealNVP", "zuko MAF", "zuko RealNVP", "nflows MAF",
          "pyro AAF (inv)", "pyro coupling"]
# The preconditioning table (--tabak-table): Tabak alone, plain flows, Tabak-preconditioned flows.
TABAK_MODELS = ["Tabak", "ours MAF", "ours RealNVP", "Tabak+MAF", "MAF+Tabak", "auto MAF"]
# DensityEstimator settings of the preconditioned rows: (precondition, refine).
_PIPELINES = {"Tabak+": ("tabak", None), "ours": ("whiten", None), "+Tabak": ("whiten", "tabak"),
              "auto": ("auto", "tabak"), "cholesky": ("cholesky", None)}
# Model-name suffixes for the refiner's selection rule (Tabak's ``selection``), e.g.
# "MAF+Tabak 1se"; without one, DensityEstimator's default.
_SELECTIONS = {"1se": "one_se", "sig": "significant", "best": "best"}
#: the peers outside pyroflows' dependencies (the ``[bench]`` extra), by their models' name
#: prefix: a default run leaves a missing one's models out, naming one in --models is an error
PEERS = ("zuko", "nflows")


def peer_of(model: str) -> str | None:
    """The peer package a model's name runs on (``"zuko MAF"``: zuko), else None."""
    return next((p for p in PEERS if model.startswith(p)), None)


def select_models(requested: str | None, default: list[str], parser) -> list[str]:
    """The models of the run: ``--models`` as given (``parser.error`` if one needs a peer that
    is not installed), else ``default`` less a missing peer's models, with one printed note."""
    if requested:
        models = [m for m in requested.split(",") if m]
        peers.require(parser, [p for p in map(peer_of, models) if p], "--models")
        return models
    peers.note_missing(p for p in map(peer_of, default) if p)
    return [m for m in default if peer_of(m) is None or peers.available(peer_of(m))]


def run_model(name: str, data: Dataset, b: Budget, seed: int, flow_options: dict | None = None):
    """Fit one model; return (test log q in the z-scored space, seconds, best epoch, epochs)."""
    torch.manual_seed(seed)
    dim = data.x_train.shape[1]
    xt, xv, xs = (torch.as_tensor(a, dtype=DTYPE) for a in (data.x_train, data.x_val, data.x_test))
    start = time.perf_counter()
    if name == "Tabak":
        tabak = pf.transforms.Tabak(dim, seed=seed).fit(xt, x_val=xv, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            lq = tabak.log_prob(xs)
        return lq, seconds, tabak.best_step, tabak.history["step"][-1]
    pipeline = next((v for k, v in _PIPELINES.items() if k in name), None)
    if pipeline is not None and name.endswith(tuple(_SELECTIONS)):
        # the same pipeline with the refiner's step count chosen by another rule
        base, rule = name.rsplit(" ", 1)
        saved = pipeline.REFINE_SELECTION
        pipeline.REFINE_SELECTION = _SELECTIONS[rule]
        try:
            return run_model(base, data, b, seed, flow_options)
        finally:
            pipeline.REFINE_SELECTION = saved
    if pipeline is not None:
        precondition, refine = pipeline
        est = DensityEstimator(
            _flow(name), num_layers=b.num_layers, hidden_dims=b.hidden,
            precondition=precondition, refine=refine, dtype=DTYPE, seed=seed,
            # Tabak first: the very Tabak fit of the "Tabak" row
            tabak_options={"seed": seed}, flow_options=flow_options,
        )
        est.fit(xt, x_val=xv, max_epochs=b.max_epochs, batch_size=b.batch_size, lr=b.lr,
                patience=b.patience, progress=False)
        seconds = time.perf_counter() - start
        lq = est.log_prob(xs)
        h = est.history_
        kept = str(h["best_epoch"])
        if refine:
            kept += f"+{h['refine_steps']}"
        if precondition == "auto":
            kept = f"{est.precondition_} {kept}"
        return lq, seconds, kept, h["epoch"][-1]
    if name.startswith("zuko"):
        module, log_prob = zuko_flow(_flow(name), dim, b)
    elif name.startswith("nflows"):
        module, log_prob = nflows_maf(dim, b)
    else:
        module, log_prob = pyro_flow("autoregressive" if "AAF" in name else "coupling", dim, b)
    info = fit_peer(module, log_prob, xt, xv, b, seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        lq = torch.cat([log_prob(c) for c in xs.split(4096)])
    return lq, seconds, info["best_epoch"], info["epochs"]


def _flow(name: str) -> str:
    """The flow family a model's name says: "... NSF", "... MAF", else RealNVP."""
    return "nsf" if "NSF" in name else "maf" if "MAF" in name else "realnvp"


def _fmt(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {se:.3f}" if math.isfinite(mean) else "nan"


def evaluate(data: Dataset, b: Budget, models: list[str], seed: int,
             flow_options: dict | None = None) -> list[str]:
    rows = []
    truth = data.true_log_prob
    gauss = multivariate_normal(data.x_train.mean(0), np.cov(data.x_train.T, bias=True))
    candidates = [("Gaussian (ML, full cov)", None)] + [(m, m) for m in models]
    for label, model in candidates:
        if model is None:
            lq = torch.as_tensor(gauss.logpdf(data.x_test.astype(np.float64)))
            seconds, best, epochs = float("nan"), "", ""
        else:
            lq, seconds, best_epoch, last = run_model(model, data, b, seed, flow_options)
            best, epochs = best_epoch, last
        lq = lq.double().cpu().numpy() + data.log_jacobian
        n = len(lq)
        ll = (float(np.mean(lq)), float(np.std(lq) / math.sqrt(n)))
        if truth is not None:
            diff = truth - lq
            gap = _fmt(float(np.mean(diff)), float(np.std(diff) / math.sqrt(n)))
        else:
            gap = "n/a"
        time_s = "" if not math.isfinite(seconds) else f"{seconds:.1f}"
        rows.append(f"| {data.name} | {label} | {_fmt(*ll)} | {gap} | {time_s} | {best} | "
                    f"{epochs} |")
        print(rows[-1], flush=True)
    if truth is not None:
        se = float(np.std(truth) / math.sqrt(len(truth)))
        truth_ll = _fmt(float(np.mean(truth)), se)
        rows.append(f"| {data.name} | truth (log p) | {truth_ll} | 0 | | | |")
        print(rows[-1], flush=True)
    return rows


def evaluate_seeds(data: Dataset, b: Budget, models: list[str], seeds: list[int],
                   flow_options: dict | None = None) -> list[str]:
    """One row per model: mean and spread over training seeds (same data, same split)."""
    rows = []
    for model in models:
        lls, gaps, secs = [], [], []
        for seed in seeds:
            lq, seconds, _, _ = run_model(model, data, b, seed, flow_options)
            lq = lq.double().cpu().numpy() + data.log_jacobian
            lls.append(float(np.mean(lq)))
            secs.append(seconds)
            if data.true_log_prob is not None:
                gaps.append(float(np.mean(data.true_log_prob - lq)))
        ll = f"{np.mean(lls):.3f} ({np.std(lls, ddof=1):.3f})"
        gap = f"{np.mean(gaps):.3f} ({np.std(gaps, ddof=1):.3f})" if gaps else "n/a"
        each = ", ".join(f"{g:.3f}" for g in (gaps or lls))
        rows.append(f"| {data.name} | {model} | {ll} | {gap} | {each} | {np.mean(secs):.1f} |")
        print(rows[-1], flush=True)
    return rows


def tabak_table(args, b: Budget) -> list[str]:
    """Tabak alone, plain MAF/RealNVP and Tabak-preconditioned MAF/RealNVP at one budget, on
    known densities at full and small sizes; one row per data set, size and model, with the
    mean (sd) over training seeds."""
    seeds = [int(v) for v in args.seeds.split(",") if v]
    sizes = [v for v in args.sizes.split(",") if v]
    flow_options = json.loads(args.flow_options) if args.flow_options else None
    models = [m for m in args.models.split(",") if m] if args.models else TABAK_MODELS
    makers = {"U2": lambda n, v: rezende("U2", n, v, 10000),
              "U3": lambda n, v: rezende("U3", n, v, 10000),
              "U4": lambda n, v: rezende("U4", n, v, 10000),
              "mixture8": lambda n, v: mixture8(n, v, 10000),
              "banana6": lambda n, v: banana6(n, v, 10000),
              "student5": lambda n, v: student5(n, v, 10000)}
    lines = [
        "# Tabak preconditioning: Tabak alone, plain flows, Tabak + flow",
        "",
        f"Budget (every neural flow): {b.num_layers} layers, hidden widths {b.hidden}, Adam lr "
        f"{b.lr}, batch {b.batch_size}, at most {b.max_epochs} epochs, early stopping with "
        f"patience {b.patience} on the validation split (best state restored, the untrained "
        "one included). Tabak: `Tabak(dim)` defaults (at most 5000 steps, 16 candidate "
        "centers, early stopping on the same validation split). Plain flows: "
        "`DensityEstimator(precondition=\"whiten\")`. Tabak+MAF: `precondition=\"tabak\"` "
        "(Tabak fitted on the training split and stopped on the validation split, then the "
        "flow trained on the Gaussianized data). MAF+Tabak: `precondition=\"whiten\", "
        "refine=\"tabak\"` (the plain flow, then a Tabak transform without whitening fitted "
        "to its latent codes of the training split, stopped on the validation split's codes). "
        "auto MAF: `precondition=\"auto\", refine=\"tabak\"` (fits Tabak+MAF and MAF+Tabak, "
        "each flow with the full budget above, keeps the one with the higher validation "
        "log-likelihood). Every `DensityEstimator` row: "
        f"`flow_options={flow_options or {}}`. float32, 1 thread, 10000 test draws. "
        f"Sizes: 'full' = {args.n_train} train / {max(args.n_train // 5, 200)} validation rows; "
        "a number N = N rows in all, 80% train / 20% validation. Gap = mean(log p - log q) "
        f"on the test draws (nats/sample), mean (sd) over training seeds {args.seeds} (same "
        "data); seconds: mean fit wall-clock on a shared 2-core machine.",
        "",
        "| data | rows (train/val) | model | gap to truth | per-seed gaps | fit s | "
        "kept: Tabak steps, or flow epoch[+refiner steps] |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.datasets.split(","):
        for size in sizes:
            if size == "full":
                n_train, n_val = args.n_train, max(args.n_train // 5, 200)
            else:
                n_val = int(size) // 5
                n_train = int(size) - n_val
            data = makers[name](n_train, n_val)
            for model in models:
                gaps, secs, kept = [], [], []
                for seed in seeds:
                    lq, seconds, best, _ = run_model(model, data, b, seed, flow_options)
                    lq = lq.double().cpu().numpy() + data.log_jacobian
                    gaps.append(float(np.mean(data.true_log_prob - lq)))
                    secs.append(seconds)
                    kept.append(str(best))
                sd = f" ({np.std(gaps, ddof=1):.3f})" if len(gaps) > 1 else ""
                row = (f"| {name} | {size} ({n_train}/{n_val}) | {model} | "
                       f"{np.mean(gaps):.3f}{sd} | {', '.join(f'{g:.3f}' for g in gaps)} | "
                       f"{np.mean(secs):.1f} | {', '.join(kept)} |")
                lines.append(row)
                print(row, flush=True)
    return lines


# precondition="whiten"'s pipelines after the standardization (density.pipeline.WHITEN_KINDS):
# "learned" (the default: layers, then a learnable Cholesky base started at the data's
# covariance), "fixed" (a fixed Cholesky whitening, layers, base N(0, I)) and "fixed+affine"
# (the fixed whitening, layers, a learnable Cholesky base started at the identity; what
# precondition="cholesky" builds).
WHITEN_KINDS = ("learned", "fixed", "fixed+affine")


def whiten_table(args, b: Budget, makers: dict) -> None:
    """``precondition="whiten"``'s variants (``density.pipeline.WHITEN_KINDS``) on --datasets,
    MAF and RealNVP, paired over --seeds: every (data set, flow, seed) is fitted with each kind
    in turn. One JSON line per fit is appended to --jsonl (so a run can be split over processes
    and resumed: fits already in the file are skipped); :func:`whiten_summary` makes the table."""
    seeds = [int(v) for v in args.seeds.split(",") if v]
    kinds = [k for k in args.whiten_kinds.split(",") if k]
    flow_options = json.loads(args.flow_options) if args.flow_options else None
    done = set()
    if os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            done = {(r["data"], r["flow"], r["seed"], r["kind"]) for r in map(json.loads, f)}
    saved = pipeline.WHITEN
    for name in args.datasets.split(","):
        data = makers[name]()
        for flow in ("MAF", "RealNVP"):
            for seed in seeds:
                for kind in kinds:
                    if (name, flow, seed, kind) in done:
                        continue
                    pipeline.WHITEN = kind
                    try:
                        lq, seconds, best, last = run_model(f"ours {flow}", data, b, seed,
                                                            flow_options)
                    finally:
                        pipeline.WHITEN = saved
                    lq = lq.double().cpu().numpy() + data.log_jacobian
                    row = {"data": name, "flow": flow, "seed": seed, "kind": kind,
                           "log_lik": float(np.mean(lq)), "seconds": seconds,
                           "best_epoch": best, "epochs": last,
                           "gap": (float(np.mean(data.true_log_prob - lq))
                                   if data.true_log_prob is not None else None)}
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(row, flush=True)


def whiten_summary(path: str, baseline: str = "learned") -> list[str]:
    """The table of :func:`whiten_table`'s fits in ``path``: per data set and flow, each kind's
    measure (the gap to truth where the density is known, else the test log-likelihood) as
    mean (per seed), and its paired difference from ``baseline`` +- the standard error over
    the seeds both have."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    fits = {(r["data"], r["flow"], r["seed"], r["kind"]): r for r in rows}
    kinds = [k for k in WHITEN_KINDS if any(r["kind"] == k for r in rows)]
    others = [k for k in kinds if k != baseline]
    lines = ["| data | flow | measure | " + " | ".join(kinds) + " | "
             + " | ".join(f"{k} - {baseline}" for k in others) + " | seeds |",
             "|" + "---|" * (4 + len(kinds) + len(others))]
    order = list(dict.fromkeys((r["data"], r["flow"]) for r in rows))
    for data, flow in order:
        seeds = sorted({r["seed"] for r in rows if (r["data"], r["flow"]) == (data, flow)})
        seeds = [s for s in seeds if all((data, flow, s, k) in fits for k in kinds)]
        if not seeds:
            continue
        gap = fits[(data, flow, seeds[0], kinds[0])]["gap"] is not None
        key = "gap" if gap else "log_lik"

        vals = {k: np.array([fits[(data, flow, s, k)][key] for s in seeds]) for k in kinds}
        cells = []
        for kind in kinds:
            v = vals[kind]
            cells.append(f"{v.mean():.3f} ({', '.join(f'{x:.3f}' for x in v)})")
        for kind in others:
            d = vals[kind] - vals[baseline]
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            cells.append(f"{d.mean():+.3f} ± {se:.3f}")
        lines.append(f"| {data} | {flow} | {'gap' if gap else 'log-lik'} | "
                     + " | ".join(cells) + f" | {len(seeds)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--datasets", default="U3,U4,mixture8,banana6,student5,digits,"
                        "breast_cancer", help="comma-separated; U2 is available too")
    parser.add_argument("--models", default=None,
                        help="comma-separated (default: MODELS, or TABAK_MODELS with "
                        "--tabak-table); a refined pipeline's name may end in ' best', "
                        "' 1se' or ' sig', the refiner's step-count rule")
    parser.add_argument("--n-train", type=int, default=2500, help="synthetic training rows")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated; with "
                        "more than one, each row is a mean (sd) over them")
    parser.add_argument("--tabak-table", action="store_true",
                        help="only the preconditioning table: Tabak, plain MAF/RealNVP, "
                        "Tabak + MAF/RealNVP on --datasets at --sizes")
    parser.add_argument("--flow-options", default="",
                        help="JSON flow_options for every DensityEstimator row (every "
                        "table), e.g. "
                        "'{\"log_scale_bound\": 2.0}'")
    parser.add_argument("--sizes", default="full,1000,300",
                        help="for --tabak-table: 'full' (--n-train rows) or total row counts")
    parser.add_argument("--whiten-table", action="store_true",
                        help="only the comparison of precondition=\"whiten\"'s kinds "
                        "(--whiten-kinds) on --datasets, MAF and RealNVP, paired over --seeds; "
                        "fits are appended to --jsonl, then the table is printed")
    parser.add_argument("--whiten-kinds", default=",".join(WHITEN_KINDS))
    parser.add_argument("--jsonl", default="whiten-fits.jsonl",
                        help="for --whiten-table: the file of fits (appended; done fits skipped)")
    parser.add_argument("--summary-only", action="store_true",
                        help="for --whiten-table: print the table of --jsonl, fit nothing")
    args = parser.parse_args(argv)
    if args.models:  # every table: a model of a peer that is not installed is a usage error
        select_models(args.models, MODELS, parser)
    if args.tabak_table:
        torch.set_num_threads(1)
        b = Budget()
        if args.max_epochs is not None:
            b.max_epochs = args.max_epochs
        if args.patience is not None:
            b.patience = args.patience
        lines = tabak_table(args, b)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return

    torch.set_num_threads(1)
    b = Budget()
    n_train = args.n_train
    if args.quick:
        b.max_epochs, b.patience, n_train = 3, 2, 1000
    if args.max_epochs is not None:
        b.max_epochs = args.max_epochs
    if args.patience is not None:
        b.patience = args.patience
    n_val, n_test = max(n_train // 5, 200), 10000
    makers = {
        "U2": lambda: rezende("U2", n_train, n_val, n_test),
        "U3": lambda: rezende("U3", n_train, n_val, n_test),
        "U4": lambda: rezende("U4", n_train, n_val, n_test),
        "mixture8": lambda: mixture8(n_train, n_val, n_test),
        "banana6": lambda: banana6(n_train, n_val, n_test),
        "student5": lambda: student5(n_train, n_val, n_test),
        "digits": digits,
        "breast_cancer": breast_cancer,
    }
    if args.whiten_table:
        if not args.summary_only:
            whiten_table(args, b, makers)
        lines = whiten_summary(args.jsonl)
        print("\n".join(lines), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    models = select_models(args.models, MODELS, parser)
    flow_options = json.loads(args.flow_options) if args.flow_options else None
    seeds = [int(v) for v in args.seeds.split(",") if v]
    header = [
        "# Density estimation benchmark",
        "",
        f"Budget (every model): {b.num_layers} layers, hidden widths {b.hidden}, Adam lr {b.lr}, "
        f"batch {b.batch_size}, at most {b.max_epochs} epochs, early stopping with patience "
        f"{b.patience} on the validation split (best state restored); float32, 1 thread; "
        f"synthetic sets: {n_train} train / {n_val} validation / {n_test} test rows. "
        f"torch {torch.__version__}, training seed(s) {args.seeds}; DensityEstimator "
        f"flow_options={flow_options or {}}.",
        "",
        "Test log-likelihood: nats per sample; known-density sets in their "
        "original space, digits and breast_cancer in their z-scored space. Gap: "
        "mean(log p - log q) over the test draws, an estimate of KL(p || q). Seconds: fit "
        "wall-clock on a shared 2-core machine (noisy; compare within a dataset).",
        "",
    ]
    if len(seeds) == 1:
        header += [
            "Single training seed: ± is the standard error over the test rows.",
            "",
            "| data | model | test log-lik | gap to truth | fit s | best epoch | epochs |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        header += [
            f"Each row: mean (standard deviation) over training seeds {args.seeds}; the data "
            "and split are the same for every seed.",
            "",
            "| data | model | test log-lik | gap to truth | per-seed gaps (or log-liks) | fit s |",
            "|---|---|---|---|---|---|",
        ]
    print("\n".join(header), flush=True)
    checks = []
    for key in ("U2", "U3", "U4"):
        if key in args.datasets.split(","):
            checks.append(f"log Z of {key} on the box by quadrature: {check_log_z(key):.6f} "
                          f"(used: {pf.datasets.LOG_Z[key]})")
    rows = []
    for name in args.datasets.split(","):
        if len(seeds) == 1:
            rows += evaluate(makers[name](), b, models, seeds[0], flow_options)
        else:
            rows += evaluate_seeds(makers[name](), b, models, seeds, flow_options)
    notes = ["", *checks, "", "Data: " + "; ".join(
        f"{k}: {v}" for k, v in (
            ("U2-U4", "Rezende energies, exact box draws"), ("mixture8", "8-D, 5 Gaussians"),
            ("banana6", "6-D rotated bananas"), ("student5", "5-D Student t, df 4"),
            ("digits", "64-D dequantized, 1200/150/447"),
            ("breast_cancer", "30-D log1p, 360/40/169"),
        )
    ) + "."]
    print("\n".join(notes), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows + notes) + "\n")


if __name__ == "__main__":
    sys.exit(main())
