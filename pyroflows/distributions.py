"""Flow distributions: a standard normal base and a flow's density, each in a few kernels;
the conditional density of a conditional flow."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, TransformedDistribution
from pyro.distributions.conditional import ConditionalDistribution, ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from ._config import is_validation_enabled
from ._gaussian import LOG_2PI, standard_normal_log_prob
from .flows import FlowStack

__all__ = ["StandardNormal", "UnitStudentT", "StudentTBase", "FlowDistribution",
           "ConditionalFlowDistribution"]


class StandardNormal(TorchDistribution):
    r"""The standard normal :math:`\mathcal{N}(0, I_D)` on :math:`\mathbb{R}^D`, the usual base
    of a flow, :math:`\log p(z) = -\tfrac12 \lVert z \rVert^2 - \tfrac{D}{2} \log 2\pi`.

    ``Independent(Normal(zeros(D), ones(D)), 1)`` up to rounding, without parameter tensors or
    support check: the log-density is three kernels.

    Arguments:
        dim: the event size D.
        batch_shape: the batch shape (default ``()``).
        device, dtype: where and in what precision :meth:`rsample` draws (default: torch's).

    Example:
        >>> import torch
        >>> from pyroflows.distributions import StandardNormal
        >>> p = StandardNormal(2)
        >>> p.log_prob(torch.zeros(2)).item() == -torch.log(torch.tensor(2 * torch.pi)).item()
        True
        >>> p.sample((5,)).shape
        torch.Size([5, 2])
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, dim: int, batch_shape: torch.Size | tuple[int, ...] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        if int(dim) < 1:
            raise ValueError(f"StandardNormal: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        # a 0-d tensor, only to carry the device and dtype of draws
        self._like = torch.zeros((), device=device, dtype=dtype)
        super().__init__(torch.Size(batch_shape), torch.Size([self.dim]), validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self._like.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        return (self._like + 1).expand(self.batch_shape + self.event_shape)

    def expand(self, batch_shape, _instance=None) -> StandardNormal:
        return StandardNormal(self.dim, batch_shape, self._like.device, self._like.dtype)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        return torch.randn(shape, device=self._like.device, dtype=self._like.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-1:] != self.event_shape:
            raise ValueError(f"StandardNormal: value must have shape (..., {self.dim}), got "
                             f"{tuple(value.shape)}")
        log_prob = standard_normal_log_prob(value)
        batch = self.batch_shape
        if not batch or log_prob.shape[-len(batch):] == batch:
            return log_prob
        # a value without the batch dims is scored once per batch entry, as torch does
        return log_prob.expand(torch.broadcast_shapes(log_prob.shape, batch))

    def entropy(self) -> Tensor:
        return (self._like + 0.5 * self.dim * (1.0 + LOG_2PI)).expand(self.batch_shape)


class UnitStudentT(TorchDistribution):
    r"""Independent Student t coordinates scaled to unit variance, a heavy-tailed flow base
    (tail-adaptive flows: Jaini et al. 2020; Laszkiewicz et al. 2022; for VI, Liang et al.
    2022) whose degrees of freedom :math:`\nu_d > 2` can be learned:

    .. math:: z_d = s_d\, t_d, \quad t_d \sim t_{\nu_d}, \quad s_d = \sqrt{(\nu_d - 2)/\nu_d},

    .. math:: \log p(z) = \sum_d \Bigl[\log t_{\nu_d}(z_d / s_d) - \log s_d\Bigr].

    Each coordinate has mean 0 and variance 1, as the standard normal (the limit
    :math:`\nu \to \infty`) has, so a flow's Gaussian start keeps its meaning; its tails
    fall as :math:`|z|^{-\nu - 1}` instead of :math:`e^{-z^2/2}`, which an affine or
    autoregressive-affine flow keeps. :meth:`rsample` is differentiable in :math:`\nu`
    (torch's implicitly reparameterized gamma draws).

    Arguments:
        df: :math:`\nu`, shape ``batch_shape + (D,)``, every entry above 2.

    Example:
        >>> import torch
        >>> from pyroflows.distributions import UnitStudentT
        >>> p = UnitStudentT(torch.full((3,), 5.0))
        >>> p.sample((200000,)).var(0).round(decimals=1)
        tensor([1., 1., 1.])
        >>> heavier = UnitStudentT(torch.full((3,), 2.5))  # more mass at 0 and far out
        >>> bool(heavier.log_prob(torch.zeros(3)) > p.log_prob(torch.zeros(3)))
        True
    """

    arg_constraints = {"df": constraints.greater_than(2.0)}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, df: Tensor, validate_args: bool | None = None) -> None:
        if df.dim() < 1:
            raise ValueError(f"UnitStudentT: df must have shape (..., D), got {tuple(df.shape)}")
        self.df = df
        super().__init__(df.shape[:-1], df.shape[-1:], validate_args=validate_args)

    @property
    def scale(self) -> Tensor:
        return ((self.df - 2) / self.df).sqrt()

    @property
    def mean(self) -> Tensor:
        return torch.zeros_like(self.df)

    @property
    def variance(self) -> Tensor:
        return torch.ones_like(self.df)

    def expand(self, batch_shape, _instance=None) -> UnitStudentT:
        return UnitStudentT(self.df.expand(torch.Size(batch_shape) + self.event_shape))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        t = torch.distributions.StudentT(self.df).rsample(torch.Size(sample_shape))
        return t * self.scale

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        scale = self.scale
        t = torch.distributions.StudentT(self.df, torch.zeros_like(self.df), scale)
        return t.log_prob(value).sum(-1)


class StudentTBase(nn.Module):
    r"""A learnable :class:`UnitStudentT` base: one degrees-of-freedom parameter per
    coordinate, :math:`\nu_d = 2 + e^{\rho_d}` (so :math:`\nu_d > 2` and a step of Adam moves
    :math:`\nu_d - 2` by a factor, whatever its size). Calling it gives the distribution.

    Arguments:
        dim: the event size D.
        df: the starting :math:`\nu` of every coordinate, above 2 (default 5: tails well
            above the normal's, which training can lighten or make heavier).

    Example:
        >>> import torch
        >>> from pyroflows.distributions import StudentTBase
        >>> base = StudentTBase(3)
        >>> base().df
        tensor([5., 5., 5.], grad_fn=<AddBackward0>)
        >>> base().rsample((4,)).shape
        torch.Size([4, 3])
    """

    def __init__(self, dim: int, df: float = 5.0) -> None:
        super().__init__()
        if not float(df) > 2:
            raise ValueError(f"StudentTBase: df must be above 2 (unit variance), got {df!r}")
        self.log_excess_df = nn.Parameter(torch.full((int(dim),), math.log(float(df) - 2)))

    @property
    def df(self) -> Tensor:
        return 2 + self.log_excess_df.exp()

    def forward(self) -> UnitStudentT:
        return UnitStudentT(self.df)


def _parameter_like(module: nn.Module) -> Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


class FlowDistribution(TransformedDistribution):
    r"""The density of a flow :math:`x = f(z)`, :math:`z \sim p_0`:

    .. math:: \log p(x) = \log p_0\bigl(f^{-1}(x)\bigr)
              - \log\left|\det \frac{\partial f}{\partial z}\right|_{z = f^{-1}(x)} .

    Pyro's ``TransformedDistribution(base, flow)`` (same values up to the order of the final
    additions), whose :meth:`log_prob`, for a :class:`~pyroflows.flows.FlowStack` of pyroflows
    layers, is one call of the stack's :meth:`~pyroflows.flows.FlowStack.inverse_and_log_det`:
    its fused kernels, or its cache for samples just drawn (no inverse). The stack checks its
    input; with :func:`pyroflows.validation` off, ``validate_args`` checks the support instead.

    Arguments:
        flow: a :class:`~pyroflows.flows.FlowStack`, or any transform or list of transforms.
        base: default :class:`StandardNormal` of the flow's event size, on the device and in
            the dtype of the flow's parameters at construction.
        validate_args: as for any torch distribution.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.distributions import FlowDistribution
        >>> p = FlowDistribution(pf.flows.build("maf", 3, num_layers=2, hidden_dims=(8,)))
        >>> p.log_prob(torch.randn(4, 3)).shape
        torch.Size([4])
        >>> x = p.rsample((5,)); p.log_prob(x).shape  # scored from the cache: no inverse
        torch.Size([5])
    """

    def __init__(self, flow, base=None, validate_args: bool | None = None) -> None:
        if base is None:
            dim = _event_size(flow)
            like = _parameter_like(flow) if isinstance(flow, nn.Module) else None
            base = StandardNormal(dim, device=None if like is None else like.device,
                                  dtype=None if like is None else like.dtype)
        super().__init__(base, flow, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        new = self._get_checked_instance(FlowDistribution, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: Tensor) -> Tensor:
        flow = self.transforms[0] if len(self.transforms) == 1 else None
        if not (isinstance(flow, FlowStack) and flow.all_flow_transforms
                and len(self.event_shape) == 1):
            return super().log_prob(value)
        if self._validate_args and not is_validation_enabled():
            self._validate_sample(value)
        # from the stack's cache when value was just drawn (no inverse), else one fused call
        z, log_det = flow.inverse_and_log_det(value)
        return self.base_dist.log_prob(z) - log_det


def _event_size(flow) -> int:
    parts = getattr(flow, "parts", None)
    first = parts[0] if parts else (flow[0] if isinstance(flow, list | tuple) else flow)
    dim = getattr(first, "dim", None)
    if dim is None:
        raise ValueError("FlowDistribution: cannot tell the flow's event size; pass base=")
    return int(dim)


class ConditionalFlowDistribution(ConditionalDistribution):
    r"""The density of a conditional flow :math:`x = f_c(z)`, :math:`z \sim p_0` (seed eq.
    27: the flow's parameters a network's output for the context :math:`c`), as Pyro's
    ``ConditionalDistribution``:

    .. math:: \log p(x \mid c) = \log p_0\bigl(f_c^{-1}(x)\bigr)
              - \log\left|\det \frac{\partial f_c}{\partial z}\right|_{z = f_c^{-1}(x)} .

    ``condition(c)``, for contexts ``c`` of shape ``batch_shape + (C,)``, is a
    :class:`FlowDistribution` with that ``batch_shape`` and event shape ``(D,)``: ``rsample``,
    ``sample``, ``log_prob``, ``expand``, usable in ``pyro.sample`` inside a ``pyro.plate``
    over the contexts' rows; ``sample((S,))`` has shape ``(S,) + batch_shape + (D,)``. Its
    base is :class:`StandardNormal` with the contexts' batch shape, device and dtype; a draw
    scored right away is scored from the conditioned stack's cache (no inverse).

    Arguments:
        flow: a conditional transform: a :class:`~pyroflows.flows.ConditionalFlowStack`
            (``pf.flows.build(name, D, context_dim=C)``), a pyroflows conditional layer, or
            any ``ConditionalTransform`` (Pyro's ``conditional_planar``, ...).
        base: default :class:`StandardNormal` of the flow's ``dim``; else a distribution
            with event shape (D,) (expanded to the contexts' batch shape) or a
            ``ConditionalDistribution`` (conditioned on the same contexts).
        distribution_class: what :meth:`condition` returns, built as
            ``distribution_class(transform, base)``: :class:`FlowDistribution`, or a subclass
            such as :class:`pyroflows.guides.AmortizedPosterior` (a guide's posterior that
            sticks the landing).

    Example:
        >>> import torch, pyro, pyroflows as pf
        >>> from pyro.distributions.transforms import conditional_planar
        >>> cflow = pf.flows.ConditionalFlowStack(
        ...     [conditional_planar(2, 3), conditional_planar(2, 3)], dim=2, context_dim=3)
        >>> q = pf.distributions.ConditionalFlowDistribution(cflow)
        >>> h = torch.randn(5, 3)  # one context per row
        >>> q_h = q.condition(h)
        >>> q_h.batch_shape, q_h.event_shape, q_h.sample((7,)).shape
        (torch.Size([5]), torch.Size([2]), torch.Size([7, 5, 2]))
        >>> with pyro.plate("data", 5):
        ...     z = pyro.sample("z", q_h)
        >>> q_h.log_prob(z).shape  # Pyro's planar layer has no inverse: scored from its cache
        torch.Size([5])
    """

    def __init__(self, flow: ConditionalTransform,
                 base: Distribution | ConditionalDistribution | None = None,
                 distribution_class: type = FlowDistribution) -> None:
        if not isinstance(flow, ConditionalTransform):
            raise TypeError("ConditionalFlowDistribution: flow must be a conditional transform "
                            f"(with .condition(context)), got {type(flow).__name__}")
        if not (isinstance(distribution_class, type)
                and issubclass(distribution_class, FlowDistribution)):
            raise TypeError("ConditionalFlowDistribution: distribution_class must be "
                            f"FlowDistribution or a subclass, got {distribution_class!r}")
        dim = getattr(flow, "dim", None)
        if base is None and dim is None:
            raise ValueError("ConditionalFlowDistribution: cannot tell the flow's event size; "
                             "pass base=")
        self.flow, self.base, self.dim = flow, base, dim
        self.distribution_class = distribution_class

    def condition(self, context: Tensor) -> FlowDistribution:
        """The distribution of ``x`` given ``context`` (shape ``batch_shape + (C,)``)."""
        transform = self.flow.condition(context)
        batch_shape = context.shape[:-1]
        if self.base is None:
            base = StandardNormal(self.dim, batch_shape, context.device, context.dtype)
        elif isinstance(self.base, ConditionalDistribution):
            base = self.base.condition(context)
        else:
            base = self.base.expand(torch.broadcast_shapes(self.base.batch_shape, batch_shape))
        return self.distribution_class(transform, base)
