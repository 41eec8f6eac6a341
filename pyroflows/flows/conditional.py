r"""Conditional flow stacks (seed eq. 27): layers whose parameters are a network's output for a
context :math:`c`, composed so that ``condition(c)`` is one :class:`FlowStack`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from ..transforms import ConditionalFlowTransform, FlowTransform
from .stack import FlowStack

__all__ = ["ConditionalFlowStack", "ConditionalElementwiseAffine"]


class ConditionalFlowStack(ConditionalFlowTransform):
    r"""A stack of conditional layers, with plain transforms mixed in, as one conditional
    transform (Pyro's ``ConditionalTransformModule`` protocol):

    .. math:: f_c = t_K^{(c)} \circ \dots \circ t_1^{(c)}, \qquad
              \log\left|\det J_{f_c}(z)\right| = \sum_{k=1}^{K}
              \log\left|\det J_{t_k^{(c)}}(z_{k-1})\right|,

    where :math:`t_k^{(c)}` is ``part.condition(c)`` for a conditional part (the context
    enters the layer's network: seed eq. 27) and the part itself for a plain transform (a
    permutation, an :class:`~pyroflows.transforms.ElementwiseAffine`).

    ``condition(c)`` checks ``c`` once (a floating tensor of shape ``(..., C)``; a
    :class:`ValueError` says what is wrong), conditions every part on it (pyroflows' layers
    skip their own repeated check) and returns a new :class:`FlowStack` of the conditioned
    parts, so the stack's one-entry cache (a sample just drawn is scored without an inverse)
    and its fused runs apply, and nothing cached for one context answers for another. Nested
    stacks are flattened into it. Conditional layers of other libraries (Pyro's
    ``conditional_planar``, ...) work too; a stack holding them is a plain composition.

    Contexts broadcast as the layers do: ``c`` of shape (B, C) with inputs of shape (B, D) or
    (S, B, D); ``c`` of shape (C,) is one context for every row.

    Arguments:
        parts: conditional layers (``ConditionalTransform``) and plain transforms, applied
            first to last.
        dim: the event size D (default: read from the parts' ``dim``).
        context_dim: the context size C (default: read from the parts' ``context_dim``).

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyro.distributions.transforms import conditional_planar
        >>> flow = pf.flows.ConditionalFlowStack(
        ...     [conditional_planar(2, 3), pf.transforms.Permute.reverse(2),
        ...      conditional_planar(2, 3)], context_dim=3)
        >>> t = flow.condition(torch.randn(5, 3))
        >>> t(torch.randn(7, 5, 2)).shape
        torch.Size([7, 5, 2])
    """

    def __init__(self, parts: Sequence[ConditionalTransform | Transform], dim: int | None = None,
                 context_dim: int | None = None) -> None:
        parts = list(parts)
        if not parts:
            raise ValueError("ConditionalFlowStack: needs at least one part")
        for part in parts:
            if not isinstance(part, ConditionalTransform | Transform):
                raise TypeError("ConditionalFlowStack: parts must be conditional transforms or "
                                f"torch Transforms, got {type(part).__name__}")
        dim = _agreed(parts, "dim", dim)
        context_dim = _agreed([p for p in parts if isinstance(p, ConditionalTransform)],
                              "context_dim", context_dim)
        super().__init__(dim, context_dim)
        self.sequence = parts  # every part in order; the modules among them also in `parts`
        self.parts = nn.ModuleList([p for p in parts if isinstance(p, nn.Module)])

    def conditioned(self, context: Tensor) -> FlowStack:
        """The :class:`FlowStack` of the parts conditioned on a checked ``context``."""
        out: list[Transform] = []
        for part in self.sequence:
            if isinstance(part, ConditionalFlowTransform):
                part = part.conditioned(context)
            elif isinstance(part, ConditionalTransform):
                part = part.condition(context)
            if type(part) is FlowStack and part.all_flow_transforms and not part.compile_backend:
                out.extend(part.parts)
            else:
                out.append(part)
        return FlowStack(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


def _agreed(parts: list, name: str, given: int | None) -> int:
    """``given``, or the one value of the parts' attribute ``name``; a :class:`ValueError`
    when they disagree or none tells."""
    seen = {int(getattr(p, name)) for p in parts if getattr(p, name, None) is not None}
    if given is not None:
        seen.add(int(given))
    if len(seen) > 1:
        raise ValueError(f"ConditionalFlowStack: the parts disagree on {name}: {sorted(seen)}")
    if not seen:
        raise ValueError(f"ConditionalFlowStack: cannot tell {name} from the parts; pass "
                         f"{name}=")
    return seen.pop()


class ConditionalElementwiseAffine(ConditionalFlowTransform):
    r"""A per-row Gaussian start for a conditional flow: :math:`y = \mu(c) + \sigma(c) \odot x`,
    :math:`\log|\det J| = \sum_i \log \sigma_i(c)`, with

    .. math:: (\mu(c), \rho(c)) = W c + b, \qquad \sigma(c) = \operatorname{softplus}(\rho(c)),

    so a standard normal base becomes :math:`\mathcal{N}(\mu(c), \operatorname{diag}
    \sigma(c)^2)`, the diagonal Gaussian :math:`q_0(z_0 \mid x)` that Rezende & Mohamed
    (2015, sec. 4.2) and Kingma et al. (2016, eq. 9: :math:`z_0 = \mu_0 + \sigma_0 \odot
    \epsilon`) put before the flow. The bias starts ``loc`` at 0 and ``scale`` at
    ``init_scale``; the weights at PyTorch's default.

    Arguments:
        dim: the event size D.
        context_dim: the context size C.
        init_scale: :math:`\sigma` at a zero context, at initialisation.

    Example:
        >>> import torch, pyroflows as pf
        >>> layer = pf.flows.ConditionalElementwiseAffine(2, 3)
        >>> t = layer.condition(torch.randn(5, 3))
        >>> t.log_abs_det_jacobian(torch.zeros(5, 2), t(torch.zeros(5, 2))).shape
        torch.Size([5])
    """

    def __init__(self, dim: int, context_dim: int, init_scale: float = 1.0) -> None:
        super().__init__(dim, context_dim)
        if not float(init_scale) > 0:
            raise ValueError(f"ConditionalElementwiseAffine: init_scale must be positive, got "
                             f"{init_scale!r}")
        self.head = nn.Linear(self.context_dim, 2 * self.dim)
        with torch.no_grad():
            self.head.bias[: self.dim].zero_()
            # softplus^{-1}(s) = s + log(1 - e^{-s})
            s = torch.tensor(float(init_scale), dtype=torch.float64)
            self.head.bias[self.dim:].fill_(float(s + torch.log(-torch.expm1(-s))))

    def conditioned(self, context: Tensor) -> FlowTransform:
        loc, raw = self.head(context).split(self.dim, dim=-1)
        # at least the dtype's smallest normal number: log sigma stays finite however far
        # below 0 the head's output goes (softplus underflows to 0 there)
        scale = nn.functional.softplus(raw).clamp_min(torch.finfo(raw.dtype).tiny)
        return _RowAffine(loc, scale)


class _RowAffine(FlowTransform):
    """:math:`y = \\mu + \\sigma \\odot x` with ``loc`` and ``scale`` of shape (..., D) given
    (one row per context), broadcast against the input."""

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__(loc.shape[-1])
        self.loc, self.scale = loc, scale
        self.log_det = scale.log().sum(-1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.addcmul(self.loc, self.scale, x)
        return y, self.log_det.expand(y.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (y - self.loc) / self.scale
        return x, self.log_det.expand(x.shape[:-1])

    def has_score_step(self) -> bool:
        return True

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        # J = diag(sigma), a log-det constant in x
        return self.forward_and_log_det(x)[0], g / self.scale
