"""Inverse and masked autoregressive flows (IAF, MAF): one MADE core, two directions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._fast import Linearization, affine_chain, sequential_no_grad, traced
from .._fast.made import supports_fused
from ..nn.made import MADE, default_hidden_dims
from .base import FlowTransform

__all__ = ["IAF", "MAF", "iaf", "maf"]

# sigma = sigmoid(raw + _GATE_BIAS) starts near 1 (0.88), as Kingma et al. (2016) advise
_GATE_BIAS = 2.0


class AutoregressiveCore(FlowTransform):
    r"""An autoregressive map :math:`u \mapsto v` of one network pass (``_parallel``) whose
    inverse takes one pass per level of the order (``_sequential``); ``forward_is_parallel``
    says which way is the forward map, ``log_det_sign`` turns the parallel direction's
    log-det into the forward one's. Subclasses: the affine core (IAF, MAF, RealNVP) and the
    spline core (NSF). ``_map`` is the plain operations unless a subclass runs a kernel."""

    forward_is_parallel: bool = True
    log_det_sign: float = 1.0
    #: a conditioned layer's context (..., C), which its network takes (``None``: no context)
    context: Tensor | None = None
    #: run the kernels where they apply (:meth:`_fusable`); ``False``: the plain operations
    fused: bool = True

    def _fusable(self) -> bool:
        """Whether the kernels compute this layer: ``fused``, over a ReLU or tanh
        :class:`~pyroflows.nn.MADE` without residual connections or hooks."""
        net = self._modules["conditioner"]  # as self.conditioner, without __getattr__'s call
        return self.fused and isinstance(net, MADE) and supports_fused(net)

    def _parallel(self, u: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def plain_map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """One direction's map and log-det by plain operations (``fused = False``, compilers)."""
        parallel = self.forward_is_parallel != inverse
        v, log_det = self._parallel(x) if parallel else self._sequential(x)
        return v, (log_det if self.log_det_sign > 0 else -log_det)

    def _map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return self.plain_map(x, inverse)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, inverse=False)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(y, inverse=True)

    def _log_abs_det_jacobian_uncached(self, x: Tensor, y: Tensor) -> Tensor:
        # the one-pass direction, never the D-pass one (MAF's: from y)
        if self.forward_is_parallel:
            return super()._log_abs_det_jacobian_uncached(x, y)
        self._validate(y, "output")
        return self.inverse_and_log_det(y)[1]


class AffineAutoregressiveCore(AutoregressiveCore):
    r"""The map shared by IAF, MAF and RealNVP: an affine autoregressive map :math:`u \mapsto v`,

    .. math:: v_i = \mu_i(u_{<i}) + e^{s_i(u_{<i})}\, u_i, \qquad
              \log\left|\det \frac{\partial v}{\partial u}\right| = \sum_i s_i(u_{<i}),

    where ":math:`<i`" is the order of a :class:`~pyroflows.nn.MADE` that outputs
    :math:`(\mu, s)` in one pass: ``u -> v`` is one pass, ``v -> u`` one pass per level of the
    order. The log-scale is bounded, :math:`s = b \tanh(\tilde s / b)`, or (``gated=True``)
    the update is Kingma et al.'s :math:`v = \sigma \odot u + (1 - \sigma) \odot m`,
    :math:`\sigma = \mathrm{sigmoid}(\tilde s + 2)`, with :math:`\log\sigma` clamped at
    :math:`-b` in the scale (so :math:`e^{-s}` of the inverse stays finite and the solve exact
    however far the gate saturates). ``forward_is_parallel`` says which way is
    the forward map, ``log_det_sign`` turns :math:`\sum_i s_i` into the forward log-det.

    ``fused = True`` (the default): the one-pass direction over a ReLU or tanh MADE runs as
    :func:`~pyroflows._fast.affine.affine_chain`, the D-pass one without autograd as
    :func:`~pyroflows._fast.affine.sequential_no_grad`; same values (to rounding where blocked
    or levelled), gradients to rounding. ``fused = False`` runs the plain operations.
    """

    #: a coupling layer's compact ``(conditioning, transformed)`` ranges (RealNVP)
    coupling_halves: tuple[slice, slice] | None = None

    def __init__(self, dim: int, hidden_dims: Sequence[int] | None = None,
                 order: Sequence[int] | Tensor | None = None, gated: bool = False,
                 log_scale_bound: float = 5.0, activation: Callable[[], nn.Module] = nn.ReLU,
                 residual: bool = False, zero_first: bool = False) -> None:
        super().__init__(dim)
        setup_affine(self, dim, hidden_dims, order, gated, log_scale_bound, activation, residual,
                     zero_first)

    def shift_and_log_scale(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`(\\mu(u), s(u))`, from one pass of the conditioner (given the context of a
        conditioned layer, broadcast against ``u``)."""
        context = self.context
        out = self.conditioner(u) if context is None else self.conditioner(u, context)
        raw_shift, raw_log_scale = out.chunk(2, dim=-1)
        b = self.log_scale_bound
        if self.gated:
            gate = raw_log_scale + _GATE_BIAS
            # log sigma >= -b, clamped in the log domain: an unbounded gate lets sigma
            # underflow, and the inverse's exp(-log sigma) overflows (0 * inf = NaN in the
            # masked products of its next pass). 1 - sigmoid(a) = sigmoid(-a): no cancellation
            # when sigma is close to 1
            return raw_shift * torch.sigmoid(-gate), F.logsigmoid(gate).clamp_min(-b)
        return raw_shift, torch.tanh(raw_log_scale * (1.0 / b)) * b

    def _parallel(self, u: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(u)
        return torch.addcmul(shift, log_scale.exp(), u), log_scale.sum(-1)

    def _sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        # after pass k every level <= k is exact, so num_passes passes solve it, and the last
        # pass's log-scales (levels below the top only) are s(u) at the solution
        if not torch.is_grad_enabled() and self._fusable() and not traced():
            return sequential_no_grad(self, v)
        u = v
        for _ in range(self.num_passes):
            shift, log_scale = self.shift_and_log_scale(u)
            u = (v - shift) * torch.exp(-log_scale)
        return u, log_scale.sum(-1)

    def _fusable(self) -> bool:
        return not self.gated and super()._fusable()

    def fused_kind(self, inverse: bool) -> tuple[bool, float] | None:
        """``(parallel, log_det_sign)`` where the fused kernel computes this direction (one pass
        of a non-gated layer over a ReLU or tanh MADE without hooks), else ``None``."""
        if not self._fusable():
            return None
        parallel = self.forward_is_parallel != inverse
        if not parallel and self.num_passes != 1:
            return None
        return parallel, self.log_det_sign

    def can_linearize(self) -> bool:
        """Whether :meth:`linearize` takes this layer: a fused one-pass forward map (IAF's,
        conditioned on a context or not) whose network sees all coordinates."""
        return Linearization.takes(self)

    def linearize(self, u: Tensor) -> Linearization:
        """The forward map at ``u`` (..., D; a conditioned layer's contexts broadcast against
        its batch dims) for repeated products with its Jacobian, on the rows of ``u`` as
        (N, D), outside autograd (:class:`~pyroflows._fast.affine.Linearization`; see
        :meth:`can_linearize`)."""
        return Linearization(self, u)

    @staticmethod
    def run_fused(x: Tensor, layers: Sequence[AffineAutoregressiveCore],
                  kinds: Sequence[tuple[bool, float]], log_det: Tensor | None,
                  inverse: bool) -> tuple[Tensor, Tensor]:
        """Consecutive layers (in the order they run) as one fused node."""
        return affine_chain(x, layers, kinds, log_det)

    def _map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        kind = self.fused_kind(inverse)
        if kind is not None and not traced():
            return affine_chain(x, [self], [kind])
        return self.plain_map(x, inverse)

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else f"log_scale_bound={self.log_scale_bound}"
        return f"dim={self.dim}, {kind}"


#: The largest ``log_scale_bound`` an affine autoregressive layer takes: a scale of exp(700)
#: is near float64's largest number (float32's is exp(88.7): the dtype bounds it further).
MAX_LOG_SCALE_BOUND = 700.0


def setup_affine(layer: nn.Module, dim: int, hidden_dims: Sequence[int] | None,
                 order: Sequence[int] | Tensor | None, gated: bool, log_scale_bound: float,
                 activation: Callable[[], nn.Module], residual: bool, zero_first: bool,
                 context_dim: int | None = None) -> None:
    """Give ``layer`` what :class:`AffineAutoregressiveCore` reads: its MADE ``conditioner``
    (with a context input of size ``context_dim`` where given), ``gated``,
    ``log_scale_bound`` and ``num_passes``."""
    if hidden_dims is None:
        hidden_dims = default_hidden_dims(dim)
    if not 0 < log_scale_bound <= MAX_LOG_SCALE_BOUND:
        raise ValueError(f"log_scale_bound must be positive and at most "
                         f"{MAX_LOG_SCALE_BOUND} (exp of more overflows float64; inf gives "
                         f"NaN), got {log_scale_bound}")
    layer.conditioner = MADE(dim, hidden_dims, num_params=2, order=order, activation=activation,
                             residual=residual, zero_first=zero_first, context_dim=context_dim)
    layer.gated = bool(gated)
    layer.log_scale_bound = float(log_scale_bound)
    # with the first level fixed to the identity, the solve from u = v is one pass shorter
    layer.num_passes = max(1, layer.conditioner.num_levels - int(zero_first))


class IAF(AffineAutoregressiveCore):
    r"""Inverse autoregressive flow (Kingma et al., 2016), seed eq. 39-41:

    .. math:: y_i = \mu_i(z_{<i}) + \sigma_i(z_{<i})\, z_i, \qquad
              \log|\det J| = \sum_i \log \sigma_i(z_{<i}),

    with :math:`(\mu, \log\sigma)` from one :class:`~pyroflows.nn.MADE` pass over :math:`z`;
    the inverse (seed eq. 40) takes D sequential passes, except for a sample just drawn (the
    cache). A new layer is the identity (``gated=False``).

    References:
        Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
        NeurIPS 2016, https://arxiv.org/abs/1606.04934

    Arguments:
        dim: the event size D.
        hidden_dims: the MADE hidden widths, default ``(max(64, 4D),) * 2``.
        order: the autoregressive rank of each coordinate, shape (D,), default ``0..D-1``.
        gated: the update :math:`y = \sigma \odot z + (1 - \sigma) \odot m` (LSTM-style).
        log_scale_bound: :math:`b` of :math:`\log\sigma = b \tanh(\cdot / b)` (gated:
            :math:`\log\sigma \ge -b`).
        activation: hidden activation (a module class), default ``nn.ReLU``.
        residual: residual connections between the hidden layers of the MADE.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.iaf(3, hidden_dims=(16, 16))
        >>> z = torch.randn(10, 3)
        >>> t(z).shape, t.log_abs_det_jacobian(z, t(z)).shape
        (torch.Size([10, 3]), torch.Size([10]))
    """

    forward_is_parallel = True
    log_det_sign = 1.0


class MAF(AffineAutoregressiveCore):
    r"""Masked autoregressive flow (Papamakarios et al., 2017), seed eq. 37-38.

    The inverse (the ``log_prob`` direction) is one :class:`~pyroflows.nn.MADE` pass over
    the data :math:`y`:

    .. math:: z_i = \tilde\mu_i(y_{<i}) + e^{\tilde s_i(y_{<i})}\, y_i, \qquad
              \log\left|\det \frac{\partial y}{\partial z}\right| = -\sum_i \tilde s_i(y_{<i}),

    sampling (seed eq. 41) D sequential passes: :class:`IAF`'s core run the other way round.

    References:
        Papamakarios et al., "Masked Autoregressive Flow for Density Estimation",
        NeurIPS 2017, https://arxiv.org/abs/1705.07057

    Arguments: :class:`IAF`'s, for the map ``y -> z``.

    Example:
        >>> import torch, pyroflows as pf
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> t = pf.transforms.maf(2, hidden_dims=(16, 16))
        >>> q = TransformedDistribution(Independent(Normal(torch.zeros(2), 1.0), 1), [t])
        >>> q.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    forward_is_parallel = False
    log_det_sign = -1.0


def iaf(dim: int, hidden_dims: Sequence[int] | None = None, gated: bool = False, **kwargs
        ) -> IAF:
    """Build an :class:`IAF` layer (identity at initialization unless ``gated``)."""
    return IAF(dim, hidden_dims=hidden_dims, gated=gated, **kwargs)


def maf(dim: int, hidden_dims: Sequence[int] | None = None, gated: bool = False, **kwargs
        ) -> MAF:
    """Build a :class:`MAF` layer (identity at initialization unless ``gated``)."""
    return MAF(dim, hidden_dims=hidden_dims, gated=gated, **kwargs)
