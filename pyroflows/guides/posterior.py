"""The posterior of a flow guide: :math:`N(0, I)` pushed through its layers."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor

from . import landing

__all__ = ["FlowPosterior"]


class FlowPosterior(dist.TransformedDistribution):
    r"""The posterior of an :class:`~pyroflows.guides.AutoFlowGuide`: :math:`N(0, I)` pushed
    through the flow layers and the final affine layer.

    It is a :class:`pyro.distributions.TransformedDistribution`; its only addition is
    :meth:`log_prob_detached`, the density with the transforms' parameters detached, which
    :class:`~pyroflows.guides.FlowELBO` uses for sticking-the-landing gradients.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows as pf
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = FlowPosterior(base, [pf.transforms.ElementwiseAffine(2, scale=2.0)])
        >>> z = q.rsample((5,))
        >>> torch.allclose(q.log_prob_detached(z), q.log_prob(z))
        True
    """

    #: whether FlowELBO's default uses sticking-the-landing gradients here (set by the guide)
    stick_the_landing: bool = False

    def expand(self, batch_shape, _instance=None) -> FlowPosterior:
        new = super().expand(batch_shape, _instance)
        new.stick_the_landing = self.stick_the_landing  # plates expand the site's distribution
        return new

    # Unbatched draws (no sample or batch shape) go through the layers as a batch of one:
    # Planar turns an input of shape (D,) into (1, D). The draw is returned unbatched and
    # remembered, so that scoring it still hits the layers' caches.
    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        if len(sample_shape) or len(self.batch_shape):
            return super().rsample(sample_shape)
        batched = super().rsample((1,))
        value = batched[0]
        self._unbatched = (value, value._version, batched)
        return value

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        last = getattr(self, "_unbatched", None)
        if last is not None and value is last[0] and value._version == last[1]:
            return super().log_prob(last[2])[0]
        if value.dim() == 1:
            return super().log_prob(value.unsqueeze(0))[0]
        return super().log_prob(value)

    def log_prob_detached(self, value: Tensor) -> Tensor:
        r""":math:`\log q_{\bar\phi}(z)` with :math:`\bar\phi` the transforms' parameters cut
        from the graph: differentiable in ``value`` only. Runs the inverse of every layer (for
        IAF, its D sequential passes)."""
        return landing.log_prob_detached(self.base_dist, self.transforms, value)
