"""The model a :class:`~pyroflows.density.DensityEstimator` fits: fixed preconditioning stages
fitted to the data, the trainable flow (conditional on a standardized context where one is
given), and a base density that a Tabak transform may refine."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import flows
from .._config import validation
from .._gaussian import ml_gaussian, standard_normal_log_prob
from ..distributions import FlowDistribution
from ..transforms.affine import FixedTriangularAffine, TriangularAffine
from ..transforms.base import FlowTransform
from ..transforms.conditional import ConditionalFlowTransform
from ..transforms.tabak import Tabak

__all__ = ["DensityModel", "Standardize", "Whiten", "ContextShift", "build_model", "fit_stages",
           "fit_context", "fit_refiner", "skip_refiner", "interrupted", "evaluate"]

# What precondition="whiten" builds after the standardization (files store it): "learned", the
# layers, then a learnable Cholesky base started at the data's; "fixed", a fixed whitening, the
# layers; "fixed+affine", that whitening, the layers, the learnable base started at I.
WHITEN_KINDS = ("learned", "fixed", "fixed+affine")
WHITEN = "learned"
# What precondition="cholesky" builds; files do not store it, so changing it needs a new version.
CHOLESKY = "fixed+affine"
# Each flow's layer options under any flow_options (files store those they were built with):
# for the affine layers a smaller |log scale| bound than their 5 (benchmarks/results/density.md);
# for the splines the interval [-6, 6] of the standardized data, not the layer's [-5, 5]
# (benchmarks/results/density.md, "Spline flows").
FLOW_DEFAULTS = {"maf": {"log_scale_bound": 2.0}, "realnvp": {"log_scale_bound": 2.0},
                 "nsf": {"bound": 6.0}}
# The refiner's step-count rule (Tabak's selection) unless tabak_options names one.
REFINE_SELECTION = "significant"
# Rows per evaluation call outside training, so memory stays bounded on large inputs.
EVAL_CHUNK = 8192


def _ml_gaussian(x: Tensor, diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`~pyroflows._gaussian.ml_gaussian`, warning where the covariance needed a ridge."""
    loc, tril, ridge = ml_gaussian(x, diagonal=diagonal)
    if ridge > 0:
        warnings.warn(
            f"the training covariance is singular (constant or collinear columns, or fewer "
            f"rows than columns); added {ridge:.3g} to its diagonal, and held-out "
            "log-likelihoods may be very low",
            stacklevel=5,
        )
    return loc, tril


class Standardize(FlowTransform):
    r"""A fixed elementwise affine map fitted to data, :math:`x = m + \sigma \odot u`, with
    :math:`\log|\det \partial x / \partial u| = \sum_i \log \sigma_i`; :math:`m`, :math:`\sigma`:
    the training columns' mean and ML standard deviation (``N(0, I)`` through it: the ML
    diagonal Gaussian).

    Example:
        >>> s = Standardize(2).fit(torch.tensor([[0.0, 1.0], [2.0, 5.0]]))
        >>> s.inv(torch.tensor([[2.0, 1.0]])).tolist()
        [[1.0, -1.0]]
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> Standardize:
        loc, tril = _ml_gaussian(x, diagonal=True)
        self.loc.copy_(loc.to(self.loc.dtype))
        self.scale.copy_(tril.diagonal().to(self.scale.dtype))
        return self

    def forward_and_log_det(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return torch.addcmul(self.loc, self.scale, u), self.scale.log().sum().expand(u.shape[:-1])

    def inverse_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.loc) / self.scale, self.scale.log().sum().expand(x.shape[:-1])


class Whiten(FixedTriangularAffine):
    r"""A fixed full-rank affine map fitted to data, :math:`x = m + L u`, with
    :math:`\log|\det \partial x / \partial u| = \sum_i \log L_{ii}`; :math:`m`, :math:`L`: the
    training rows' mean and the Cholesky factor of their ML covariance.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 1.0], [0.0, 2.0], [2.0, 3.0]])
        >>> Whiten(2).fit(x).scale_tril.tolist()
        [[1.0, 0.0], [0.5, 1.0]]
    """

    def __init__(self, dim: int) -> None:
        super().__init__(torch.zeros(dim), torch.eye(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> Whiten:
        loc, tril = _ml_gaussian(x)
        self.loc.copy_(loc.to(self.loc.dtype))
        self.scale_tril.copy_(tril.to(self.scale_tril.dtype))
        return self


class _Shift(FlowTransform):
    r""":math:`y = x + a` with ``shift`` :math:`a` of shape (..., D) (one row per context),
    broadcast against the input; :math:`\log|\det J| = 0`."""

    def __init__(self, shift: Tensor) -> None:
        super().__init__(shift.shape[-1])
        self.shift = shift

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x + self.shift
        return y, y.new_zeros(y.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y - self.shift
        return x, x.new_zeros(x.shape[:-1])


class ContextShift(ConditionalFlowTransform):
    r"""A learnable linear function of the context added to every row, :math:`u = v + W h`,
    with :math:`\log|\det \partial u / \partial v| = 0`; :math:`W` of shape (D, C) starts at 0
    (the identity for every context).

    After a :class:`~pyroflows.transforms.TriangularAffine` :math:`v = m + L z`, the standard
    normal becomes :math:`N(m + W h, L L^\top)`: the linear-Gaussian conditional density,
    which :func:`fit_stages` starts at the least-squares regression of the training rows on
    their contexts.

    Example:
        >>> shift = ContextShift(2, 3)
        >>> t = shift.condition(torch.randn(5, 3))
        >>> torch.equal(t(torch.ones(5, 2)), torch.ones(5, 2))
        True
    """

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__(dim, context_dim)
        self.weight = nn.Parameter(torch.zeros(self.dim, self.context_dim))

    def conditioned(self, context: Tensor) -> FlowTransform:
        return _Shift(context @ self.weight.T)


def _inverse_parts(parts: Sequence[FlowTransform], y: Tensor) -> tuple[Tensor, Tensor]:
    """``y`` through the inverses of ``parts``, last first, and ``log|det d(result)/dy|``
    (``inverse_and_log_det`` directly: no per-layer validation or caching)."""
    log_det = torch.zeros(y.shape[:-1], device=y.device, dtype=y.dtype)
    for part in reversed(list(parts)):
        y, ld = part.inverse_and_log_det(y)
        log_det = log_det - ld
    return y, log_det


def _forward_parts(parts: Sequence[FlowTransform], z: Tensor) -> Tensor:
    for part in parts:  # draws need no log-det: Tabak's map alone is faster
        z = part.forward_value(z) if isinstance(part, Tabak) else part.forward_and_log_det(z)[0]
    return z


class DensityModel(nn.Module):
    r"""``log p(x | c) = log p_R(z) + log|det dz/dx|`` with ``z = f_h^{-1}(P^{-1}(x))``: fixed
    preconditioning stages ``P`` of ``x`` alone, the trainable flow ``f`` (conditional on
    ``h = (c - m_c) / s_c``, the context standardized by the training contexts' mean and ML
    standard deviation, where the model has a context), and the base ``p_R``: ``N(0, I)``, or
    through a refining Tabak transform ``R``, ``N(R^{-1}(z); 0, I) |det dR^{-1}/dz|``.

    The stages and the refiner do not see the context: fixed maps of ``x`` (or ``z``) alone,
    they are exact changes of variables for every context.

    Arguments:
        dim: the number of columns D.
        flow: the trainable stack ``f`` (forward: base to data); a
            :class:`~pyroflows.flows.ConditionalFlowStack` where ``context_dim`` is given.
        stages: the preconditioning stages, base side first.
        refine: empty, or one Tabak transform between ``N(0, I)`` and the flow's latent space.
        base_from_data: whether :func:`fit_stages` starts the flow's base-side
            ``TriangularAffine`` at the Cholesky factor of the preconditioned rows (with a
            context: of the residuals of their regression on the contexts, and the
            :class:`ContextShift` after it at the regression's coefficients).
        context_dim: the context size C, or ``None`` for a density of ``x`` alone.
    """

    def __init__(self, dim: int, flow: nn.Module, stages: Sequence[FlowTransform],
                 refine: Sequence[FlowTransform] = (), base_from_data: bool = False,
                 context_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.flow = flow
        self.stages = nn.ModuleList(stages)
        self.refine = nn.ModuleList(refine)
        self.base_from_data = base_from_data
        self.context_dim = None if context_dim is None else int(context_dim)
        if self.context_dim is not None:
            self.context_stage = Standardize(self.context_dim)

    def features(self, context: Tensor | None) -> Tensor | None:
        """``h = (c - m_c) / s_c``, what the flow's networks see (``None``: no context)."""
        if context is None:
            return None
        return self.context_stage.inverse_and_log_det(context)[0]

    def conditioned_flow(self, h: Tensor | None) -> nn.Module:
        """The flow for the standardized contexts ``h`` (the plain flow where ``h`` is
        ``None``)."""
        return self.flow if h is None else self.flow.condition(h)

    def precondition(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, log|det du/dx|)`` with ``u = P^{-1}(x)``."""
        return _inverse_parts(self.stages, x)

    def latent(self, u: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/du|)`` with ``z = f_h^{-1}(u)``, the flow's latent code (``h``: the
        standardized contexts, one row per row of ``u``)."""
        return _inverse_parts(self.conditioned_flow(h), u)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """``log p_R(z)``."""
        z, log_det = _inverse_parts(self.refine, z)
        return log_det + standard_normal_log_prob(z)

    def flow_log_prob(self, u: Tensor, h: Tensor | None = None) -> Tensor:
        """The training objective: the flow's density of ``u`` on ``N(0, I)`` (given the
        standardized contexts ``h``), through ``FlowDistribution`` (the stack's fused
        inverse), without the support check (the rows were checked as they came in; it
        would cost a host synchronization per step)."""
        flow = self.flow if h is None else self.flow.condition(h)
        return FlowDistribution(flow, validate_args=False).log_prob(u)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        u, log_det = self.precondition(x)
        z, log_det_flow = self.latent(u, self.features(context))
        return self.base_log_prob(z) + log_det_flow + log_det

    def sample(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """The data-space image of base draws ``z`` (rows; ``context``: one row per row)."""
        flow = self.conditioned_flow(self.features(context))
        u = _forward_parts(flow, _forward_parts(self.refine, z))
        return _forward_parts(self.stages, u)


def build_model(
    precondition: str | None, dim: int, *, flow: str, num_layers: int,
    hidden_dims: Sequence[int], flow_options: dict, flow_defaults: dict, whiten: str,
    tabak_options: dict, refine: str | None, seed: int | None = None,
    context_dim: int | None = None,
) -> DensityModel:
    """The unfitted model of one pipeline, from the estimator's arguments (``whiten``: the kind
    ``"whiten"`` builds; ``flow_defaults``: the layer options under ``flow_options``;
    ``context_dim``: a conditional flow of contexts of that size)."""
    stack = flows.build(flow, dim, num_layers=num_layers, hidden_dims=hidden_dims,
                        context_dim=context_dim, **{**flow_defaults, **flow_options})
    stages: list[FlowTransform] = []
    # "learned" puts the correlations into a learnable Cholesky factor at the base, not a fixed
    # rotation, so the layers see the data's own coordinates (benchmarks/results/density.md).
    kind = {"whiten": whiten, "cholesky": CHOLESKY}.get(precondition)
    if kind in ("learned", "fixed+affine"):
        if context_dim is None:
            # A FlowStack, so training runs its fused inverse (the state_dict keys are the same).
            stack = flows.FlowStack([TriangularAffine(dim), *stack.parts],
                                    compile=stack.compile_backend or False)
        else:  # the base N(m + W h, L L^T): the linear-Gaussian conditional
            stack = flows.ConditionalFlowStack(
                [TriangularAffine(dim), ContextShift(dim, context_dim), *stack.sequence],
                dim=dim, context_dim=context_dim)
    if kind in ("fixed", "fixed+affine"):
        stages.append(Whiten(dim))  # forward order: base side first
    if precondition in ("standardize", "whiten", "cholesky"):
        stages.append(Standardize(dim))
    elif precondition == "tabak":
        stages.append(Tabak(dim, **{"seed": seed, **tabak_options}))
    refiners: list[FlowTransform] = []
    if refine == "tabak":
        # No whitening: zero steps are the identity, so validation keeps only steps that help.
        refiners.append(Tabak(dim, **{"seed": None if seed is None else seed + 1,
                                      "selection": REFINE_SELECTION, **tabak_options,
                                      "whiten": False}))
    return DensityModel(dim, stack, stages, refiners, base_from_data=kind == "learned",
                        context_dim=context_dim)


@torch.no_grad()
def fit_context(model: DensityModel, context_train: Tensor) -> None:
    """Fit the model's context standardization to the training contexts."""
    model.context_stage.fit(context_train)


def _regression(h: Tensor, u: Tensor) -> Tensor:
    r"""The least-squares :math:`W` (D, C) of :math:`u \approx W h` over centred rows, from the
    normal equations :math:`H^\top H W^\top = H^\top U` by Cholesky; where :math:`H^\top H` is
    singular (collinear contexts, fewer rows than columns), with a ridge of
    :math:`n \sqrt{\epsilon}` (the dtype's), so the answer stays finite."""
    gram, moment = h.T @ h, h.T @ u
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        ridge = h.shape[0] * torch.finfo(h.dtype).eps ** 0.5
        factor = torch.linalg.cholesky(gram + ridge * torch.eye(
            gram.shape[0], device=gram.device, dtype=gram.dtype))
    return torch.cholesky_solve(moment, factor).T


@torch.no_grad()
def fit_stages(model: DensityModel, x_train: Tensor, x_val: Tensor,
               progress: bool, h_train: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit the stages, data side first, each to the rows the stages after it make, and start the
    flow's base where asked (``h_train``: the standardized training contexts, where the model
    has a context); returns ``(u_train, ld_train, u_val, ld_val)``, the preconditioned rows and
    their log-dets."""
    x_fit, x_val_fit = x_train, x_val
    for i, stage in enumerate(reversed(model.stages)):
        if isinstance(stage, Tabak):
            stage.fit(x_fit, x_val=x_val_fit, progress=progress)
        else:
            stage.fit(x_fit)
        if i + 1 < len(model.stages):
            x_fit = evaluate(stage.inverse_and_log_det, x_fit)[0]
            x_val_fit = evaluate(stage.inverse_and_log_det, x_val_fit)[0]
    u_train, ld_train = evaluate(model.precondition, x_train)
    u_val, ld_val = evaluate(model.precondition, x_val)
    if model.base_from_data:  # base N(0, ML covariance of u), or N(W h, residual covariance)
        residual = u_train
        if h_train is not None:
            weight = _regression(h_train, u_train)
            model.flow.parts[1].weight.copy_(weight)
            residual = u_train - h_train @ weight.T
        model.flow.parts[0].set_scale_tril_(_ml_gaussian(residual)[1])
    return u_train, ld_train, u_val, ld_val


@torch.no_grad()
def fit_refiner(model: DensityModel, u_train: Tensor, u_val: Tensor, ld_val: Tensor,
                progress: bool, h_train: Tensor | None = None,
                h_val: Tensor | None = None) -> float:
    """Fit the refiner to the trained flow's codes of the training split (its step count chosen
    on the validation codes); returns the refined model's mean validation log-likelihood
    (``h_train``, ``h_val``: the splits' standardized contexts, where the model has one)."""
    with validation(False):
        z_train, _ = evaluate(model.latent, u_train, h_train)
        z_val, zld_val = evaluate(model.latent, u_val, h_val)
    model.refine[0].fit(z_train, x_val=z_val, progress=progress)
    with validation(False):
        return float((evaluate(model.base_log_prob, z_val) + zld_val + ld_val).mean())


def interrupted(stage: nn.Module) -> bool:
    """Whether ``stage``'s last fit was stopped by a ``KeyboardInterrupt`` (a Tabak fit then
    keeps its steps so far and says so in its ``history``)."""
    history = getattr(stage, "history", None)
    return isinstance(history, dict) and history.get("stopped") == "interrupted"


@torch.no_grad()
def skip_refiner(model: DensityModel) -> None:
    """Make a refiner that was not fitted the identity: a Tabak transform without whitening and
    with no steps is ``R(z) = z`` (a fitted one is left as it is)."""
    for refiner in model.refine:
        if not bool(refiner.fitted):
            refiner.fitted.fill_(True)


def evaluate(fn: Callable[..., Any], x: Tensor, *rows: Tensor | None) -> Any:
    """``fn(x, *rows)`` ``EVAL_CHUNK`` rows at a time (``rows``: tensors with one row per row of
    ``x``, such as contexts, or ``None``; ``fn`` returns a tensor or a tuple, by rows)."""
    if x.shape[0] <= EVAL_CHUNK:
        return fn(x, *rows)
    starts = range(0, x.shape[0], EVAL_CHUNK)
    outs = [fn(x[i:i + EVAL_CHUNK], *(r if r is None else r[i:i + EVAL_CHUNK] for r in rows))
            for i in starts]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)
