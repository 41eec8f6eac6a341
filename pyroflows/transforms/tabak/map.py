"""The 1-D map of seed eq. 25, its inverse, and the Gauss-Newton step of seed eq. 23 that fits
it: the math of one Tabak step, coordinate by coordinate."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "map_1d", "map_1d_inverse", "local_ascent", "PARAMETERS",
    "displacement", "displacement_constants", "inverse_displacement",
    "inverse_displacement_constants",
]

#: The map's parameters in :func:`map_1d`'s order: the fitted transform's (T, K) buffers.
PARAMETERS = ("sigmas", "shifts", "gammas", "centers", "widths")

# Safe region of the map: monotone exactly when sigma < 1 and |gamma| < 1; the margins keep every
# slope in [0.5 * 0.05, 2 * 1.95], so inverses stay well conditioned.
SIGMA_MIN, SIGMA_MAX = -1.0, 0.5
GAMMA_MAX = 0.95


def displacement_constants(sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor,
                           width: Tensor) -> tuple[Tensor, ...]:
    r""":func:`displacement`'s constants :math:`(1 - \sigma, -x_0, \epsilon^2, \gamma, \varphi_0,
    -\sigma, 1 - \gamma^2)`, each of the parameters' shape."""
    return (1 - sigma, -center, width * width, gamma, shift, -sigma, (1 - gamma) * (1 + gamma))


def displacement(
    c: Tensor, scale: Tensor, neg_center: Tensor, width_sq: Tensor, gamma: Tensor, shift: Tensor,
    neg_sigma: Tensor, one_minus_g2: Tensor, exact: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The map of seed eq. 25 as a displacement: :math:`\varphi(c) - c = \varphi_0 - \sigma c +
    \gamma r` and :math:`\log\varphi'(c) - \log(1 - \sigma) = \log(1 + \gamma w / r)`, with
    :math:`w = (1 - \sigma) c - x_0`, :math:`r = \sqrt{\epsilon^2 + w^2}`; the caller adds
    :math:`\log(1 - \sigma)`, once for all points.

    The logarithm is free of cancellation: :math:`\log((r + \gamma w) / r)` where :math:`\gamma w
    \ge 0`, else :math:`\log((\epsilon^2 + (1 - \gamma^2) w^2) / ((r - \gamma w) r))`; both
    branches are finite, so the unused one passes a zero gradient.

    Arguments:
        c: the points, broadcasting against the constants (``(K, n)`` against ``(K, 1)``).
        scale, neg_center, width_sq, gamma, shift, neg_sigma, one_minus_g2: from
            :func:`displacement_constants`.
        exact: the cancellation-free logarithm; else :math:`\log(1 + \gamma w / r)` as written.
    """
    w = torch.addcmul(neg_center, scale, c)
    ww = w * w
    r = torch.sqrt(ww + width_sq)
    gw = gamma * w
    moved = torch.addcmul(torch.addcmul(shift, neg_sigma, c), gamma, r)
    # The fit's form: half the cost, within ulps for its |gamma| <= 0.95 (results/tabak.md).
    if not exact:
        return moved, torch.log1p(gw / r)
    rewritten = torch.addcmul(width_sq, one_minus_g2, ww) / (r - gw)
    # Branch weight 1 where gamma w >= 0, else 0: lerp with it selects exactly (at gamma = 0 the
    # log-slope is exactly 0), far cheaper on the CPU than torch.where.
    pick = torch.sign(gw.detach()).add_(1).clamp_(max=1)
    return moved, torch.log(torch.lerp(rewritten, r + gw, pick) / r)


def inverse_displacement_constants(sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor,
                                   width: Tensor) -> tuple[Tensor, ...]:
    r""":func:`inverse_displacement`'s constants :math:`(\varphi_0 + x_0, x_0, \gamma, 1 -
    \gamma^2, (1 - \gamma^2)\epsilon^2, \gamma\epsilon, \epsilon^2, 1 - \sigma)`."""
    width_sq = width * width
    one_minus_g2 = (1 - gamma) * (1 + gamma)
    return (shift + center, center, gamma, one_minus_g2, one_minus_g2 * width_sq, gamma * width,
            width_sq, 1 - sigma)


def inverse_displacement(
    y: Tensor, offset: Tensor, center: Tensor, gamma: Tensor, one_minus_g2: Tensor,
    g2_width_sq: Tensor, gamma_width: Tensor, width_sq: Tensor, scale: Tensor,
    log_det: bool = True,
) -> tuple[Tensor, Tensor | None]:
    r"""The inverse of seed eq. 25 as a displacement: :math:`\varphi^{-1}(y) - y`, and
    :math:`\log\varphi'(x) - \log(1 - \sigma)` at the pre-image :math:`x`.

    The root :math:`w` is that of :func:`map_1d_inverse`; with :math:`P = S + |\gamma c|`, the
    identities :math:`r + \gamma w = S`, :math:`r = P / (1 - \gamma^2)` (:math:`\gamma c \le 0`)
    and :math:`r = (c^2 + \epsilon^2) / P` (:math:`\gamma c > 0`) give :math:`\log(1 + \gamma w /
    r) = \log(S / r)` without a second square root or logarithm.

    Arguments:
        y: the points, broadcasting against the constants.
        offset, center, gamma, one_minus_g2, g2_width_sq, gamma_width, width_sq, scale: from
            :func:`inverse_displacement_constants`.
        log_det: also return the log-slope (else ``None``; draws need none).
    """
    c = y - offset
    cc = c * c
    s = torch.sqrt(cc + g2_width_sq)
    gc = gamma * c
    # 1 where gamma c > 0, else 0: lerp with it selects exactly, far cheaper than torch.where.
    same_sign = torch.sign(gc.detach()).clamp_(min=0)
    p = s + gc.abs()
    gs = gamma * s
    w_opposite = (c - gs) / one_minus_g2
    # c + gamma S, nonzero where that branch is taken, is pushed at least 1 from zero elsewhere:
    # the unused branch stays finite, and its (zero) gradient does not turn into NaN.
    den = c + gs
    den = den + torch.copysign(1 - same_sign, den)
    w_same = (c - gamma_width) * (c + gamma_width) / den
    w = torch.lerp(w_opposite, w_same, same_sign)
    moved = (w + center) / scale - y
    if not log_det:
        return moved, None
    ratio = torch.lerp(s * one_minus_g2 / p, s * p / (cc + width_sq), same_sign)
    return moved, torch.log(ratio)


def map_1d(x: Tensor, sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor,
           width: Tensor) -> tuple[Tensor, Tensor]:
    r"""The 1-D map of seed eq. 25, elementwise, and its log-slope:

    .. math:: \varphi(x) = (1 - \sigma) x + \varphi_0 + \gamma \sqrt{\epsilon^2 + ((1 - \sigma) x
              - x_0)^2},\qquad
              \log\varphi'(x) = \log(1 - \sigma) + \log\Bigl(1 + \gamma \frac{w}{r}\Bigr),

    with :math:`w = (1 - \sigma)x - x_0`, :math:`r = \sqrt{\epsilon^2 + w^2}`. Strictly
    increasing for :math:`\sigma < 1`, :math:`|\gamma| < 1`, :math:`\epsilon > 0`; the identity
    at :math:`\sigma = \varphi_0 = \gamma = 0`. Parameters of shape ``(K,)``, ``x`` ``(..., K)``.

    Example:
        >>> zero = torch.zeros(1, dtype=torch.float64)
        >>> x = torch.tensor([-0.75, 0.0, 0.75], dtype=torch.float64)
        >>> y, log_slope = map_1d(x, zero, zero + 0.5, zero + 0.5, zero, zero + 1)
        >>> y.tolist()  # x + 0.5 + 0.5 sqrt(1 + x^2)
        [0.375, 1.0, 1.875]
        >>> map_1d_inverse(y, zero, zero + 0.5, zero + 0.5, zero, zero + 1)[0].tolist()
        [-0.75, 0.0, 0.75]
    """
    moved, log_ratio = displacement(x, *displacement_constants(sigma, shift, gamma, center, width))
    return x + moved, torch.log1p(-sigma) + log_ratio


def map_1d_inverse(y: Tensor, sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor,
                   width: Tensor) -> tuple[Tensor, Tensor]:
    r"""The inverse of :func:`map_1d` in closed form, and :math:`\log\varphi'` at the pre-image.

    With :math:`c = y - \varphi_0 - x_0`, :math:`w = (1 - \sigma) x - x_0` is the root of
    :math:`w + \gamma\sqrt{\epsilon^2 + w^2} = c`:

    .. math:: w = \frac{c - \gamma S}{1 - \gamma^2}
                = \frac{(c - \gamma\epsilon)(c + \gamma\epsilon)}{c + \gamma S},\qquad
              S = \sqrt{c^2 + (1 - \gamma^2)\epsilon^2},

    the first form where :math:`c\gamma \le 0`, the second where :math:`c\gamma > 0`, so that
    neither cancels (accurate for :math:`\gamma` near :math:`\pm 1`). Example: :func:`map_1d`.
    """
    constants = inverse_displacement_constants(sigma, shift, gamma, center, width)
    moved, log_ratio = inverse_displacement(y, *constants)
    return y + moved, torch.log1p(-sigma) + log_ratio


def local_ascent(
    x: Tensor, center: Tensor, width: Tensor, precision: float = 1.0,
    weights: Tensor | None = None, mean: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gradient and Gauss-Newton matrix, shapes ``(K, 3)`` and ``(K, 3, 3)``, of the local
    log-likelihood of seed eq. 23 at the identity, per coordinate (row of ``x``), in the
    parameters :math:`\alpha = (\sigma, \varphi_0, \gamma)` of :func:`map_1d`:

    .. math:: L(\alpha) = \frac1n\sum_j \Bigl[\log\varphi'(x_j) - \frac{\lambda}{2}
              \varphi(x_j)^2\Bigr].

    At :math:`\alpha = 0`, with :math:`w_j = x_j - x_0`, :math:`r_j = \sqrt{\epsilon^2 + w_j^2}`,
    :math:`q_j = w_j / r_j`, :math:`a_j = \nabla_\alpha \log\varphi'(x_j) = (-1, 0, q_j)` and
    :math:`b_j = \nabla_\alpha \varphi(x_j) = (-x_j, 1, r_j)`:

    .. math:: \nabla L = \frac1n\sum_j (a_j - \lambda x_j b_j)
              = \bigl(\lambda\overline{x^2} - 1,\ -\lambda\bar x,\
              \bar q - \lambda\overline{x r}\bigr),\qquad
              G = \frac1n\sum_j (a_j a_j^\top + \lambda b_j b_j^\top) \succeq 0,

    the Hessian without its second-derivative terms (which can make it indefinite). The step
    :math:`\Delta = G^{-1}\nabla L` predicts the gain :math:`\frac12\nabla L^\top\Delta`;
    :math:`\sqrt{\Delta^\top G\Delta}` is the RMS change of :math:`(\log\varphi',
    \sqrt\lambda\,\varphi)` over the points.

    Arguments:
        x: the current coordinates, shape ``(K, n)``.
        center: :math:`x_0`, shape ``(K,)``.
        width: :math:`\epsilon > 0`, shape ``(K,)``.
        precision: :math:`\lambda` (1 for the standard normal target).
        weights: optional point weights broadcasting against ``x``, summing to 1 along the last
            dim (histogram bins' shares): the means become weighted sums.
        mean: the mean over the points along the last dim (default ``v.mean(-1)``; a
            data-parallel fit passes the mean over every rank's points).

    Example:
        >>> x = torch.randn(2, 1000, dtype=torch.float64)
        >>> grad, gn = local_ascent(x, torch.zeros(2, dtype=torch.float64),
        ...                         torch.ones(2, dtype=torch.float64))
        >>> grad.shape, gn.shape
        (torch.Size([2, 3]), torch.Size([2, 3, 3]))
    """
    lam = precision
    center, width = center.unsqueeze(-1), width.unsqueeze(-1)
    w = x - center
    r = torch.sqrt(w * w + width * width)
    q = w / r
    if weights is not None:
        def mean(v: Tensor) -> Tensor:
            return (v * weights).sum(-1)
    elif mean is None:
        def mean(v: Tensor) -> Tensor:
            return v.mean(-1)
    mq, mqq, mr, mxr = mean(q), mean(q * q), mean(r), mean(x * r)
    mx, mxx, center, width = torch.broadcast_tensors(
        mean(x), mean(x * x), center.squeeze(-1), width.squeeze(-1)
    )
    mrr = width * width + mxx - 2 * center * mx + center * center  # mean of eps^2 + w^2
    grad = torch.stack([lam * mxx - 1, -lam * mx, mq - lam * mxr], dim=-1)
    one = torch.ones_like(mx)
    g13 = -mq - lam * mxr
    gn = torch.stack(
        [
            torch.stack([1 + lam * mxx, -lam * mx, g13], dim=-1),
            torch.stack([-lam * mx, lam * one, lam * mr], dim=-1),
            torch.stack([g13, lam * mr, mqq + lam * mrr], dim=-1),
        ],
        dim=-2,
    )
    return grad, gn
