"""The standard normal log density and the maximum-likelihood Gaussian of a data matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._distributed import Rows

__all__ = ["standard_normal_log_prob", "ml_gaussian"]

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    r""":math:`\log N(z; 0, I_D) = -\tfrac12 \lVert z \rVert^2 - \tfrac D2 \log 2\pi`, D last."""
    # -(|z|^2 + D log 2 pi) / 2: the sum is a fresh tensor, so the steps after it run in place
    return z.square().sum(-1).add_(z.shape[-1] * LOG_2PI).mul_(-0.5)


@torch.no_grad()
def ml_gaussian(x: Tensor, diagonal: bool = False,
                rows: Rows | None = None) -> tuple[Tensor, Tensor, float]:
    r"""The mean :math:`m` and the Cholesky factor :math:`L` of the maximum-likelihood
    covariance (divisor n) of the rows of ``x`` (only its diagonal with ``diagonal=True``), in
    float64, and the ridge added to the covariance's diagonal: 0 where it is positive
    definite, else the smallest :math:`10^{k-12}` times the mean variance that makes :math:`L`
    invertible (callers decide whether a ridge is an error or a warning). With ``rows``
    (:class:`~pyroflows._distributed.Rows`), ``x`` is this rank's shard and the moments are
    those of all ranks' rows.

    Example:
        >>> loc, tril, ridge = ml_gaussian(torch.tensor([[0.0, 2.0], [2.0, 0.0], [1.0, 4.0]]))
        >>> loc.tolist(), ridge
        ([1.0, 2.0], 0.0)
        >>> ml_gaussian(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))[2] > 0  # collinear columns
        True
    """
    rows = rows if rows is not None else Rows(False, x.shape[0])
    x64 = x.to(torch.float64)
    loc = rows.mean(x64, 0)
    centred = x64 - loc
    cov = rows.sum(centred.T @ centred) / rows.total
    var = cov.diagonal()
    scale = float(var.mean()) if float(var.mean()) > 0 else 1.0
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    ridge = 0.0
    while True:
        if diagonal:
            tril = torch.diag((var + ridge).sqrt())
            ok = bool((tril.diagonal() > 0).all())
        else:
            tril, info = torch.linalg.cholesky_ex(cov + ridge * eye)
            ok = int(info) == 0 and bool((tril.diagonal() > 0).all())
        if ok:
            return loc, tril, ridge
        ridge = 1e-12 * scale if ridge == 0.0 else 10 * ridge
