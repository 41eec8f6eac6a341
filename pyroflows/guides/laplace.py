r"""The Laplace start of a flow guide: the Gaussian :math:`N(m, C C^T)` at the mode :math:`m`
of the model's unconstrained log density :math:`\log p(x, T(u)) + \log|\det J_T(u)|`, with
:math:`C = \mathrm{chol}(H^{-1})` and :math:`H` the Hessian of the negative log density there.

The mode is found by :func:`map_search`, an L-BFGS search whose steps are bounded (a trust
radius that doubles after a full step and shrinks to the step that was accepted) and whose
trial points with a non-finite density or gradient are never taken (the step is cut instead),
so no start sends it to infinity in one step. A search that leaves the box
:math:`|u_i - u^{(0)}_i| \le` :data:`LAPLACE_RUNAWAY` :math:`(1 + |u^{(0)}_i|)` around its start
has found an unbounded direction (a funnel's neck, a scale running to 0 or infinity) and stops
there. Where a search fails (an unbounded direction, a model error, no finite point, a Hessian
that is not positive definite), the next start is tried: the guide's initial location, then
the origin of the unconstrained space (Pyro's ``init_to_feasible``), then
:data:`LAPLACE_PRIOR_RESTARTS` draws of the prior. The mode is kept only where its ELBO beats
the plain start's (a funnel's mode sits at the edge of an unbounded density). ``info`` says
which start gave the mode and why the others failed. It costs a few hundred model runs and a
Hessian at set-up; more only where a start fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .. import _plates
from ..transforms.affine import FixedTriangularAffine

__all__ = ["LogDensity", "laplace_approximation", "map_search", "gaussian_elbo",
           "match_laplace_layer", "laplace_record"]

#: L-BFGS iterations of the MAP search from the guide's initial location.
LAPLACE_MAX_ITER = 500
#: L-BFGS iterations of each later start's search (the fallbacks).
LAPLACE_RESTART_ITER = 200
#: A search that moves a coordinate farther than this times ``1 + |start|`` from its start has
#: found an unbounded direction: for a log-scale coordinate a factor e^100.
LAPLACE_RUNAWAY = 100.0
#: Draws of the prior tried as starts after the initial location and the origin have failed.
LAPLACE_PRIOR_RESTARTS = 3
#: Draws behind the ELBO comparison that decides whether the Laplace start is kept.
LAPLACE_ELBO_DRAWS = 64
#: The most model runs :class:`LogDensity` takes to see every row of a subsampled plate.
WHOLE_DATA_MAX_RUNS = _plates.WHOLE_DATA_MAX_RUNS


class LogDensity:
    r""":math:`\log p(x, T(u)) + \log|\det J_T(u)|` of a model's unconstrained latent vector
    :math:`u`, with :math:`T` the ``biject_to`` map of every latent site, every latent site
    conditioned; ``unpack_latent`` as :meth:`AutoContinuous._unpack_latent`.

    A model that subsamples one plate (``pyro.plate(name, N, subsample_size=M)``) would give a
    random estimate at every call, on which a mode search stops on noise and states compare
    by chance. Its density is that of every row instead, the mean over
    :math:`L = \lceil N/M \rceil` runs over windows of the rows (:mod:`pyroflows._plates`),
    where :math:`L \le` :data:`WHOLE_DATA_MAX_RUNS`. Otherwise (more runs, several
    subsampled plates, a latent site inside the plate) :attr:`whole_data` is ``False`` and
    each call draws its subsamples, as the model does.

    Example:
        >>> import pyro, pyro.distributions as dist, pyroflows as pf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = pf.guides.AutoPlanar(model, num_layers=1, laplace_init=False)
        >>> _ = guide()
        >>> density = LogDensity(model, guide._unpack_latent, (), {})
        >>> round(float(density(torch.zeros(1))), 4)  # log N(0; 0, 1)
        -0.9189
    """

    def __init__(self, model: Callable, unpack_latent: Callable[[Tensor], Iterator],
                 args: tuple, kwargs: dict) -> None:
        self.model = model
        self.unpack_latent = unpack_latent
        self.args = args
        self.kwargs = kwargs
        #: False once the model refused a batch of draws: :meth:`mean` then loops directly
        self.vectorized = True
        self._runs: list[Callable] | None = None  # each run's model wrapper
        self._subsampled: list[str] = []
        self._enumerated: list[str] = []
        self._nesting = 0  # the model's plate dims, for TraceEnum_ELBO

    @property
    def whole_data(self) -> bool:
        """Whether the density is every row's (no plate subsamples, or one does and its
        windows are used); ``False``: a random estimate at each call. After
        :meth:`prepare`."""
        return bool(self._runs)

    @property
    def subsampled(self) -> list[str]:
        """The model's subsampled plates, as ``"name (M of N)"`` (after :meth:`prepare`)."""
        return self._subsampled

    @property
    def enumerated(self) -> list[str]:
        """The model's discrete sites enumerated in parallel (``infer={"enumerate":
        "parallel"}``), which the density sums out (after :meth:`prepare`)."""
        return self._enumerated

    def prepare(self, u: Tensor) -> None:
        """Find, once, from a run of the model at ``u`` (D,) with every latent site conditioned
        (so an improper prior needs no draw): its subsampled plates, enumerated sites and
        plate dims, and so the runs of each evaluation (:meth:`runs`). A model that fails
        there is asked again at the next point."""
        if self._runs is not None:
            return
        values, _ = self._constrained(u.detach())
        with torch.no_grad():
            model = poutine.condition(self.model, data=values)
            trace = poutine.block(poutine.trace(model).get_trace)(*self.args, **self.kwargs)
        self._subsampled = [_plates.describe(site) for site in _plates.subsampled(trace)]
        self._enumerated = [name for name, site in trace.nodes.items()
                            if site["type"] == "sample" and not site["is_observed"]
                            and site["infer"].get("enumerate") == "parallel"]
        self._nesting = max((-frame.dim for site in trace.nodes.values()
                             if site["type"] == "sample" for frame in site["cond_indep_stack"]
                             if frame.vectorized and frame.dim is not None), default=0)
        windows = _plates.windows(trace, latent=values)
        self._runs = [_same] if windows == [] else (windows or [])

    def runs(self) -> list[Callable]:
        """Each run's wrapper of the model (latent sites conditioned): ``[identity]`` for a
        model that subsamples no plate, the windows of :func:`pyroflows._plates.windows` for
        one that does, or ``[identity]`` too where they would not give every row's density
        (:attr:`whole_data` ``False``: each run draws its own subsamples). After
        :meth:`prepare`."""
        return self._runs or [_same]

    def __call__(self, u: Tensor) -> Tensor:
        """The log density at one vector ``u`` (D,)."""
        self.prepare(u)
        if self._enumerated:
            return self._summed_out(u)
        return self.with_trace(u)[0]

    def _constrained(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The latent sites' values at ``u`` (D,) and the log-det of the map to them."""
        values, log_det = {}, u.new_zeros(())
        for site, unconstrained in self.unpack_latent(u):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
            values[site["name"]] = value
        return values, log_det

    def _summed_out(self, u: Tensor) -> Tensor:
        r"""The log density at ``u`` with the enumerated discrete sites summed out:
        :math:`-` ``TraceEnum_ELBO``'s loss of the model with every latent site conditioned
        and no guide (so nothing but the enumerated sites is random)."""
        values, log_det = self._constrained(u)
        elbo = TraceEnum_ELBO(max_plate_nesting=self._nesting)
        runs = self.runs()
        total = 0.0
        for run in runs:
            model = run(poutine.condition(self.model, data=values))
            with poutine.block():  # (hidden from a trace around it: SVI's, at set-up)
                if torch.is_grad_enabled() and u.requires_grad:  # (the search's gradients)
                    loss = elbo.differentiable_loss(model, _no_guide, *self.args, **self.kwargs)
                else:  # (differentiable_loss refuses a loss without gradients)
                    loss = elbo.loss(model, _no_guide, *self.args, **self.kwargs)
            total = total - loss
        return total / len(runs) + log_det

    def with_trace(self, u: Tensor) -> tuple[Tensor, Trace]:
        """The log density at ``u`` (enumerated discrete sites drawn, not summed out) and the
        model's trace behind it (the first run's)."""
        self.prepare(u)
        values, log_det = self._constrained(u)
        total, first = 0.0, None
        runs = self.runs()
        for run in runs:
            model = run(poutine.condition(self.model, data=values))
            trace = poutine.block(poutine.trace(model).get_trace)(*self.args, **self.kwargs)
            total = total + trace.log_prob_sum()
            first = trace if first is None else first
        return total / len(runs) + log_det, first

    def batched(self, u: Tensor, plate_dim: int) -> Tensor | None:
        """The log density (S,) of the rows of ``u`` (S, D) in one run of the model in a plate
        at ``plate_dim``, or ``None`` where a site does not broadcast over the draws."""
        num_draws, nesting = u.shape[0], -plate_dim
        latent = u.reshape((num_draws,) + (1,) * (nesting - 1) + u.shape[-1:])
        values, log_det = {}, u.new_zeros(num_draws)
        for site, unconstrained in self.unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            ld = transform.log_abs_det_jacobian(unconstrained, value)
            if ld.dim() == 0 or ld.shape[0] != num_draws:
                return None
            log_det = log_det + ld.reshape(num_draws, -1).sum(-1)
            values[site["name"]] = value
        self.prepare(u[0])
        runs = self.runs()
        total = 0.0
        for run in runs:
            model = run(poutine.condition(self.model, data=values))
            with poutine.block(), pyro.plate("_pyroflows_laplace_draws", num_draws,
                                             dim=plate_dim):
                trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
            trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):  # (those add zero)
                    continue
                log_prob = site["log_prob"]
                # batch dims are the plates' (and this plate's) only: else the model has its
                # own batch dims left of the draws, which the loop sums over and this would
                # misread
                if log_prob.dim() != nesting or log_prob.shape[0] != num_draws:
                    return None
                total = total + log_prob.reshape(num_draws, -1).sum(-1)
        return total / len(runs) + log_det

    def mean(self, draws: Tensor) -> float:
        r"""The mean log density over the rows of ``draws`` (S, D), :math:`-\infty` where a
        draw is rejected or not finite (:meth:`values`)."""
        values = self.values(draws)
        return float(values.mean()) if bool(torch.isfinite(values).all()) else -math.inf

    def values(self, draws: Tensor) -> Tensor:
        r"""The log density (S,) at each row of ``draws`` (S, D), :math:`-\infty` where a
        draw is rejected or not finite: one vectorized run where it agrees, else a loop."""
        if self.vectorized:
            values = self.vectorized_values(draws)
            if values is not None:
                return values
            self.vectorized = False
        out = []
        for u in draws:
            try:
                value = float(self(u))
            except Exception:  # noqa: BLE001 - a draw the model rejects
                value = -math.inf
            out.append(value if math.isfinite(value) else -math.inf)
        return torch.tensor(out, dtype=draws.dtype, device=draws.device)

    def vectorized_values(self, draws: Tensor) -> Tensor | None:
        r""":meth:`values` from one vectorized run, or ``None`` where the loop must decide: the
        batched run fails or differs from the plain one at the first and last draw (a model
        can run and still mix the draws), or a plate subsamples. Where the first draw is
        rejected or not finite, every entry is :math:`-\infty` (the draws are rejected as a
        whole, without running the rest)."""
        rejected = torch.full(draws.shape[:1], -math.inf, dtype=draws.dtype, device=draws.device)
        try:
            self.prepare(draws[0])
        except Exception:  # noqa: BLE001 - a draw the model rejects: the loop's answer
            return rejected
        if self._enumerated:  # (TraceEnum_ELBO's runs are per draw)
            return None
        try:
            first, trace = self.with_trace(draws[0])
        except Exception:  # noqa: BLE001 - a draw the model rejects: the loop's answer
            return rejected
        if not bool(torch.isfinite(first)):
            return rejected
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        frames = [frame for site in sites for frame in site["cond_indep_stack"]
                  if frame.vectorized]
        if not self.whole_data and any(frame.full_size is not None
                                       and frame.full_size != frame.size for frame in frames):
            return None  # each draw its own subsamples: the loop
        # the draws' plate goes left of every batch dim of the plain run: the plates' and a
        # site's own unplated ones (an observation ``obs=y`` outside any plate, whose dims
        # Pyro sums; a plate right of them would meet them and send the model to the loop)
        unplated = max((max(len(site["fn"].batch_shape),
                             site["value"].dim() - len(site["fn"].event_shape))
                        for site in sites if not site_is_subsample(site)), default=0)
        plate_dim = min(min((frame.dim for frame in frames if frame.dim is not None),
                            default=0), -unplated) - 1
        try:
            values = self.batched(draws, plate_dim)
            last = self(draws[-1])
        except Exception:  # noqa: BLE001 - the model does not broadcast: the loop decides
            return None
        if values is None:
            return None
        tol = math.sqrt(torch.finfo(values.dtype).eps)
        if not torch.allclose(values[[0, -1]], torch.stack([first, last]), rtol=tol, atol=tol):
            return None
        return torch.where(torch.isfinite(values), values.detach(), rejected)


def _same(model: Callable) -> Callable:
    return model


def _no_guide(*args: Any, **kwargs: Any) -> None:
    """The guide of :meth:`LogDensity._summed_out`: every latent site is conditioned."""


def laplace_record(used: bool, reason: str) -> dict[str, Any]:
    """A guide's ``laplace_info`` where no search ran: the keys of a search's record."""
    return {"used": used, "reason": reason, "search_start": None, "attempts": []}


def gaussian_elbo(density: LogDensity, loc: Tensor, scale_tril: Tensor, eps: Tensor) -> float:
    r"""The ELBO of :math:`N(\mu, L L^T)`: ``density``'s mean over :math:`\mu + L \varepsilon`
    of ``eps`` (S, D) plus the Gaussian's entropy."""
    entropy = (0.5 * eps.shape[-1] * math.log(2 * math.pi * math.e)
               + float(scale_tril.diagonal().log().sum()))
    return density.mean(loc + eps @ scale_tril.T) + entropy


def laplace_approximation(density: LogDensity, loc: Tensor, init_scale: float,
                          prior_draw: Callable[[], Tensor] | None = None
                          ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    r"""``(mode, chol(H^-1))`` of ``density`` by :func:`map_search` from ``loc`` (D,) and, where
    that fails, from the origin and from ``prior_draw()`` (an unconstrained prior draw (D,)), or
    ``None`` where no start gives a usable mode or its ELBO is below the plain start's
    :math:`N(\mathrm{loc}, \mathrm{init\_scale}^2 I)`; and ``info``: ``used``, ``reason``,
    ``search_start`` (the start whose mode was used), ``attempts`` (each start tried and how
    its search ended) and the ELBOs. The random state is kept.

    Example:
        >>> import torch, pyro, pyro.distributions as dist, pyroflows as pf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(3.0, 2.0))
        >>> guide = pf.guides.AutoPlanar(model, num_layers=1, laplace_init=False)
        >>> _ = guide()
        >>> density = LogDensity(model, guide._unpack_latent, (), {})
        >>> (mode, scale_tril), info = laplace_approximation(density, torch.zeros(1), 0.1)
        >>> round(float(mode), 4), round(float(scale_tril), 4), info["search_start"]
        (3.0, 2.0, 'the initial location')
    """
    cuda = [loc.device.index or 0] if loc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _search(density, loc, init_scale, prior_draw)


def _starts(loc: Tensor, prior_draw: Callable[[], Tensor] | None
            ) -> Iterator[tuple[str, Tensor | str]]:
    """The MAP search's starts in order, each ``(label, start)``; a prior draw that failed is
    ``(label, why)``."""
    yield "the initial location", loc
    origin = torch.zeros_like(loc)
    if not torch.equal(origin, loc):
        yield "the origin of the unconstrained space", origin
    for k in range(LAPLACE_PRIOR_RESTARTS if prior_draw is not None else 0):
        label = f"prior draw {k + 1}"
        try:
            draw = prior_draw().to(loc)
        except Exception as e:  # noqa: BLE001 - a model that cannot be drawn from
            yield label, f"the prior could not be drawn: {type(e).__name__}: {str(e)[:100]}"
            return
        yield label, draw


def _search(density: LogDensity, loc: Tensor, init_scale: float,
            prior_draw: Callable[[], Tensor] | None
            ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    info: dict[str, Any] = {"used": False, "attempts": []}
    try:
        density.prepare(loc)
    except Exception:  # noqa: BLE001 - a model that fails there: the searches say what fails
        pass
    if density.subsampled and not density.whole_data:
        info["reason"] = (
            f"the model subsamples {', '.join(density.subsampled)} in a way whose every row "
            "the search cannot see in a few runs (several subsampled plates, a latent site "
            "inside one, or more than WHOLE_DATA_MAX_RUNS windows): its density at a point is "
            "a random estimate, on which a mode search stops on noise")
        return None, info

    def objective(u: Tensor) -> Tensor:
        return -density(u)

    found = None
    with pyro.validation_enabled(False):
        for label, start in _starts(loc, prior_draw):
            if isinstance(start, str):
                info["attempts"].append(f"{label}: {start}")
                continue
            budget = LAPLACE_MAX_ITER if not info["attempts"] else LAPLACE_RESTART_ITER
            try:
                mode, why = map_search(objective, start, max_iter=budget)
            except Exception as e:  # noqa: BLE001 - e.g. a model that rejects far-off values
                mode, why = None, f"the search failed: {type(e).__name__}: {str(e)[:200]}"
            if mode is not None:
                with torch.enable_grad():
                    try:
                        hessian = torch.autograd.functional.hessian(objective, mode)
                    except Exception as e:  # noqa: BLE001 - a model that fails there
                        hessian, why = None, f"the Hessian failed: {type(e).__name__}: {e}"
                if hessian is not None and not bool(torch.isfinite(hessian).all()):
                    hessian, why = None, "the Hessian at the mode is not finite"
                if hessian is not None:
                    chol_h, failed = torch.linalg.cholesky_ex(0.5 * (hessian + hessian.T))
                    if bool(failed):
                        why = "the Hessian at the mode is not positive definite"
                    else:
                        found = (label, mode, chol_h)
            info["attempts"].append(f"{label}: {why}")
            if found is not None:
                break
    if found is None:
        info["reason"] = "no start gave a usable mode (" + "; ".join(info["attempts"]) + ")"
        return None, info
    label, mode, chol_h = found
    info["search_start"] = label
    scale_tril = torch.linalg.cholesky(torch.cholesky_inverse(chol_h))
    # The guard for modes at the edge of an unbounded or singular density (Neal's funnel has
    # its mode at x0 = -40.5 with scales e^-20): keep the Laplace Gaussian only if its ELBO
    # beats the plain start's, on common draws.
    gen = torch.Generator(device=loc.device).manual_seed(0)
    eps = torch.randn(LAPLACE_ELBO_DRAWS, loc.numel(), generator=gen, device=loc.device,
                      dtype=loc.dtype)
    plain = torch.diag(torch.full_like(loc, init_scale))
    with torch.no_grad(), pyro.validation_enabled(False):
        elbo_plain = gaussian_elbo(density, loc, plain, eps)
        elbo_laplace = gaussian_elbo(density, mode, scale_tril, eps)
    info.update(elbo_plain=elbo_plain, elbo_laplace=elbo_laplace)
    if not elbo_laplace > elbo_plain:
        info["reason"] = (f"the mode found from {label} has an ELBO estimate "
                          f"({elbo_laplace:.4g}) below the plain start's ({elbo_plain:.4g})")
        return None, info
    info.update(used=True, reason=f"ok: the mode found from {label}")
    return (mode, scale_tril), info


def map_search(objective: Callable[[Tensor], Tensor], start: Tensor,
               max_iter: int = LAPLACE_MAX_ITER, history: int = 20
               ) -> tuple[Tensor | None, str]:
    r"""Minimize ``objective`` (a scalar of a vector (D,)) from ``start`` by L-BFGS with bounded
    steps: ``(minimizer, "converged ...")``, or ``(None, why)`` where it ran off or did not
    converge in ``max_iter`` iterations.

    Each iteration takes the L-BFGS direction :math:`d` (two-loop recursion, the steepest
    descent where it is not a descent direction), shortened to the trust radius
    :math:`\Delta` (first 1, doubled after a full step, else the accepted step's length),
    then halves the step until the Armijo condition
    :math:`f(u + t d) \le f(u) + 10^{-4}\, t\, \nabla f^\top d` holds at a finite value and
    gradient: a non-finite trial point is never taken. It stops where the gradient or the
    change of :math:`f` and the step are at the dtype's resolution (:math:`\epsilon^{2/3}
    (1 + |f|)` for the gradient, :math:`\epsilon (1 + |f|)` and :math:`\sqrt\epsilon\,
    (1 + \|u\|_\infty)` for the change), or no step decreases :math:`f`; it
    reports an unbounded direction where an iterate leaves the box
    :math:`|u_i - u^{(0)}_i| \le` :data:`LAPLACE_RUNAWAY` :math:`(1 + |u^{(0)}_i|)`, or where
    the density still rises (the gradient above :math:`\sqrt\epsilon\,(1 + |f|)`) but every
    shorter step meets a non-finite value (a scale under- or overflowing the dtype).

    Example:
        >>> import torch
        >>> u, why = map_search(lambda u: ((u - 2.0) ** 2).sum(), torch.zeros(3))
        >>> torch.allclose(u, torch.full((3,), 2.0)), why.startswith("converged")
        (True, True)
        >>> map_search(lambda u: u.sum(), torch.zeros(2))[1][:28]
        'an unbounded direction: the '
    """
    eps = torch.finfo(start.dtype).eps
    grad_tol = eps ** (2 / 3)
    box = LAPLACE_RUNAWAY * (1 + start.abs())

    def value_and_grad(u: Tensor) -> tuple[Tensor, Tensor] | None:
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            try:
                value = objective(u)
                (grad,) = torch.autograd.grad(value, u)
            except Exception:  # noqa: BLE001 - a point the model rejects: not taken
                return None
        value = value.detach()
        if not (bool(torch.isfinite(value)) and bool(torch.isfinite(grad).all())):
            return None
        return value, grad

    u = start.detach().clone()
    first = value_and_grad(u)
    if first is None:
        return None, "the log density or its gradient is not finite at the start"
    f, g = first
    steps: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, 1 / y.s)
    radius = 1.0
    for _ in range(max_iter):
        if float(g.abs().max()) <= grad_tol * (1 + float(f.abs())):
            return u, "converged (the gradient is at the dtype's resolution)"
        direction = _lbfgs_direction(g, steps)
        slope = float(g @ direction)
        if not slope < 0:  # not a descent direction: restart from the steepest descent
            steps.clear()
            direction, slope = -g, -float(g @ g)
        length = float(direction.norm())
        if length > radius:
            direction, slope, length = direction * (radius / length), slope * radius / length, \
                radius
        t, accepted, overflow = 1.0, None, False
        while t * length > eps * (1 + float(u.norm())):
            trial = u + t * direction
            result = value_and_grad(trial)
            overflow = overflow or result is None
            if result is not None and float(result[0]) <= float(f) + 1e-4 * t * slope:
                accepted = (trial, *result)
                break
            t *= 0.5
        if accepted is None:
            if overflow and float(g.abs().max()) > eps ** 0.5 * (1 + float(f.abs())):
                return None, ("an unbounded direction: the log density still rises where the "
                              "model's density over- or underflows (at coordinate "
                              f"{int(g.abs().argmax())}, value "
                              f"{float(u[int(g.abs().argmax())]):.3g})")
            return u, "converged (no step decreases the objective)"
        new_u, new_f, new_g = accepted
        if bool(((new_u - start).abs() > box).any()):
            worst = int(((new_u - start).abs() / box).argmax())
            return None, (f"an unbounded direction: the search left the box |u - start| <= "
                          f"{LAPLACE_RUNAWAY:g} (1 + |start|) at coordinate {worst} "
                          f"(value {float(new_u[worst]):.3g})")
        s_k, y_k = new_u - u, new_g - g
        sy = float(s_k @ y_k)
        if sy > eps * float(y_k @ y_k):
            steps.append((s_k, y_k, 1.0 / sy))
            if len(steps) > history:
                steps.pop(0)
        radius = 2 * radius if t == 1.0 else max(t * length, 1e-3)
        change = float((f - new_f).abs())
        small_step = float(s_k.abs().max()) <= eps ** 0.5 * (1 + float(u.abs().max()))
        u, f, g = new_u, new_f, new_g
        if change <= eps * (1 + float(f.abs())) and small_step:
            return u, "converged (neither the log density nor the point moves any more)"
    return None, f"no convergence in {max_iter} iterations"


def _lbfgs_direction(grad: Tensor, steps: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """:math:`-H_k \nabla f` by the L-BFGS two-loop recursion over ``steps`` (s, y, 1 / s.y),
    the initial :math:`H_0 = (s^\top y / y^\top y) I` of the newest pair."""
    q = -grad
    alphas = []
    for s_k, y_k, rho in reversed(steps):
        alpha = rho * float(s_k @ q)
        q = q - alpha * y_k
        alphas.append(alpha)
    if steps:
        s_k, y_k, rho = steps[-1]
        q = q / (rho * float(y_k @ y_k))
    for (s_k, y_k, rho), alpha in zip(steps, reversed(alphas), strict=True):
        beta = rho * float(y_k @ q)
        q = q + (alpha - beta) * s_k
    return q


def match_laplace_layer(guide, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a flow guide: give it the fixed Laplace layer exactly when
    the ``state_dict`` has one (the saved affine layer means something only with it)."""
    affine = guide._modules.get("affine")
    if affine is None:  # not set up yet: the usual missing-key errors say so
        return
    loc, scale_tril = f"{prefix}laplace.loc", f"{prefix}laplace.scale_tril"
    has = guide._modules.get("laplace") is not None
    if loc in state_dict and scale_tril in state_dict and not has:
        guide.laplace = FixedTriangularAffine(state_dict[loc], state_dict[scale_tril]).to(
            device=affine.loc.device, dtype=affine.loc.dtype)
        guide.laplace_info = laplace_record(True, "loaded from a state_dict")
    elif has and loc not in state_dict and (f"{prefix}affine.packed" in state_dict
                                            or f"{prefix}affine.loc" in state_dict):
        del guide._modules["laplace"]
        guide.laplace_info = laplace_record(False, "loaded from a state_dict without it")
