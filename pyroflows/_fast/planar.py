"""Planar layers as one fused kernel: a run of forward maps in one autograd node."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["planar_chain"]


def planar_chain(x: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor,
                 log_det: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""The forward maps of K planar layers with the stacked ``w``, ``u_hat`` (K, ..., D),
    ``bias`` and slacks :math:`\delta_k = 1 + w_k^\top \hat u_k > 0` (K, ...), :math:`x_{k+1} =
    x_k + \hat u_k t_k`, :math:`t_k = \tanh(w_k^\top x_k + b_k)`, and their log-dets
    :math:`\log d_k` added to ``log_det``, with :math:`q_k = 1 - t_k^2` and
    :math:`d_k = 1 + q_k (\delta_k - 1) = t_k^2 + q_k \delta_k` (non-negative terms: no
    cancellation as :math:`w_k^\top \hat u_k` nears -1). The parameters' middle dims ``...``
    are the rows (none: one set for every input; (B,): one per context row of a conditional
    layer) and broadcast against the batch dims of ``x`` (shape (..., D)).

    Three kernels per layer and a written-out backward pass: with :math:`g_{k+1}` the gradient
    at :math:`x_{k+1}` and :math:`\ell` the one at the log-det,

    .. math:: \gamma_k = q_k \Bigl(g_{k+1}^\top \hat u_k
              + \frac{2 \ell\, t_k (1 - \delta_k)}{d_k}\Bigr), \qquad
              g_k = g_{k+1} + \gamma_k w_k,

    :math:`\nabla w_k = \sum_n \gamma_{k,n} x_{k,n}`, :math:`\nabla \hat u_k = \sum_n
    t_{k,n} g_{k+1,n}`, :math:`\nabla b_k = \sum_n \gamma_{k,n}`,
    :math:`\nabla \delta_k = \sum_n \ell_n q_{k,n} / d_{k,n}`, for all layers at once (the
    sums over the inputs that share a row's parameters).
    """
    args = (x, w, u_hat, bias, slack, log_det)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return _PlanarChain.apply(*args)
    with torch.no_grad():
        return _planar_forward(*args)[:2]


def _aligned(x: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor):
    """The inputs' and rows' broadcast batch shape, and the parameters viewed with that many
    batch dims (ones in front of the rows' own)."""
    batch = torch.broadcast_shapes(x.shape[:-1], w.shape[1:-1])
    lead = (1,) * (len(batch) - (w.dim() - 2))
    num_layers, rows = w.shape[0], w.shape[1:-1]
    vector = (num_layers, *lead, *rows, w.shape[-1])
    scalar = (num_layers, *lead, *rows)
    return batch, w.view(vector), u_hat.view(vector), bias.view(scalar), slack.view(scalar)


def _planar_forward(x, w, u_hat, bias, slack, log_det):
    batch, w, u_hat, bias, slack = _aligned(x, w, u_hat, bias, slack)
    num_layers, dim = w.shape[0], w.shape[-1]
    xs = x.new_empty(num_layers + 1, *batch, dim)  # the input of every layer, and the output
    xs[0] = x
    tanh = x.new_empty(num_layers, *batch)
    for k in range(num_layers):
        torch.tanh(torch.add(_project(xs[k], w[k]), bias[k]), out=tanh[k])
        torch.addcmul(xs[k], tanh[k].unsqueeze(-1), u_hat[k], out=xs[k + 1])
    tanh_sq = tanh * tanh
    q = 1 - tanh_sq
    d = torch.addcmul(tanh_sq, q, slack)  # 1 + q (slack - 1), as a sum
    ld = torch.log(d).sum(0)
    log_det = ld if log_det is None else log_det + ld
    return xs[-1], log_det, xs, tanh, q, d, (w.shape, slack.shape)


def _project(x: Tensor, w: Tensor) -> Tensor:
    # w^T x over the last dim, w (D,) or (..., D) broadcast against x (..., D)
    return (x * w).sum(-1)


class _PlanarChain(torch.autograd.Function):
    """The autograd node of :func:`planar_chain`."""

    @staticmethod
    def forward(ctx, x, w, u_hat, bias, slack, log_det):
        ctx.log_det_shape = None if log_det is None else log_det.shape
        y, log_det, xs, tanh, q, d, aligned = _planar_forward(x, w, u_hat, bias, slack,
                                                              log_det)
        ctx.save_for_backward(w, u_hat, slack)
        ctx.xs, ctx.tanh, ctx.q, ctx.d, ctx.aligned = xs, tanh, q, d, aligned
        ctx.shapes = x.shape, w.shape, u_hat.shape, bias.shape, slack.shape
        ctx.set_materialize_grads(False)
        return y, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_log_det):
        if grad_y is None and grad_log_det is None:
            return (None,) * 6
        xs, tanh, q = ctx.xs, ctx.tanh, ctx.q
        vector, scalar = ctx.aligned  # the parameters' shapes with the batch dims of xs
        w, u_hat, slack = (t.view(s) for t, s in zip(ctx.saved_tensors, (vector, vector, scalar),
                                                     strict=True))
        x_shape, w_shape, u_shape, bias_shape, slack_shape = ctx.shapes
        num_layers = xs.shape[0] - 1
        grads = torch.empty_like(xs)  # gradient at every x_k
        if grad_y is None:
            grads[-1].zero_()
        else:
            grads[-1] = grad_y
        if grad_log_det is None:
            from_log_det = torch.zeros_like(tanh)
            grad_slack = slack.new_zeros(slack_shape)
        else:
            ell = grad_log_det.unsqueeze(0)
            d = ctx.d
            # d log(t^2 + q slack) / dt = 2 t (1 - slack) / d
            from_log_det = (2 * ell) * tanh * (1 - slack) / d
            grad_slack = (ell * q / d).sum_to_size(slack.shape).view(slack_shape)
        gamma = torch.empty_like(tanh)
        for k in range(num_layers - 1, -1, -1):
            torch.mul(torch.add(_project(grads[k + 1], u_hat[k]), from_log_det[k]), q[k],
                      out=gamma[k])
            torch.addcmul(grads[k + 1], gamma[k].unsqueeze(-1), w[k], out=grads[k])
        grad_w = (gamma.unsqueeze(-1) * xs[:-1]).sum_to_size(w.shape).view(w_shape)
        grad_u_hat = (tanh.unsqueeze(-1) * grads[1:]).sum_to_size(u_hat.shape).view(u_shape)
        grad_bias = gamma.sum_to_size(slack.shape).view(bias_shape)
        grad_log_det0 = None
        if ctx.needs_input_grad[5] and grad_log_det is not None:
            grad_log_det0 = grad_log_det.sum_to_size(ctx.log_det_shape)
        grad_x = grads[0].sum_to_size(x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_u_hat, grad_bias, grad_slack, grad_log_det0
