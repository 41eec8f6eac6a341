r"""The Laplace start of a flow guide: the Gaussian :math:`N(m, C C^T)` at the mode :math:`m`
of the model's unconstrained log density :math:`\log p(x, T(u)) + \log|\det J_T(u)|`, found by
L-BFGS from the guide's initial location, with :math:`C = \mathrm{chol}(H^{-1})` and :math:`H`
the Hessian of the negative log density there. It is kept only where the search ends finite,
:math:`H` is positive definite and its ELBO beats the plain start's (a funnel's mode sits at
the edge of an unbounded density). It costs a few hundred model runs and a Hessian at set-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from ..transforms.affine import FixedTriangularAffine

__all__ = ["LogDensity", "laplace_approximation", "gaussian_elbo", "match_laplace_layer"]

#: L-BFGS iterations of the MAP search.
LAPLACE_MAX_ITER = 500
#: Draws behind the ELBO comparison that decides whether the Laplace start is kept.
LAPLACE_ELBO_DRAWS = 64


class LogDensity:
    r""":math:`\log p(x, T(u)) + \log|\det J_T(u)|` of a model's unconstrained latent vector
    :math:`u`, with :math:`T` the ``biject_to`` map of every latent site, every latent site
    conditioned; ``unpack_latent`` as :meth:`AutoContinuous._unpack_latent`.

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

    def __call__(self, u: Tensor) -> Tensor:
        """The log density at one vector ``u`` (D,)."""
        return self.with_trace(u)[0]

    def with_trace(self, u: Tensor) -> tuple[Tensor, Trace]:
        """The log density at ``u`` and the model's trace behind it."""
        values, log_det = {}, u.new_zeros(())
        for site, unconstrained in self.unpack_latent(u):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
            values[site["name"]] = value
        model = poutine.condition(self.model, data=values)
        trace = poutine.block(poutine.trace(model).get_trace)(*self.args, **self.kwargs)
        return trace.log_prob_sum() + log_det, trace

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
        model = poutine.condition(self.model, data=values)
        with poutine.block(), pyro.plate("_pyroflows_laplace_draws", num_draws, dim=plate_dim):
            trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
        total = log_det
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):  # (those add zero)
                continue
            log_prob = site["log_prob"]
            # batch dims are the plates' (and this plate's) only: else the model has its own
            # batch dims left of the draws, which the loop sums over and this would misread
            if log_prob.dim() != nesting or log_prob.shape[0] != num_draws:
                return None
            total = total + log_prob.reshape(num_draws, -1).sum(-1)
        return total

    def mean(self, draws: Tensor) -> float:
        r"""The mean log density over the rows of ``draws`` (S, D), :math:`-\infty` where a
        draw is rejected or not finite: one vectorized run where it agrees, else a loop."""
        if self.vectorized:
            value = self.vectorized_mean(draws)
            if value is not None:
                return value
            self.vectorized = False
        total = 0.0
        for u in draws:
            try:
                value = float(self(u))
            except Exception:  # noqa: BLE001 - a draw the model rejects
                return -math.inf
            if not math.isfinite(value):
                return -math.inf
            total += value
        return total / draws.shape[0]

    def vectorized_mean(self, draws: Tensor) -> float | None:
        r""":meth:`mean` from one vectorized run, or ``None`` where the loop must decide: the
        batched run fails or differs from the plain one at the first and last draw (a model
        can run and still mix the draws), or a plate subsamples."""
        try:
            first, trace = self.with_trace(draws[0])
        except Exception:  # noqa: BLE001 - a draw the model rejects: the loop's answer
            return -math.inf
        if not bool(torch.isfinite(first)):
            return -math.inf
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        frames = [frame for site in sites for frame in site["cond_indep_stack"]
                  if frame.vectorized]
        if any(frame.full_size is not None and frame.full_size != frame.size
               for frame in frames):
            return None
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
        if not bool(torch.isfinite(values).all()):
            return -math.inf
        return float(values.sum()) / draws.shape[0]


def gaussian_elbo(density: LogDensity, loc: Tensor, scale_tril: Tensor, eps: Tensor) -> float:
    r"""The ELBO of :math:`N(\mu, L L^T)`: ``density``'s mean over :math:`\mu + L \varepsilon`
    of ``eps`` (S, D) plus the Gaussian's entropy."""
    entropy = (0.5 * eps.shape[-1] * math.log(2 * math.pi * math.e)
               + float(scale_tril.diagonal().log().sum()))
    return density.mean(loc + eps @ scale_tril.T) + entropy


def laplace_approximation(density: LogDensity, loc: Tensor, init_scale: float
                          ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    r"""``(mode, chol(H^-1))`` of ``density`` by L-BFGS from ``loc`` (D,), or ``None`` where
    unusable or its ELBO is below the plain start's :math:`N(\mathrm{loc},
    \mathrm{init\_scale}^2 I)`; and ``used``, ``reason``, the ELBOs. The random state is kept."""
    cuda = [loc.device.index or 0] if loc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _search(density, loc, init_scale)


def _search(density: LogDensity, loc: Tensor, init_scale: float
            ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    info: dict[str, Any] = {"used": False}

    def objective(u: Tensor) -> Tensor:
        return -density(u)

    with torch.enable_grad(), pyro.validation_enabled(False):
        u = loc.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=LAPLACE_MAX_ITER, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                      tolerance_change=1e-12)

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = objective(u)
            value.backward()
            return value

        try:
            optimizer.step(closure)
            mode = u.detach()
            hessian = torch.autograd.functional.hessian(objective, mode)
        except Exception as e:  # noqa: BLE001 - e.g. a model that rejects far-off values
            info["reason"] = f"the MAP search failed: {type(e).__name__}: {str(e)[:200]}"
            return None, info
    if not (bool(torch.isfinite(mode).all()) and bool(torch.isfinite(hessian).all())):
        info["reason"] = "the MAP search ran off to infinity"
        return None, info
    chol_h, failed = torch.linalg.cholesky_ex(0.5 * (hessian + hessian.T))
    if bool(failed):
        info["reason"] = "the Hessian at the mode is not positive definite"
        return None, info
    scale_tril = torch.linalg.cholesky(torch.cholesky_inverse(chol_h))
    # The guard for modes at the edge of an unbounded or singular density (Neal's funnel has
    # its mode at x0 = -40.5 with scales e^-20; centered eight schools has none): keep the
    # Laplace Gaussian only if its ELBO beats the plain start's, on common draws.
    gen = torch.Generator(device=loc.device).manual_seed(0)
    eps = torch.randn(LAPLACE_ELBO_DRAWS, loc.numel(), generator=gen, device=loc.device,
                      dtype=loc.dtype)
    plain = torch.diag(torch.full_like(loc, init_scale))
    with torch.no_grad(), pyro.validation_enabled(False):
        elbo_plain = gaussian_elbo(density, loc, plain, eps)
        elbo_laplace = gaussian_elbo(density, mode, scale_tril, eps)
    info.update(elbo_plain=elbo_plain, elbo_laplace=elbo_laplace)
    if not elbo_laplace > elbo_plain:
        info["reason"] = (f"its ELBO estimate ({elbo_laplace:.4g}) is below the plain "
                          f"start's ({elbo_plain:.4g})")
        return None, info
    info.update(used=True, reason="ok")
    return (mode, scale_tril), info


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
        guide.laplace_info = {"used": True, "reason": "loaded from a state_dict"}
    elif has and loc not in state_dict and (f"{prefix}affine.packed" in state_dict
                                            or f"{prefix}affine.loc" in state_dict):
        del guide._modules["laplace"]
        guide.laplace_info = {"used": False, "reason": "loaded from a state_dict without it"}
