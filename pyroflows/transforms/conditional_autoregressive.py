r"""Conditional IAF, MAF and RealNVP (seed eq. 27): the context enters the MADE or coupling
network as the IAF paper's :math:`h`, one per-row bias of the first hidden layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .autoregressive import IAF, MAF, AffineAutoregressiveCore, setup_affine
from .conditional import ConditionalMADELayer, Conditioned
from .coupling import RealNVP, _contiguous_halves

__all__ = [
    "ConditionalIAF", "conditional_iaf", "ConditionalMAF", "conditional_maf",
    "ConditionalRealNVP", "conditional_realnvp", "ConditionedIAF", "ConditionedMAF",
    "ConditionedRealNVP",
]


class ConditionedIAF(Conditioned, IAF):
    """:class:`~pyroflows.transforms.IAF`'s map for one batch of contexts (made by
    :meth:`ConditionalIAF.condition`)."""


class ConditionedMAF(Conditioned, MAF):
    """:class:`~pyroflows.transforms.MAF`'s map for one batch of contexts (made by
    :meth:`ConditionalMAF.condition`)."""


class ConditionedRealNVP(Conditioned, RealNVP):
    """:class:`~pyroflows.transforms.RealNVP`'s map for one batch of contexts (made by
    :meth:`ConditionalRealNVP.condition`)."""


class ConditionalAffineAutoregressive(ConditionalMADELayer):
    r"""The conditional layers over the affine autoregressive core: a MADE with a context
    input (:class:`~pyroflows.nn.MADE` with ``context_dim``), whose ``condition(c)`` is the
    plain layer's map with :math:`(\mu, s)` from the network of :math:`(u, c)`.
    ``conditioned_type`` is the class of the transform ``condition`` returns."""

    conditioned_type: type[AffineAutoregressiveCore] = ConditionedIAF
    conditioned_settings = ("gated", "log_scale_bound", "num_passes", "fused", "_halves",
                            "compact_min_dim")

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 order: Sequence[int] | Tensor | None = None, gated: bool = False,
                 log_scale_bound: float = 5.0, activation: Callable[[], nn.Module] = nn.ReLU,
                 residual: bool = False, zero_first: bool = False) -> None:
        super().__init__(dim, context_dim)
        setup_affine(self, self.dim, hidden_dims, order, gated, log_scale_bound, activation,
                     residual, zero_first, self.context_dim)

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else f"log_scale_bound={self.log_scale_bound}"
        return f"{super().extra_repr()}, {kind}"


class ConditionalIAF(ConditionalAffineAutoregressive):
    r"""Conditional inverse autoregressive flow (Kingma et al., 2016, where the encoder's
    context :math:`h` enters every IAF layer): for a context :math:`c`,

    .. math:: y_i = \mu_i(z_{<i}, c) + \sigma_i(z_{<i}, c)\, z_i, \qquad
              \log|\det J| = \sum_i \log \sigma_i(z_{<i}, c),

    with :math:`(\mu, \log\sigma)` from one :class:`~pyroflows.nn.MADE` pass whose first
    hidden layer is :math:`a\bigl((W_1 \odot M_1) z + V c + b_1\bigr)` (as Pyro's
    ``ConditionalAutoRegressiveNN``, nflows' ``MADE(context_features=...)`` and zuko's
    ``MaskedAutoregressiveTransform(context=...)``). ``condition(c)`` (c of shape (..., C),
    its batch dims broadcast against the input's: (B, C) with z of shape (B, D) or (S, B, D);
    (C,) for every row) returns a :class:`ConditionedIAF`: sampling and scoring its own draws
    is one pass (the output cache), the fused kernel included; scoring other points D passes.
    A new layer is the identity for every context (zero output layer, ``gated=False``), so an
    amortized guide starts at its base distribution.

    References:
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
        NeurIPS 2016, https://arxiv.org/abs/1606.04934

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        hidden_dims: the MADE hidden widths (at least one), default ``(max(64, 4D),) * 2``.
        order, gated, log_scale_bound, activation, residual: as
            :class:`~pyroflows.transforms.IAF`'s.

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.transforms.conditional_iaf(3, context_dim=2, hidden_dims=(16, 16))
        >>> t = layer.condition(torch.randn(10, 2))
        >>> z = torch.randn(4, 10, 3)  # 4 draws for each of 10 contexts
        >>> t(z).shape, t.log_abs_det_jacobian(z, t(z)).shape
        (torch.Size([4, 10, 3]), torch.Size([4, 10]))
    """

    conditioned_type = ConditionedIAF


class ConditionalMAF(ConditionalAffineAutoregressive):
    r"""Conditional masked autoregressive flow (Papamakarios et al., 2017, section 3.4: a
    conditional density :math:`p(y \mid c)` by a MADE that also takes :math:`c`):

    .. math:: z_i = \tilde\mu_i(y_{<i}, c) + e^{\tilde s_i(y_{<i}, c)}\, y_i, \qquad
              \log\left|\det \frac{\partial y}{\partial z}\right|
              = -\sum_i \tilde s_i(y_{<i}, c),

    the context entering the MADE's first hidden layer as in :class:`ConditionalIAF`.
    ``condition(c)`` returns a :class:`ConditionedMAF`: ``log_prob`` (the inverse) is one pass,
    sampling D sequential passes (level by level without autograd). A new layer is the
    identity for every context.

    References:
        Papamakarios et al., "Masked Autoregressive Flow for Density Estimation",
        NeurIPS 2017, https://arxiv.org/abs/1705.07057

    Arguments: :class:`ConditionalIAF`'s, for the map ``y -> z``.

    Example:
        >>> import torch, pyroflows as pf
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> layer = pf.transforms.conditional_maf(2, context_dim=3, hidden_dims=(16, 16))
        >>> base = Independent(Normal(torch.zeros(2), 1.0), 1)
        >>> q = TransformedDistribution(base, [layer.condition(torch.randn(5, 3))])
        >>> q.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    conditioned_type = ConditionedMAF


class ConditionalRealNVP(ConditionalAffineAutoregressive):
    r"""Conditional affine coupling (Dinh et al., 2017, with the context concatenated to the
    conditioning half, as Pyro's ``conditional_affine_coupling``): with :math:`a` the masked
    coordinates and :math:`b` the others,

    .. math:: y_a = z_a, \qquad y_b = \mu(z_a, c) + e^{s(z_a, c)} \odot z_b, \qquad
              \log|\det J| = \sum_i s_i(z_a, c),

    both directions one pass; the network's first hidden layer is
    :math:`a\bigl(W_1 z_a + V c + b_1\bigr)` (a per-row bias). ``condition(c)`` returns a
    :class:`ConditionedRealNVP`. A new layer is the identity for every context.

    References:
        Dinh et al., "Density estimation using Real NVP", ICLR 2017,
        https://arxiv.org/abs/1605.08803

    Arguments:
        dim: the event size D (at least 2).
        context_dim: the context size C.
        hidden_dims: the hidden widths (at least one), default ``(max(64, 4D),) * 2``.
        mask, log_scale_bound, activation, residual: as
            :class:`~pyroflows.transforms.RealNVP`'s.

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.transforms.conditional_realnvp(4, context_dim=2, hidden_dims=(16,))
        >>> t = layer.condition(torch.randn(2))  # one context for every row
        >>> z = torch.randn(3, 4)
        >>> torch.allclose(t.inv(t(z).clone()), z, atol=1e-5)
        True
    """

    conditioned_type = ConditionedRealNVP

    def __init__(self, dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                 mask: Sequence[bool] | Tensor | None = None, log_scale_bound: float = 5.0,
                 activation: Callable[[], nn.Module] = nn.ReLU, residual: bool = False) -> None:
        mask_t = RealNVP.checked_mask(dim, mask)
        super().__init__(dim, context_dim, hidden_dims, order=(~mask_t).long(),
                         log_scale_bound=log_scale_bound, activation=activation,
                         residual=residual, zero_first=True)
        self.register_buffer("mask", mask_t)
        self._halves = _contiguous_halves(mask_t)
        self.register_load_state_dict_post_hook(RealNVP._mask_loaded)  # (as RealNVP's)


def conditional_iaf(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                    **kwargs) -> ConditionalIAF:
    """Build a :class:`ConditionalIAF` layer (the identity at initialization unless gated)."""
    return ConditionalIAF(dim, context_dim, hidden_dims=hidden_dims, **kwargs)


def conditional_maf(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                    **kwargs) -> ConditionalMAF:
    """Build a :class:`ConditionalMAF` layer (the identity at initialization unless gated)."""
    return ConditionalMAF(dim, context_dim, hidden_dims=hidden_dims, **kwargs)


def conditional_realnvp(dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None,
                        mask: Sequence[bool] | Tensor | None = None, **kwargs
                        ) -> ConditionalRealNVP:
    """Build a :class:`ConditionalRealNVP` coupling layer (the identity at initialization)."""
    return ConditionalRealNVP(dim, context_dim, hidden_dims=hidden_dims, mask=mask, **kwargs)
