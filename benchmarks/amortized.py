"""Amortized flow posteriors in a VAE on binarized digits (issue 21): pyroflows' conditional
planar, radial and IAF guides against a diagonal Gaussian guide and against the same families
from Pyro's conditional transforms and zuko's conditional flows.

Run from the repository root (about 4 minutes of CPU per seed with the defaults)::

    python -m benchmarks.amortized --out benchmarks/results/amortized.md

Data: sklearn's ``load_digits`` (1797 images of 8 x 8 = 64 pixels), binarized at
pixel / 16 > 0.5, rows shuffled once with a fixed generator (seed 0); the last 297 are the
test set, the first 1500 the training set. The split is the same for every seed and row.

Model (every row): a VAE (Kingma & Welling) with a local latent z of size ``--latent`` (8),
p(z) = N(0, I), decoder ``Linear(d, 128) -> tanh -> Linear(128, 64)`` giving Bernoulli logits,
z and x inside ``pyro.plate("data", N, subsample_size=B)``. Guide (every row): the encoder
``Linear(64, 128) -> tanh -> Linear(128, H) -> tanh`` (H = 64) gives h; a linear head on h
gives loc and softplus scale of a diagonal Gaussian (scale 1 at h = 0 at initialisation); the
flow rows then apply K conditional layers fed h:

- ``gaussian``: ``dist.Normal(loc, scale).to_event(1)``, the plain Pyro idiom;
- ``pyroflows``: :class:`pyroflows.guides.AmortizedFlowGuide` (its Gaussian start is the same
  linear head, ``ConditionalElementwiseAffine``), family planar (K = 4, 16), radial (K = 16),
  iaf (K = 2), at its defaults: for planar and radial one network of h outputs all K layers'
  parameters (Rezende & Mohamed's inference network);
- ``pyroflows per-layer``: the same planar and radial guides with ``shared_network=False``,
  one network of h per layer (Pyro's layout);
- ``Pyro``: ``dist.ConditionalTransformedDistribution`` of the per-row Gaussian (a
  ``ConditionalDistribution``) and ``conditional_planar`` / ``conditional_radial`` /
  ``conditional_affine_autoregressive`` (Pyro's defaults otherwise: its IAF layers' random
  variable orders, clipped log-scales);
- ``zuko``: ``zuko.flows.MAF(d, H, transforms=K)`` used as an IAF (its transform is the
  sampling direction, one pass), on the same per-row Gaussian as base, scored by zuko's
  ``rsample_and_log_prob`` (wrapped as a Pyro distribution that scores its own draw from that
  pass). zuko has no planar or radial flow, so those rows have no zuko peer.

Network sizes are the same across libraries: planar and radial parameter networks
``H -> 80 -> 80 -> params`` (10 d, Pyro's and pyroflows' default; one network for all K
layers' parameters in the ``pyroflows`` rows, one per layer in the others), IAF MADEs of
hidden (64, 64), ReLU everywhere.

Training (every row, every seed): the decoder, encoder and (for a given seed) the whole
random stream are the same; ``--epochs`` epochs of N / B steps (B = ``--batch`` 100), each
step one subsample of the plate, ``Trace_ELBO(num_particles=--particles,
vectorize_particles=True).differentiable_loss`` minimized by one ``torch.optim.Adam`` (lr
``--lr``) over the model's and guide's parameters (the update ``SVI`` with
``pyro.optim.Adam`` makes). The rows are trained interleaved: each epoch trains every row
for one epoch in a freshly shuffled order (each row with its own saved random state, so its
run is the one it would have alone), and its seconds are process CPU time with one torch
thread (the machine is shared: CPU time, and interleaving, keep the load's drift out of the
comparison).

Evaluation, on the test images: S = ``--samples`` (2000) draws z_s ~ q(z | x) per image,
log w_s = log p(x, z_s) - log q(z_s | x) (q scored from the draw's own pass); test ELBO = the
mean of log w, test log-likelihood = logsumexp(log w) - log S (importance sampling with the
guide as proposal), gap = log-lik - ELBO (an estimate of KL(q(z | x) || p(z | x)), from
below: the importance-sampling log-likelihood is itself a lower bound in expectation), all
nats per image averaged over the test images. Each row: mean +- standard error over seeds.

The committed table ran its seeds as separate processes at the same time, each saving its
results (``--save-json``); ``--merge`` wrote the 3-seed table from them. One process with
``--seeds 0,1,2`` gives the same table (up to the timings) in more wall-clock.
``--profile`` times the parts of one training step per row instead (no table);
``--gap-split`` splits the Gaussian guide's gap into its amortization and approximation parts
(Cremer, Li & Duvenaud 2018) by fitting one Gaussian per test image (no table).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from torch import nn

import pyroflows as pf
from benchmarks import emit, peers

HIDDEN, CONTEXT, PIXELS, TEST = 128, 64, 64, 297
#: the settings that must agree between merged runs
SAME_ARGS = ("epochs", "batch", "latent", "lr", "particles", "samples", "threads", "stl")

#: (label, library, family, K): the rows of the table, in its order.
ROWS = [
    ("gaussian", "pyro", "gaussian", 0),
    ("planar K=4", "pyroflows", "planar", 4),
    ("planar K=4", "pyroflows per-layer", "planar", 4),
    ("planar K=4", "pyro", "planar", 4),
    ("planar K=16", "pyroflows", "planar", 16),
    ("planar K=16", "pyroflows per-layer", "planar", 16),
    ("planar K=16", "pyro", "planar", 16),
    ("radial K=16", "pyroflows", "radial", 16),
    ("radial K=16", "pyroflows per-layer", "radial", 16),
    ("radial K=16", "pyro", "radial", 16),
    ("iaf K=2", "pyroflows", "iaf", 2),
    ("iaf K=2", "pyro", "iaf", 2),
    ("iaf K=2", "zuko", "iaf", 2),
]
#: ``--stl``: the Gaussian and pyroflows' rows, each family with sticking the landing (the
#: guide's default) and without (``AmortizedFlowGuide(stick_the_landing=False)``).
STL_ROWS = [ROWS[0], ("gaussian", "pyroflows", "gaussian", 0)] + [
    (label, lib, family, k) for label, library, family, k in ROWS
    if library == "pyroflows" for lib in ("pyroflows", "pyroflows no STL")]
#: the rows' libraries that are peers outside pyroflows' dependencies (the ``[bench]`` extra):
#: a run leaves their rows out where the package is not installed
PEERS = ("zuko",)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The binarized digits, shuffled once (seed 0): (train (1500, 64), test (297, 64))."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data / 16.0 > 0.5, dtype=torch.float32)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    return x[:-TEST], x[-TEST:]


def flow_hidden(family: str, latent: int) -> tuple[int, ...]:
    return (64, 64) if family == "iaf" else (10 * latent, 10 * latent)


class GaussianHead(nn.Module, dist.ConditionalDistribution):
    """The per-row diagonal Gaussian q_0(z | h): (loc, rho) = W h + b, scale = softplus(rho),
    initialised as pyroflows' ``ConditionalElementwiseAffine`` (loc 0, scale 1 at h = 0)."""

    def __init__(self, context_dim: int, latent: int) -> None:
        super().__init__()
        self.latent = latent
        self.head = nn.Linear(context_dim, 2 * latent)
        with torch.no_grad():
            self.head.bias[:latent].zero_()
            self.head.bias[latent:].fill_(math.log(math.expm1(1.0)))

    def condition(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc, rho = self.head(h).split(self.latent, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(rho)).to_event(1)


class ZukoPosterior(dist.TorchDistribution):
    """A zuko ``NormalizingFlow`` of batch shape (N,) as a Pyro distribution: ``rsample`` is
    zuko's ``rsample_and_log_prob`` (the draw and its score from one pass), ``log_prob`` of
    that draw returns the score; ``expand`` adds leading batch dimensions (Pyro's particle
    plate), drawn as leading sample dimensions of the flow."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow, batch_shape: torch.Size, event_shape: torch.Size) -> None:
        self.flow, self._draw = flow, None
        super().__init__(batch_shape, event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None) -> ZukoPosterior:
        return ZukoPosterior(self.flow, torch.Size(batch_shape), self.event_shape)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        lead = self.batch_shape[: len(self.batch_shape) - len(self.flow.batch_shape)]
        x, log_q = self.flow.rsample_and_log_prob(torch.Size(sample_shape) + lead)
        self._draw = (x, log_q)
        return x

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._draw is not None and value is self._draw[0]:
            return self._draw[1]
        return self.flow.log_prob(value)


class Row:
    """One VAE and guide of the table, with its optimizer and its own random state."""

    def __init__(self, label: str, library: str, family: str, k: int, seed: int,
                 args: argparse.Namespace, n_train: int) -> None:
        self.label, self.library, self.family, self.k = label, library, family, k
        self.name = f"{library}:{label}"
        d, batch = args.latent, args.batch
        torch.manual_seed(seed)
        self.decoder = nn.Sequential(nn.Linear(d, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, PIXELS))
        self.encoder = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.Tanh(),
                                     nn.Linear(HIDDEN, CONTEXT), nn.Tanh())
        hidden = flow_hidden(family, d)
        self.pf_guide = None
        if library.startswith("pyroflows"):
            layout = {"shared_network": False} if library == "pyroflows per-layer" else {}
            if family == "gaussian":  # the per-row Gaussian alone (its linear head on h)
                family, layout = pf.flows.ConditionalElementwiseAffine(d, CONTEXT), {
                    "gaussian": False}
            self.pf_guide = pf.guides.AmortizedFlowGuide(
                self.encoder, d, family, context_dim=CONTEXT, num_layers=k, hidden_dims=hidden,
                subsample_size=batch, name=self.name + ":guide",
                stick_the_landing=library != "pyroflows no STL", **layout)
            self.guide_module: nn.Module = self.pf_guide
            self.posterior: Callable = self.pf_guide.get_posterior
        else:
            head = GaussianHead(CONTEXT, d)
            if library == "zuko":
                import zuko

                maf = zuko.flows.MAF(d, CONTEXT, transforms=k, hidden_features=hidden)
                self.guide_module = nn.ModuleList([self.encoder, head, maf])

                def posterior(x, head=head, maf=maf):
                    h = self.encoder(x)
                    base = head.condition(h)
                    # maf.transform(h) maps the base to z in one pass (IAF); the flow's
                    # transform is z -> base
                    flow = zuko.distributions.NormalizingFlow(maf.transform(h).inv, base)
                    return ZukoPosterior(flow, base.batch_shape, base.event_shape)
            elif family == "gaussian":
                self.guide_module = nn.ModuleList([self.encoder, head])

                def posterior(x, head=head):
                    return head.condition(self.encoder(x))
            else:
                make = {"planar": T.conditional_planar, "radial": T.conditional_radial,
                        "iaf": T.conditional_affine_autoregressive}[family]
                layers = nn.ModuleList([make(d, CONTEXT, hidden_dims=list(hidden))
                                        for _ in range(k)])
                q = dist.ConditionalTransformedDistribution(head, list(layers))
                self.guide_module = nn.ModuleList([self.encoder, head, layers])

                def posterior(x, q=q):
                    return q.condition(self.encoder(x))
            self.posterior = posterior
        self.params = list(self.decoder.parameters()) + list(self.guide_module.parameters())
        self.optim = torch.optim.Adam(self.params, lr=args.lr)
        self.elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True,
                               max_plate_nesting=1)
        self.latent, self.batch, self.n_train = d, batch, n_train
        self.rng = torch.get_rng_state()
        self.seconds: list[float] = []

    def model(self, x: torch.Tensor) -> None:
        pyro.module(self.name + ":decoder", self.decoder)
        with pyro.plate("data", x.shape[0], subsample_size=self.batch) as rows:
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x[rows])

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        if self.pf_guide is not None:
            return self.pf_guide(x)
        pyro.module(self.name + ":guide", self.guide_module)
        with pyro.plate("data", x.shape[0], subsample_size=self.batch) as rows:
            return pyro.sample("z", self.posterior(x[rows]))

    def epoch(self, x: torch.Tensor) -> float:
        """One epoch (N / B steps); its process CPU seconds. Returns the mean loss per image."""
        torch.set_rng_state(self.rng)
        total = 0.0
        start = time.process_time()
        for _ in range(self.n_train // self.batch):
            self.optim.zero_grad(set_to_none=True)
            loss = self.elbo.differentiable_loss(self.model, self.guide, x) / self.n_train
            loss.backward()
            self.optim.step()
            total += loss.item()
        self.seconds.append(time.process_time() - start)
        self.rng = torch.get_rng_state()
        return total / (self.n_train // self.batch)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, samples: int, chunk: int) -> tuple[float, float]:
        """(test ELBO, test log-likelihood by importance sampling), nats per image."""
        log_w = []
        prior = dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1)
        for start in range(0, samples, chunk):
            q = self.posterior(x)
            z = q.rsample((min(chunk, samples - start),))
            log_q = q.log_prob(z)
            log_lik = dist.Bernoulli(logits=self.decoder(z)).to_event(1).log_prob(x)
            log_w.append(prior.log_prob(z) + log_lik - log_q)
        log_w = torch.cat(log_w).double()
        elbo = log_w.mean(0)
        log_lik = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
        return elbo.mean().item(), log_lik.mean().item()


def run_seed(seed: int, args, train, test, log) -> dict[tuple[str, str], dict]:
    pyro.clear_param_store()
    rows = [Row(*spec, seed=seed, args=args, n_train=train.shape[0]) for spec in _rows(args)]
    order = random.Random(seed)
    wall = time.perf_counter()
    for epoch in range(args.epochs):
        shuffled = list(rows)
        order.shuffle(shuffled)
        losses = {row.name: row.epoch(train) for row in shuffled}
        if epoch % max(1, args.epochs // 5) == 0 or epoch == args.epochs - 1:
            log(f"seed {seed} epoch {epoch + 1}/{args.epochs} ({time.perf_counter() - wall:.0f} s)"
                ": " + ", ".join(f"{n} {v:.2f}" for n, v in losses.items()))
    out = {}
    for row in rows:
        torch.manual_seed(10_000 + seed)
        elbo, log_lik = row.evaluate(test, args.samples, args.chunk)
        per_epoch = float(np.mean(row.seconds[1:] if len(row.seconds) > 1 else row.seconds))
        out[(row.label, row.library)] = {"elbo": elbo, "ll": log_lik, "gap": log_lik - elbo,
                                         "sec": per_epoch}
        log(f"seed {seed} {row.name}: ELBO {elbo:.3f} log-lik {log_lik:.3f} "
            f"gap {log_lik - elbo:.3f} s/epoch {per_epoch:.3f}")
    return out


def profile(args, train, log) -> list[str]:
    """Where a training step's time goes, per row: the whole step (Pyro's
    ``Trace_ELBO.differentiable_loss`` + backward + Adam), the same loss written by hand
    without Pyro (encoder, ``posterior(x).rsample`` and ``log_prob``, decoder, backward,
    Adam), the guide's distribution alone (``posterior(x)``: encoder, conditioning,
    draw and score, backward of the score), and the planar/radial layers' parameter networks
    alone (forward and backward on the encoder's h), each of these with Adam's update of the
    parameters it reaches, and Adam's update of all the row's parameters alone; the guide
    step's aten operations and backward nodes (torch.profiler). Process CPU milliseconds
    per step, the best of ``--profile-rounds`` rounds of 15 steps, the rows interleaved in a
    shuffled order."""
    rows = [Row(*spec, seed=0, args=args, n_train=train.shape[0]) for spec in _installed(ROWS)]
    n, b = train.shape[0], args.batch

    def by_hand(row):
        xb = train[torch.randperm(n)[:b]]
        q = row.posterior(xb)
        z = q.rsample((args.particles,))
        log_lik = dist.Bernoulli(logits=row.decoder(z)).to_event(1).log_prob(xb)
        prior = dist.Normal(z.new_zeros(row.latent), 1.0).to_event(1).log_prob(z)
        return -(prior + log_lik - q.log_prob(z)).mean()

    def guide_only(row):
        xb = train[torch.randperm(n)[:b]]
        q = row.posterior(xb)
        return q.log_prob(q.rsample((args.particles,))).mean()

    def pyro_step(row):
        return row.elbo.differentiable_loss(row.model, row.guide, train) / n

    def networks_only(row):
        # the planar/radial layers' parameter networks alone, on the encoder's (fixed) h
        nets = [m for m in row.guide_module.modules()
                if type(m).__name__ in ("DenseNetwork", "DenseNN")]
        h = row.encoder(train[torch.randperm(n)[:b]]).detach().requires_grad_()
        outs = [net(h) for net in nets]
        flat = [t for o in outs for t in (o if isinstance(o, tuple) else (o,))]
        return sum(t.sum() for t in flat) if flat else h.sum()

    def adam_only(row):
        # Adam's update of every parameter of the row (the gradients set to ones)
        for p in row.params:
            p.grad = torch.ones_like(p)
        return torch.zeros((), requires_grad=True)

    kinds = {"step": pyro_step, "by hand": by_hand, "guide alone": guide_only,
             "parameter networks alone": networks_only, "Adam alone": adam_only}
    best = {(r.name, k): float("inf") for r in rows for k in kinds}
    order = random.Random(0)
    for _ in range(args.profile_rounds):
        cases = [(r, k) for r in rows for k in kinds]
        order.shuffle(cases)
        for row, kind in cases:
            start = time.process_time()
            for _ in range(15):
                row.optim.zero_grad(set_to_none=True)
                kinds[kind](row).backward()
                row.optim.step()
            best[(row.name, kind)] = min(best[(row.name, kind)],
                                         (time.process_time() - start) / 15)
    ops = {}
    for row in rows:  # the guide's step: aten operations and backward nodes (torch.profiler)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                guide_only(row).backward()
        events = prof.key_averages()
        ops[row.name] = (sum(e.count for e in events if e.key.startswith("aten::")) / 5,
                         sum(e.count for e in events if "Backward" in e.key
                             and not e.key.startswith("autograd::")) / 5)
    lines = ["| posterior | library | step (Pyro SVI loss) | same loss by hand | guide alone | "
             "parameter networks alone | Adam alone | guide: aten ops / backward nodes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{1e3 * best[(r.name, k)]:.2f} ms" for k in kinds]
        if r.family not in ("planar", "radial"):
            cells[3] = "-"
        lines.append(f"| {r.label} | {r.library} | " + " | ".join(cells)
                     + f" | {ops[r.name][0]:.0f} / {ops[r.name][1]:.0f} |")
    log("\n".join(lines))
    return lines


def gap_split(args, train, test, seed: int) -> list[str]:
    """The Gaussian guide's gap split in two (Cremer et al. 2018): train the Gaussian row
    alone (same settings), then fit one diagonal Gaussian per test image (decoder fixed;
    started at the encoder's; Adam 1e-2, 2000 steps of 32 draws): amortization gap = its
    ELBO - the amortized ELBO; approximation gap = log-lik - its ELBO, the most any
    posterior richer than the Gaussian family can recover beyond amortization."""
    row = Row(*ROWS[0], seed=seed, args=args, n_train=train.shape[0])
    for _ in range(args.epochs):
        row.epoch(train)
    torch.manual_seed(10_000 + seed)
    elbo, log_lik = row.evaluate(test, args.samples, args.chunk)
    for p in row.params:
        p.requires_grad_(False)
    start = row.posterior(test).base_dist
    loc = start.loc.clone().requires_grad_()
    log_scale = start.scale.log().clone().requires_grad_()
    optim = torch.optim.Adam([loc, log_scale], lr=1e-2)
    prior = dist.Normal(test.new_zeros(args.latent), 1.0).to_event(1)

    def log_w(q, z):
        log_lik = dist.Bernoulli(logits=row.decoder(z)).to_event(1).log_prob(test)
        return prior.log_prob(z) + log_lik - q.log_prob(z)

    for _ in range(2000):
        q = dist.Normal(loc, log_scale.exp()).to_event(1)
        optim.zero_grad()
        (-log_w(q, q.rsample((32,))).mean(0).sum()).backward()
        optim.step()
    with torch.no_grad():
        q = dist.Normal(loc, log_scale.exp()).to_event(1)
        w = torch.cat([log_w(q, q.sample((args.chunk,)))
                       for _ in range(args.samples // args.chunk)]).double()
    best = w.mean(0).mean().item()
    best_ll = (torch.logsumexp(w, 0) - math.log(w.shape[0])).mean().item()
    return [f"seed {seed}: amortized Gaussian ELBO {elbo:.3f}, log-lik {log_lik:.3f} (gap "
            f"{log_lik - elbo:.3f}); per-image best Gaussian ELBO {best:.3f} (its log-lik "
            f"{best_ll:.3f}): amortization gap {best - elbo:.3f}, approximation gap "
            f"{log_lik - best:.3f} nats per image"]


def _ms(values: list[float], digits: int = 2) -> str:
    m = float(np.mean(values))
    if len(values) < 2:
        return f"{m:.{digits}f}"
    se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def _installed(rows: list[tuple]) -> list[tuple]:
    """``rows`` less those of a peer (:data:`PEERS`) that is not installed."""
    return [r for r in rows if r[1] not in PEERS or peers.available(r[1])]


def _rows(args) -> list[tuple]:
    """The rows of this run: :data:`STL_ROWS` with ``--stl``, else :data:`ROWS`; a peer's
    rows only where it is installed."""
    return _installed(STL_ROWS if getattr(args, "stl", False) else ROWS)


def _shown(results: list[dict], args) -> list[tuple]:
    """The rows of the table: those of :data:`STL_ROWS` (``--stl``) or :data:`ROWS` that
    every seed's results hold (a run leaves a missing peer's rows out; ``--merge``d runs
    hold what their machines had)."""
    return [r for r in (STL_ROWS if getattr(args, "stl", False) else ROWS)
            if all((r[0], r[1]) in res for res in results)]


def stl_summary(results: list[dict]) -> list[str]:
    """Per family, sticking the landing (pyroflows' default) against the same guide without
    it: the paired differences of test log-lik and gap (mean ± standard error over seeds)
    and the ratio of seconds per epoch; then each flow against the Gaussian, both with it."""
    lines = ["Sticking the landing against the same guide without it (per-seed differences, "
             "mean ± standard error; gap cut = the gap without minus the gap with; the "
             "Gaussian without it is Pyro's idiom, the same head on h):", ""]
    for label, lib, _, _ in STL_ROWS:
        if lib != "pyroflows":
            continue
        on = [r[(label, lib)] for r in results]
        off = [r[(label, "pyro" if label == "gaussian" else "pyroflows no STL")]
               for r in results]
        gain = [a["ll"] - b["ll"] for a, b in zip(on, off, strict=True)]
        elbo = [a["elbo"] - b["elbo"] for a, b in zip(on, off, strict=True)]
        cut = [b["gap"] - a["gap"] for a, b in zip(on, off, strict=True)]
        cost = [a["sec"] / b["sec"] for a, b in zip(on, off, strict=True)]
        lines.append(f"- {label}: test ELBO {_ms(elbo)}, test log-lik {_ms(gain)} "
                     f"({_clear(gain)}), gap cut {_ms(cut)} ({_clear(cut)}); seconds per "
                     f"epoch {_ms(cost)}x")
    base = [r[("gaussian", "pyroflows")] for r in results]
    lines += ["", "With sticking the landing on both sides, each flow against the Gaussian "
              "(gain = log-lik minus the Gaussian's; gap cut = the Gaussian's gap minus the "
              "flow's):", ""]
    for label, lib, _, _ in STL_ROWS:
        if lib != "pyroflows" or label == "gaussian":
            continue
        on = [r[(label, lib)] for r in results]
        gain = [a["ll"] - b["ll"] for a, b in zip(on, base, strict=True)]
        cut = [b["gap"] - a["gap"] for a, b in zip(on, base, strict=True)]
        lines.append(f"- {label}: gain {_ms(gain)} ({_clear(gain)}), gap cut {_ms(cut)} "
                     f"({_clear(cut)})")
    return lines


def table(results: list[dict], args) -> list[str]:
    if getattr(args, "stl", False):
        keys = [(label, lib) for label, lib, _, _ in _shown(results, args)]
        col = {k: {m: [r[k][m] for r in results] for m in ("elbo", "ll", "gap", "sec")}
               for k in keys}
        lines = ["| posterior | library | test ELBO | test log-lik | gap | s / epoch |",
                 "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {k[0]} | {k[1]} | {_ms(col[k]['elbo'])} | {_ms(col[k]['ll'])} | "
                  f"{_ms(col[k]['gap'])} | {_ms(col[k]['sec'], 3)} |" for k in keys]
        return lines + [""] + stl_summary(results)
    keys = [(label, lib) for label, lib, _, _ in _shown(results, args)]
    col = {k: {m: [r[k][m] for r in results] for m in ("elbo", "ll", "gap", "sec")}
           for k in keys}
    lines = ["| posterior | library | test ELBO | test log-lik | gap | s / epoch |",
             "|---|---|---:|---:|---:|---:|"]
    for k in keys:
        c = col[k]
        lines.append(f"| {k[0]} | {k[1]} | {_ms(c['elbo'])} | {_ms(c['ll'])} | {_ms(c['gap'])} "
                     f"| {_ms(c['sec'], 3)} |")
    base = col[("gaussian", "pyro")]
    lines += ["", "Against the Gaussian guide and the peers (means over seeds; gain = log-lik "
              "minus the Gaussian's, gap cut = the Gaussian's gap minus the row's; speed = the "
              "peer's seconds per epoch over pyroflows'; each a mean ± standard error of the "
              "per-seed differences or ratios, the same seed giving every row the same data "
              "stream and networks at the start). Goal, per family: a clear gain (mean above 2 "
              "standard errors) in test log-lik and a clearly smaller gap than the Gaussian, a "
              "log-lik at least the peer's, and 2x the peer's speed per epoch:", ""]
    for label, lib, _, _ in _shown(results, args):
        if lib != "pyroflows":
            continue
        ours = col[(label, lib)]
        gain = [a - b for a, b in zip(ours["ll"], base["ll"], strict=True)]
        gap_cut = [b - a for a, b in zip(ours["gap"], base["gap"], strict=True)]
        parts = [f"- {label}: log-lik gain over the Gaussian {_ms(gain)} nats, gap "
                 f"{_ms(gap_cut)} nats smaller"]
        verdict = [f"gain {_clear(gain)}", f"smaller gap {_clear(gap_cut)}"]
        if (label, "pyroflows per-layer") in col:
            p = col[(label, "pyroflows per-layer")]
            ratio = [a / b for a, b in zip(p["sec"], ours["sec"], strict=True)]
            diff = [a - b for a, b in zip(ours["ll"], p["ll"], strict=True)]
            parts.append(f"against one network per layer: log-lik {_ms(diff)}, their seconds "
                         f"per epoch over ours {_ms(ratio)}x")
        for peer in ("pyro", "zuko"):
            if (label, peer) not in col:
                continue
            p = col[(label, peer)]
            pgain = [a - b for a, b in zip(p["ll"], base["ll"], strict=True)]
            ratio = [a / b for a, b in zip(p["sec"], ours["sec"], strict=True)]
            diff = [a - b for a, b in zip(ours["ll"], p["ll"], strict=True)]
            parts.append(f"{peer}'s gain {_ms(pgain)} (ours minus {peer}'s log-lik "
                         f"{_ms(diff)}), {peer} / pyroflows seconds per epoch {_ms(ratio)}x")
            at_least = ("met" if np.mean(diff) >= 0 else
                        "not met, within 2 se" if _clear(diff) == "not clear" else "not met")
            verdict += [f"log-lik at least {peer}'s {at_least}",
                        f"2x {peer}'s speed {'met' if np.mean(ratio) >= 2 else 'not met'}"
                        f" ({np.mean(ratio):.2f}x)"]
        lines.append("; ".join(parts) + ". Goal: " + "; ".join(verdict) + ".")
    return lines


def _clear(values: list[float]) -> str:
    """'clear' where the mean is positive and more than 2 standard errors from zero."""
    m = float(np.mean(values))
    if len(values) < 2:
        return "positive (one seed)" if m > 0 else "not met"
    se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return "clear" if m > 2 * se else ("not met" if m <= -2 * se else "not clear")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amortized",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--samples", type=int, default=2000, help="importance samples / image")
    parser.add_argument("--chunk", type=int, default=250, help="importance samples per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--save-json", default=None, help="also save the per-seed results")
    parser.add_argument("--merge", default=None,
                        help="comma-separated --save-json files (seeds run as separate "
                             "processes): write their table, train nothing")
    parser.add_argument("--profile", action="store_true",
                        help="only time the parts of a training step per row (no table)")
    parser.add_argument("--profile-rounds", type=int, default=7)
    parser.add_argument("--stl", action="store_true",
                        help="the Gaussian and pyroflows' rows, each without and with "
                             "sticking the landing, and their comparison")
    parser.add_argument("--gap-split", action="store_true",
                        help="only split the Gaussian guide's gap into amortization and "
                             "approximation gaps, per seed (no table)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    train, test = digits()
    if not (args.gap_split or args.merge):  # (--gap-split trains the Gaussian row alone)
        peers.note_missing(PEERS)
    if args.profile:
        lines = profile(args, train, lambda m: None)
        print("\n".join(lines))
        return
    if args.gap_split:
        for seed in seeds:
            print("\n".join(gap_split(args, train, test, seed)), flush=True)
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    command = "python -m benchmarks.amortized " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)
    commands = [command]
    if args.merge:
        # seeds run as separate processes (each one interleaves its rows): one table
        results, commands, seed_list = [], [], []
        for path in args.merge.split(","):
            with open(path) as f:
                saved = json.load(f)
            same = {k: saved["args"].get(k, False) for k in SAME_ARGS}  # (no "stl" before)
            if not commands:  # the table's settings: the first run's
                vars(args).update(same)
            elif any(same[k] != getattr(args, k) for k in same):
                raise ValueError(f"{path} was run with other settings: {same}")
            commands.append(saved["command"])
            seed_list += saved["args"]["seeds"].split(",")
            results += [{tuple(k.split("|")): v for k, v in r.items()}
                        for r in saved["results"]]
        commands.append(command)
        args.seeds, seeds = ",".join(seed_list), [int(s) for s in seed_list]
    else:
        results = [run_seed(seed, args, train, test, log) for seed in seeds]
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump({"command": command, "args": vars(args),
                       "results": [{"|".join(k): v for k, v in r.items()} for r in results]},
                      f, indent=1)
    lines = [
        "# Amortized flow posteriors: a VAE on binarized digits (issue 21)",
        "",
        *[f"`{c}`" + ("  " if i < len(commands) - 1 else "") for i, c in enumerate(commands)],
        "",
        f"Binarized `load_digits` (pixel / 16 > 0.5), {train.shape[0]} train / "
        f"{test.shape[0]} test images (fixed shuffle, seed 0). VAE: latent d = {args.latent}, "
        f"p(z) = N(0, I), decoder d -> {HIDDEN} (tanh) -> 64 Bernoulli logits; encoder "
        f"64 -> {HIDDEN} (tanh) -> h of {CONTEXT} (tanh); every guide starts from the per-row "
        "diagonal Gaussian of a linear head on h, the flows' layers are fed h (planar/radial "
        "parameter networks h -> 80 -> 80: pyroflows one for all K layers, its default, "
        "'per-layer' and Pyro one per layer; IAF MADEs (64, 64), ReLU). Same initial networks, "
        f"random stream, {args.epochs} epochs of {train.shape[0] // args.batch} steps "
        f"(subsample {args.batch} of the data plate), Adam lr {args.lr}, "
        f"Trace_ELBO(num_particles={args.particles}, vectorize_particles=True) for every row; "
        f"seeds {args.seeds}; float32, {args.threads} torch thread(s), torch "
        f"{torch.__version__}, pyro {pyro.__version__}, zuko {peers.version('zuko')}.",
        "",
        f"Test ELBO and log-likelihood: nats per image, from {args.samples} draws of the guide "
        "per test image (log-lik = log mean exp of the importance weights); gap = log-lik - "
        "ELBO. s / epoch: process CPU seconds per training epoch (the first epoch left out), "
        "rows trained interleaved in a shuffled order every epoch, on the shared 2-core "
        f"machine. Each cell: mean ± standard error over {len(seeds)} seed(s).",
        "",
        *table(results, args),
        "",
        "Per seed (ELBO / log-lik / s per epoch):",
        "",
    ]
    for label, lib, _, _ in _shown(results, args):
        lines.append(f"- {label} {lib}: " + "; ".join(
            f"{r[(label, lib)]['elbo']:.2f} / {r[(label, lib)]['ll']:.2f} / "
            f"{r[(label, lib)]['sec']:.3f}" for r in results))
    emit(lines, args.out)


if __name__ == "__main__":
    main()
