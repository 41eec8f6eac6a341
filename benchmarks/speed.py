"""Speed of pyroflows against Pyro, zuko and nflows on the same architectures (issue 9).

Items, each timed in ONE process with the libraries interleaved (every round times every case
once, in a shuffled order), so machine noise hits all of them alike:

1. MAF density training step (``zero_grad; (-log_prob(batch).mean()).backward(); Adam.step``,
   batch 512, a fresh batch every step), 5 layers, at D=8 with hidden (64, 64) and at D=64 with
   hidden (256, 256), ReLU, order reversal between layers (a permutation layer or an
   alternating order, as each library does it), standard normal base (each library's own way
   of writing the density: Pyro ``TransformedDistribution(Independent(Normal))``, zuko
   ``flow().log_prob``, nflows ``Flow.log_prob``, pyroflows
   ``pyroflows.distributions.FlowDistribution(flow)``, whose base is its ``StandardNormal``);
2. RealNVP training step, same sizes (alternating coupling masks);
3. an SVI step (the reparameterized ELBO, 8 vectorized particles, ``pyro.optim.Adam``) on the
   German credit logistic regression: ``pyroflows.guides.AutoIAF`` against Pyro's
   ``AutoIAFNormal``, 2 IAF layers of hidden (64, 64) each (ours adds its final diagonal
   affine layer and the fixed Laplace layer); ours through ``FlowELBO`` (its direct path) and,
   as ``alt: Trace_ELBO``, through Pyro's ``Trace_ELBO``, Pyro's through ``Trace_ELBO``;
4. an SVI step on the Rezende U1 energy: ``AutoPlanar`` with 32 layers against Pyro's
   ``AutoNormalizingFlow`` over 32 ``planar`` layers;
5. sampling throughput at D=64, 10k draws, 5 layers of hidden (256, 256): IAF (one pass per
   layer) and MAF (D passes per layer for the peers; pyroflows goes level by level and
   computes each hidden unit once, about one pass of arithmetic, which its GFLOP/s counts);
   and NSF (8 bins, MAF's direction, 1k draws) against zuko's NSF and pyroflows' own plain
   passes (``alt: plain passes``, a full pass a level);
6. Tabak fit steps/s on 20k x 10 data (no peer implements it).

The ``alt:`` rows are pyroflows with one design choice swapped back (see ``_PerLayerMADE``;
``alt: plain kernels`` turns the fused kernels off, ``FlowStack.fused = False``, so every layer
runs its plain differentiable operations; ``alt: TransformedDistribution(...)`` scores the same
stack through torch's ``TransformedDistribution`` over an ``Independent(Normal)`` base, as
the peers' Pyro row does); ``pyroflows (compile)`` (``--compile``) is
``build(..., compile=True)``. ``pyroflows DensityEstimator.fit's step`` (items 1-2) is the
step ``DensityEstimator.fit`` itself runs, what its users get: its model (the standardized rows
through the layers, with the estimator's log-scale bound, to the learnable Cholesky base), its
fused Adam, gradient clipping and parameter averaging. In items 3-4 our guides hand their flow
to Pyro as one :class:`~pyroflows.flows.FlowStack` (fused kernels, one cache).

Rates are per second of process CPU time with one torch thread: on a quiet machine that is the
wall-clock rate, and on a shared one it leaves out the time spent waiting for a core.
Contention only ever slows a round down, so the best round estimates the undisturbed rate (as
``timeit`` advises) and the ratio to the fastest peer uses it; the median round and the
wall-clock median are printed too. On CUDA (``--device cuda``) rates are synchronized
wall-clock. GFLOP/s is the dense conditioner arithmetic at the best-round rate, next to a
matmul measured in the same run.

Run ``python -m benchmarks.speed`` (``--help`` for options). It prints a markdown table; it never
asserts times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution

from benchmarks import peers

__all__ = ["LIBRARIES", "build_step", "measure", "main"]

DIM, NUM_LAYERS, HIDDEN, BATCH = 8, 5, (64, 64), 512

Step = Callable[[Tensor], None]


def _standard_normal(dim: int) -> Independent:
    return Independent(Normal(torch.zeros(dim), torch.ones(dim)), 1)


def _size(dim: int | None, hidden) -> tuple[int, tuple[int, ...]]:
    return (DIM if dim is None else dim), tuple(HIDDEN if hidden is None else hidden)


def _pyroflows(family: str, validate: bool = True, dim: int | None = None, hidden=None,
               compile: bool = False) -> tuple[torch.nn.Module, Callable]:
    import pyroflows as pf
    from pyroflows.distributions import FlowDistribution

    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
    flow = pf.flows.build(family, DIM, num_layers=NUM_LAYERS, hidden_dims=HIDDEN,
                          compile=compile)
    # the library's density of a flow: a StandardNormal base, the stack's inverse in one call
    dist = FlowDistribution(flow)

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


def _pyroflows_variant(family: str, variant: str, dim: int | None = None,
                       hidden=None) -> tuple[torch.nn.Module, Callable]:
    from pyro.distributions.torch_transform import ComposeTransformModule

    import pyroflows as pf
    import pyroflows.transforms.autoregressive as ar

    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
    if variant == "plain kernels":
        flow, loss = _pyroflows(family, dim=DIM, hidden=HIDDEN)
        flow.fused = False
        for part in flow.parts:
            part.fused = False
        return flow, loss
    if variant == "torch composition":
        flow = pf.flows.build(family, DIM, num_layers=NUM_LAYERS, hidden_dims=HIDDEN)
        dist = TransformedDistribution(_standard_normal(DIM), flow)
        return flow, lambda x: -dist.log_prob(x).mean()
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
        return _pyroflows(family, dim=DIM, hidden=HIDDEN)
    finally:
        ar.MADE = made


def _pyro(family: str, dim: int | None = None, hidden=None) -> tuple[torch.nn.Module, Callable]:
    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
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


def _zuko(family: str, dim: int | None = None, hidden=None) -> tuple[torch.nn.Module, Callable]:
    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
    import zuko

    # zuko alternates the MADE order (MAF) or the coupling mask (RealNVP) between layers
    cls = zuko.flows.MAF if family == "maf" else zuko.flows.RealNVP
    flow = cls(DIM, transforms=NUM_LAYERS, hidden_features=HIDDEN)
    return flow, lambda x: -flow().log_prob(x).mean()


class _NflowsMLP(torch.nn.Module):
    """nflows' MLP, called the way its coupling layers call a network (with a context)."""

    def __init__(self, in_features: int, out_features: int, hidden=HIDDEN) -> None:
        super().__init__()
        from nflows.nn import nets

        self.hidden = tuple(hidden)
        self.net = nets.MLP((in_features,), (out_features,), hidden_sizes=list(self.hidden))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def _nflows(family: str, dim: int | None = None, hidden=None) -> tuple[torch.nn.Module, Callable]:
    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
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
            layers.append(transforms.AffineCouplingTransform(
                mask.int(), lambda i, o: _NflowsMLP(i, o, HIDDEN)))
    flow = flows.Flow(transforms.CompositeTransform(layers),
                      distributions.StandardNormal((DIM,)))
    return flow, lambda x: -flow.log_prob(x).mean()


Builder = Callable[..., tuple[torch.nn.Module, Callable]]

#: the step ``DensityEstimator.fit`` runs (what its users get), next to the bare stacks
ESTIMATOR = "pyroflows DensityEstimator.fit's step"


def _estimator_row(family: str, **kw) -> tuple[torch.nn.Module, Callable]:
    raise TypeError(f"{ESTIMATOR!r} has its own optimizer: use build_estimator_step")


LIBRARIES: dict[str, Builder] = {
    "pyroflows": _pyroflows,
    "pyroflows (validation off)": lambda family, **kw: _pyroflows(family, validate=False, **kw),
    "pyroflows (compile)": lambda family, **kw: _pyroflows(family, compile=True, **kw),
    ESTIMATOR: _estimator_row,
    "pyro": _pyro,
    "zuko": _zuko,
    "nflows": _nflows,
}
PEERS = ("pyro", "zuko", "nflows")
#: the peers outside pyroflows' dependencies (the ``[bench]`` extra; library name = package):
#: a default run leaves a missing one's rows out, naming one in --libraries is an error
BENCH_PEERS = ("zuko", "nflows")


def installed(libraries) -> list[str]:
    """``libraries`` less the peers (:data:`BENCH_PEERS`) that are not installed."""
    return [lib for lib in libraries if lib not in BENCH_PEERS or peers.available(lib)]
VARIANTS: dict[str, Builder] = {
    "alt: TransformedDistribution(Independent(Normal), flow)":
        lambda f, **kw: _pyroflows_variant(f, "torch composition", **kw),
    "alt: plain kernels (fused off)": lambda f, **kw: _pyroflows_variant(f, "plain kernels", **kw),
    "alt: per-layer weights, W*M each call":
        lambda f, **kw: _pyroflows_variant(f, "multiply", **kw),
    "alt: per-layer, zeros + grad hook": lambda f, **kw: _pyroflows_variant(f, "grad hook", **kw),
    "alt: Permute layers between": lambda f, **kw: _pyroflows_variant(f, "permute layers", **kw),
}
LIBRARIES.update(VARIANTS)
#: run by default; "pyroflows (compile)" is opt-in (``--compile``): Inductor takes a minute or
#: more per configuration to compile on a small CPU
DEFAULT_LIBRARIES = tuple(lib for lib in LIBRARIES if lib != "pyroflows (compile)")
SIZES = {"D=8": (8, (64, 64)), "D=64": (64, (256, 256))}
#: item 5's spline layers: bins, and the draws per call as a share of ``--samples`` (the peers
#: run D full passes of a network with 23 D outputs per layer)
NSF_BINS, NSF_SHARE = 8, 10


def build_step(library: str, family: str, lr: float = 1e-3, dim: int | None = None,
               hidden=None) -> Step:
    """One training step (zero_grad, backward, Adam step) for a library and family."""
    torch.manual_seed(0)
    module, loss_fn = LIBRARIES[library](family, dim=dim, hidden=hidden)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)

    def step(x: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()

    return step


def build_estimator_step(family: str, data: Tensor, lr: float = 1e-3, dim: int | None = None,
                         hidden=None) -> Step:
    """``DensityEstimator.fit``'s own training step, on its model (precondition "whiten": the
    standardized rows through the layers, with their log-scale bound, to the learnable
    Cholesky base), with its optimizer (Adam, fused where torch has the kernel), its gradient
    clipping and its parameter averaging. The model is set up on ``data`` as ``fit`` sets it
    up (``max_epochs=0``); the batches are the same raw rows as the other rows'."""
    import pyroflows as pf

    try:
        from pyroflows.density.training import training_state, training_step
    except ImportError:  # a tree from before the density package (--against)
        from pyroflows.density import _training_state as training_state
        from pyroflows.density import _training_step as training_step

    DIM, HIDDEN = _size(dim, hidden)  # noqa: N806 (the module constants, overridden)
    torch.manual_seed(0)
    est = pf.density.DensityEstimator(flow=family, num_layers=NUM_LAYERS, hidden_dims=HIDDEN,
                                      seed=0)
    est.fit(data, max_epochs=0, progress=False)
    model = est._model
    optimizer, params, average = training_state(model, lr, 0.0, rate=0.01)
    model.train()

    def step(x: Tensor) -> None:
        with pf.validation(False):  # as fit runs it
            training_step(model, x, optimizer, params, average)

    return step


def _batches(data: Tensor) -> Iterator[Tensor]:
    while True:
        for i in range(0, len(data) - BATCH + 1, BATCH):
            yield data[i:i + BATCH]


def _made_macs(dim: int, hidden, family: str = "maf") -> int:
    """Multiply-adds per sample of one conditioner, dense: D -> hidden -> 2D for a MADE;
    D/2 -> hidden -> 2 (D - D/2) for a coupling network, as Pyro, zuko and nflows compute it
    and pyroflows from D = 32 on (below, its RealNVP runs the full masked D -> 2D network,
    1.16x the arithmetic counted here at D = 8 with hidden (64, 64)); D -> hidden ->
    (3K - 1) D for a spline MADE of K = ``NSF_BINS`` bins."""
    if family == "realnvp":
        widths = [dim // 2, *hidden, 2 * (dim - dim // 2)]
    elif family == "nsf":
        widths = [dim, *hidden, (3 * NSF_BINS - 1) * dim]
    else:
        widths = [dim, *hidden, 2 * dim]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=False))


# ---- the cases: each is a zero-argument callable doing one unit of work --------------------


class Case:
    """One timed (item, case, library): ``fn()`` does ``per_call`` units of work."""

    def __init__(self, item: str, case: str, library: str, fn: Callable[[], object],
                 per_call: int = 1, flops: float | None = None, calls: int = 1) -> None:
        self.item, self.case, self.library, self.fn = item, case, library, fn
        self.per_call, self.flops, self.calls = per_call, flops, calls
        self.cpu: list[float] = []
        self.wall: list[float] = []


def _training_cases(families, libraries, sizes, steps: int) -> list[Case]:
    import pyroflows as pf

    cases = []
    for size in sizes:
        dim, hidden = SIZES[size]
        data, _ = pf.datasets.gaussian_mixture(64 * BATCH, dim=dim, seed=0)
        data = data.to(torch.get_default_dtype())
        for family in families:
            # forward + 2x backward
            flops = 3 * 2 * BATCH * NUM_LAYERS * _made_macs(dim, hidden, family)
            item = "1" if family == "maf" else "2"
            for lib in libraries:
                if lib == ESTIMATOR:
                    step = build_estimator_step(family, data, dim=dim, hidden=hidden)
                else:
                    step = build_step(lib, family, dim=dim, hidden=hidden)
                batches = _batches(data.clone())
                cases.append(Case(item, f"{family}, {size}", lib,
                                  lambda step=step, b=batches: step(next(b)),
                                  flops=flops, calls=steps))
    return cases


def _svi_cases(steps: int, suffix: str = "") -> list[Case]:
    """Items 3 and 4: one SVI step (8 vectorized particles, Adam) with each guide.

    Every row uses the same gradient estimator (the reparameterized ELBO of Trace_ELBO, no
    sticking-the-landing). The ``pyroflows`` row runs it through the library's
    ``FlowELBO(stick_the_landing=False)``, which draws a pyroflows guide without tracing it
    (its ``direct`` path: the same losses, draws and parameter updates as Trace_ELBO, tested
    step by step); ``alt: Trace_ELBO`` is the same guide through Pyro's Trace_ELBO; ``pyro``
    is Pyro's guide through Trace_ELBO (``FlowELBO``'s direct path does not apply to guides
    other than pyroflows', so it would time the same)."""
    from functools import partial

    import pyro
    import pyro.distributions.transforms as T
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow

    import pyroflows as pf

    from .targets import load_target

    dtype = torch.get_default_dtype()
    device = torch.empty(0).device
    if not suffix:
        pyro.clear_param_store()  # guides of different classes own differently named parameters
    cases = []
    # every row's guide under its own class name, hence its own param-store names: two guides
    # named alike would take each other's entries over on every step
    auto_iaf = type(f"AutoIAF{suffix}", (pf.guides.AutoIAF,), {})
    auto_planar = type(f"AutoPlanar{suffix}", (pf.guides.AutoPlanar,), {})
    traced_iaf = type(f"AutoIAFTraced{suffix}", (pf.guides.AutoIAF,), {})
    traced_planar = type(f"AutoPlanarTraced{suffix}", (pf.guides.AutoPlanar,), {})
    iaf = dict(num_layers=2, hidden_dims=(64, 64), full_rank=False)
    planar = dict(num_layers=32, full_rank=False)
    specs = [
        ("3", "german credit, IAF 2 x (64, 64)", "german_credit", {
            "pyroflows": (partial(auto_iaf, **iaf), "FlowELBO"),
            "alt: Trace_ELBO": (partial(traced_iaf, **iaf), "Trace_ELBO"),
            "pyro": (lambda m: AutoIAFNormal(m, hidden_dim=[64, 64], num_transforms=2),
                     "Trace_ELBO"),
        }),
        ("4", "rezende U1, 32 planar", "rezende_u1", {
            "pyroflows": (partial(auto_planar, **planar), "FlowELBO"),
            "alt: Trace_ELBO": (partial(traced_planar, **planar), "Trace_ELBO"),
            "pyro": (lambda m: AutoNormalizingFlow(m, partial(T.iterated, 32, T.planar)),
                     "Trace_ELBO"),
        }),
    ]
    for item, label, name, guides in specs:
        target = load_target(name, device=device, dtype=dtype)
        for lib, (make, estimator) in guides.items():
            torch.manual_seed(0)
            guide = make(target.model)
            kw = dict(num_particles=8, vectorize_particles=True,
                      max_plate_nesting=target.max_plate_nesting)
            elbo = (pf.guides.FlowELBO(stick_the_landing=False, **kw)
                    if estimator == "FlowELBO" else Trace_ELBO(**kw))
            svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
            svi.step()  # sets the guide up
            cases.append(Case(item, label, lib, svi.step, calls=steps))
    return cases


def _sampling_cases(num_samples: int) -> list[Case]:
    """Item 5: draws per second at D=64, 5 layers of (256, 256): IAF is one pass per layer,
    MAF D passes per layer."""
    import pyro.distributions.transforms as T
    from pyro.nn import AutoRegressiveNN

    import pyroflows as pf

    zuko = None
    if peers.available("zuko"):  # a [bench] extra: without it, the rows are left out
        import zuko
    dim, hidden = SIZES["D=64"]
    base = _standard_normal(dim)
    cases = _nsf_sampling_cases(max(1, num_samples // NSF_SHARE), zuko)
    for family in ("iaf", "maf"):
        passes = 1 if family == "iaf" else dim
        flops = 2 * num_samples * NUM_LAYERS * passes * _made_macs(dim, hidden)
        label = f"{family} sampling, D=64, {num_samples} draws"
        torch.manual_seed(0)
        ours = pf.flows.build(family, dim, num_layers=NUM_LAYERS, hidden_dims=hidden)
        pf.testing.randomize_parameters_(ours, scale=0.01)  # off the identity start
        parts, modules = [], torch.nn.ModuleList()
        for i in range(NUM_LAYERS):
            if i > 0:
                parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
            layer = T.AffineAutoregressive(AutoRegressiveNN(dim, list(hidden)))
            modules.append(layer)
            parts.append(layer if family == "iaf" else layer.inv)
        libs = {"pyroflows": TransformedDistribution(base, ours),
                "pyro": TransformedDistribution(base, parts)}
        if family == "maf" and zuko is not None:
            flow = zuko.flows.MAF(dim, transforms=NUM_LAYERS, hidden_features=hidden)
            libs["zuko"] = flow()
        for lib, d in libs.items():
            def draw(d=d):
                with torch.no_grad():
                    return d.sample((num_samples,))
            # pyroflows samples MAF level by level, computing each hidden unit once: about
            # one pass of arithmetic where the peers run D full passes
            work = flops // passes if lib == "pyroflows" else flops
            cases.append(Case("5", label, lib, draw, per_call=num_samples, flops=work))
    return cases


def _nsf_sampling_cases(num_samples: int, zuko) -> list[Case]:
    """Item 5's spline rows: draws per second at D=64 of 5 autoregressive NSF layers of
    (256, 256) and 8 bins in MAF's direction (D passes per layer to sample): pyroflows level by
    level (each hidden unit once), ``alt: plain passes`` (``fused = False``: a full pass a
    level, as the peers), zuko's ``NSF``."""
    import pyroflows as pf

    dim, hidden = SIZES["D=64"]
    base = _standard_normal(dim)
    flops = 2 * num_samples * NUM_LAYERS * dim * _made_macs(dim, hidden, "nsf")
    label = f"nsf sampling, D=64, {num_samples} draws"
    torch.manual_seed(0)
    ours = pf.flows.build("nsf", dim, num_layers=NUM_LAYERS, hidden_dims=hidden,
                          bins=NSF_BINS)
    pf.testing.randomize_parameters_(ours, scale=0.01)  # off the identity start
    plain = copy.deepcopy(ours)
    for layer in plain.modules():
        if isinstance(layer, pf.transforms.NSF):
            layer.fused = False
    libs = {"pyroflows": (TransformedDistribution(base, ours), flops // dim),
            "alt: plain passes": (TransformedDistribution(base, plain), flops)}
    if zuko is not None:
        flow = zuko.flows.NSF(dim, transforms=NUM_LAYERS, hidden_features=hidden, bins=NSF_BINS)
        libs["zuko"] = (flow(), flops)
    cases = []
    for lib, (d, work) in libs.items():
        def draw(d=d):
            with torch.no_grad():
                return d.sample((num_samples,))
        cases.append(Case("5", label, lib, draw, per_call=num_samples, flops=work))
    return cases


def _tabak_cases(steps: int) -> list[Case]:
    """Item 6: Tabak fit steps per second on 20k x 10 (18k fit, 2k held out); no peer has it."""
    import pyroflows as pf

    x, _ = pf.datasets.gaussian_mixture(20000, dim=10, seed=0)
    x = x.to(torch.get_default_dtype())

    def fit() -> None:
        t = pf.transforms.Tabak(10, max_steps=steps, patience=10**6, seed=0)
        t.fit(x[:18000], x_val=x[18000:], progress=False)

    return [Case("6", "tabak fit, 20k x 10", "pyroflows", fit, per_call=steps)]


def _matmul_gflops(rounds: int) -> dict[str, float]:
    """Best-round GFLOP/s of plain matmuls in this process (the hardware reference)."""
    out = {}
    for m, k, n in ((512, 256, 256), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(1, int(2e9 // (2 * m * k * n)))
        best = 0.0
        for _ in range(rounds):
            start = _now()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (_now() - start) / 1e9)
        out[f"{m}x{k} @ {k}x{n}"] = best
    return out


def _now() -> float:
    """Process CPU time on CPU; wall-clock after a synchronize on CUDA (where CPU time says
    nothing about the device's work)."""
    if torch.empty(0).device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def _time(cases: list[Case], rounds: int, warmup: int) -> None:
    for case in cases:
        for _ in range(warmup):
            case.fn()
    order = list(cases)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for case in order:
            wall, cpu = time.perf_counter(), _now()
            for _ in range(case.calls):
                case.fn()
            units = case.calls * case.per_call
            case.cpu.append(units / (_now() - cpu))
            case.wall.append(units / (time.perf_counter() - wall))


def measure(
    families: tuple[str, ...] = ("maf", "realnvp"),
    libraries: tuple[str, ...] | None = None,
    rounds: int = 9,
    steps: int = 30,
    warmup: int = 10,
    sizes: tuple[str, ...] = ("D=8",),
) -> list[Case]:
    """Rates of the training steps (items 1, 2) of every (family, size, library), timed in
    interleaved rounds; ``libraries`` by default :data:`DEFAULT_LIBRARIES` less the peers that
    are not installed."""
    if libraries is None:
        libraries = tuple(installed(DEFAULT_LIBRARIES))
    cases = _training_cases(families, libraries, sizes, steps)
    _time(cases, rounds, warmup)
    return cases


_UNITS = {"1": "steps/s", "2": "steps/s", "3": "steps/s", "4": "steps/s", "5": "draws/s",
          "6": "fit steps/s"}


def _table(cases: list[Case]) -> str:
    lines = [
        "| item | case | library | rate, best round | median round | wall-clock median "
        "| vs fastest peer | GFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.item, c.case), []).append(c)
    for (item, label), group in groups.items():
        peers = [max(c.cpu) for c in group if c.library in PEERS]
        fastest = max(peers) if peers else float("nan")
        for c in group:
            best = max(c.cpu)
            gflops = "" if c.flops is None else f"{best * c.flops / c.per_call / 1e9:.1f}"
            ratio = f"{best / fastest:.2f}x" if peers else "(no peer)"
            lines.append(
                f"| {item} | {label} | {c.library} | {best:,.1f} {_UNITS[item]} | "
                f"{statistics.median(c.cpu):,.1f} | {statistics.median(c.wall):,.1f} | "
                f"{ratio} | {gflops} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", nargs="+", default=["1", "2", "3", "4", "5", "6"],
                        choices=["1", "2", "3", "4", "5", "6"],
                        help="1 MAF / 2 RealNVP training, 3 IAF guide SVI, 4 planar guide SVI, "
                             "5 IAF / MAF sampling, 6 Tabak fit")
    parser.add_argument("--families", nargs="+", default=["maf", "realnvp"],
                        help="training families (items 1, 2)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--libraries", nargs="+", default=None, choices=list(LIBRARIES),
                        help="training rows (items 1, 2); default: all but 'pyroflows "
                             "(compile)', less the peers not installed")
    parser.add_argument("--compile", action="store_true",
                        help="add 'pyroflows (compile)' training rows at D=8 (torch.compile)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--slow-rounds", type=int, default=3,
                        help="rounds of one call for items 5 and 6")
    parser.add_argument("--slow-warmup", type=int, default=1,
                        help="untimed calls first, items 5 and 6")
    parser.add_argument("--samples", type=int, default=10000, help="draws per call, item 5")
    parser.add_argument("--tabak-steps", type=int, default=100, help="fit steps per call, item 6")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small matrices, shared machines)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--against", default=None, metavar="TREE",
                        help="also time the pyroflows rows of another source tree of this "
                             "repository (e.g. a git worktree of an earlier commit), in the "
                             "same process, interleaved")
    parser.add_argument("--against-label", default=None,
                        help="the label of --against's rows (default: the tree's folder name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    used = []  # the [bench] peers this run would time
    if args.libraries is None:
        args.libraries = installed(DEFAULT_LIBRARIES)
        if {"1", "2"} & set(args.items):
            used += BENCH_PEERS
    else:
        peers.require(parser, [lib for lib in args.libraries if lib in BENCH_PEERS],
                      "--libraries")
    if "5" in args.items:
        used.append("zuko")
    peers.note_missing(used)
    dtype, device = torch.get_default_dtype(), torch.empty(0).device
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.set_default_device(args.device)  # every library builds on the device under test
    try:
        _run(args)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_default_device(device)


#: the rows that ``--against`` also times for the other source tree
AGAINST_ROWS = ("pyroflows", ESTIMATOR, "alt: Trace_ELBO")
_TREES: dict[str, dict] = {}  # source tree -> its imported pyroflows modules


@contextlib.contextmanager
def _pyroflows_of(tree: str) -> Iterator[None]:
    """Inside the block ``import pyroflows`` gives the package of the source tree ``tree``
    (another checkout of this repository, e.g. ``git worktree add /tmp/before <commit>``),
    imported once and kept; outside it, this one's. So both trees' rows are built and timed
    in one process, interleaved, as the peers are."""
    def take() -> dict:
        return {k: sys.modules.pop(k) for k in list(sys.modules)
                if k == "pyroflows" or k.startswith("pyroflows.")}

    ours = take()
    sys.modules.update(_TREES.get(tree, {}))
    try:
        if tree not in _TREES:
            sys.path.insert(0, os.path.abspath(tree))
            try:
                package = importlib.import_module("pyroflows")
                for name in package.__all__:  # bind the lazily loaded submodules now
                    getattr(package, name)
            finally:
                sys.path.remove(os.path.abspath(tree))
        yield
    finally:
        _TREES[tree] = take()
        sys.modules.update(ours)


def _against(args: argparse.Namespace, build: Callable[..., list[Case]], *build_args,
             **build_kw) -> list[Case]:
    """The cases ``build`` makes for the other tree (``--against``), its rows relabelled."""
    if not args.against:
        return []
    with _pyroflows_of(args.against):
        cases = build(*build_args, **build_kw)
    label = args.against_label or os.path.basename(os.path.abspath(args.against))
    kept = [c for c in cases if c.library in AGAINST_ROWS]
    for c in kept:
        c.library = f"{c.library} @{label}"
    return kept


def _run(args: argparse.Namespace) -> None:
    libraries = list(args.libraries)
    if args.compile and "pyroflows (compile)" not in libraries:
        libraries.insert(1, "pyroflows (compile)")
    items = set(args.items)
    families = [f for f in args.families if {"maf": "1", "realnvp": "2"}.get(f, "") in items]
    plain = [lib for lib in libraries if lib != "pyroflows (compile)" and lib not in VARIANTS]
    cases = []
    for size in args.sizes:
        # compiled and alt: rows at D=8 only: that is where per-op overhead dominates, each
        # compiled configuration costs a minute or more of compiling, and the design
        # alternatives are about that overhead
        libs = libraries if size == "D=8" else plain
        cases += _training_cases(families, libs, [size], args.steps)
        cases += _against(args, _training_cases, families,
                          [lib for lib in libs if lib in AGAINST_ROWS], [size], args.steps)
    if "3" in items or "4" in items:
        cases += [c for c in _svi_cases(args.steps) if c.item in items]
        cases += [c for c in _against(args, _svi_cases, args.steps, suffix="Against")
                  if c.item in items]
    _time(cases, args.rounds, args.warmup)
    slow = []
    if "5" in items:
        slow += _sampling_cases(args.samples)
        slow += _against(args, _sampling_cases, args.samples)
    if "6" in items:
        slow += _tabak_cases(args.tabak_steps)
        slow += _against(args, _tabak_cases, args.tabak_steps)
    _time(slow, args.slow_rounds, warmup=args.slow_warmup)
    reference = _matmul_gflops(rounds=5)
    command = " ".join(["python -m benchmarks.speed", shlex.join(args.argv)])
    print(f"`{command}`")
    print()
    print(f"Items 1-2: training steps/s (log_prob + backward + Adam), {NUM_LAYERS} layers, "
          f"batch {BATCH}, D=8 with hidden (64, 64) and D=64 with hidden (256, 256). Items 3-4: "
          f"one SVI step, the reparameterized ELBO with 8 vectorized particles (pyroflows: "
          f"FlowELBO, alt: Trace_ELBO; pyro: Trace_ELBO), pyro.optim.Adam. Item 5: draws/s. "
          f"Item 6: Tabak fit steps/s. {args.dtype}, device {args.device}, {args.threads} torch "
          f"thread(s); {args.rounds} interleaved rounds of {args.steps} steps (items 5-6: "
          f"{args.slow_rounds} rounds of one call). Rates use process CPU time on CPU "
          f"(contention on a shared machine only slows a round down, so the best round is the "
          f"estimate and the ratio uses it), synchronized wall-clock on CUDA; the wall-clock "
          f"median is shown too. GFLOP/s counts the dense conditioner products (forward, and "
          f"2x for backward in training; RealNVP: the D/2 -> 2 (D - D/2) coupling network) "
          f"at the best-round rate.")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")
    print("Matmul reference in this run (best round): " + ", ".join(
        f"{k}: {v:.1f} GFLOP/s" for k, v in reference.items()))
    print()
    print(_table(cases + slow))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
