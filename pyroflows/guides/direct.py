"""FlowELBO's direct path: a flow guide drawn without Pyro's effect handlers, and the model
replayed against the draw and scored in one handler, where nothing could see the difference
(:func:`applies`): the estimator, random draws and parameters of :class:`~pyro.infer.Trace_ELBO`
on the traced guide, without Pyro's per-site work for the guide's sites. ``loss`` and a
FlowELBO subclass that overrides ``_get_trace`` trace the guide as usual.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import pyro
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape
from torch import Tensor
from torch.distributions import ComposeTransform, Transform, biject_to
from torch.distributions.transforms import IndependentTransform

from .. import _private, flows
from .._gaussian import standard_normal_log_prob
from . import landing
from .autoguide import AutoFlowGuide

__all__ = ["applies", "draw", "particles"]


def applies(guide: Callable) -> bool:
    """Whether ``guide`` may be drawn directly now: a set-up :class:`AutoFlowGuide` with no
    latent site in a subsampled plate (whose indices the guide's trace hands the model) and no
    forward hooks, called by nothing but ``SVI``'s parameter capture (outside ``SVI.step``, by
    nothing)."""
    return (isinstance(guide, AutoFlowGuide) and guide.prototype_trace is not None
            and not guide._subsampled_latents
            and not (guide._forward_hooks or guide._forward_pre_hooks
                     or _private.global_module_hooks())
            and _private.only_param_capture_active())


def draw(guide: AutoFlowGuide, shape: tuple, stick_the_landing: bool
         ) -> tuple[Trace, Tensor, Tensor | None, Tensor | None]:
    r"""One draw of ``guide`` of batch ``shape``, as its traced ``forward`` makes it:
    ``(trace, log_q, entropy, jacobian)``, the trace of the latent and site values,
    :math:`\log q(u)` (``shape``), :math:`\log q_{\bar\phi}(u)` with ``stick_the_landing``
    (else ``None``), and the ``Delta`` sites' :math:`-\sum \log|\det J_T|` (``None`` where
    every site is unconstrained)."""
    with guide._pyro_context:  # as __call__: the parameters register under their names
        base, transforms = guide._posterior_parts()
        stack = transforms[0] if len(transforms) == 1 else None
        posterior, eps, kept, path = None, None, (), False
        if len(shape) and isinstance(stack, flows.FlowStack) and stack.all_flow_transforms:
            # what the posterior's rsample + log_prob compute, without building the
            # distribution and its per-call checks: the same base draw, one uncached run of
            # the stack with its log-det (a fresh draw of N(0, I) needs no input checks)
            eps = base.rsample(shape)
            path = stick_the_landing and landing.path_route(stack, eps)
            if path:  # the IAF layers' linearizations at the draw, for the path gradient below
                latent, log_det, kept = stack.run_linearized(eps)
            else:
                latent, log_det = stack.run(eps, inverse=False, validate=False)
            learned = guide._modules.get("base")  # a learned base, else N(0, I)
            log_q = (standard_normal_log_prob(eps) if learned is None else base.log_prob(eps)
                     ) - log_det
        else:
            posterior = guide._posterior(base, transforms)
            latent = posterior.rsample(shape)
            log_q = posterior.log_prob(latent)
        entropy = None
        if path:
            entropy = landing.path_log_density(stack, eps, latent, log_q, base, kept)
        elif stick_the_landing:
            posterior = posterior or guide._posterior(base, transforms)
            entropy = posterior.log_prob_detached(latent)
        trace = Trace()
        name = f"_{guide._pyro_name}_latent"
        trace.add_node(name, name=name, type="sample", fn=posterior, value=latent,
                       is_observed=False, infer={"is_auxiliary": True, "flow_latent": True})
        jacobian = None
        for site, unconstrained in guide._unpack_latent(latent):
            name = site["name"]
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            if not _is_identity(transform):  # (an identity adds zeros: skip its kernels)
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(
                    log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
                log_density = log_density.sum()
                jacobian = log_density if jacobian is None else jacobian + log_density
            trace.add_node(name, name=name, type="sample", fn=None, value=value,
                           is_observed=False, infer={})
    return trace, log_q, entropy, jacobian


def particles(elbo: Trace_ELBO, model: Callable, guide: AutoFlowGuide, args: tuple,
              kwargs: dict, beta: float, stick_the_landing: bool, traces: list | None
              ) -> Iterator[tuple[float, Tensor]]:
    r"""``(loss, surrogate loss)`` of each run over ``num_particles``, as ``elbo`` (a
    Memoized :class:`~pyro.infer.Trace_ELBO`) computes them from the traces: of
    :math:`\log p(x, T(u)) + \log|\det J_T(u)| - \log q(u)`, the first two tempered by
    ``beta``; the runs' ``(model trace, guide trace)`` are appended to ``traces``."""
    guide._ready(args, kwargs)  # the latent shapes still the model's (as the guide's call)
    num_particles, max_plate_nesting = elbo.num_particles, elbo.max_plate_nesting
    vectorized = elbo.vectorize_particles and num_particles > 1
    plate = contextlib.nullcontext()
    if vectorized:  # Trace_ELBO's particle plate (it subsamples nothing: one serves every step)
        plate = elbo.memo("particle_plate", (num_particles, max_plate_nesting), lambda: pyro.plate(
            "num_particles_vectorized", num_particles, dim=-max_plate_nesting))
    validate = is_validation_enabled()
    runs = 1 if vectorized else num_particles
    # the latent's shape under the particle plate (at dim -max_plate_nesting)
    shape = (num_particles,) + (1,) * (int(max_plate_nesting) - 1) if vectorized else ()
    for _ in range(runs):
        guide_trace, log_q, entropy, jacobian = draw(guide, shape, stick_the_landing)
        scored = _ReplayAndScore(guide_trace, max_plate_nesting, validate)
        with plate, \
                (poutine.scale(scale=beta) if beta < 1.0 else contextlib.nullcontext()):
            scored.run(model, args, kwargs)
        model_trace = scored.trace
        if validate:
            _check_match(model_trace, guide_trace)
        if traces is not None:
            traces.append((model_trace, guide_trace))
        model_log_prob = scored.log_prob_sum
        # the guide's log density: the latent's and its Delta sites' (-log|det J_T|, tempered
        # as FlowELBO tempers them on the traced path; None where every site is unconstrained)
        guide_log_prob = log_q.sum()
        surrogate_guide = guide_log_prob if entropy is None else entropy.sum()
        if jacobian is not None:
            guide_log_prob = guide_log_prob + beta * jacobian
            surrogate_guide = surrogate_guide + beta * jacobian
        loss = -(torch_item(model_log_prob) - torch_item(guide_log_prob))
        surrogate = -(model_log_prob - surrogate_guide)
        yield loss / num_particles, surrogate / num_particles


class _ReplayAndScore(Messenger):
    """What ``poutine.trace(poutine.replay(model, guide_trace))`` records, in one handler; the
    trace is scored as Trace_ELBO scores it (subsample sites left out, shapes checked under
    validation)."""

    def __init__(self, guide_trace: Trace, max_plate_nesting: float, validate: bool) -> None:
        super().__init__()
        self.guide_nodes = guide_trace.nodes
        self.max_plate_nesting = max_plate_nesting
        self.validate = validate
        self.trace = Trace(graph_type="flat")
        self.log_prob_sum: Tensor | float = 0.0

    def run(self, model: Callable, args: tuple, kwargs: dict) -> None:
        """Run ``model`` (its errors get the sites' shapes, as under ``poutine.trace``) and score
        its sites."""
        try:
            with self:
                model(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{e}\n{self.trace.format_shapes()}").with_traceback(
                e.__traceback__) from e
        self.trace.compute_log_prob(site_filter=_not_subsample)
        if self.validate:
            for name, site in self.trace.nodes.items():
                if site["type"] == "sample" and _not_subsample(name, site):
                    check_site_shape(site, self.max_plate_nesting)
        self.log_prob_sum = self.trace.log_prob_sum(site_filter=_not_subsample)

    def _pyro_sample(self, msg: dict) -> None:
        guide_site = self.guide_nodes.get(msg["name"])
        if guide_site is None or msg["is_observed"]:
            return
        if guide_site["type"] != "sample" or guide_site["is_observed"]:
            raise RuntimeError(f"site {msg['name']} must be sampled in trace")
        msg["done"] = True
        msg["value"] = guide_site["value"]
        msg["infer"] = guide_site["infer"]

    def _pyro_post_sample(self, msg: dict) -> None:
        if _private.site_is_traced(msg):
            self.trace.add_node(msg["name"], **msg)

    def _pyro_post_param(self, msg: dict) -> None:
        self.trace.add_node(msg["name"], **msg)


def _not_subsample(name: str, site: dict) -> bool:
    return not site_is_subsample(site)


def _is_identity(transform: Transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _check_match(model_trace: Trace, guide_trace: Trace) -> None:
    """The checks of :func:`pyro.util.check_model_guide_match` that can fail here: the model's
    latent sites are the guide's."""
    guide_vars = {name for name, site in guide_trace.nodes.items()
                  if not site["infer"].get("is_auxiliary")}
    model_vars = {name for name, site in model_trace.nodes.items()
                  if site["type"] == "sample" and not site["is_observed"]
                  and not site_is_subsample(site)}
    if model_vars - guide_vars:
        warnings.warn(f"Found vars in model but not guide: {model_vars - guide_vars}",
                      stacklevel=4)
    if guide_vars - model_vars:
        warnings.warn("Found non-auxiliary vars in guide but not model, consider marking "
                      f"these infer={{'is_auxiliary': True}}:\n{guide_vars - model_vars}",
                      stacklevel=4)
