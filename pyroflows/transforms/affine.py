"""Learnable affine layers: the loc/scale end of a flow stack (elementwise or lower triangular)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _legacy, _private
from .._fast import RowView, keeps_map
from .._memo import Memoized, tensor_state
from .base import FlowTransform

__all__ = ["ElementwiseAffine", "elementwise_affine", "TriangularAffine", "triangular_affine",
           "FixedTriangularAffine", "tril_affine_solve", "tril_score"]


class _PackedAffine(FlowTransform):
    """An affine layer whose parameters are the rows ``_ROWS`` of one tensor ``packed``, read
    as views (:class:`~pyroflows._fast.banks.RowView`): one optimizer step per layer."""

    _ROWS: tuple[str, ...] = ()

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        _private.register_load_state_dict_pre_hook(self, _legacy.pack_separate_entries)

    def _initial(self, loc: Tensor | float, scale: Tensor | float) -> dict[str, Tensor]:
        """The (D,) ``loc`` and ``log_scale`` rows from a float or (D,) ``loc`` and ``scale``."""
        loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype()).detach()
        scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype()).detach()
        for name, value in (("loc", loc_t), ("scale", scale_t)):
            if value.dim() > 1 or value.numel() not in (1, self.dim):  # (what expands to (D,))
                shapes = "(1,)" if self.dim == 1 else f"(1,) or ({self.dim},)"
                raise ValueError(f"{type(self).__name__}: {name} must be a number or of shape "
                                 f"{shapes}, got shape {tuple(value.shape)}")
        if not bool((scale_t > 0).all()):
            raise ValueError(f"{type(self).__name__}: scale must be positive, got {scale}")
        return {"loc": loc_t.expand(self.dim), "log_scale": scale_t.log().expand(self.dim)}

    def pack(self, **parts: Tensor) -> Tensor:
        """The ``packed`` tensor of the rows ``_ROWS``."""
        raise NotImplementedError


class ElementwiseAffine(_PackedAffine):
    r"""Elementwise affine map :math:`y = \mu + e^{s} \odot x`, :math:`\log|\det J| = \sum_i
    s_i`: last in a guide's flow, it starts the posterior at a mean-field Gaussian. Its one
    parameter ``packed`` (2, D) holds the rows ``loc`` and ``log_scale`` (views).

    Arguments:
        dim: the event size D.
        loc: initial :math:`\mu` (a tensor of shape (D,) or a float), default 0.
        scale: initial :math:`e^{s}` (a tensor of shape (D,) or a positive float), default 1.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.ElementwiseAffine(2, loc=torch.tensor([1.0, -1.0]), scale=0.5)
        >>> t(torch.zeros(1, 2)).tolist()
        [[1.0, -1.0]]
        >>> [name for name, _ in t.named_parameters()]
        ['packed']
    """

    _ROWS = ("loc", "log_scale")
    loc = RowView(0, tensor="packed", in_bank=False)
    log_scale = RowView(1, tensor="packed", in_bank=False)

    def __init__(self, dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0) -> None:
        super().__init__(dim)
        self.packed = nn.Parameter(self.pack(**self._initial(loc, scale)))

    def pack(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        return torch.stack([loc, log_scale.to(loc)])

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.packed.unbind(0)
        y = torch.addcmul(loc, log_scale.exp(), x)
        return y, log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.packed.unbind(0)
        x = (y - loc) * torch.exp(-log_scale)
        return x, log_scale.sum().expand(y.shape[:-1])

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), ElementwiseAffine, _MAP)

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        # J = diag(e^s), a log-det constant in x
        return self.forward_and_log_det(x)[0], g * torch.exp(-self.log_scale)


def elementwise_affine(dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0
                       ) -> ElementwiseAffine:
    """Build an :class:`ElementwiseAffine` layer (identity by default)."""
    return ElementwiseAffine(dim, loc=loc, scale=scale)


class TriangularAffine(_PackedAffine):
    r"""Full-rank affine map :math:`y = \mu + L x`, :math:`L` lower triangular with
    :math:`L_{ii} = e^{s_i}`, :math:`\log|\det J| = \sum_i s_i`: last in a full-rank guide's
    flow, where it learns the linear correlations directly. Its one parameter ``packed``
    (D + 2, D) holds the rows ``lower`` (D rows, strictly lower part used), ``loc`` and
    ``log_scale`` (views).

    Arguments:
        dim: the event size D.
        loc: initial :math:`\mu` (a tensor of shape (D,) or a float), default 0.
        scale: initial diagonal :math:`e^{s}` (a tensor of shape (D,) or a positive float).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import TriangularAffine
        >>> t = TriangularAffine(2, loc=1.0, scale=2.0)
        >>> t(torch.ones(1, 2)).tolist()
        [[3.0, 3.0]]
    """

    _ROWS = ("lower", "loc", "log_scale")
    lower = RowView(lambda t: slice(0, t.dim), tensor="packed", in_bank=False)
    loc = RowView(lambda t: t.dim, tensor="packed", in_bank=False)
    log_scale = RowView(lambda t: t.dim + 1, tensor="packed", in_bank=False)

    def __init__(self, dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0) -> None:
        super().__init__(dim)
        self.packed = nn.Parameter(self.pack(lower=torch.zeros(dim, dim),
                                             **self._initial(loc, scale)))

    def pack(self, lower: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        return torch.cat([lower.to(loc), loc[None], log_scale.to(loc)[None]])

    def _parts(self) -> tuple[Tensor, Tensor, Tensor]:
        lower, loc, log_scale = self.packed.split((self.dim, 1, 1))
        log_scale = log_scale[0]
        scale_tril = torch.tril(lower, diagonal=-1) + torch.diag_embed(log_scale.exp())
        return loc[0], scale_tril, log_scale

    @property
    def scale_tril(self) -> Tensor:
        """:math:`L`, lower triangular with positive diagonal."""
        return self._parts()[1]

    @torch.no_grad()
    def set_scale_tril_(self, tril: Tensor) -> None:
        """Set :math:`L` in place from a lower-triangular matrix with a positive diagonal."""
        if tril.shape != (self.dim, self.dim) or not bool((tril.diagonal() > 0).all()):
            raise ValueError(f"TriangularAffine: expected a ({self.dim}, {self.dim}) lower "
                             f"triangular matrix with a positive diagonal, got {tuple(tril.shape)}")
        self.lower.copy_(torch.tril(tril, -1).to(self.packed))
        self.log_scale.copy_(tril.diagonal().log().to(self.packed))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale_tril, log_scale = self._parts()
        y = loc + x @ scale_tril.T
        return y, log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale_tril, log_scale = self._parts()
        return tril_affine_solve(loc, scale_tril, y), log_scale.sum().expand(y.shape[:-1])

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), TriangularAffine, _MAP)

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_and_log_det(x)[0], tril_score(self.scale_tril, g)


def triangular_affine(dim: int, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0
                      ) -> TriangularAffine:
    """Build a :class:`TriangularAffine` layer (identity by default)."""
    return TriangularAffine(dim, loc=loc, scale=scale)


class FixedTriangularAffine(Memoized, FlowTransform):
    r""":math:`y = m + C x` with fixed (buffers) ``loc`` :math:`m` and lower-triangular
    ``scale_tril`` :math:`C` of positive diagonal, :math:`\log|\det J| = \sum_i \log C_{ii}`.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import FixedTriangularAffine
        >>> t = FixedTriangularAffine(torch.ones(2), torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        >>> t(torch.ones(1, 2)).tolist()
        [[3.0, 3.0]]
    """

    def __init__(self, loc: Tensor, scale_tril: Tensor) -> None:
        super().__init__(loc.shape[-1])
        dim = self.dim
        if loc.shape != (dim,) or scale_tril.shape != (dim, dim):
            raise ValueError(f"FixedTriangularAffine: loc must have shape (D,) and scale_tril "
                             f"(D, D), got {tuple(loc.shape)} and {tuple(scale_tril.shape)}")
        if not bool(torch.equal(scale_tril, scale_tril.tril())):
            raise ValueError("FixedTriangularAffine: scale_tril must be lower-triangular (a "
                             "Cholesky factor, torch.linalg.cholesky), got entries above the "
                             "diagonal")
        if not bool((scale_tril.diagonal() > 0).all()):
            raise ValueError("FixedTriangularAffine: scale_tril's diagonal must be positive")
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale_tril", scale_tril.detach().clone())

    def _log_det(self) -> Tensor:
        # once per state of the buffer; the memo keeps the buffer alive, so its id stays its own
        tril = self.scale_tril
        return self.memo("log_det", (tensor_state(tril), torch.is_inference_mode_enabled()),
                         lambda: (tril, tril.diagonal().log().sum()))[1]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # loc + x C^T as one addmm over the flattened batch
        y = torch.addmm(self.loc, x.reshape(-1, self.dim), self.scale_tril.T).view(x.shape)
        return y, self._log_det().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = tril_affine_solve(self.loc, self.scale_tril, y)
        return x, self._log_det().expand(y.shape[:-1])

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), FixedTriangularAffine, _MAP)

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_and_log_det(x)[0], tril_score(self.scale_tril, g)


# the methods that define an affine layer's map: a subclass that redefines one has no score step
_MAP = ("forward_and_log_det", "inverse_and_log_det")


def tril_score(scale_tril: Tensor, g: Tensor) -> Tensor:
    r""":math:`L^{-\top} g` for every row of ``g`` (..., D): the score step of an affine layer
    :math:`y = \mu + L x` (its log-det is constant), by one triangular solve of
    :math:`u L = g` with the rows flattened into one right-hand side."""
    rows = g.reshape(-1, g.shape[-1])
    return torch.linalg.solve_triangular(scale_tril, rows, upper=False, left=False).view(g.shape)


def tril_affine_solve(loc: Tensor, scale_tril: Tensor, y: Tensor) -> Tensor:
    r""":math:`x = L^{-1}(y - \mu)` for every row of ``y`` (..., D) by one triangular solve of
    :math:`x L^\top = y - \mu` (one (D, D) ``scale_tril``: the rows flattened into one
    right-hand side, not broadcast as N systems; a batched (..., D, D) one broadcasts).

    Example:
        >>> import torch
        >>> tril = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        >>> tril_affine_solve(torch.ones(2), tril, torch.tensor([[3.0, 3.0]])).tolist()
        [[1.0, 1.0]]
    """
    diff = y - loc
    if scale_tril.dim() == 2:
        flat = diff.reshape(-1, diff.shape[-1])
        x = torch.linalg.solve_triangular(scale_tril.T, flat, upper=True, left=False)
        return x.reshape(diff.shape)
    return torch.linalg.solve_triangular(scale_tril.mT, diff.unsqueeze(-2), upper=True,
                                         left=False).squeeze(-2)
