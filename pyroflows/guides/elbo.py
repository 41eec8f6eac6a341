"""FlowELBO: Pyro's Trace_ELBO with sticking-the-landing gradients and annealing for flow
guides, and a clear error when a step diverges."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger
from pyro.util import warn_if_nan
from torch import Tensor, nn

from .._memo import Memoized
from . import direct, landing
from .amortized import AmortizedPosterior
from .autoguide import AutoFlowGuide, FlowPosterior

__all__ = ["FlowELBO", "MAX_CONSECUTIVE_SKIPS"]

#: After this many consecutive skipped steps (non-finite loss or gradient), FlowELBO raises.
MAX_CONSECUTIVE_SKIPS = 10


class FlowELBO(Memoized, Trace_ELBO):
    r""":class:`~pyro.infer.Trace_ELBO` with sticking the landing and annealing for flow
    guides, a faster draw of them, and a clear error when a step diverges.

    - ``stick_the_landing``: the path-derivative gradient (Roeder et al. 2017): the guide's
      :math:`\log q_\phi(z)` enters the surrogate loss as :math:`\log q_{\bar\phi}(z_\phi)`,
      the parameters :math:`\bar\phi` detached and only :math:`z_\phi = T_\phi(\varepsilon)`
      differentiated. The dropped score term has expectation zero, so the gradient stays
      unbiased and its variance vanishes as :math:`q \to p` (:mod:`pyroflows.guides.landing`).
      Only the latent sites of pyroflows guides are affected: an
      :class:`~pyroflows.guides.AutoFlowGuide`'s and an
      :class:`~pyroflows.guides.AmortizedPosterior`'s (an
      :class:`~pyroflows.guides.AmortizedFlowGuide`'s, or the plain idiom's).
    - ``anneal_steps``: over the first :math:`T` training calls the guide fits the tempered
      density of the unconstrained latent vector (:math:`\beta = 1` afterwards),

      .. math:: p_\beta(u) \propto \bigl[p(x, T(u))\, |\det J_T(u)|\bigr]^{\beta},
                \qquad \beta_t = \beta_0 + (1 - \beta_0)\, t / T,

      with :math:`T` the ``biject_to`` map: the Jacobian terms of an autoguide's ``Delta``
      sites are tempered with the model's log joint (alone, it would leave
      :math:`p^\beta |\det J_T|`, improper for heavy-tailed positive sites). The wider
      :math:`p_\beta` lets a flow spread over several modes first (Rezende & Mohamed 2015).
      ``svi.step()`` returns the tempered loss; :meth:`loss` uses :math:`\beta = 1`.
    - ``direct``: a set-up :class:`~pyroflows.guides.AutoFlowGuide` is drawn without Pyro's
      effect handlers where nothing could tell the difference
      (:mod:`pyroflows.guides.direct`): the same loss, surrogate, draws and parameters.

    An SVI step (:meth:`loss_and_grads`) whose loss or any gradient is not finite is skipped:
    its gradients are dropped, so optimizers move no parameter or state, and it is counted in
    :attr:`skipped_steps` (no annealing step; ``svi.step()`` returns the loss). The first skip
    warns, naming the model sites with a non-finite log density and the size of the draws;
    :data:`MAX_CONSECUTIVE_SKIPS` in a row raise that as a :class:`ValueError`. A non-finite
    :meth:`differentiable_loss` raises, as the caller's optimizer takes its step. A plain
    ``Trace_ELBO`` has none of this: ``SVI`` steps itself, and no public API lets a guide veto it.

    Every finite step at :math:`\beta = 1` of a pyroflows guide is recorded in the guide's
    running ELBO estimate (:meth:`~pyroflows.guides.AutoFlowGuide.record_loss`), so
    ``guide.keep_best(*args)`` after training keeps the best of its start, its best state
    and its last (:mod:`pyroflows.guides.best`).

    References:
        Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference", NeurIPS 2017.

    Arguments:
        stick_the_landing: ``None``: as each flow guide says; ``True`` / ``False``: every flow
            guide (``True`` without one is an error) / none.
        anneal_steps: the steps over which :math:`\beta` rises to 1 (0: none).
        anneal_start: :math:`\beta_0`.
        direct: draw a pyroflows guide untraced where the result is the same.
        kwargs: passed to :class:`~pyro.infer.Trace_ELBO`.

    Example:
        >>> elbo = FlowELBO(num_particles=8, vectorize_particles=True, anneal_steps=1000)
        >>> elbo.beta
        0.05
    """

    def __init__(self, stick_the_landing: bool | None = None, anneal_steps: int = 0,
                 anneal_start: float = 0.05, direct: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct = bool(direct)
        if not 0 < anneal_start <= 1:
            raise ValueError(f"anneal_start must lie in (0, 1], got {anneal_start}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        self.stick_the_landing = None if stick_the_landing is None else bool(stick_the_landing)
        self.anneal_steps = int(anneal_steps)
        self.anneal_start = float(anneal_start)
        self.step_count = 0
        #: steps skipped for a non-finite loss or gradient, and how many of them in a row
        self.skipped_steps = self._skips_in_a_row = 0
        self._training = False
        self._traces: list = []  # this step's (model, guide) traces, to explain a failure

    @property
    def beta(self) -> float:
        """The current inverse temperature :math:`\\beta_t` of the training loss."""
        if self.step_count >= self.anneal_steps:
            return 1.0
        return self.anneal_start + (1 - self.anneal_start) * self.step_count / self.anneal_steps

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The (tempered, while annealing) loss; backpropagates the surrogate loss."""
        if self._direct(model, guide, args, kwargs):
            return self._train(self._direct_loss_and_grads, model, guide, args, kwargs)
        return self._train(super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The (tempered, while annealing) loss as a differentiable tensor, for torch
        optimizers; each call counts as one annealing step."""
        if self._direct(model, guide, args, kwargs):
            return self._train(self._direct_differentiable_loss, model, guide, args, kwargs)
        return self._train(super().differentiable_loss, model, guide, args, kwargs)

    def _train(self, method, model, guide, args, kwargs):
        self._training = True
        self._traces = []
        untempered = self.beta == 1.0
        try:
            loss = method(model, guide, *args, **kwargs)
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            if not method.__name__.endswith("loss_and_grads"):
                if not math.isfinite(value):
                    raise ValueError(_divergence_message(value, self.step_count, self._traces))
            elif not _step_is_finite(value, params := _step_params(self._traces, guide)):
                for p in params:
                    p.grad = None  # the backward pass ran: the optimizer skips these
                self.skipped_steps += 1
                self._skips_in_a_row += 1
                message = _divergence_message(value, self.step_count, self._traces)
                if self._skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise ValueError(f"{message} {self._skips_in_a_row} steps in a row were "
                                     "skipped (MAX_CONSECUTIVE_SKIPS).")
                if self.skipped_steps == 1:
                    warnings.warn(f"{message} The step was skipped (counted in "
                                  "FlowELBO.skipped_steps; this warning is not repeated).",
                                  RuntimeWarning, stacklevel=4)
                return loss
        finally:
            self._training = False
            self._traces = []
        if untempered and isinstance(guide, AutoFlowGuide):
            guide.record_loss(value)  # the running ELBO estimate behind guide.keep_best
        self.step_count += 1
        self._skips_in_a_row = 0
        return loss

    # ---- the traced path ------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        beta = self.beta if self._training else 1.0
        if beta < 1.0:
            model = poutine.scale(model, scale=beta)
            guide = _TemperJacobians(beta)(guide)
        with landing.posterior_stl_off():  # FlowELBO's own choice below, not the posterior's
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self.stick_the_landing is not False and self._training:
            _stick_the_landing(guide_trace, force=self.stick_the_landing is True)
        if self._training:
            self._traces.append((model_trace, guide_trace))
        return model_trace, guide_trace

    # ---- the direct path ------------------------------------------------------------------------
    def _direct(self, model, guide, args, kwargs) -> bool:
        """Whether this step draws the guide directly (:func:`direct.applies`, own traces)."""
        if not (self.direct and type(self)._get_trace is FlowELBO._get_trace
                and direct.applies(guide)):
            return False
        if (self.vectorize_particles and self.num_particles > 1
                and self.max_plate_nesting == float("inf")):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return True

    def _direct_particles(self, model, guide, args, kwargs):
        stl = guide.stick_the_landing if self.stick_the_landing is None else self.stick_the_landing
        return direct.particles(self, model, guide, args, kwargs,
                                beta=self.beta if self._training else 1.0,
                                stick_the_landing=self._training and stl,
                                traces=self._traces if self._training else None)

    def _direct_loss_and_grads(self, model, guide, *args, **kwargs):
        loss = 0.0
        for loss_particle, surrogate in self._direct_particles(model, guide, args, kwargs):
            loss += loss_particle
            if getattr(surrogate, "requires_grad", False):
                surrogate.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def _direct_differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate_loss = 0.0, 0.0
        for loss_particle, surrogate in self._direct_particles(model, guide, args, kwargs):
            loss += loss_particle
            surrogate_loss = surrogate_loss + surrogate
        warn_if_nan(surrogate_loss, "loss")
        return loss + (surrogate_loss - torch_item(surrogate_loss))


class _TemperJacobians(Messenger):
    """Scales the guide's ``Delta`` sample sites (log density :math:`-\\log|\\det J_T(u)|`)
    by ``beta``, leaving the auxiliary latent site alone."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if (msg["type"] == "sample" and not msg["is_observed"]
                and not (msg.get("infer") or {}).get("is_auxiliary")
                and isinstance(msg["fn"], dist.Delta)):
            msg["scale"] = msg["scale"] * self.beta


def _stick_the_landing(guide_trace, force: bool) -> None:
    """Give the flow latent sites of a traced guide the sticking-the-landing entropy term (from
    the draw itself where the stack's cache knows its base point; else an autoguide's by its
    inverse, while an amortized posterior's keeps Pyro's parts, as its own ``score_parts``
    would)."""
    found = False
    for site in guide_trace.nodes.values():
        fn = site["fn"] if site["type"] == "sample" else None
        if not isinstance(fn, (FlowPosterior, AmortizedPosterior)):
            continue
        found = True
        if not (force or fn.stick_the_landing):
            continue
        entropy = landing.path_entropy(fn, site["value"])
        if entropy is None:
            if not isinstance(fn, FlowPosterior):
                continue
            entropy = fn.log_prob_detached(site["value"])
        parts = ScoreParts(site["score_parts"].log_prob, 0, entropy)
        scaled = parts.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"] = site["score_parts"]._replace(entropy_term=scaled.entropy_term)
    if force and not found:
        raise ValueError("FlowELBO(stick_the_landing=True) needs a pyroflows flow guide "
                         "(AutoFlowGuide and its subclasses, or AmortizedFlowGuide / "
                         "AmortizedPosterior)")


def _step_params(traces: list, guide: Any) -> list[Tensor]:
    """The leaf tensors a step's optimizer moves: its traces' parameters and the guide's own
    (the direct path traces no guide parameters)."""
    params = {id(p): p for p in guide.parameters()} if isinstance(guide, nn.Module) else {}
    for model_trace, guide_trace in traces:
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "param":
                    ref = getattr(site["value"], "unconstrained", None)  # Pyro: a weakref
                    leaf = ref() if ref is not None else site["value"]
                    if isinstance(leaf, Tensor):
                        params[id(leaf)] = leaf
    return list(params.values())


def _step_is_finite(loss: float, params: list[Tensor]) -> bool:
    """Whether the loss and every gradient of ``params`` are finite (one host sync)."""
    grads = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return math.isfinite(loss) and (not grads or bool(torch.stack(grads).all()))


def _divergence_message(loss: float, step: int, traces: list) -> str:
    """Why a step's loss or gradient is not finite: the model sites with a non-finite log
    density and the size of the flow guide's draws."""
    sites: dict[str, list[int]] = {}
    largest = 0.0
    for model_trace, guide_trace in traces:
        for name, site in model_trace.nodes.items():
            log_prob = site.get("log_prob")
            if site["type"] == "sample" and isinstance(log_prob, Tensor):
                bad = int((~torch.isfinite(log_prob.detach())).sum())
                if bad:
                    counts = sites.setdefault(name, [0, 0])
                    counts[0] += bad
                    counts[1] += log_prob.numel()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and (isinstance(site["fn"], FlowPosterior)
                                             or site["infer"].get("flow_latent")):
                value = site["value"].detach()
                largest = max(largest, float(value.abs().nan_to_num(math.inf).max()))
    where = ("non-finite at " + ", ".join(f"{name!r} ({bad} of its {n} log-density entries)"
                                          for name, (bad, n) in sites.items())
             if sites else "finite at every site")
    return (
        f"FlowELBO: the loss ({loss}) or its gradient is not finite at step {step + 1}. The "
        f"model's log density is {where}; the largest unconstrained draw of the flow guide is "
        f"{largest:.3g}. The guide has diverged (its draws reach where the model's density "
        "over- or underflows). No parameter moved in this step: lower the step sizes "
        "(optim_args(guide, lr=..., flow_lr=...) or param_groups(...)), use fewer flow "
        "layers, or start from a narrower init_scale."
    )
