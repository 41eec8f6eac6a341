"""Training speed of MAF and RealNVP stacks: pyroflows against Pyro, zuko and nflows.

Every library builds the same architecture: 5 layers on D = 8, conditioner hidden widths
(64, 64) with ReLU, order reversal between layers (a permutation layer or an alternating order /
mask, as each library does it), a standard normal base. A training step is
``zero_grad; (-log_prob(batch).mean()).backward(); Adam.step`` on a batch of 512, float32, with
a fresh batch tensor every step. The libraries are timed in interleaved rounds (each round times
every library once, in a shuffled order), so machine noise hits all of them alike.
The ``alt:`` rows are pyroflows with one design choice swapped back (see ``_PerLayerMADE``).

Rates are steps per second of process CPU time with one torch thread: on a quiet machine that
is the wall-clock rate, and on a shared one it leaves out the time spent waiting for a core.
Contention only ever slows a round down, so the best round estimates the undisturbed rate (as
``timeit`` advises) and the ratio to the fastest peer uses it; the median round and the
wall-clock median are printed too.

Run ``python -m benchmarks.speed`` (``--help`` for options). It prints a markdown table; it never
asserts times.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution

__all__ = ["LIBRARIES", "build_step", "measure", "main"]

DIM, NUM_LAYERS, HIDDEN, BATCH = 8, 5, (64, 64), 512

Step = Callable[[Tensor], None]


def _standard_normal(dim: int) -> Independent:
    return Independent(Normal(torch.zeros(dim), torch.ones(dim)), 1)


def _pyroflows(family: str, validate: bool = True) -> tuple[torch.nn.Module, Callable]:
    import pyroflows as pf

    flow = pf.flows.build(family, DIM, num_layers=NUM_LAYERS, hidden_dims=HIDDEN)
    dist = TransformedDistribution(_standard_normal(DIM), flow)

    def loss(x: Tensor) -> Tensor:
        with pf.validation(validate):
            return -dist.log_prob(x).mean()

    return flow, loss


# ---- design alternatives, to show the chosen one is the fastest found ----------------------
# pyroflows' MADE keeps every weight in one flat parameter with one mask product per call, and
# flows.build folds the permutation between layers into the next layer's order / mask. The
# variants below swap one of these choices back, everything else unchanged.


class _PerLayerMADE(torch.nn.Module):
    """The same network with one (weight, bias) parameter pair per layer, as Pyro, zuko and
    nflows store it. ``hook=False``: multiply each weight by its mask every call.
    ``hook=True``: keep masked entries at exactly zero and mask the *gradient* with a hook, so
    the forward pass has no multiply at all (valid while only the optimizer edits weights)."""

    def __init__(self, features: int, hidden_dims, hook: bool = False, **kwargs) -> None:
        super().__init__()
        from pyroflows.nn import MADE

        ref = MADE(features, hidden_dims, **kwargs)
        self.num_levels, self.hidden_dims, self.hook = ref.num_levels, ref.hidden_dims, hook
        self.register_buffer("degrees", ref.degrees)
        self.activation = ref.activation
        masks = ref.mask.split(ref._sizes)
        values = ref.flat_parameters.detach().split(ref._sizes)
        self.weights, self.biases = torch.nn.ParameterList(), torch.nn.ParameterList()
        for k, shape in enumerate(ref._shapes):
            mask, bias_mask = masks[2 * k].view(shape).clone(), masks[2 * k + 1].clone()
            self.register_buffer(f"mask{k}", mask)
            self.register_buffer(f"bias_mask{k}", bias_mask)
            weight = torch.nn.Parameter(values[2 * k].view(shape).clone())
            bias = torch.nn.Parameter(values[2 * k + 1].clone())
            if hook:
                weight.register_hook(lambda g, mask=mask: g * mask)
                bias.register_hook(lambda g, mask=bias_mask: g * mask)
            self.weights.append(weight)
            self.biases.append(bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        last = len(self.weights) - 1
        for k, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if not self.hook:
                weight = weight * getattr(self, f"mask{k}")
                bias = bias * getattr(self, f"bias_mask{k}")
            h = torch.nn.functional.linear(h, weight, bias)
            if k < last:
                h = self.activation(h)
        return h


def _pyroflows_variant(family: str, variant: str) -> tuple[torch.nn.Module, Callable]:
    from pyro.distributions.torch_transform import ComposeTransformModule

    import pyroflows as pf
    import pyroflows.transforms.autoregressive as ar

    if variant == "permute layers":
        parts = []
        for i in range(NUM_LAYERS):
            if i > 0:
                parts.append(pf.transforms.Permute.reverse(DIM))
            cls = pf.transforms.MAF if family == "maf" else pf.transforms.RealNVP
            parts.append(cls(DIM, hidden_dims=HIDDEN))
        flow = ComposeTransformModule(parts)
        dist = TransformedDistribution(_standard_normal(DIM), flow)
        return flow, lambda x: -dist.log_prob(x).mean()
    made = ar.MADE
    ar.MADE = lambda *a, **kw: _PerLayerMADE(*a, hook=variant == "grad hook", **kw)
    try:
        return _pyroflows(family)
    finally:
        ar.MADE = made


def _pyro(family: str) -> tuple[torch.nn.Module, Callable]:
    import pyro.distributions.transforms as T
    from pyro.nn import AutoRegressiveNN, DenseNN

    modules, parts = torch.nn.ModuleList(), []
    for i in range(NUM_LAYERS):
        if i > 0:
            parts.append(T.Permute(torch.arange(DIM - 1, -1, -1)))
        if family == "maf":
            # Pyro's MAF is AffineAutoregressive used through .inv: log_prob is one pass
            layer = T.AffineAutoregressive(
                AutoRegressiveNN(DIM, list(HIDDEN), permutation=torch.arange(DIM))
            )
            parts.append(layer.inv)
        else:
            split = DIM // 2
            layer = T.AffineCoupling(split, DenseNN(split, list(HIDDEN), [DIM - split] * 2))
            parts.append(layer)
        modules.append(layer)
    dist = TransformedDistribution(_standard_normal(DIM), parts)
    return modules, lambda x: -dist.log_prob(x).mean()


def _zuko(family: str) -> tuple[torch.nn.Module, Callable]:
    import zuko

    # zuko alternates the MADE order (MAF) or the coupling mask (RealNVP) between layers
    cls = zuko.flows.MAF if family == "maf" else zuko.flows.RealNVP
    flow = cls(DIM, transforms=NUM_LAYERS, hidden_features=HIDDEN)
    return flow, lambda x: -flow().log_prob(x).mean()


class _NflowsMLP(torch.nn.Module):
    """nflows' MLP, called the way its coupling layers call a network (with a context)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        from nflows.nn import nets

        self.net = nets.MLP((in_features,), (out_features,), hidden_sizes=list(HIDDEN))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def _nflows(family: str) -> tuple[torch.nn.Module, Callable]:
    from nflows import distributions, flows, transforms

    layers = []
    for i in range(NUM_LAYERS):
        if i > 0:
            layers.append(transforms.ReversePermutation(DIM))
        if family == "maf":
            # initial layer + num_blocks=1 feed-forward block + output = hidden (64, 64)
            layers.append(transforms.MaskedAffineAutoregressiveTransform(
                DIM, HIDDEN[0], num_blocks=len(HIDDEN) - 1, use_residual_blocks=False,
            ))
        else:
            mask = torch.arange(DIM) >= DIM // 2
            layers.append(transforms.AffineCouplingTransform(mask.int(), _NflowsMLP))
    flow = flows.Flow(transforms.CompositeTransform(layers),
                      distributions.StandardNormal((DIM,)))
    return flow, lambda x: -flow.log_prob(x).mean()


LIBRARIES: dict[str, Callable[[str], tuple[torch.nn.Module, Callable]]] = {
    "pyroflows": _pyroflows,
    "pyroflows (validation off)": lambda family: _pyroflows(family, validate=False),
    "pyro": _pyro,
    "zuko": _zuko,
    "nflows": _nflows,
}
PEERS = ("pyro", "zuko", "nflows")
VARIANTS: dict[str, Callable[[str], tuple[torch.nn.Module, Callable]]] = {
    "alt: per-layer weights, W*M each call": lambda f: _pyroflows_variant(f, "multiply"),
    "alt: per-layer, zeros + grad hook": lambda f: _pyroflows_variant(f, "grad hook"),
    "alt: Permute layers between": lambda f: _pyroflows_variant(f, "permute layers"),
}
LIBRARIES.update(VARIANTS)


def build_step(library: str, family: str, lr: float = 1e-3) -> Step:
    """One training step (zero_grad, backward, Adam step) for a library and family."""
    torch.manual_seed(0)
    module, loss_fn = LIBRARIES[library](family)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)

    def step(x: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()

    return step


def _batches(data: Tensor) -> Iterator[Tensor]:
    while True:
        for i in range(0, len(data) - BATCH + 1, BATCH):
            yield data[i:i + BATCH]


def measure(
    families: tuple[str, ...] = ("maf", "realnvp"),
    libraries: tuple[str, ...] = tuple(LIBRARIES),
    rounds: int = 9,
    steps: int = 30,
    warmup: int = 10,
) -> dict[tuple[str, str], dict]:
    """CPU-time and wall-clock steps per second of every (family, library), timed in
    interleaved rounds."""
    import pyroflows as pf

    data, _ = pf.datasets.gaussian_mixture(64 * BATCH, dim=DIM, seed=0)
    data = data.to(torch.get_default_dtype())
    runs = {}
    for family in families:
        for lib in libraries:
            step = build_step(lib, family)
            batches = _batches(data)
            for _ in range(warmup):
                step(next(batches))
            runs[family, lib] = {"step": step, "batches": batches, "cpu": [], "wall": []}
    order = list(runs)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            run = runs[key]
            xs = [next(run["batches"]) for _ in range(steps)]
            wall, cpu = time.perf_counter(), time.process_time()
            for x in xs:
                run["step"](x)
            run["cpu"].append(steps / (time.process_time() - cpu))
            run["wall"].append(steps / (time.perf_counter() - wall))
    for run in runs.values():
        del run["step"], run["batches"]
    return runs


def _table(runs: dict, families: tuple[str, ...], libraries: tuple[str, ...]) -> str:
    lines = [
        "| family | library | steps/s, best round | median round | wall-clock median "
        "| vs fastest peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for family in families:
        best = {lib: max(runs[family, lib]["cpu"]) for lib in libraries}
        peers = [best[lib] for lib in libraries if lib in PEERS]
        fastest_peer = max(peers) if peers else float("nan")
        for lib in libraries:
            run = runs[family, lib]
            lines.append(
                f"| {family} | {lib} | {best[lib]:.1f} | {statistics.median(run['cpu']):.1f} | "
                f"{statistics.median(run['wall']):.1f} | {best[lib] / fastest_peer:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    parser.add_argument("--families", nargs="+", default=["maf", "realnvp"])
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES),
                        choices=list(LIBRARIES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small matrices, shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    families, libraries = tuple(args.families), tuple(args.libraries)
    runs = measure(families, libraries, rounds=args.rounds, steps=args.steps,
                   warmup=args.warmup)
    command = " ".join(["python -m benchmarks.speed", *(sys.argv[1:] if argv is None else argv)])
    print(f"`{command}`")
    print()
    print(f"Training steps/s: {NUM_LAYERS} layers, D={DIM}, hidden {HIDDEN}, batch {BATCH}, "
          f"Adam, float32, CPU, {args.threads} torch thread(s); {args.rounds} interleaved "
          f"rounds of {args.steps} steps. Rates use process CPU time (contention on a shared "
          f"machine only slows a round down, so the best round is the estimate and the ratio "
          f"uses it); the last column is wall-clock.")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")
    print()
    print(_table(runs, families, libraries))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
