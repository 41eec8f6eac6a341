"""Planar layers as one fused kernel: a run of forward maps in one autograd node."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["planar_chain"]


def planar_chain(x: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor,
                 log_det: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""The forward maps of K planar layers with the stacked ``w``, ``u_hat`` (K, D), ``bias``
    and slacks :math:`\delta_k = 1 + w_k^\top \hat u_k > 0` (K,), :math:`x_{k+1} = x_k +
    \hat u_k t_k`, :math:`t_k = \tanh(w_k^\top x_k + b_k)`, and their log-dets
    :math:`\log d_k` added to ``log_det``, with :math:`q_k = 1 - t_k^2` and
    :math:`d_k = 1 + q_k (\delta_k - 1) = t_k^2 + q_k \delta_k` (non-negative terms: no
    cancellation as :math:`w_k^\top \hat u_k` nears -1).

    Three kernels per layer and a written-out backward pass: with :math:`g_{k+1}` the gradient
    at :math:`x_{k+1}` and :math:`\ell` the one at the log-det,

    .. math:: \gamma_k = q_k \Bigl(g_{k+1}^\top \hat u_k
              + \frac{2 \ell\, t_k (1 - \delta_k)}{d_k}\Bigr), \qquad
              g_k = g_{k+1} + \gamma_k w_k,

    :math:`\nabla w_k = \sum_n \gamma_{k,n} x_{k,n}`, :math:`\nabla \hat u_k = \sum_n
    t_{k,n} g_{k+1,n}`, :math:`\nabla b_k = \sum_n \gamma_{k,n}`,
    :math:`\nabla \delta_k = \sum_n \ell_n q_{k,n} / d_{k,n}`, for all layers at once.
    """
    args = (x, w, u_hat, bias, slack, log_det)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return _PlanarChain.apply(*args)
    with torch.no_grad():
        return _planar_forward(*args)[:2]


def _planar_forward(x, w, u_hat, bias, slack, log_det):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    num_layers, (n, dim) = w.shape[0], x2.shape
    xs = x2.new_empty(num_layers + 1, n, dim)  # the input of every layer, and the output
    xs[0] = x2
    tanh = x2.new_empty(num_layers, n)
    for k, (w_k, u_k, b_k) in enumerate(zip(w, u_hat, bias, strict=True)):
        torch.tanh(torch.addmv(b_k, xs[k], w_k), out=tanh[k])
        torch.addr(xs[k], tanh[k], u_k, out=xs[k + 1])
    tanh_sq = tanh * tanh
    q = 1 - tanh_sq
    d = torch.addcmul(tanh_sq, q, slack[:, None])  # 1 + q (slack - 1), as a sum
    ld = torch.log(d).sum(0).view(shape[:-1])
    log_det = ld if log_det is None else log_det + ld
    return xs[-1].view(shape), log_det, xs, tanh, q, d


class _PlanarChain(torch.autograd.Function):
    """The autograd node of :func:`planar_chain`."""

    @staticmethod
    def forward(ctx, x, w, u_hat, bias, slack, log_det):
        ctx.log_det_shape = None if log_det is None else log_det.shape
        y, log_det, xs, tanh, q, d = _planar_forward(x, w, u_hat, bias, slack, log_det)
        ctx.save_for_backward(w, u_hat, slack)
        ctx.xs, ctx.tanh, ctx.q, ctx.d = xs, tanh, q, d
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return y, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_log_det):
        w, u_hat, slack = ctx.saved_tensors
        if grad_y is None and grad_log_det is None:
            return (None,) * 6
        xs, tanh, q = ctx.xs, ctx.tanh, ctx.q
        num_layers, n, dim = xs.shape
        num_layers -= 1
        grads = xs.new_empty(num_layers + 1, n, dim)  # gradient at every x_k
        if grad_y is None:
            grads[-1].zero_()
        else:
            grads[-1] = grad_y.reshape(n, dim)
        if grad_log_det is None:
            from_log_det = torch.zeros_like(tanh)
            grad_slack = torch.zeros_like(slack)
        else:
            ell = grad_log_det.reshape(1, n)
            d = ctx.d
            # d log(t^2 + q slack) / dt = 2 t (1 - slack) / d
            from_log_det = (2 * ell) * tanh * (1 - slack)[:, None] / d
            grad_slack = (ell * q / d).sum(-1)
        gamma = torch.empty_like(tanh)
        for k in range(num_layers - 1, -1, -1):
            torch.mul(torch.addmv(from_log_det[k], grads[k + 1], u_hat[k]), q[k], out=gamma[k])
            torch.addr(grads[k + 1], gamma[k], w[k], out=grads[k])
        grad_w = torch.bmm(gamma.unsqueeze(1), xs[:-1]).squeeze(1)
        grad_u_hat = torch.bmm(tanh.unsqueeze(1), grads[1:]).squeeze(1)
        grad_bias = gamma.sum(-1)
        grad_log_det0 = None
        if ctx.needs_input_grad[5] and grad_log_det is not None:
            grad_log_det0 = grad_log_det.sum_to_size(ctx.log_det_shape)
        grad_x = grads[0].view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_u_hat, grad_bias, grad_slack, grad_log_det0
