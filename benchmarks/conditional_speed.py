"""Speed of pyroflows' conditional IAF and MAF against Pyro's
``conditional_affine_autoregressive`` and zuko's ``MAF(context=...)`` (issue 21).

Items, each timed in ONE process with the libraries interleaved (every round times every case
once, in a shuffled order), B = 256 contexts of size C = 16, 5 layers of hidden (64, 64), ReLU,
at D = 8 and 32:

1. IAF sample + score + backward: draw z (B, D), x = t(z) through the 5 conditioned layers,
   log q(x | c) from the same pass (each library's cache), ``(-log q).mean().backward()`` to
   the parameters and the context (an amortized guide's step);
2. MAF log_prob + backward: ``(-log p(y | c)).mean().backward()`` of B rows.

pyroflows runs its 5 conditioned layers with alternating orders (the stacks' folded
permutations) through ``run_parts`` (one fused node for the run; ``alt: one node per layer``
composes them through torch's ``TransformedDistribution`` instead). Pyro: its conditional
transforms in a ``ConditionalTransformedDistribution``; zuko: ``MAF(context=C)`` (its IAF is the
inverse of its transform, ``Flow(maf.transform.inv, maf.base)``). Rates are per second of
process CPU time with one thread; the best of the rounds, with the ratio of the peers' best to
ours. Run: ``python benchmarks/conditional_speed.py [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import random
import time

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch.distributions import Independent, Normal

import pyroflows as pf
from pyroflows._fast import run_parts

try:
    from benchmarks import peers
except ImportError:  # run as a script, ``python benchmarks/conditional_speed.py``
    import peers

B, C, LAYERS, HIDDEN = 256, 16, 5, (64, 64)


def _ours(kind: str, dim: int):
    ctor = pf.transforms.conditional_iaf if kind == "iaf" else pf.transforms.conditional_maf
    layers = [ctor(dim, C, hidden_dims=HIDDEN,
                   order=list(range(dim)) if k % 2 == 0 else list(range(dim))[::-1])
              for k in range(LAYERS)]
    pf.testing.randomize_parameters_(torch.nn.ModuleList(layers), scale=0.05)
    return layers


def _base(dim):
    return Independent(Normal(torch.zeros(dim), torch.ones(dim)), 1)


def case_iaf_ours(dim):
    layers = _ours("iaf", dim)
    base = _base(dim)
    params = [p for m in layers for p in m.parameters()]

    def step(c):
        parts = [m.condition(c) for m in layers]
        z = torch.randn(B, dim)
        x, log_det = run_parts(parts, z, inverse=False)
        # x would go on to the model; the guide's term: -log q(x | c) from the same pass
        assert x.shape == z.shape
        (-(base.log_prob(z) - log_det).mean()).backward()
    return step, params


def case_iaf_ours_per_layer(dim):
    layers = _ours("iaf", dim)
    base = _base(dim)
    params = [p for m in layers for p in m.parameters()]

    def step(c):
        q = torch.distributions.TransformedDistribution(base, [m.condition(c) for m in layers])
        x = q.rsample()
        (-q.log_prob(x).mean()).backward()
    return step, params


def case_iaf_pyro(dim):
    layers = [T.conditional_affine_autoregressive(dim, C, hidden_dims=list(HIDDEN))
              for _ in range(LAYERS)]
    base = _base(dim)
    q = dist.ConditionalTransformedDistribution(base, layers)
    params = [p for m in layers for p in m.parameters()]

    def step(c):
        d = q.condition(c)
        x = d.rsample(torch.Size([B]))  # c's rows broadcast with the draws' batch
        (-d.log_prob(x).mean()).backward()
    return step, params


def case_iaf_zuko(dim):
    import zuko

    maf = zuko.flows.MAF(dim, C, transforms=LAYERS, hidden_features=HIDDEN)
    flow = zuko.flows.Flow(maf.transform.inv, maf.base)
    params = list(maf.parameters())

    def step(c):
        x, log_q = flow(c).rsample_and_log_prob()
        (-log_q.mean()).backward()
    return step, params


def case_maf_ours(dim):
    layers = _ours("maf", dim)
    base = _base(dim)
    params = [p for m in layers for p in m.parameters()]
    y = torch.randn(B, dim)

    def step(c):
        parts = [m.condition(c) for m in layers]
        z, log_det = run_parts(parts, y, inverse=True)
        (-(base.log_prob(z) + log_det).mean()).backward()
    return step, params


def case_maf_pyro(dim):
    # Pyro's autoregressive transform: forward = sampling, inverse (log_prob) D passes; its
    # MAF is the inverse of the transform, so log_prob is one pass per layer
    layers = [T.conditional_affine_autoregressive(dim, C, hidden_dims=list(HIDDEN))
              for _ in range(LAYERS)]
    base = _base(dim)
    params = [p for m in layers for p in m.parameters()]
    y = torch.randn(B, dim)

    def step(c):
        z, log_det = y, 0.0
        for m in reversed(layers):  # y -> z by each layer's one-pass map, the inverse's log-det
            t = m.condition(c)
            z_next = t(z)
            log_det = log_det + t.log_abs_det_jacobian(z, z_next)
            z = z_next
        (-(base.log_prob(z) + log_det).mean()).backward()
    return step, params


def case_maf_zuko(dim):
    import zuko

    maf = zuko.flows.MAF(dim, C, transforms=LAYERS, hidden_features=HIDDEN)
    params = list(maf.parameters())
    y = torch.randn(B, dim)

    def step(c):
        (-maf(c).log_prob(y).mean()).backward()
    return step, params


CASES = {
    "iaf": [("pyroflows", case_iaf_ours), ("alt: one node per layer", case_iaf_ours_per_layer),
            ("pyro", case_iaf_pyro), ("zuko", case_iaf_zuko)],
    "maf": [("pyroflows", case_maf_ours), ("pyro", case_maf_pyro), ("zuko", case_maf_zuko)],
}
#: the cases' libraries outside pyroflows' dependencies (the ``[bench]`` extra): their cases
#: are left out where the package is not installed
PEERS = ("zuko",)


def installed_cases() -> dict[str, list]:
    """:data:`CASES` less those of a peer that is not installed."""
    return {item: [(name, make) for name, make in cases
                   if name not in PEERS or peers.available(name)]
            for item, cases in CASES.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    peers.note_missing(PEERS, "cases are left out")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    for item, cases in installed_cases().items():
        for dim in (8, 32):
            built = []
            for name, make in cases:
                step, params = make(dim)
                built.append((name, step, params))
            contexts = torch.randn(B, C)
            best = {name: float("inf") for name, _, _ in built}
            for _ in range(args.rounds):
                order = list(built)
                random.shuffle(order)
                for name, step, params in order:
                    c = contexts.clone().requires_grad_(True)
                    step(c)  # warm
                    start = time.process_time()
                    for _ in range(args.steps):
                        for p in params:
                            p.grad = None
                        step(c)
                    best[name] = min(best[name], (time.process_time() - start) / args.steps)
            ours = best["pyroflows"]
            print(f"{item} D={dim}: " + ", ".join(
                f"{name} {1e3 * t:.2f} ms ({t / ours:.2f}x)" for name, t in best.items()))


if __name__ == "__main__":
    main()
