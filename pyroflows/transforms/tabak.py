"""The Tabak transform: a flow fitted to data by dual ascent of the log-likelihood."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .base import FlowTransform

__all__ = ["Tabak", "tabak", "gaussianize", "NotFittedError", "SELECTIONS"]

# Safe region of the 1-D map: monotone exactly when sigma < 1 and |gamma| < 1; the margins keep
# every slope in [0.5 * 0.05, 2 * 1.95], so inverses stay well conditioned.
_SIGMA_MIN, _SIGMA_MAX = -1.0, 0.5
_GAMMA_MAX = 0.95
# Parameter order in the per-coordinate ascent problem: (sigma, shift = phi_0, gamma).
_NUM_PARAMS = 3


# Below this many elements per step (n x K), CPU work runs on one thread: per-step ops are too
# small for threads to pay off, and on a loaded machine every threaded op waits for a core.
_THREADED_NUMEL = 1 << 20
# Elements per (K, rows) intermediate (and thread) when the fitted transform runs a batch on the
# CPU: 1 MiB in float64, so a step's temporaries stay in cache (200k x 10 rows, float64, 300
# steps: 2.5x faster than the whole batch at once; 4096 to 16384 rows of 10 within 5%).
_CHUNK_NUMEL = 1 << 17


@contextlib.contextmanager
def _threads_for(numel: int, device: torch.device) -> Iterator[None]:
    old = torch.get_num_threads()
    if device.type != "cpu" or numel >= _THREADED_NUMEL or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class NotFittedError(RuntimeError, ValueError):
    """Raised when an unfitted :class:`Tabak` transform is used before :meth:`Tabak.fit`."""


# ---- the 1-D map of seed eq. 25 and its inverse -----------------------------------------------
def _log_one_plus_gamma_q(gamma: Tensor, w: Tensor, r: Tensor, width: Tensor) -> Tensor:
    r"""``log(1 + gamma w / r)`` with ``r = sqrt(width^2 + w^2)``, free of cancellation.

    Where :math:`\gamma w < 0` the sum :math:`r + \gamma w` cancels (badly for :math:`|\gamma|`
    near 1 and :math:`|w| \gg \epsilon`); there it is rewritten as
    :math:`(\epsilon^2 + (1 - \gamma^2) w^2) / (r - \gamma w)`, a ratio of positive terms. Both
    branches are finite everywhere, so ``torch.where`` passes clean gradients.
    """
    gw = gamma * w
    direct = r + gw
    rewritten = (width * width + (1 - gamma) * (1 + gamma) * w * w) / (r - gw)
    return torch.log(torch.where(gw >= 0, direct, rewritten)) - torch.log(r)


def map_1d(
    x: Tensor, sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor, width: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The 1-D map of seed eq. 25, elementwise, and its log-slope:

    .. math:: \varphi(x) = (1 - \sigma) x + \varphi_0 + \gamma \sqrt{\epsilon^2 + ((1 - \sigma) x
              - x_0)^2},\qquad
              \log\varphi'(x) = \log(1 - \sigma) + \log\Bigl(1 + \gamma \frac{w}{r}\Bigr),

    with :math:`w = (1 - \sigma)x - x_0`, :math:`r = \sqrt{\epsilon^2 + w^2}`. The parameters
    broadcast against ``x`` (shape ``(..., K)`` against ``(K,)``).
    """
    u = (1 - sigma) * x
    w = u - center
    r = torch.sqrt(w * w + width * width)
    y = u + shift + gamma * r
    return y, torch.log1p(-sigma) + _log_one_plus_gamma_q(gamma, w, r, width)


def map_1d_inverse(
    y: Tensor, sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor, width: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The inverse of :func:`map_1d` in closed form, and :math:`\log\varphi'` at the pre-image.

    With :math:`c = y - \varphi_0 - x_0`, the unknown :math:`w = (1 - \sigma) x - x_0` solves
    :math:`w + \gamma\sqrt{\epsilon^2 + w^2} = c`; squaring gives the quadratic
    :math:`(1 - \gamma^2) w^2 - 2 c w + c^2 - \gamma^2 \epsilon^2 = 0`, whose root with
    :math:`\mathrm{sign}(c - w) = \mathrm{sign}(\gamma)` is, for either sign of :math:`\gamma`,

    .. math:: w = \frac{c - \gamma S}{1 - \gamma^2}
                = \frac{(c - \gamma\epsilon)(c + \gamma\epsilon)}{c + \gamma S},\qquad
              S = \sqrt{c^2 + (1 - \gamma^2)\epsilon^2}.

    The first form is used where :math:`c\gamma \le 0` (no cancellation in the numerator), the
    second where :math:`c\gamma > 0` (no cancellation in the denominator, and none from a small
    :math:`1 - \gamma^2`), so the root is accurate for :math:`\gamma` near :math:`\pm 1`.
    """
    c = y - shift - center
    one_minus_g2 = (1 - gamma) * (1 + gamma)
    s = torch.sqrt(c * c + one_minus_g2 * width * width)
    same_sign = c * gamma > 0
    w_opposite = (c - gamma * s) / one_minus_g2
    safe_den = torch.where(same_sign, c + gamma * s, torch.ones_like(c))
    w_same = (c - gamma * width) * (c + gamma * width) / safe_den
    w = torch.where(same_sign, w_same, w_opposite)
    x = (w + center) / (1 - sigma)
    r = torch.sqrt(w * w + width * width)
    return x, torch.log1p(-sigma) + _log_one_plus_gamma_q(gamma, w, r, width)


def _gaussianizing_step(
    c: Tensor, scale: Tensor, neg_center: Tensor, width_sq: Tensor, gamma: Tensor, shift: Tensor,
    neg_sigma: Tensor, one_minus_g2: Tensor,
) -> tuple[Tensor, Tensor]:
    r""":func:`map_1d` for the fitted transform's passes, in fewer elementwise passes: the
    displacement :math:`\varphi(x) - x = \varphi_0 - \sigma x + \gamma r` and
    :math:`\log(1 + \gamma w / r)` as one logarithm of a ratio (:func:`map_1d` takes two:
    :math:`\log(r + \gamma w) - \log r`), with the same cancellation-free branch where
    :math:`\gamma w < 0`. The constant :math:`\log(1 - \sigma)` is left to the caller, which
    adds it once for all points. Parameters are ``(K, 1)`` columns (``scale = 1 - sigma``,
    ``width_sq = epsilon^2``, ``one_minus_g2 = 1 - gamma^2``); ``c`` is ``(K, n)``."""
    w = torch.addcmul(neg_center, scale, c)
    ww = w * w
    r = torch.sqrt(ww + width_sq)
    gw = gamma * w
    displacement = torch.addcmul(torch.addcmul(shift, neg_sigma, c), gamma, r)
    rewritten = torch.addcmul(width_sq, one_minus_g2, ww) / (r - gw)
    # Branch weights 1 (gw > 0), 0 (gw < 0) or 1/2 (gw = 0, where the branches agree): lerp with
    # them selects exactly, at a tenth of torch.where's CPU cost; both branches are finite.
    pick = torch.sign(gw.detach()).mul_(0.5).add_(0.5)
    return displacement, torch.log(torch.lerp(rewritten, r + gw, pick) / r)


def _restoring_step(
    c: Tensor, offset: Tensor, center: Tensor, gamma: Tensor, one_minus_g2: Tensor,
    g2_width_sq: Tensor, gamma_width: Tensor, width_sq: Tensor, scale: Tensor,
    log_det: bool = True,
) -> tuple[Tensor, Tensor | None]:
    r""":func:`map_1d_inverse` for the fitted transform's passes, in fewer elementwise passes.

    With :math:`c = y - \varphi_0 - x_0`, :math:`S = \sqrt{c^2 + (1 - \gamma^2)\epsilon^2}`
    and :math:`P = S + |\gamma c|`, the root :math:`w` is :func:`map_1d_inverse`'s, and the
    identities :math:`r + \gamma w = S` and

    .. math:: r = \frac{P}{1 - \gamma^2}\ (\gamma c \le 0),\qquad
              r = \frac{c^2 + \epsilon^2}{P}\ (\gamma c > 0)

    (from :math:`(S - \gamma c)(S + \gamma c) = (1 - \gamma^2)(c^2 + \epsilon^2)`) give
    :math:`\log(1 + \gamma w / r) = \log(S / r)` without a second square root or logarithm,
    each branch free of cancellation. Returns :math:`x - y` and that log-ratio (``None``
    without ``log_det``: draws need no log-det, and it is about a third of the work); the constant
    :math:`\log(1 - \sigma)` is left to the caller. Parameters are ``(K, 1)`` columns
    (``offset = shift + center``, ``scale = 1 - sigma``); ``c`` is ``(K, n)``."""
    y = c
    c = y - offset
    cc = c * c
    s = torch.sqrt(cc + g2_width_sq)
    gc = gamma * c
    # 1 where gamma c > 0, else 0: lerp with it selects a branch exactly, at a tenth of
    # torch.where's CPU cost.
    same_sign = (gc.detach() > 0).to(c.dtype)
    p = s + gc.abs()
    gs = gamma * s
    w_opposite = (c - gs) / one_minus_g2
    # c + gamma S is unchanged where that branch is taken (same_sign = 1: it is nonzero there)
    # and pushed at least 1 from zero elsewhere, so the unused branch stays finite and its
    # gradient (zero) does not turn into NaN.
    den = c + gs
    den = den + torch.copysign(1 - same_sign, den)
    w_same = (c - gamma_width) * (c + gamma_width) / den
    w = torch.lerp(w_opposite, w_same, same_sign)
    if not log_det:
        return (w + center) / scale - y, None
    ratio = torch.lerp(s * one_minus_g2 / p, s * p / (cc + width_sq), same_sign)
    return (w + center) / scale - y, torch.log(ratio)


def _fast_map(
    x: Tensor, sigma: Tensor, shift: Tensor, gamma: Tensor, center: Tensor, width: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`map_1d` for the fit's hot loop: ``log1p(gamma w / r)`` directly. Safe there,
    because fitted steps keep ``|gamma| <= 0.95``, so ``1 + gamma w / r >= 0.05`` loses at most a
    few ulps; the fitted transform itself evaluates the cancellation-free
    :func:`_gaussianizing_step`."""
    u = (1 - sigma) * x
    w = u - center
    r = torch.sqrt(w * w + width * width)
    return u + shift + gamma * r, torch.log1p(-sigma) + torch.log1p(gamma * w / r)


def local_ascent(
    x: Tensor, center: Tensor, width: Tensor, precision: float = 1.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Gradient and Gauss-Newton matrix of the local log-likelihood of seed eq. 23 at the
    identity, for every coordinate at once.

    For each coordinate :math:`k` (a row of ``x``, shape ``(K, n)``), with parameters
    :math:`\alpha = (\sigma, \varphi_0, \gamma)` of :func:`map_1d`,

    .. math:: L(\alpha) = \frac1n\sum_j \Bigl[\log\varphi'(x_j) - \frac{\lambda}{2}
              \varphi(x_j)^2\Bigr].

    At :math:`\alpha = 0` the map is the identity and, with :math:`w_j = x_j - x_0`,
    :math:`r_j = \sqrt{\epsilon^2 + w_j^2}`, :math:`q_j = w_j / r_j`,

    .. math:: a_j = \nabla_\alpha \log\varphi'(x_j) = (-1,\ 0,\ q_j),\qquad
              b_j = \nabla_\alpha \varphi(x_j) = (-x_j,\ 1,\ r_j),

    .. math:: \nabla L = \frac1n\sum_j (a_j - \lambda x_j b_j)
              = \bigl(\lambda\overline{x^2} - 1,\ -\lambda\bar x,\
              \bar q - \lambda\overline{x r}\bigr).

    The exact Hessian is :math:`\frac1n\sum_j [\nabla^2\log\varphi' - a_j a_j^\top - \lambda b_j
    b_j^\top - \lambda x_j \nabla^2\varphi]`; its second-derivative terms (e.g.
    :math:`\partial^2_{\sigma\gamma}\log\varphi' = -x\epsilon^2/r^3`) can make it indefinite.
    Gauss-Newton keeps the rest,

    .. math:: G = \frac1n\sum_j (a_j a_j^\top + \lambda b_j b_j^\top) \succeq 0,

    and the ascent step is :math:`\Delta = G^{-1}\nabla L`, the maximizer of the model
    :math:`L(0) + \nabla L^\top\Delta - \frac12\Delta^\top G\Delta`, which predicts the gain
    :math:`\frac12\nabla L^\top G^{-1}\nabla L`. :math:`\Delta^\top G\Delta` is the mean squared
    change of :math:`(\log\varphi', \sqrt\lambda\,\varphi)` over the sample, so its square root
    measures how far a step moves the points.

    Arguments:
        x: the current coordinates, one row per coordinate: shape ``(K, n)``.
        center: :math:`x_0`, shape ``(K,)``.
        width: :math:`\epsilon > 0`, shape ``(K,)``.
        precision: :math:`\lambda` (1 for the standard normal target).
        weights: optional weights of the points (broadcasting against ``x``, summing to 1
            along the last dim), e.g. the shares of histogram bins whose means are ``x``;
            the means :math:`\frac1n\sum_j` become weighted sums.

    Returns:
        ``(grad, gauss_newton)`` of shapes ``(K, 3)`` and ``(K, 3, 3)``.
    """
    lam = precision
    center, width = center.unsqueeze(-1), width.unsqueeze(-1)
    w = x - center
    r = torch.sqrt(w * w + width * width)
    q = w / r
    if weights is None:
        def mean(v: Tensor) -> Tensor:
            return v.mean(-1)
    else:
        def mean(v: Tensor) -> Tensor:
            return (v * weights).sum(-1)
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


def _histogram(c: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Each row of ``c`` (K, n) summarized by ``bins`` equal-width bins: the mean of the points
    in each bin and the bin's share of the points (empty bins: share 0), shapes (K, bins)."""
    lo, hi = c.amin(-1, keepdim=True), c.amax(-1, keepdim=True)
    scale = bins / (hi - lo).clamp_min(torch.finfo(c.dtype).tiny)
    idx = ((c - lo) * scale).long().clamp_(0, bins - 1)
    counts = c.new_zeros(c.shape[0], bins).scatter_add_(1, idx, torch.ones_like(c))
    sums = c.new_zeros(c.shape[0], bins).scatter_add_(1, idx, c)
    return sums / counts.clamp_min(1), counts / c.shape[-1]


def _haar_frames(num: int, dim: int, k: int, like: Tensor, generator) -> Tensor:
    """``num`` Haar-random ``dim x k`` matrices with orthonormal columns (Q of a Gaussian's QR,
    with the signs of R's diagonal moved into Q so the law is exactly Haar)."""
    g = torch.randn(num, dim, k, generator=generator, device=like.device, dtype=like.dtype)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def _select(selection: str, per_row: list[Tensor], steps: list[int], best_step: int) -> int:
    """The kept step count under ``selection`` (``Tabak``'s argument), from the held-out rows'
    log-likelihoods at every check: with d the per-row differences (the best count minus a
    smaller one) and m rows, a count is within one standard error when mean(d) <= sd(d) /
    sqrt(m). ``"one_se"``: the smallest count within one standard error of the best;
    ``"significant"``: no steps if they are within, else the best count."""
    best = per_row[steps.index(best_step)]
    m = best.shape[0]

    def within(rows: Tensor) -> bool:
        d = best - rows
        return float(d.mean()) <= (float(d.std()) / math.sqrt(m) if m > 1 else 0.0)

    if selection == "significant":
        return 0 if within(per_row[0]) else best_step
    for step, rows in zip(steps, per_row, strict=True):
        if step < best_step and within(rows):
            return step
    return best_step


#: The accepted values of ``Tabak(selection=...)``: how the kept step count is chosen.
SELECTIONS = ("best", "one_se", "significant")


class Tabak(FlowTransform):
    r"""The Tabak transform (Tabak & Vanden-Eijnden 2010; seed section 2.5, eq. 23-25): a flow
    fitted to data by many small, exactly invertible steps that carry the data to
    :math:`N(0, I)`.

    The Gaussianizing map ``t.inv`` is :math:`G = S_T \circ \dots \circ S_1 \circ W`: a whitening
    :math:`W(x) = L^{-1}(x - m)` (mean and Cholesky factor of the covariance), then steps

    .. math:: S_t(z) = z + Q_t\bigl(\varphi_t(Q_t^\top z) - Q_t^\top z\bigr),

    where :math:`Q_t` (D x K) has Haar-random orthonormal columns (K = D: a random rotation) and
    :math:`\varphi_t` applies the map of seed eq. 25 (:func:`map_1d`) to each of the K rotated
    coordinates with its own :math:`(\sigma, \varphi_0, \gamma, x_0, \epsilon)`. So
    :math:`\log|\det \partial G/\partial x| = -\sum_i \log L_{ii} + \sum_{t,k}
    \log\varphi_{t,k}'`, and the fitted density is :math:`\rho(x) = |\det \partial G /
    \partial x|\, \mathcal N(G(x); 0, I)` (seed eq. 1). The forward map ``t(z) = G^{-1}(z)``
    takes :math:`N(0, I)` draws to data space, so ``TransformedDistribution(N(0, I), [t])`` is the
    fitted density and can be sampled, as for every pyroflows flow.

    Fitting (:meth:`fit`): each step draws :math:`Q_t`; for each rotated marginal it draws
    ``num_candidates`` centers :math:`x_0` at random training points, with :math:`\epsilon` =
    ``width`` times that marginal's standard deviation, and keeps the center whose Gauss-Newton
    ascent step on the local log-likelihood of seed eq. 23 (:func:`local_ascent`), from the
    identity and with its length capped at ``step_size`` (root mean squared displacement of the
    points, in units of the target's standard deviation), predicts the largest gain; that step
    is taken. Because the
    rotation preserves :math:`|z|`, the per-coordinate gains add up to the exact gain in training
    log-likelihood of the whole step; a coordinate whose step would lose likelihood keeps the
    identity, so the training log-likelihood never decreases. Every ``check_every`` steps the
    held-out log-likelihood (tracked incrementally) is compared; the fit stops after ``patience``
    checks without improvement and keeps the best step count.

    Everything runs as batched tensor code on the data's device: one ``(n, D) @ (D, K)`` product
    and a few elementwise passes per step.

    Edge cases: NaN/inf rows and constant (or linearly dependent, when whitening) columns raise a
    :class:`ValueError` in :meth:`fit`; repeated values are allowed (every map has width
    :math:`\epsilon > 0`, so nothing divides by zero), but data on a lattice has no density, so
    dequantize it first. An unfitted transform raises :class:`NotFittedError` on use. A fit that
    fails or is interrupted leaves the previous fitted state intact.

    References:
        Tabak & Vanden-Eijnden, "Density estimation by dual ascent of the log-likelihood",
        Comm. Math. Sci. 8 (2010), 217-233.

    Arguments:
        dim: the event size D.
        max_steps: the most ascent steps :meth:`fit` takes.
        step_size: cap on each step's root mean squared displacement (a learning rate).
        whiten: ``True`` (full whitening), ``"diagonal"`` (standardize each column) or ``False``.
        width: :math:`\epsilon` relative to the standard deviation of the rotated marginal, or a
            ``(low, high)`` range to draw it from log-uniformly at every step and coordinate.
        subspace_dim: K, the number of random directions moved per step (default
            ``min(D, 64)``); buffers hold ``max_steps x D x K`` numbers, so a small K bounds
            memory for large D.
        check_every: steps between held-out log-likelihood checks.
        patience: checks without improvement before stopping.
        val_fraction: share of the rows held out for early stopping when ``fit`` gets no
            ``x_val``.
        num_candidates: random centers :math:`x_0` (training points; with a ``width`` range,
            each with its own width) tried per coordinate and step; the one whose capped
            Gauss-Newton step predicts the largest gain is taken. 1 is the plain algorithm;
            16 reaches a given held-out log-likelihood in about half the steps
            (``benchmarks/results/tabak.md``).
        candidate_bins: the candidates' predicted gains are computed on a histogram of each
            rotated coordinate with this many bins (the chosen step itself uses every point),
            so they cost about ``num_candidates x candidate_bins`` per coordinate, not
            ``num_candidates x n``.
        num_rotations: random frames drawn per step; the one whose coordinates' best
            candidates predict the largest total gain is used (ranked on histograms too).
            Helps from about 5 dimensions, where most random directions carry little
            structure (held-out gap, 5-D mixture: 0.287 -> 0.247; 6-D bananas, 2400 rows:
            0.68 -> 0.60), at several times the CPU time per step; not in 2-D (U4 at 3000 steps:
            0.121 against 0.104).
        seed: seed of the fit's random rotations, centers and split (default: torch's global RNG).
        selection: the step count kept: ``"best"``, the check with the highest mean held-out
            log-likelihood; ``"one_se"``, the one-standard-error rule: the smallest checked
            count :math:`s` with :math:`\bar d_s \le \mathrm{sd}(d_s)/\sqrt{m}`, where
            :math:`d_{s,i}` is the best count's held-out log-likelihood of row :math:`i` minus
            count :math:`s`'s, over the :math:`m` held-out rows (a gain within the noise of a
            small validation set does not buy steps; holds ``m`` numbers per check);
            ``"significant"``: the best count if its gain over no steps exceeds one standard
            error, :math:`\bar d_0 > \mathrm{sd}(d_0)/\sqrt{m}`, else no steps. Measured as
            :class:`~pyroflows.density.DensityEstimator`'s refiner
            (``benchmarks/results/density.md``): ``"one_se"`` cuts useful steps with 500
            held-out rows (U4 2500 rows: 0.088 -> 0.094 nats); ``"significant"`` keeps them
            and drops a 925-step refiner chosen on 60 rows (U4 300 rows: 0.543 -> 0.430).

    Example:
        >>> import torch, pyroflows as pf
        >>> x = torch.randn(500, 2, dtype=torch.float64) ** 3
        >>> t = pf.transforms.Tabak(2, max_steps=100, seed=0).fit(x, progress=False)
        >>> z = t.inv(x)                      # Gaussianized data
        >>> torch.allclose(t(z), x)           # exact inverse
        True
        >>> t.log_prob(x).shape               # the fitted density
        torch.Size([500])
    """

    _STEP_BUFFERS = ("frames", "sigmas", "shifts", "gammas", "centers", "widths")

    def __init__(
        self,
        dim: int,
        max_steps: int = 5000,
        step_size: float = 0.1,
        whiten: bool | str = True,
        width: float | tuple[float, float] = 0.1,
        subspace_dim: int | None = None,
        check_every: int = 25,
        patience: int = 20,
        val_fraction: float = 0.1,
        num_candidates: int = 16,
        candidate_bins: int = 256,
        num_rotations: int = 1,
        seed: int | None = None,
        selection: str = "best",
    ) -> None:
        super().__init__(dim)
        if whiten not in (True, False, "full", "diagonal", "none"):
            raise ValueError(f"Tabak: whiten must be True, False or 'diagonal', got {whiten!r}")
        k = min(self.dim, 64) if subspace_dim is None else int(subspace_dim)
        if not 1 <= k <= self.dim:
            raise ValueError(f"Tabak: subspace_dim must be in [1, {self.dim}], got {subspace_dim}")
        ranged = not isinstance(width, (int, float)) and hasattr(width, "__len__")
        widths = tuple(float(v) for v in width) if ranged else (float(width), float(width))
        if len(widths) != 2 or not 0 < widths[0] <= widths[1]:
            raise ValueError(f"Tabak: width must be positive or a (low, high) range, got {width}")
        if (int(max_steps) < 1 or not step_size > 0 or int(num_candidates) < 1
                or int(candidate_bins) < 1 or int(num_rotations) < 1):
            raise ValueError("Tabak: max_steps, step_size, num_candidates and candidate_bins must "
                             "be positive")
        if not 0 < val_fraction < 1 or int(check_every) < 1 or int(patience) < 1:
            raise ValueError("Tabak: need 0 < val_fraction < 1, check_every >= 1, patience >= 1")
        self.max_steps = int(max_steps)
        self.step_size = float(step_size)
        self.whiten = {True: "full", False: "none"}.get(whiten, whiten)
        self.width = widths if ranged else widths[0]
        self.subspace_dim = k
        self.check_every = int(check_every)
        self.patience = int(patience)
        self.val_fraction = float(val_fraction)
        if selection not in SELECTIONS:
            raise ValueError(f"Tabak: selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        self.seed = seed
        self.num_candidates = int(num_candidates)
        self.candidate_bins = int(candidate_bins)
        self.num_rotations = int(num_rotations)
        self.history: dict[str, list[float]] = {}
        self.best_step = 0
        dt = torch.get_default_dtype()
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("loc", torch.zeros(self.dim, dtype=dt))
        self.register_buffer("scale_tril", torch.eye(self.dim, dtype=dt))
        self.register_buffer("frames", torch.zeros(0, self.dim, k, dtype=dt))
        for name in self._STEP_BUFFERS[1:]:
            self.register_buffer(name, torch.zeros(0, k, dtype=dt))

    @property
    def num_steps(self) -> int:
        """The number of fitted ascent steps T."""
        return self.frames.shape[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, subspace_dim={self.subspace_dim}, num_steps={self.num_steps}"

    # ---- state dict: step buffers are sized by the fit ----------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._STEP_BUFFERS:
            value = state_dict.get(prefix + name)
            old = getattr(self, name)
            if isinstance(value, Tensor) and value.shape != old.shape:
                setattr(self, name, old.new_empty(value.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the map -----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise NotFittedError(
                "Tabak: this transform is not fitted yet; call .fit(x) before using it"
            )

    def _step_params(self, t: int) -> tuple[Tensor, ...]:
        return self.sigmas[t], self.shifts[t], self.gammas[t], self.centers[t], self.widths[t]

    def _whiten(self, x: Tensor) -> Tensor:
        flat = (x - self.loc).reshape(-1, self.dim)
        z = torch.linalg.solve_triangular(self.scale_tril.mT, flat, upper=True, left=False)
        return z.reshape(x.shape)

    def _whiten_log_det(self) -> Tensor:
        """log|det dW/dx| = -sum log L_ii."""
        return -torch.log(torch.diagonal(self.scale_tril)).sum()

    def _step_constants(self, inverse: bool) -> tuple[list[tuple[Tensor, ...]], Tensor]:
        r"""Per step, the ``(K, 1)`` parameter columns :func:`_gaussianizing_step` (or, with
        ``inverse``, :func:`_restoring_step`) takes, derived from the buffers for all steps at
        once; and :math:`\sum_{t,k}\log(1 - \sigma_{t,k})`, the part of the summed log-slopes
        that is the same for every point."""
        sigma, shift, gamma = self.sigmas, self.shifts, self.gammas
        center, width = self.centers, self.widths
        scale = 1 - sigma
        width_sq = width * width
        one_minus_g2 = (1 - gamma) * (1 + gamma)
        if inverse:
            columns = (shift + center, center, gamma, one_minus_g2, one_minus_g2 * width_sq,
                       gamma * width, width_sq, scale)
        else:
            columns = (scale, -center, width_sq, gamma, shift, -sigma, one_minus_g2)
        # (T, P, K, 1) -> T tuples of P views: one split here rather than P indexing ops per step
        # (and per row chunk) in the loop.
        stacked = torch.stack(columns, dim=1).unsqueeze(-1)
        per_step = [tuple(step.unbind(0)) for step in stacked.unbind(0)]
        return per_step, torch.log1p(-sigma).sum()

    def _run_steps(self, z: Tensor, inverse: bool,
                   log_det: bool = True) -> tuple[Tensor, Tensor | None]:
        """Apply the steps to ``z`` of shape (..., D): in order (Gaussianizing) or, with
        ``inverse``, their inverses in reverse order. Returns the image and the summed log-slopes
        of the forward steps at the Gaussianizing-side points (``None`` when ``inverse`` and not
        ``log_det``: the inverse steps then skip them).

        On the CPU the rows go through all steps a chunk at a time (about ``_CHUNK_NUMEL``
        elements per ``(K, rows)`` intermediate per thread), so the step's dozen elementwise
        passes run in cache instead of streaming the whole batch through memory once per pass
        (200k x 10 rows, float64: 2.5x faster); on an accelerator the whole batch is one
        chunk."""
        batch = z.shape[:-1]
        flat = z.reshape(-1, self.dim)
        rows = flat.shape[0]
        constants, log_scale_sum = self._step_constants(inverse)
        order = list(reversed(range(self.num_steps)) if inverse else range(self.num_steps))
        step = _restoring_step if inverse else _gaussianizing_step
        log_det = log_det or not inverse
        if not log_det:
            step = functools.partial(_restoring_step, log_det=False)
        frames = list(self.frames.unbind(0))
        frames_t = [frame.mT for frame in frames]
        outs, log_slopes = [], []
        with _threads_for(rows * self.subspace_dim, flat.device):
            chunk = rows
            if flat.device.type == "cpu":
                per_chunk = _CHUNK_NUMEL * torch.get_num_threads() // self.subspace_dim
                chunk = max(1, min(rows, per_chunk))
            for part in flat.split(chunk) if rows else (flat,):
                # Transposed, (D, n): sums over the K coordinates then add contiguous rows.
                zt = part.mT
                acc = zt.new_zeros(zt.shape[-1])
                for t in order:
                    c = frames_t[t] @ zt
                    displacement, log_ratio = step(c, *constants[t])
                    zt = torch.addmm(zt, frames[t], displacement)
                    if log_det:
                        acc = acc + log_ratio.sum(0)
                outs.append(zt.mT)
                log_slopes.append(acc)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if not log_det:
            return out.reshape(*batch, self.dim), None
        acc = log_slopes[0] if len(log_slopes) == 1 else torch.cat(log_slopes)
        return out.reshape(*batch, self.dim), (acc + log_scale_sum).reshape(batch)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Gaussianize: ``z = G(y)``, and ``log|det d t(z)/dz| = -log|det dG/dy|``."""
        self._check_fitted()
        z, log_slopes = self._run_steps(self._whiten(y), inverse=False)
        return z, -(log_slopes + self._whiten_log_det())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map N(0, I) draws to data space: the steps' inverses in reverse order, then
        un-whiten."""
        self._check_fitted()
        z, log_slopes = self._run_steps(x, inverse=True)
        y = self.loc + z @ self.scale_tril.mT
        return y, -(log_slopes + self._whiten_log_det())

    def forward_value(self, x: Tensor) -> Tensor:
        """``t(x)`` alone, without the log-det (about 1.4x faster than
        :meth:`forward_and_log_det`): for draws that are not scored. Not cached."""
        self._check_fitted()
        self._validate(x, "input")
        z, _ = self._run_steps(x, inverse=True, log_det=False)
        return self.loc + z @ self.scale_tril.mT

    # ---- density helpers ---------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """The fitted log-density :math:`\\log\\rho(x)` (seed eq. 1), shape ``x.shape[:-1]``."""
        self._validate(x, "x")
        z, log_det = self.inverse_and_log_det(x)
        return _std_normal_log_prob(z) - log_det

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        """Draws from the fitted density: ``t(z)`` for ``z ~ N(0, I)``."""
        self._check_fitted()
        z = torch.randn(
            (*sample_shape, self.dim), device=self.loc.device, dtype=self.loc.dtype
        )
        return self.forward_value(z)

    def truncated(self, num_steps: int) -> Tabak:
        """A copy keeping the whitening and the first ``num_steps`` steps: the flow as it stood
        at that point of the fit (``truncated(0)`` is the whitening alone)."""
        self._check_fitted()
        if not 0 <= int(num_steps) <= self.num_steps:
            raise ValueError(f"Tabak.truncated: num_steps must be in [0, {self.num_steps}], "
                             f"got {num_steps}")
        out = copy.deepcopy(self)
        for name in self._STEP_BUFFERS:
            setattr(out, name, getattr(self, name)[: int(num_steps)].clone())
        out.clear_cache()
        return out

    def fit_transform(self, x: Tensor, x_val: Tensor | None = None, progress: bool = True):
        """Fit to ``x`` and return the Gaussianized training data ``t.inv(x)``."""
        return self.fit(x, x_val=x_val, progress=progress).inv(x)

    # ---- fitting -----------------------------------------------------------------------------
    def _check_data(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Tabak.fit: {what} must be a tensor of shape (n, {self.dim}), "
                             f"got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"Tabak.fit: {what} must be floating point, got {x.dtype}")
        bad = ~torch.isfinite(x).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(
                f"Tabak.fit: {what} has {rows.numel()} row(s) with NaN or inf values "
                f"(first at row {int(rows[0])}); drop or impute them before fitting"
            )

    def _fit_whitening(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc = x.mean(0)
        centered = x - loc
        var = centered.square().mean(0)
        scale = x.abs().amax(0).clamp_min(torch.finfo(x.dtype).tiny)
        constant = var <= (16 * torch.finfo(x.dtype).eps * scale) ** 2
        if bool(constant.any()):
            cols = constant.nonzero().flatten().tolist()
            raise ValueError(
                f"Tabak.fit: column(s) {cols} are constant; data on a lower-dimensional set has "
                "no density in R^D; drop those columns"
            )
        if self.whiten == "full":
            cov = centered.mT @ centered / x.shape[0]
            tril, info = torch.linalg.cholesky_ex(cov)
            ok = int(info) == 0 and bool(
                torch.diagonal(tril).square().min() > 1e3 * torch.finfo(x.dtype).eps * var.max()
            )
            if not ok:
                raise ValueError(
                    "Tabak.fit: the data's covariance is singular (columns are linearly "
                    "dependent); drop redundant columns or use whiten='diagonal'"
                )
        elif self.whiten == "diagonal":
            tril = torch.diag(var.sqrt())
        else:
            loc, tril = torch.zeros_like(loc), torch.eye(self.dim, device=x.device, dtype=x.dtype)
        return loc, tril

    def fit(self, x: Tensor, x_val: Tensor | None = None, progress: bool = True) -> Tabak:
        """Fit the steps to the rows of ``x`` (shape ``(n, D)``) and return ``self``.

        Arguments:
            x: training data. The fitted buffers take its device and dtype.
            x_val: held-out data for early stopping; by default ``val_fraction`` of the rows
                of ``x`` are held out (and not used for the steps).
            progress: show a progress bar with the held-out log-likelihood per sample.

        After the fit, ``history`` holds ``step``, ``train_log_prob`` and ``val_log_prob``
        (mean per sample, nats) at every check, and ``best_step`` the kept step count.
        """
        from tqdm.auto import tqdm

        self._check_data(x, "x")
        x = x.detach()
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(int(self.seed))
        if x_val is None:
            n_val = max(1, int(round(self.val_fraction * x.shape[0])))
            perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
            x_val, x = x[perm[:n_val]], x[perm[n_val:]]
        else:
            self._check_data(x_val, "x_val")
            x_val = x_val.detach().to(device=x.device, dtype=x.dtype)
        n = x.shape[0]
        if n < 2 * self.dim + 2:
            raise ValueError(f"Tabak.fit: need at least {2 * self.dim + 2} training rows, got {n}")
        loc, tril = self._fit_whitening(x)
        self._warn_repeats(x)
        whiten_ld = -torch.log(torch.diagonal(tril)).sum()

        def whiten(v: Tensor) -> Tensor:
            # Transposed, (D, n): every per-coordinate reduction then runs along contiguous rows.
            return torch.linalg.solve_triangular(tril, (v - loc).mT, upper=False)

        z, z_val = whiten(x), whiten(x_val)
        ld, ld_val = x.new_zeros(n), x.new_zeros(x_val.shape[0])
        k = self.subspace_dim
        steps: dict[str, list[Tensor]] = {name: [] for name in self._STEP_BUFFERS}
        history: dict[str, list[float]] = {"step": [], "train_log_prob": [], "val_log_prob": []}
        per_row: list[Tensor] = []  # the held-out rows' log-likelihoods per check, for one_se

        def record(step: int) -> float:
            train = float((_std_normal_log_prob(z.mT) + ld).mean() + whiten_ld)
            rows_val = _std_normal_log_prob(z_val.mT) + ld_val
            if self.selection != "best":
                per_row.append(rows_val)
            val = float(rows_val.mean() + whiten_ld)
            history["step"].append(step)
            history["train_log_prob"].append(train)
            history["val_log_prob"].append(val)
            return val

        best_val, best_step, bad_checks, done = record(0), 0, 0, 0
        with _threads_for(n * k * self.num_candidates, x.device):
            bar = tqdm(total=self.max_steps, disable=not progress, desc="Tabak", leave=False)
            try:
                while done < self.max_steps and bad_checks < self.patience:
                    chunk = min(self.check_every, self.max_steps - done)
                    frames = _haar_frames(chunk * self.num_rotations, self.dim, k, x, gen)
                    frames = frames.reshape(chunk, self.num_rotations, self.dim, k)
                    rows = torch.randint(n, (chunk, k, self.num_candidates), generator=gen,
                                         device=x.device)
                    rel_widths = self._relative_widths((chunk, k, self.num_candidates), x, gen)
                    for i in range(chunk):
                        frame = self._best_frame(frames[i], z, rows[i], rel_widths[i])
                        frame_t = frame.mT
                        c, c_val = frame_t @ z, frame_t @ z_val
                        params, keep, c_new, log_slope = self._ascent_step(c, rows[i],
                                                                           rel_widths[i])
                        z = z + frame @ ((c_new - c) * keep)
                        ld = ld + (keep.mT @ log_slope).squeeze(0)
                        c_val_new, log_slope_val = _fast_map(c_val, *params)
                        z_val = z_val + frame @ ((c_val_new - c_val) * keep)
                        ld_val = ld_val + (keep.mT @ log_slope_val).squeeze(0)
                        steps["frames"].append(frame)
                        for name, p in zip(self._STEP_BUFFERS[1:], params, strict=True):
                            steps[name].append(p.squeeze(-1) if name in ("centers", "widths")
                                               else p.squeeze(-1) * keep.squeeze(-1))
                    done += chunk
                    bar.update(chunk)
                    val = record(done)
                    bar.set_postfix(val_log_prob=f"{val:.4f}")
                    if val > best_val:
                        best_val, best_step, bad_checks = val, done, 0
                    else:
                        bad_checks += 1
            finally:
                bar.close()
        if not math.isfinite(best_val):
            raise RuntimeError("Tabak.fit: the held-out log-likelihood is not finite")
        if per_row:
            best_step = _select(self.selection, per_row, history["step"], best_step)

        def stacked(name: str, shape: tuple) -> Tensor:
            kept = steps[name][:best_step]
            return torch.stack(kept) if kept else x.new_zeros((0, *shape))

        new = {name: stacked(name, (k,)) for name in self._STEP_BUFFERS[1:]}
        new["frames"] = stacked("frames", (self.dim, k))
        # Commit only now, so an exception or interrupt above leaves the old state intact.
        self.loc, self.scale_tril = loc, tril
        for name, value in new.items():
            setattr(self, name, value.contiguous())
        self.fitted = torch.ones((), dtype=torch.bool, device=x.device)
        self.history, self.best_step = history, best_step
        self.clear_cache()
        return self

    def _relative_widths(self, shape: tuple, like: Tensor, generator) -> Tensor:
        """Per step and coordinate epsilon / std: fixed, or log-uniform on the ``width`` range."""
        if not isinstance(self.width, tuple):
            return like.new_full(shape, self.width)
        lo, hi = math.log(self.width[0]), math.log(self.width[1])
        u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
        return torch.exp(lo + (hi - lo) * u)

    def _capped_step(self, grad: Tensor, gn: Tensor) -> tuple[Tensor, Tensor]:
        """The Gauss-Newton step ``G^{-1} grad`` with its RMS displacement capped at
        ``step_size``, and the gain the quadratic model predicts for it (shapes ``(..., 3)``,
        ``(...)``)."""
        ridge = 1e-8 * torch.eye(_NUM_PARAMS, device=grad.device, dtype=grad.dtype)
        delta = torch.linalg.solve(gn + ridge, grad.unsqueeze(-1)).squeeze(-1)
        # The RMS displacement is sqrt(delta^T G delta) = sqrt(grad^T delta).
        length = (grad * delta).sum(-1).clamp_min(0).sqrt()
        scale = self.step_size / length.clamp_min(self.step_size)
        return delta * scale.unsqueeze(-1), (scale - 0.5 * scale * scale) * length * length

    def _best_frame(self, frames: Tensor, z: Tensor, rows: Tensor, rel_width: Tensor) -> Tensor:
        """Of the ``num_rotations`` frames (R, D, K), the one whose coordinates' best candidate
        steps predict the largest total gain (ranked on histograms, as the centers are)."""
        if frames.shape[0] == 1:
            return frames[0]
        r, _, k = frames.shape
        c = (frames.mT @ z).reshape(r * k, -1)                      # (R K, n)
        rows, rel_width = rows.repeat(r, 1), rel_width.repeat(r, 1)  # (R K, m)
        centers = c.gather(1, rows)
        mean = c.mean(-1, keepdim=True)
        std = ((c * c).mean(-1, keepdim=True) - mean * mean).clamp_min(0).sqrt()
        widths = rel_width * std.clamp_min(torch.finfo(c.dtype).eps)
        means, shares = _histogram(c, self.candidate_bins)
        grad, gn = local_ascent(means.unsqueeze(1), centers, widths, weights=shares.unsqueeze(1))
        _, predicted = self._capped_step(grad, gn)                   # (R K, m)
        total = predicted.amax(-1).reshape(r, k).sum(-1)
        return frames[total.argmax()]  # a tensor index: no host sync per step on a GPU

    def _ascent_step(self, c: Tensor, rows: Tensor, rel_width: Tensor) -> tuple[
        tuple[Tensor, ...], Tensor, Tensor, Tensor
    ]:
        """One Gauss-Newton step of every coordinate (row) of ``c``, shape (K, n), from the
        identity. ``rows`` (K, m) index candidate centers and ``rel_width`` (K, m) their widths
        relative to each coordinate's std; with m > 1 the candidate whose capped step predicts
        the largest gain is taken, the gains computed on a histogram of each coordinate
        (``candidate_bins`` bins, so ranking m candidates costs m x bins, not m x n), and the
        chosen step is then computed on all the points.
        Returns the map parameters as (K, 1) columns; ``keep`` (K, 1): 1 where the step gains
        training likelihood, else 0 (that coordinate keeps the identity); and the mapped ``c``
        and its log-slopes."""
        centers = c.gather(1, rows)  # (K, m) candidate centers
        mean = c.mean(-1, keepdim=True)
        std = ((c * c).mean(-1, keepdim=True) - mean * mean).clamp_min(0).sqrt()
        widths = rel_width * std.clamp_min(torch.finfo(c.dtype).eps)  # (K, m)
        if rows.shape[1] > 1:
            means, shares = _histogram(c, self.candidate_bins)
            grad, gn = local_ascent(means.unsqueeze(1), centers, widths,
                                    weights=shares.unsqueeze(1))
            _, predicted = self._capped_step(grad, gn)
            best = predicted.argmax(-1, keepdim=True)
            center, width = centers.gather(1, best).squeeze(-1), widths.gather(1, best).squeeze(-1)
        else:
            center, width = centers.squeeze(-1), widths.squeeze(-1)
        delta, _ = self._capped_step(*local_ascent(c, center, width))
        params = (
            delta[:, 0].clamp(_SIGMA_MIN, _SIGMA_MAX),
            delta[:, 1],
            delta[:, 2].clamp(-_GAMMA_MAX, _GAMMA_MAX),
            center,
            width,
        )
        params = tuple(p.unsqueeze(-1) for p in params)
        c_new, log_slope = _fast_map(c, *params)
        # Exact per-coordinate gain in training log-likelihood (rotations preserve |z|); where
        # the quadratic model overshoots and the step would lose, keep the identity.
        gain = log_slope.mean(-1) - 0.5 * (c_new * c_new - c * c).mean(-1)
        return params, (gain > 0).to(c.dtype).unsqueeze(-1), c_new, log_slope

    def _warn_repeats(self, x: Tensor) -> None:
        """Warn when a column is mostly repeated values: such data sits on a lattice and its
        fitted density keeps sharpening on the repeats."""
        s = torch.sort(x, dim=0).values
        repeated = (s[1:] == s[:-1]).to(x.dtype).mean(0)
        if bool((repeated > 0.5).any()):
            cols = (repeated > 0.5).nonzero().flatten().tolist()
            warnings.warn(
                f"Tabak.fit: column(s) {cols} are mostly repeated values (discrete data); "
                "the fit is well defined, but for a density add dequantization noise first",
                stacklevel=3,
            )


def tabak(dim: int, **kwargs) -> Tabak:
    """Build an unfitted :class:`Tabak` transform; see its arguments."""
    return Tabak(dim, **kwargs)


def gaussianize(x: Tensor, x_val: Tensor | None = None, progress: bool = False,
                **kwargs) -> tuple[Tensor, Tabak]:
    """Fit a :class:`Tabak` transform to ``x`` (shape ``(n, D)``) and return ``(z, tabak)`` with
    ``z = tabak.inv(x)`` approximately :math:`N(0, I)`.

    The preconditioning step for models: fit a Pyro model to ``z`` (e.g. a Gaussian mixture, as
    in Agnelli, Cadeiras, Tabak, Turner & Vanden-Eijnden 2010), then map results back exactly:
    points with ``tabak(z)``, densities with
    ``TransformedDistribution(model_density_of_z, [tabak])``, whose ``log_prob(x)`` is
    :math:`\\log p_z(G(x)) + \\log|\\det \\partial G/\\partial x|`.

    Arguments:
        x: the data, shape ``(n, D)``.
        x_val: optional held-out data for early stopping.
        progress: show a progress bar.
        kwargs: :class:`Tabak` arguments (``max_steps``, ``step_size``, ``seed``, ...).

    Example:
        >>> import torch
        >>> from pyroflows.transforms.tabak import gaussianize
        >>> x = torch.rand(400, 2, dtype=torch.float64)
        >>> z, t = gaussianize(x, max_steps=50, seed=0)
        >>> z.shape, bool(torch.isfinite(t.log_prob(x)).all())
        (torch.Size([400, 2]), True)
    """
    t = Tabak(x.shape[-1], **kwargs).fit(x, x_val=x_val, progress=progress)
    with torch.no_grad():
        z = t.inv(x)
    return z, t
