"""Radial layers as one fused kernel: a run of forward maps in one autograd node."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dispatch import broadcast_batch, incoming_log_det_grad, layer_grads, row_view

__all__ = ["radial_chain", "log_det_slope"]


def radial_chain(x: Tensor, x0: Tensor, alpha: Tensor, alpha_plus_beta: Tensor,
                 log_det: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""The forward maps of K radial layers with the stacked centres ``x0`` (K, ..., D) and
    :math:`a_k = \alpha_k`, :math:`p_k = \alpha_k + \beta_k` (K, ...), both positive,
    :math:`x_{k+1} = x_k + s_k (x_k - x_{0,k})`, :math:`s_k = \beta_k / A_k`, with
    :math:`r_k = \|x_k - x_{0,k}\|`, :math:`A = a + r`, :math:`P = p + r`,
    :math:`Q = a p + r (2 a + r)`, and their log-dets
    :math:`\ell_k = (D - 1)(\log P_k - \log A_k) + \log Q_k - 2 \log A_k` (those of
    :func:`~pyroflows.transforms.radial.radial_forward`: sums of positive terms) added to
    ``log_det``. The parameters' middle dims ``...`` are the rows (none: one set for every
    input; (B,): one per context row) and broadcast against the batch dims of ``x``.

    A written-out backward pass: with :math:`g` the gradient at :math:`x_{k+1}`,
    :math:`\lambda` the one at the log-det, :math:`\delta = x_k - x_{0,k}` and
    :math:`\gamma = g^\top \delta`,

    .. math:: c = \Bigl(\gamma \frac{\partial s}{\partial r} + \lambda
              \frac{\partial \ell}{\partial r}\Bigr) \frac1r, \qquad
              g_k = (1 + s)\, g + c\, \delta, \qquad \nabla x_{0,k} = g - g_k,

    .. math:: \nabla a = \gamma \frac{\partial s}{\partial a} + \lambda
              \frac{\partial \ell}{\partial a}, \qquad
              \nabla p = \gamma \frac{\partial s}{\partial p} + \lambda
              \frac{\partial \ell}{\partial p},

    with :math:`\partial s / \partial r = -\beta / A^2`, :math:`\partial s / \partial a =
    -P / A^2`, :math:`\partial s / \partial p = 1 / A`, :math:`\partial \ell / \partial r =
    (D - 1)(1/P - 1/A) + 2 (a + r) / Q - 2 / A`, :math:`\partial \ell / \partial a =
    -(D + 1) / A + (p + 2 r) / Q`, :math:`\partial \ell / \partial p = (D - 1) / P + a / Q`,
    summed over the inputs that share a row's parameters; :math:`1/r` is taken as 0 at the
    centre (:math:`\delta = 0` there), as the norm's subgradient.
    """
    args = (x, x0, alpha, alpha_plus_beta, log_det)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return _RadialChain.apply(*args)
    with torch.no_grad():
        return _radial_forward(*args)[:2]


def log_det_slope(dim: int, a: Tensor, r: Tensor, big_a: Tensor, big_p: Tensor, big_q: Tensor
                  ) -> Tensor:
    r""":math:`\partial \ell / \partial r = (D - 1)(1/P - 1/A) + 2 (a + r) / Q - 2 / A`, the
    slope of a radial layer's log-det in the distance :math:`r` from its centre, from the sums
    :math:`A, P, Q` of :func:`radial_chain`."""
    inv_a = 1 / big_a
    return (dim - 1) * (1 / big_p - inv_a) + 2 * (a + r) / big_q - 2 * inv_a


def _prepared(x: Tensor, x0: Tensor, alpha: Tensor, alpha_plus_beta: Tensor):
    """The inputs and parameters viewed with the broadcast batch dims."""
    batch = broadcast_batch(x.shape[:-1], x0.shape[1:-1], alpha.shape[1:],
                            alpha_plus_beta.shape[1:])
    n = len(batch)
    return (x.expand(*batch, x.shape[-1]), row_view(x0, n, 1), row_view(alpha, n, 0),
            row_view(alpha_plus_beta, n, 0))


def _radial_forward(x, x0, alpha, alpha_plus_beta, log_det):
    x, x0, a, p = _prepared(x, x0, alpha, alpha_plus_beta)
    num_layers, dim = x0.shape[0], x.shape[-1]
    xs = x.new_empty(num_layers + 1, *x.shape)  # the input of every layer, and the output
    xs[0] = x
    r = x.new_empty(num_layers, *x.shape[:-1])
    beta = p - a
    for k in range(num_layers):
        diff = xs[k] - x0[k]
        torch.linalg.vector_norm(diff, dim=-1, out=r[k])
        torch.addcmul(xs[k], (beta[k] / (a[k] + r[k])).unsqueeze(-1), diff, out=xs[k + 1])
    big_a, big_p, big_q = a + r, p + r, a * p + r * (2 * a + r)
    log_a = torch.log(big_a)
    ld = ((dim - 1) * (torch.log(big_p) - log_a) + torch.log(big_q) - 2 * log_a).sum(0)
    log_det = ld if log_det is None else log_det + ld
    return xs[-1], log_det, xs, r, (big_a, big_p, big_q)


class _RadialChain(torch.autograd.Function):
    """The autograd node of :func:`radial_chain`."""

    @staticmethod
    def forward(ctx, x, x0, alpha, alpha_plus_beta, log_det):
        ctx.log_det_shape = None if log_det is None else log_det.shape
        y, log_det, xs, r, sums = _radial_forward(x, x0, alpha, alpha_plus_beta, log_det)
        ctx.save_for_backward(x, x0, alpha, alpha_plus_beta)
        ctx.xs, ctx.r, ctx.sums = xs, r, sums
        ctx.set_materialize_grads(False)
        return y, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_log_det):
        if grad_y is None and grad_log_det is None:
            return (None,) * 5
        given = ctx.saved_tensors
        _, x0, a, p = _prepared(*given)
        xs, r = ctx.xs, ctx.r
        big_a, big_p, big_q = ctx.sums
        num_layers, dim = x0.shape[0], xs.shape[-1]
        inv_a, beta = 1 / big_a, p - a
        s = beta * inv_a
        ds_dr, ds_da, ds_dp = -s * inv_a, -big_p * inv_a * inv_a, inv_a
        inv_r = torch.where(r > 0, 1 / r, torch.zeros_like(r))
        if grad_log_det is None:
            ell = torch.zeros_like(r[0])
            from_log_det = torch.zeros_like(r)
        else:
            ell = grad_log_det.expand(r.shape[1:])
            from_log_det = ell * log_det_slope(dim, a, r, big_a, big_p, big_q) * inv_r
        grads = layer_grads(xs, grad_y)
        gamma = torch.empty_like(r)
        for k in range(num_layers - 1, -1, -1):
            diff = xs[k] - x0[k]
            torch.linalg.vecdot(grads[k + 1], diff, out=gamma[k])
            c = torch.addcmul(from_log_det[k], gamma[k] * ds_dr[k], inv_r[k])
            torch.addcmul((1 + s[k]).unsqueeze(-1) * grads[k + 1], c.unsqueeze(-1), diff,
                          out=grads[k])
        grad_x0 = (grads[1:] - grads[:-1]).sum_to_size(x0.shape).view(given[1].shape)
        grad_a, grad_p = gamma * ds_da, gamma * ds_dp
        if grad_log_det is not None:
            grad_a = grad_a + ell * ((p + 2 * r) / big_q - (dim + 1) * inv_a)
            grad_p = grad_p + ell * ((dim - 1) / big_p + a / big_q)
        grad_a = grad_a.sum_to_size(a.shape).view(given[2].shape)
        grad_p = grad_p.sum_to_size(p.shape).view(given[3].shape)
        grad_log_det0 = incoming_log_det_grad(ctx, 4, grad_log_det)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0].sum_to_size(given[0].shape)
        return grad_x, grad_x0, grad_a, grad_p, grad_log_det0
