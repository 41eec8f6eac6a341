r"""Amortized flow guides (seed eq. 27): a local latent's posterior, one per datapoint, as a
conditional flow whose context is an encoder's output (Rezende & Mohamed 2015; Kingma et al.
2016)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.score_parts import ScoreParts
from torch import Tensor, nn

from .. import flows
from ..distributions import ConditionalFlowDistribution, FlowDistribution
from . import landing

__all__ = ["AmortizedFlowGuide", "AmortizedPosterior"]


class AmortizedPosterior(FlowDistribution):
    r""":math:`q(z \mid x)` of an :class:`AmortizedFlowGuide`: a
    :class:`~pyroflows.distributions.FlowDistribution` of the flow conditioned on the
    encoder's output, whose ``score_parts`` stick the landing
    (Roeder et al. 2017) where :attr:`stick_the_landing` is on: for a draw :math:`z` of its
    own ``rsample``, the entropy term is :math:`\log q_{\bar\phi}(z \mid x)` with the
    conditioned layers' parameters (the network's output for :math:`h`, and so the encoder)
    held fixed, only the path :math:`z = f_h(\varepsilon)` differentiated: its value is
    ``log_prob``, its gradient in :math:`z` comes from the draw itself
    (:func:`~pyroflows.guides.landing.path_log_density`: layer by layer, in closed form for
    planar and radial layers and the Gaussian start, by the draw's kept linearizations for
    IAF layers, by one vector-Jacobian product of the one-pass inverse for MAF, NSF and
    RealNVP layers; for layers of no such kind, from the draw's whole Jacobian, one pass over
    D + 1 copies of the draws and a D x D solve per draw, up to D = 1024 and 32768 numbers
    of draws). Elsewhere
    (a value it did not draw, more draws than that) Pyro's parts: the standard gradient.
    ELBOs that read the entropy term (``Trace_ELBO``, ``TraceMeanField_ELBO``) then give the
    sticking-the-landing gradient; ``RenyiELBO`` / IWAE reads ``log_prob`` and keeps its own
    (there the path gradient would be biased)."""

    #: whether ``score_parts`` stick the landing (on; a guide that made it sets its own)
    stick_the_landing: bool = True

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        # the IAF layers' linearizations kept on the draw (landing.rsample_keeping)
        return landing.rsample_keeping(self, lambda: super(AmortizedPosterior, self).rsample(
            sample_shape))

    def expand(self, batch_shape, _instance=None) -> AmortizedPosterior:
        new = super().expand(batch_shape, _instance)
        new.stick_the_landing = self.stick_the_landing  # plates expand the site's distribution
        return new

    def score_parts(self, value: Tensor, *args: Any, **kwargs: Any) -> ScoreParts:
        if landing.sticks(self, value):
            entropy = landing.path_entropy(self, value)
            if entropy is not None:
                return ScoreParts(self.log_prob(value), 0, entropy)
        return super().score_parts(value, *args, **kwargs)


class AmortizedFlowGuide(nn.Module):
    r"""A VAE's guide: an encoder of each datapoint and a conditional flow over its latent
    :math:`z`, drawn inside the data plate,

    .. math:: h = e(x), \quad z_0 = \mu(h) + \sigma(h) \odot \epsilon, \quad
              z = f_K^{(h)} \circ \dots \circ f_1^{(h)}(z_0), \quad \epsilon \sim
              \mathcal{N}(0, I),

    .. math:: \log q(z \mid x) = \log \mathcal{N}(\epsilon; 0, I) - \sum_i \log \sigma_i(h)
              - \sum_{k=1}^{K} \log\left|\det J_{f_k^{(h)}}\right| ,

    the diagonal Gaussian :math:`q_0(z_0 \mid x)` of both papers (its :math:`\mu, \sigma` a
    linear head on :math:`h`: :class:`~pyroflows.flows.ConditionalElementwiseAffine`), then
    the family's conditional layers, each fed :math:`h` (``pf.flows.build(flow, latent_dim,
    context_dim=...)``; IAF as Kingma et al.'s eq. 10, planar and radial with all K layers'
    parameters the output of one network of :math:`h`, seed eq. 27).

    Calling it with the model's arguments registers its modules (``pyro.module(name,
    self)``), opens ``pyro.plate(plate, N, subsample_size=subsample_size)`` over the first
    argument's rows (the data, shape (N, ...)), encodes the rows of the (sub)sample and draws
    ``site`` from the flow conditioned on them; the model must open the same plate. Works with
    ``SVI`` and ``Trace_ELBO`` (vectorized particles: the encoder runs once, the particles
    broadcast against the contexts), ``RenyiELBO`` / IWAE, ``Predictive``, ``.to(device)``,
    ``state_dict`` and Pyro's param store.

    The plain Pyro idiom it packs (for any other layout of data and plates)::

        cflow = pf.flows.build("iaf", latent_dim, num_layers=2, context_dim=H)
        q = pf.distributions.ConditionalFlowDistribution(
            cflow, distribution_class=pf.guides.AmortizedPosterior)  # sticks the landing

        def guide(x):
            pyro.module("encoder", encoder)
            pyro.module("flow", cflow)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", q.condition(encoder(x)))

    Arguments:
        encoder: an ``nn.Module`` mapping the data rows (N, ...) to contexts (N, H).
        latent_dim: the size D of ``z``.
        flow: a family name of :data:`pyroflows.flows.FAMILIES` with a conditional layer
            (planar, radial, iaf, maf, realnvp), or a built conditional transform.
        context_dim: the encoder's output size H.
        num_layers: the flow's layers (default: the family's guide default).
        hidden_dims: the conditional layers' network sizes (default: the layer's).
        site: the latent sample site's name.
        plate: the data plate's name.
        subsample_size: the plate's subsample size (``None``: every row each step).
        gaussian: start with the per-row diagonal Gaussian (``False``: the flow on
            :math:`\mathcal{N}(0, I)` alone).
        init_scale: :math:`\sigma` of the Gaussian start at a zero context, at initialisation.
        stick_the_landing: the posterior's entropy term sticks the landing
            (:class:`AmortizedPosterior`; Roeder et al. 2017; default on): with gradients only
            through the draw, its gradient is zero wherever :math:`q(z \mid x)` equals the
            posterior. On the digits VAE of ``benchmarks/amortized.py`` it raised every
            guide's test log-likelihood by about a quarter of a nat (``--stl``). Its cost:
            closed-form steps for planar, radial and the Gaussian start (a few operations a
            layer), two or three pullbacks of each IAF layer's network from the draw's own
            activations, a pass of each MAF, NSF or RealNVP layer's inverse and its
            backward.
        name: the name of its parameters in Pyro's param store (``name$$$encoder...``).
        layer_kwargs: passed to :func:`pyroflows.flows.build`; e.g. ``shared_network=False``
            for planar or radial layers with a network each (by default one network of
            :math:`h` outputs every layer's parameters, Rezende & Mohamed's inference
            network).

    Example:
        >>> import torch, pyro, pyro.distributions as dist, pyroflows as pf
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        >>> guide = pf.guides.AmortizedFlowGuide(encoder, 2, "planar", context_dim=8,
        ...                                      num_layers=4)
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z @ torch.ones(2, 6), 1.0).to_event(1), obs=x)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
        ...                      pyro.infer.Trace_ELBO(num_particles=4,
        ...                                            vectorize_particles=True))
        >>> loss = svi.step(torch.randn(10, 6))
        >>> guide(torch.randn(10, 6)).shape
        torch.Size([10, 2])
        >>> pyro.clear_param_store()
    """

    def __init__(self, encoder: nn.Module, latent_dim: int,
                 flow: str | ConditionalTransform = "iaf", *, context_dim: int,
                 num_layers: int | None = None, hidden_dims: Sequence[int] | None = None,
                 site: str = "z", plate: str = "data", subsample_size: int | None = None,
                 gaussian: bool = True, init_scale: float = 1.0,
                 stick_the_landing: bool = True, name: str = "amortized_flow_guide",
                 **layer_kwargs) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"AmortizedFlowGuide: encoder must be an nn.Module, got "
                            f"{type(encoder).__name__}")
        latent_dim, context_dim = int(latent_dim), int(context_dim)
        if isinstance(flow, str):
            if num_layers is None:
                num_layers = flows.FAMILIES[flow].num_layers if flow in flows.FAMILIES else 4
            flow = flows.build(flow, latent_dim, num_layers=num_layers, hidden_dims=hidden_dims,
                               context_dim=context_dim, **layer_kwargs)
        elif not isinstance(flow, ConditionalTransform):
            raise TypeError("AmortizedFlowGuide: flow must be a family name or a conditional "
                            f"transform, got {type(flow).__name__}")
        parts = [flow]
        if gaussian:
            parts.insert(0, flows.ConditionalElementwiseAffine(latent_dim, context_dim,
                                                               init_scale=init_scale))
        self.encoder = encoder
        self.flow = flows.ConditionalFlowStack(parts, dim=latent_dim, context_dim=context_dim)
        self.latent_dim, self.context_dim = latent_dim, context_dim
        self.site, self.plate, self.subsample_size = site, plate, subsample_size
        self.stick_the_landing = bool(stick_the_landing)
        self.name = name

    def get_posterior(self, x: Tensor) -> AmortizedPosterior:
        r""":math:`q(z \mid x)` for the data rows ``x`` (N, ...): batch shape (N,), event
        shape (D,) (outside any plate; e.g. to score draws or estimate :math:`\log p(x)` by
        importance sampling)."""
        posterior = ConditionalFlowDistribution(
            self.flow, distribution_class=AmortizedPosterior).condition(self.encoder(x))
        posterior.stick_the_landing = self.stick_the_landing
        return posterior

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Draw ``site`` for the rows of ``x`` (the model's first argument) inside the data
        plate; the other arguments are the model's, unused. Returns the draw."""
        pyro.module(self.name, self)
        with pyro.plate(self.plate, x.shape[0], subsample_size=self.subsample_size,
                        device=x.device) as rows:
            data = x if self.subsample_size is None else x[rows]
            return pyro.sample(self.site, self.get_posterior(data))

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, context_dim={self.context_dim}, "
                f"site={self.site!r}, plate={self.plate!r}")
