r"""Flow guides against Pyro's autoguides on targets with known answers; prints one table.

Run from the repository root (about an hour of CPU with the defaults; split ``--targets``
over two processes to halve the wall-clock)::

    nice -n 5 python -m benchmarks.vi --out benchmarks/results/vi.md

Every guide gets the same step budget and the same loop: after one call that builds its
parameters, one ``torch.optim.Adam`` over its parameters (our guides: ``param_groups()``)
minimizes ``differentiable_loss`` of a Trace_ELBO with ``--particles`` (32) vectorized
particles for ``--steps`` (1000) steps. Adam is elementwise, so this is the update ``SVI`` with
``pyro.optim.Adam`` makes, without its per-parameter optimizers.

- Pyro's guides run as the issue measured them: Adam 1e-2 for the Gaussian guides, 5e-3 for the
  flows, constant; AutoIAFNormal and AutoNormalizingFlow(planar x 16) at their defaults.
- Our guides run at their documented defaults (:mod:`pyroflows.guides`): the Laplace start
  where it beats the plain one (``laplace_init``), the family's ``init_scale``, Adam at
  the family's ``lr`` (affine layer 5e-2, flow layers 1e-2 for planar and radial, 3e-3 for IAF) via
  ``guide.param_groups()``, all decayed exponentially by a factor 50 over the run, and
  :class:`pyroflows.guides.FlowELBO` with its default sticking-the-landing choice (IAF guides
  only, the family's ``stick_the_landing``). On the multimodal target (Rezende U1,
  :data:`MULTIMODAL`) they anneal the energy, beta 0.05 -> 1 over the first half of the steps;
  nowhere else.

``--gaussians`` runs the start-against-end table instead (issue 24): each of our guides at its
defaults (the recipe above, ``--steps`` steps, ``--particles`` particles) on Gaussian
posteriors with known KL, :math:`z \sim N(m, \Sigma)` with :math:`\log Z = 0`, equicorrelated
(:math:`\Sigma = 0.5 I + 0.5\, 1 1^T`) and ill-conditioned (eigenvalues log-spaced from 1 to
1e-3, a fixed random rotation), D = ``--dims``, seeds ``--seeds``; KL at the start (after
set-up, before any step), at the end of training, and after ``guide.keep_best()``; and which
state ``keep_best`` kept. The Laplace start of a Gaussian is exact, so any KL above 0 at the
end is what training spoilt::

    nice -n 5 python -m benchmarks.vi --gaussians --out benchmarks/results/vi-gaussians.md

``--scaling`` runs the cost-against-D table instead (issue 24, item 3): on the ill-conditioned
Gaussian of each D in ``--dims``, our ``AutoIAF`` at its defaults (the recipe above) next to
Pyro's ``AutoIAFNormal`` (Adam 5e-3) and ``AutoMultivariateNormal`` (Adam 1e-2), and ours at
the conditioner widths it had before (``hidden 4D``; ``--scaling-guides`` picks), each trained
``--steps`` steps with ``--particles`` particles, one seed; the parameter count, the median
seconds of a training step, the final KL (closed form log p, ``--draws`` draws of the guide;
ours also at the start and after ``keep_best``), and for our guide the median time of a
gradient without and with sticking the landing (its default route: layer by layer), of a whole
training step (the gradient and the Adam update) without and with it, and of the gradient with
it by the draw's whole Jacobian (the route before) beside the plain one, each pair in an
alternation of its own (``--time-steps`` each, the state put back) in the same process::

    nice -n 5 python -m benchmarks.vi --scaling --dims 10 30 100 300 --steps 300 \
        --particles 8 --draws 4000 --out benchmarks/results/vi-scaling.md

``--plain`` runs the plain-loop table instead (issue 24, item 6): each of our guides at its
defaults on banana, rezende_u1 and funnel10 (``--targets`` picks others), trained ``--steps``
steps with Pyro's ``SVI`` and ``--particles`` vectorized particles under two loops: what a Pyro
user writes (``pyro.optim.Adam({"lr": 5e-3})``, ``Trace_ELBO``) and the recommended one
(``pf.guides.recommended_optimizer``, ``FlowELBO``, annealing on U1); KL of each, and of the
plain loop's guide after ``keep_best``, seeds ``--seeds``::

    nice -n 10 python -m benchmarks.vi --plain --steps 2000 --particles 8 --seeds 0 1 \
        --draws 5000 --out benchmarks/results/vi-plain.md

``--stl-routes FAMILY ...`` times one loss and gradient with sticking the landing of
``AutoFlowGuide(flow=FAMILY, stick_the_landing=True)`` at ``--dims``, layer by layer against
the draw's whole Jacobian::

    nice -n 5 python -m benchmarks.vi --stl-routes maf nsf realnvp --dims 10 40 100 \
        --particles 8 --out benchmarks/results/vi-stl-routes.md

Columns: KL = log Z - ELBO (nats, from ``--draws`` draws, where log Z is known); PSIS k-hat of
the same importance weights (:func:`pyroflows.diagnostics.psis`); the largest standardized mean
error |mean_q - mean_ref| / sd_ref and the largest |log(sd_q / sd_ref)| over the parameters,
on the constrained scale, against the reference draws; seconds of set-up (our Laplace start
included) and training; "start": how our guide started (laplace or plain).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import iterated, planar
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.importance import vectorized_importance_weights

import pyroflows as pf
from pyroflows.guides import FlowELBO, landing
from pyroflows.guides.best import restore, snapshot
from pyroflows.nn import default_hidden_dims

from .targets import TARGETS, Target, load_target

__all__ = ["Recipe", "GUIDES", "OUR_RECIPE", "SCALING_GUIDES", "PLAIN_GUIDES", "fit", "fit_svi",
           "evaluate", "main"]


@dataclass(frozen=True)
class Recipe:
    """How a guide is trained: Adam at ``lr`` (for our guides: the affine layer, ``None`` for
    the guide's default) and ``flow_lr`` (our flow layers, ``None`` for the default), decayed
    exponentially by the factor ``decay`` over the run; ``stick_the_landing`` as for
    :class:`~pyroflows.guides.FlowELBO` (``None``: the guide's default)."""

    lr: float | None = None
    flow_lr: float | None = None
    decay: float = 1.0
    anneal_fraction: float = 0.0
    stick_the_landing: bool | None = None
    num_particles: int = 32


PYRO_GAUSSIAN = Recipe(lr=1e-2)
PYRO_FLOW = Recipe(lr=5e-3)
#: Our guides: their documented defaults (the family's step sizes ``lr``), decayed 50-fold.
OUR_RECIPE = Recipe(decay=50.0)
#: Targets on which our guides anneal the energy (over this fraction of the steps).
MULTIMODAL = {"rezende_u1": 0.5}

GUIDES: dict[str, tuple[Callable, Recipe]] = {
    "AutoNormal": (lambda m: AutoNormal(m), PYRO_GAUSSIAN),
    "AutoMultivariateNormal": (lambda m: AutoMultivariateNormal(m), PYRO_GAUSSIAN),
    "AutoIAFNormal": (lambda m: AutoIAFNormal(m), PYRO_FLOW),
    "AutoNormalizingFlow(planar x16)": (
        lambda m: AutoNormalizingFlow(m, partial(iterated, 16, planar)), PYRO_FLOW),
    "pf AutoPlanar": (lambda m: pf.guides.AutoPlanar(m), OUR_RECIPE),
    "pf AutoRadial": (lambda m: pf.guides.AutoRadial(m), OUR_RECIPE),
    "pf AutoIAF": (lambda m: pf.guides.AutoIAF(m), OUR_RECIPE),
    "pf AutoIAF(full_rank=False)": (lambda m: pf.guides.AutoIAF(m, full_rank=False),
                                    OUR_RECIPE),
    "pf AutoIAF(base=studentt)": (lambda m: pf.guides.AutoIAF(m, base="studentt"), OUR_RECIPE),
    # sticking the landing, off by default for planar and radial guides
    "pf AutoPlanar(stl)": (lambda m: pf.guides.AutoPlanar(m, stick_the_landing=True),
                           OUR_RECIPE),
    "pf AutoRadial(stl)": (lambda m: pf.guides.AutoRadial(m, stick_the_landing=True),
                           OUR_RECIPE),
    # the other families, with and without sticking the landing (vi-stl-families.md)
    **{f"pf AutoFlowGuide({flow}{label})": (
        partial(lambda m, flow, stl: pf.guides.AutoFlowGuide(m, flow=flow,
                                                             stick_the_landing=stl),
                flow=flow, stl=stl), OUR_RECIPE)
       for flow in ("realnvp", "maf", "nsf") for label, stl in (("", None), (", no stl", False),
                                                                 (", stl", True))},
}
#: The main table's guides (``--guides`` by default): Pyro's, and ours at their defaults with
#: the diagonal IAF; the other entries of :data:`GUIDES` are options measured apart.
MAIN_GUIDES = ["AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal",
               "AutoNormalizingFlow(planar x16)", "pf AutoPlanar", "pf AutoRadial", "pf AutoIAF",
               "pf AutoIAF(full_rank=False)"]


def fit(target: Target, make_guide: Callable, recipe: Recipe, steps: int, seed: int = 0,
        num_particles: int | None = None):
    """Train a guide on ``target``; returns ``(guide, seconds, final_loss)``. The guide is
    built (Laplace start included) inside the timed part."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    guide = make_guide(target.model)
    ours = isinstance(guide, pf.guides.AutoFlowGuide)
    anneal_fraction = MULTIMODAL.get(target.name, recipe.anneal_fraction) if ours else 0.0
    elbo_kwargs = dict(num_particles=num_particles or recipe.num_particles,
                       vectorize_particles=True, max_plate_nesting=target.max_plate_nesting)
    if ours:
        elbo = FlowELBO(anneal_steps=int(anneal_fraction * steps),
                        stick_the_landing=recipe.stick_the_landing, **elbo_kwargs)
    else:
        elbo = pyro.infer.Trace_ELBO(**elbo_kwargs)
    guide()  # build the parameters
    if ours:
        optimizer = torch.optim.Adam(guide.param_groups(recipe.lr, recipe.flow_lr))
    else:
        optimizer = torch.optim.Adam(guide.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, recipe.decay ** (-1 / steps))
    loss = float("nan")
    with pf.validation(False):  # the flows only ever see their own Gaussian draws here
        for _ in range(steps):
            optimizer.zero_grad()
            loss_t = elbo.differentiable_loss(target.model, guide)
            loss_t.backward()
            optimizer.step()
            scheduler.step()
            loss = float(loss_t.detach())
    return guide, time.perf_counter() - start, loss


@torch.no_grad()
def evaluate(target: Target, guide, num_draws: int, chunk: int = 2000) -> dict[str, float]:
    """KL (where log Z is known), PSIS k-hat and moment errors from ``num_draws`` guide draws."""
    log_weights, columns = [], []
    done = 0
    with pf.validation(False):
        while done < num_draws:
            n = min(chunk, num_draws - done)
            lw, model_trace, _ = vectorized_importance_weights(
                target.model, guide, num_samples=n, max_plate_nesting=target.max_plate_nesting,
                normalized=False)
            values = {name: site["value"] for name, site in model_trace.nodes.items()
                      if site["type"] == "sample"}
            log_weights.append(lw.reshape(n).double().cpu())
            columns.append(target.extract(values, n).double().cpu())
            done += n
    lw = torch.cat(log_weights)
    draws = torch.cat(columns).numpy()
    out: dict[str, float] = {}
    finite = torch.isfinite(lw)
    elbo = float(lw[finite].mean()) if bool(finite.all()) else -math.inf
    out["kl"] = target.log_z - elbo if target.log_z is not None else math.nan
    out["khat"] = float(pf.diagnostics.psis(lw.numpy())[1]) if bool(finite.all()) else math.inf
    if target.reference is not None:
        ref_mean, ref_sd = target.reference.mean(0), target.reference.std(0)
        mean_err = np.abs(draws.mean(0) - ref_mean) / ref_sd
        log_sd = np.abs(np.log(draws.std(0) / ref_sd))
        out["mean_err"] = float(np.nanmax(mean_err))
        out["log_sd"] = float(np.nanmax(log_sd))
    return out


# ---- start against end on Gaussians (issue 24) -------------------------------------------------

#: Our guides in the Gaussian table (MAF left out: its draws take D sequential passes).
GAUSSIAN_GUIDES: dict[str, Callable] = {
    "pf AutoPlanar": lambda m: pf.guides.AutoPlanar(m),
    "pf AutoRadial": lambda m: pf.guides.AutoRadial(m),
    "pf AutoIAF": lambda m: pf.guides.AutoIAF(m),
    "pf AutoFlowGuide(realnvp)": lambda m: pf.guides.AutoFlowGuide(m, flow="realnvp"),
    "pf AutoFlowGuide(maf)": lambda m: pf.guides.AutoFlowGuide(m, flow="maf"),
    "pf AutoFlowGuide(nsf)": lambda m: pf.guides.AutoFlowGuide(m, flow="nsf"),
}


def gaussian_posterior(kind: str, dim: int) -> tuple[Callable, Callable]:
    """``(model, log_density)`` of the ``"equicorrelated"`` or ``"ill-conditioned"`` Gaussian
    posterior of size ``dim`` (float64, normalized: log Z = 0)."""
    eye = torch.eye(dim, dtype=torch.float64)
    if kind == "equicorrelated":
        cov = 0.5 * eye + 0.5 * torch.ones(dim, dim, dtype=torch.float64)
    elif kind == "ill-conditioned":
        gen = torch.Generator().manual_seed(1234)
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        variances = torch.logspace(0.0, -3.0, dim, dtype=torch.float64)
        cov = rotation @ torch.diag(variances) @ rotation.T
        cov = 0.5 * (cov + cov.T)
    else:
        raise ValueError(f"unknown Gaussian kind {kind!r}")
    loc = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    posterior = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=posterior.scale_tril))

    return model, posterior.log_prob


def gaussian_kl(guide, log_density: Callable, num_draws: int) -> float:
    """KL(q || p) = E_q[log q - log p] from ``num_draws`` draws of the guide, log p in closed
    form (log Z = 0)."""
    with torch.no_grad(), pf.validation(False):
        draws = guide._draw_latent(num_draws, seed=12345)
        log_q = guide.get_posterior().log_prob(draws)
        value = float((log_q - log_density(draws)).mean())
    return value if math.isfinite(value) else math.inf


def fit_gaussian(kind: str, dim: int, make_guide: Callable, steps: int, seed: int,
                 num_particles: int, num_draws: int) -> dict[str, float | str]:
    """One guide at its defaults on one Gaussian: KL at the start, after training, after
    ``keep_best``; the state kept; seconds of training."""
    model, log_density = gaussian_posterior(kind, dim)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    guide()
    out: dict[str, float | str] = {"start_kind": _start(guide)}
    out["start"] = gaussian_kl(guide, log_density, num_draws)
    elbo = FlowELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=0)
    optimizer = torch.optim.Adam(guide.param_groups())
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer,
                                                       OUR_RECIPE.decay ** (-1 / steps))
    begin = time.perf_counter()
    with pf.validation(False):
        for _ in range(steps):
            optimizer.zero_grad()
            elbo.differentiable_loss(model, guide).backward()
            optimizer.step()
            scheduler.step()
    out["seconds"] = time.perf_counter() - begin
    out["trained"] = gaussian_kl(guide, log_density, num_draws)
    out["kept_state"] = guide.keep_best()["kept"]
    out["kept"] = gaussian_kl(guide, log_density, num_draws)
    return out


GAUSSIAN_KINDS = ("equicorrelated", "ill-conditioned")


def gaussian_table(dims: list[int], seeds: list[int], steps: int, num_particles: int,
                   num_draws: int, guides: list[str],
                   kinds: tuple[str, ...] = GAUSSIAN_KINDS) -> list[str]:
    """The start-against-end table, one row per (kind, D, guide), the seeds side by side."""
    rows = [
        "| kind | D | guide | start | KL start | KL trained | KL kept | kept | "
        "worst kept - start | s / run |",
        "|---|---:|---|---|---|---|---|---|---:|---:|",
    ]
    print("\n".join(rows), flush=True)
    for kind in kinds:
        for dim in dims:
            for gname in guides:
                runs = []
                for seed in seeds:
                    try:
                        runs.append(fit_gaussian(kind, dim, GAUSSIAN_GUIDES[gname], steps, seed,
                                                 num_particles, num_draws))
                    except Exception as e:  # noqa: BLE001 - a failing guide is a result
                        runs.append({"error": f"{type(e).__name__}: {str(e)[:60]}"})
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    row = f"| {kind} | {dim} | {gname} | failed: {runs[0]['error']} |||||||"
                else:
                    def col(key: str, ok: list = ok) -> str:
                        return " / ".join(_fmt(r[key]) for r in ok)
                    worst = max(r["kept"] - r["start"] for r in ok)
                    row = (f"| {kind} | {dim} | {gname} | {ok[0]['start_kind']} | {col('start')} "
                           f"| {col('trained')} | {col('kept')} | "
                           f"{' / '.join(str(r['kept_state']) for r in ok)} | {_fmt(worst)} | "
                           f"{sum(r['seconds'] for r in ok) / len(ok):.0f} |")
                print(row, flush=True)
                rows.append(row)
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _start(guide) -> str:
    """How one of our guides started: "laplace" or "plain"; "-" for Pyro's."""
    info = getattr(guide, "laplace_info", None)
    if not isinstance(guide, pf.guides.AutoFlowGuide):
        return "-"
    return "laplace" if info is not None and info["used"] else "plain"


# ---- cost against D (issue 24, item 3) -----------------------------------------------------------

#: The guides of the scaling table: (constructor, Adam step size; ``None``: ours, the recipe).
SCALING_GUIDES: dict[str, tuple[Callable, float | None]] = {
    "pf AutoIAF": (lambda m: pf.guides.AutoIAF(m), None),
    # the conditioner widths before issue 24 (the layers' own default, two layers of 4D units)
    "pf AutoIAF(hidden 4D)": (lambda m: pf.guides.AutoIAF(m, hidden_dims=_four_d(m)), None),
    "AutoIAFNormal": (lambda m: AutoIAFNormal(m), PYRO_FLOW.lr),
    "AutoMultivariateNormal": (lambda m: AutoMultivariateNormal(m), PYRO_GAUSSIAN.lr),
}


def _four_d(model: Callable) -> tuple[int, int]:
    """Two layers of max(64, 4D) units for the one latent site ``"z"`` of ``model``."""
    dim = pyro.poutine.trace(model).get_trace().nodes["z"]["value"].shape[-1]
    return default_hidden_dims(dim)


def posterior_kl(guide, log_density: Callable, num_draws: int) -> float:
    """KL(q || p) of an autoguide over one real latent site, from ``num_draws`` draws of its
    posterior over the unconstrained latent vector (here the site itself), log p in closed
    form (log Z = 0)."""
    with torch.no_grad(), pf.validation(False):
        posterior = guide.get_posterior()
        draws = posterior.sample((num_draws,))
        value = float((posterior.log_prob(draws) - log_density(draws)).mean())
    return value if math.isfinite(value) else math.inf


def gradient_times(model: Callable, guide, optimizer: torch.optim.Optimizer,
                   num_particles: int, repeats: int) -> dict[str, float]:
    """Median seconds of our guide's loss-and-gradient without sticking the landing
    (``plain``) and with it by its default route (``stl``), no parameter update; of a whole
    training step (zero the gradients, loss, gradient, ``optimizer`` step) without and with it
    (``step_plain``, ``step_stl``); and of the gradient with it by the draw's whole Jacobian
    (``stl_jacobian``: ``STL_LAYERWISE`` off, the route before the layer-by-layer one) against
    the plain gradient again (``plain_again``). Each pair measured in an alternation of its
    own (after the whole Jacobian's large allocations, whatever ran next was slower); the
    guide's and the optimizer's states are put back afterwards."""
    elbos = {stl: FlowELBO(num_particles=num_particles, vectorize_particles=True,
                           max_plate_nesting=0, stick_the_landing=stl) for stl in (False, True)}

    def gradient(stl: bool, layerwise: bool = True) -> float:
        landing.STL_LAYERWISE = layerwise
        guide.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        elbos[stl].differentiable_loss(model, guide).backward()
        return time.perf_counter() - begin

    def step(stl: bool) -> float:
        begin = time.perf_counter()
        optimizer.zero_grad()
        elbos[stl].differentiable_loss(model, guide).backward()
        optimizer.step()
        return time.perf_counter() - begin

    pairs = {("plain", "stl"): (lambda: gradient(False), lambda: gradient(True)),
             ("step_plain", "step_stl"): (lambda: step(False), lambda: step(True)),
             ("plain_again", "stl_jacobian"): (lambda: gradient(False),
                                               lambda: gradient(True, layerwise=False))}
    times: dict[str, list[float]] = {name: [] for names in pairs for name in names}
    # put back in place (load_state_dict would restart the guide's best-state record), and
    # the record itself, which these calls add to
    params = snapshot(guide.named_parameters())
    record = copy.deepcopy(guide._best)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    try:
        with pf.validation(False):
            for names, runs in pairs.items():
                for _ in range(repeats):
                    for name, run in zip(names, runs, strict=True):
                        times[name].append(run())
    finally:
        landing.STL_LAYERWISE = True
        restore(guide.named_parameters(), params)
        guide._best = record
        optimizer.load_state_dict(optimizer_state)
    return {name: float(np.median(t)) for name, t in times.items()}


def fit_scaling(dim: int, gname: str, steps: int, num_particles: int, num_draws: int,
                time_steps: int, seed: int = 0) -> dict[str, float]:
    """One guide of the scaling table on the ill-conditioned Gaussian of size ``dim``."""
    make_guide, lr = SCALING_GUIDES[gname]
    model, log_density = gaussian_posterior("ill-conditioned", dim)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    ours = lr is None
    guide()
    out: dict[str, float] = {"params": float(sum(p.numel() for p in guide.parameters()))}
    if ours:
        out["start"] = posterior_kl(guide, log_density, num_draws)
        elbo = FlowELBO(num_particles=num_particles, vectorize_particles=True,
                        max_plate_nesting=0)
        optimizer = torch.optim.Adam(guide.param_groups())
        decay = OUR_RECIPE.decay
    else:
        elbo = pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                                     max_plate_nesting=0)
        optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
        decay = 1.0
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay ** (-1 / steps))
    step_times = []
    with pf.validation(False):
        for _ in range(steps):
            begin = time.perf_counter()
            optimizer.zero_grad()
            elbo.differentiable_loss(model, guide).backward()
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - begin)
    out["step"] = float(np.median(step_times))
    out["kl"] = posterior_kl(guide, log_density, num_draws)
    if ours:
        out.update(gradient_times(model, guide, optimizer, num_particles, time_steps))
        guide.keep_best()
        out["kept"] = posterior_kl(guide, log_density, num_draws)
    return out


def scaling_table(dims: list[int], steps: int, num_particles: int, num_draws: int,
                  time_steps: int, seed: int, guides: list[str]) -> list[str]:
    """The cost-against-D table, one row per (D, guide)."""
    rows = ["| D | guide | parameters | ms / step | KL start | KL trained | KL kept | "
            "gradient ms plain | gradient ms STL | STL / plain | gradient ms STL, whole "
            "Jacobian | whole Jacobian / plain | step ms plain | step ms STL | "
            "STL step / plain step |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    for dim in dims:
        for gname in guides:
            try:
                r = fit_scaling(dim, gname, steps, num_particles, num_draws, time_steps, seed)
                ours = "stl" in r
                extra = (f"{1e3 * r['plain']:.1f} | {1e3 * r['stl']:.1f} | "
                         f"{r['stl'] / r['plain']:.2f} | {1e3 * r['stl_jacobian']:.1f} | "
                         f"{r['stl_jacobian'] / r['plain_again']:.2f} | "
                         f"{1e3 * r['step_plain']:.1f} | {1e3 * r['step_stl']:.1f} | "
                         f"{r['step_stl'] / r['step_plain']:.2f}" if ours
                         else "- | - | - | - | - | - | - | -")
                row = (f"| {dim} | {gname} | {int(r['params'])} | {1e3 * r['step']:.1f} | "
                       f"{_fmt(r['start']) if ours else '-'} | {_fmt(r['kl'])} | "
                       f"{_fmt(r['kept']) if ours else '-'} | {extra} |")
            except Exception as e:  # noqa: BLE001 - a failing guide is a result
                row = (f"| {dim} | {gname} | failed: {type(e).__name__}: {str(e)[:60]} "
                       "|||||||||||||")
            print(row, flush=True)
            rows.append(row)
    return rows


# ---- the loop a Pyro user writes (issue 24, item 6) ----------------------------------------------

#: Our guides in the plain-loop table, at their defaults.
PLAIN_GUIDES: dict[str, Callable] = {
    "pf AutoPlanar": lambda m: pf.guides.AutoPlanar(m),
    "pf AutoRadial": lambda m: pf.guides.AutoRadial(m),
    "pf AutoIAF": lambda m: pf.guides.AutoIAF(m),
}
#: The targets of the plain-loop table.
PLAIN_TARGETS = ["banana_b0.1", "rezende_u1", "funnel10"]
#: The plain loop's Adam step size, constant.
PLAIN_LR = 5e-3


def fit_svi(target: Target, make_guide: Callable, loop: str, steps: int, num_particles: int,
            seed: int) -> tuple[object, float]:
    """Train a guide with Pyro's ``SVI`` and either ``loop``: ``"plain"``, what a Pyro user
    writes (``pyro.optim.Adam({"lr": 5e-3})``, ``Trace_ELBO``), or ``"recommended"``
    (:func:`pyroflows.guides.recommended_optimizer` and ``FlowELBO``, annealing on
    :data:`MULTIMODAL` targets); ``num_particles`` vectorized particles. Returns
    ``(guide, seconds)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    begin = time.perf_counter()
    guide = make_guide(target.model)
    elbo_kwargs = dict(num_particles=num_particles, vectorize_particles=True,
                       max_plate_nesting=target.max_plate_nesting)
    if loop == "plain":
        optimizer = pyro.optim.Adam({"lr": PLAIN_LR})
        elbo = pyro.infer.Trace_ELBO(**elbo_kwargs)
    elif loop == "recommended":
        guide()
        optimizer = pf.guides.recommended_optimizer(guide, steps)
        anneal = int(MULTIMODAL.get(target.name, 0.0) * steps)
        elbo = FlowELBO(anneal_steps=anneal, **elbo_kwargs)
    else:
        raise ValueError(f"unknown loop {loop!r}")
    svi = pyro.infer.SVI(target.model, guide, optimizer, elbo)
    with pf.validation(False):
        for _ in range(steps):
            svi.step()
    return guide, time.perf_counter() - begin


def plain_table(targets: list[str], guides: list[str], steps: int, num_particles: int,
                seeds: list[int], num_draws: int) -> list[str]:
    """The plain-loop table: per (target, guide), KL under the recommended loop, under the
    plain loop (its last state, and after ``guide.keep_best()``), the ratio plain / recommended
    and whether it is within 1.5x; the seeds side by side."""
    rows = ["| target | guide | KL recommended | KL plain | KL plain + keep_best | "
            "plain / recommended | within 1.5x | s / run (rec, plain) |",
            "|---|---|---|---|---|---:|---|---|"]
    print("\n".join(rows), flush=True)
    for tname in targets:
        target = load_target(tname)
        for gname in guides:
            res: dict[str, list[float]] = {"rec": [], "plain": [], "kept": [], "t_rec": [],
                                           "t_plain": []}
            for seed in seeds:
                guide, sec = fit_svi(target, PLAIN_GUIDES[gname], "recommended", steps,
                                     num_particles, seed)
                res["rec"].append(evaluate(target, guide, num_draws)["kl"])
                res["t_rec"].append(sec)
                guide, sec = fit_svi(target, PLAIN_GUIDES[gname], "plain", steps,
                                     num_particles, seed)
                res["plain"].append(evaluate(target, guide, num_draws)["kl"])
                res["t_plain"].append(sec)
                with pf.validation(False):
                    guide.keep_best()
                res["kept"].append(evaluate(target, guide, num_draws)["kl"])
            rec, plain = float(np.mean(res["rec"])), float(np.mean(res["plain"]))
            ratio = plain / rec if rec > 0 else math.inf

            def col(key: str, res: dict = res) -> str:
                return " / ".join(_fmt(x) for x in res[key])
            row = (f"| {tname} | {gname} | {col('rec')} | {col('plain')} | {col('kept')} | "
                   f"{ratio:.2f} | {'met' if ratio <= 1.5 else 'not met'} | "
                   f"{np.mean(res['t_rec']):.0f}, {np.mean(res['t_plain']):.0f} |")
            print(row, flush=True)
            rows.append(row)
    return rows


# ---- sticking the landing by route, for the other families -----------------------------------

def stl_routes_table(families: list[str], dims: list[int], num_particles: int, rounds: int,
                     calls: int = 10) -> list[str]:
    """Milliseconds of one ``FlowELBO`` loss and gradient with sticking the landing for
    ``AutoFlowGuide(flow=..., num_layers=2, stick_the_landing=True)`` on a correlated
    Gaussian of each D, its parameters moved off their start: layer by layer (the default)
    against the draw's whole Jacobian (``landing.STL_LAYERWISE = False``), the best of
    ``rounds`` alternations of ``calls`` calls each."""
    from pyroflows.guides import landing

    rows = ["| family | D | layer by layer (ms) | whole Jacobian (ms) | Jacobian / layer by "
            "layer |", "|---|---:|---:|---:|---:|"]
    for family in families:
        for dim in dims:
            pyro.clear_param_store()
            torch.manual_seed(0)
            loc = torch.linspace(-1.0, 1.0, dim)
            cov = 0.5 * torch.eye(dim) + 0.3

            def model(loc=loc, cov=cov):
                pyro.sample("z", dist.MultivariateNormal(loc, cov))

            guide = pf.guides.AutoFlowGuide(model, flow=family, num_layers=2,
                                            stick_the_landing=True)
            guide()
            with torch.no_grad():
                for p in guide.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            elbo = FlowELBO(num_particles=num_particles, vectorize_particles=True,
                            max_plate_nesting=0)
            best = {True: math.inf, False: math.inf}
            try:
                for _ in range(rounds):
                    for layerwise in (True, False):
                        landing.STL_LAYERWISE = layerwise
                        start = time.perf_counter()
                        for _ in range(calls):
                            elbo.differentiable_loss(model, guide).backward()
                        best[layerwise] = min(best[layerwise],
                                              (time.perf_counter() - start) / calls)
            finally:
                landing.STL_LAYERWISE = True
            rows.append(f"| {family} | {dim} | {1e3 * best[True]:.1f} | "
                        f"{1e3 * best[False]:.1f} | {best[False] / best[True]:.2f} |")
            print(rows[-1], flush=True)
    return rows


def _save(out: str | None, lines: list[str]) -> None:
    """Write a table printed as it was computed (its header first, then its rows) to ``out``."""
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--guides", nargs="*", default=MAIN_GUIDES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--gaussians", action="store_true",
                        help="the start-against-end table on Gaussians instead (issue 24)")
    parser.add_argument("--dims", nargs="*", type=int, default=[10, 30, 50, 100])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--gaussian-guides", nargs="*", default=list(GAUSSIAN_GUIDES))
    parser.add_argument("--kinds", nargs="*", default=list(GAUSSIAN_KINDS),
                        choices=GAUSSIAN_KINDS, help="--gaussians: the posteriors' kinds")
    parser.add_argument("--scaling", action="store_true",
                        help="the cost-against-D table on ill-conditioned Gaussians instead "
                        "(issue 24, item 3)")
    parser.add_argument("--time-steps", type=int, default=20,
                        help="--scaling: gradients timed with and without sticking the landing")
    parser.add_argument("--scaling-guides", nargs="*", default=list(SCALING_GUIDES))
    parser.add_argument("--plain", action="store_true",
                        help="the plain-loop table instead (issue 24, item 6): each guide "
                        "under SVI with Adam 5e-3 and Trace_ELBO against the recommended loop")
    parser.add_argument("--stl-routes", nargs="*", default=None, metavar="FAMILY",
                        help="milliseconds of a loss and gradient with sticking the landing "
                        "for these families' AutoFlowGuide, layer by layer against the whole "
                        "Jacobian, at --dims, instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Pyro's flow guides build their layers lazily in the default dtype: float64 models need it.
    torch.set_default_dtype(torch.float64)
    if args.stl_routes is not None:
        header = (
            "# Sticking the landing by route, for MAF, NSF and RealNVP guides\n\n"
            f"`AutoFlowGuide(flow=..., num_layers=2, stick_the_landing=True)` on "
            "N(linspace(-1, 1, D), 0.5 I + 0.3), its parameters moved off their start; one "
            f"`FlowELBO` loss and gradient of {args.particles} vectorized particles, float64, "
            "one thread: milliseconds, best of 3 alternations of 10 calls, layer by layer "
            "(the default) against the draw's whole Jacobian (`landing.STL_LAYERWISE = "
            "False`).\n"
        )
        print(header, flush=True)
        rows = stl_routes_table(args.stl_routes or ["maf", "nsf", "realnvp"], args.dims,
                                args.particles, rounds=3)
        _save(args.out, [header, *rows])
        return 0
    if args.plain:
        targets = args.targets if args.targets != list(TARGETS) else PLAIN_TARGETS
        guides = [g for g in args.guides if g in PLAIN_GUIDES] or list(PLAIN_GUIDES)
        header = (
            "# The loop a Pyro user writes (issue 24, item 6)\n\n"
            f"Each guide at its defaults, trained {args.steps} steps with `pyro.infer.SVI` and "
            f"{args.particles} vectorized particles, float64, seeds "
            f"{', '.join(map(str, args.seeds))} (the values of a cell, in order; the ratio "
            "is of the means). Plain: `pyro.optim.Adam({\"lr\": 5e-3})` constant and "
            "`Trace_ELBO`; KL of the last state, and after `guide.keep_best()` (which, with "
            "no recorded step, chooses between the start and the last state). Recommended: "
            "`pf.guides.recommended_optimizer(guide, num_steps)` (ClippedAdam at the family's "
            f"step sizes, decayed {pf.guides.autoguide.RECOMMENDED_DECAY:g}x) and `FlowELBO` "
            "(its default sticking the landing; on rezende_u1 annealing over the first half). "
            f"KL = log Z - ELBO from {args.draws} draws (nats). Goal: plain within 1.5x of "
            "recommended.\n"
        )
        print(header, flush=True)
        rows = plain_table(targets, guides, args.steps, args.particles, args.seeds, args.draws)
        _save(args.out, [header, *rows])
        return 0
    if args.scaling:
        header = (
            "# Cost against the latent size D (issue 24, item 3)\n\n"
            f"Ill-conditioned Gaussian posteriors (eigenvalues log-spaced from 1 to 1e-3, a "
            f"fixed random rotation; log Z = 0), float64, {args.steps} training steps of "
            f"{args.particles} vectorized particles, seed {args.seed} only (CPU is scarce: a "
            "2-core machine shared with other jobs, `torch.set_num_threads(1)`; times are "
            "noisy, ratios within one run are the measure). pf AutoIAF at its defaults "
            "(conditioner widths `guide_hidden_dims(D)`, Laplace start up to D = 256, the "
            f"family's Adam step sizes decayed {OUR_RECIPE.decay:g}x, FlowELBO with sticking "
            "the landing); Pyro's AutoIAFNormal (Adam 5e-3) and AutoMultivariateNormal (Adam "
            "1e-2) constant, Trace_ELBO; `pf AutoIAF(hidden 4D)`: ours at the conditioner "
            "widths before issue 24 (two layers of max(64, 4D) units). ms / step: median "
            "wall time of a training step. KL "
            f"(nats) from {args.draws} draws of the guide, log p in closed form. For our "
            "guide, the median time of one loss and gradient without and with sticking the "
            "landing (its default route: layer by layer), no update; of a whole training "
            "step (the gradient and the Adam update) without and with it; and of the "
            "gradient with it by the draw's whole Jacobian (`STL_LAYERWISE` off; its ratio "
            "to the plain gradient measured beside it): each pair "
            f"{args.time_steps} times in an alternation of its own after training (the state "
            "put back); "
            "its KL at the start (the Laplace start: exact up to D = 256), after training "
            "and after `guide.keep_best()`.\n"
        )
        print(header, flush=True)
        rows = scaling_table(args.dims, args.steps, args.particles, args.draws,
                             args.time_steps, args.seed, args.scaling_guides)
        _save(args.out, [header, *rows])
        return 0
    if args.gaussians:
        header = (
            "# Start against end on Gaussian posteriors (issue 24)\n\n"
            f"{args.steps} steps, {args.particles} vectorized particles, float64, seeds "
            f"{', '.join(map(str, args.seeds))} (the three values of a cell, in order); our "
            "guides at their defaults (Laplace start where its ELBO beats the plain one, the "
            f"family's Adam step sizes decayed {OUR_RECIPE.decay:g}x, FlowELBO with its default "
            "sticking the landing). KL (nats) from "
            f"{args.draws} draws of the guide, log p in closed form (log Z = 0): at the start "
            "(after set-up, before any step), at the end of training, and after "
            "`guide.keep_best()` (the state it kept: start, best tracked, last); worst = the "
            "largest KL kept - KL start over the seeds; seconds of training per run.\n"
        )
        print(header, flush=True)
        rows = gaussian_table(args.dims, args.seeds, args.steps, args.particles, args.draws,
                              args.gaussian_guides, tuple(args.kinds))
        _save(args.out, [header, *rows])
        return 0
    families = pf.flows.FAMILIES
    lrs = ", ".join(f"{k} {families[k].lr[1]:g}" for k in ("planar", "radial", "iaf"))
    header = (
        f"# VI benchmark: flow guides vs Pyro autoguides\n\n"
        f"{args.steps} steps per guide, {args.particles} vectorized particles, float64, seed "
        f"{args.seed}; KL = log Z - ELBO from {args.draws} draws (nats); k-hat from the same "
        f"draws; mean err = max |mean_q - mean_ref| / sd_ref, log sd = max |log(sd_q / sd_ref)| "
        f"against the reference draws; seconds of set-up and training on a shared 2-core CPU "
        f"(noisy).\n"
        f"Pyro guides: Adam 1e-2 (Gaussian) or 5e-3 (flows), constant. pyroflows guides at "
        f"their defaults (full-rank last layer unless stated; start = Laplace where its ELBO "
        f"beat the plain start, else plain with init_scale "
        f"{families['planar'].init_scale:g} planar/radial, "
        f"{families['iaf'].init_scale:g} IAF): Adam "
        f"{families['iaf'].lr[0]:g} for the affine layer, flow layers {lrs}, all "
        f"decayed {OUR_RECIPE.decay:g}x over the run; sticking the landing for IAF; on "
        f"rezende_u1 only, FlowELBO annealing beta 0.05 -> 1 over the first half.\n\n"
        "| target | guide | start | KL | k-hat | mean err | log sd | seconds |\n"
        "|---|---|---|---:|---:|---:|---:|---:|"
    )
    print(header, flush=True)
    rows = [header]
    for tname in args.targets:
        target = load_target(tname)
        for gname in args.guides:
            make_guide, recipe = GUIDES[gname]
            try:
                guide, seconds, _ = fit(target, make_guide, recipe, args.steps, args.seed,
                                        num_particles=args.particles)
                m = evaluate(target, guide, args.draws)
                row = (f"| {tname} | {gname} | {_start(guide)} | {_fmt(m['kl'])} | "
                       f"{_fmt(m['khat'], 2)} | {_fmt(m.get('mean_err'), 2)} | "
                       f"{_fmt(m.get('log_sd'), 2)} | {seconds:.0f} |")
            except Exception as e:  # noqa: BLE001 - a failing guide is a result, not a crash
                row = f"| {tname} | {gname} | failed: {type(e).__name__}: {str(e)[:60]} ||||||"
            print(row, flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
