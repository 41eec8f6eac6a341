"""Planar layers as one fused kernel: a run of forward maps in one autograd node."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dispatch import broadcast_batch, incoming_log_det_grad, layer_grads, row_view

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


class _Shared:
    """The kernel's products for one parameter set (K, D) for every input, the inputs as
    the rows of a matrix (n, D): matrix-vector products."""

    @staticmethod
    def project(x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # w^T x + b per row
        return torch.addmv(b, x, w)

    @staticmethod
    def spread(x: Tensor, t: Tensor, u: Tensor, out: Tensor) -> Tensor:  # x + t u
        return torch.addr(x, t, u, out=out)

    @staticmethod
    def reduce(t: Tensor, v: Tensor, shape: torch.Size) -> Tensor:  # sum_n t_kn v_kn
        return torch.bmm(t.unsqueeze(1), v).squeeze(1)


class _PerRow:
    """The kernel's products for one parameter set per row, broadcast against the inputs."""

    @staticmethod
    def project(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.add((x * w).sum(-1), b)

    @staticmethod
    def spread(x: Tensor, t: Tensor, u: Tensor, out: Tensor) -> Tensor:
        return torch.addcmul(x, t.unsqueeze(-1), u, out=out)

    @staticmethod
    def reduce(t: Tensor, v: Tensor, shape: torch.Size) -> Tensor:
        return (t.unsqueeze(-1) * v).sum_to_size(shape)


def _prepared(x: Tensor, w: Tensor, u_hat: Tensor, bias: Tensor, slack: Tensor):
    """``(x, w, u_hat, bias, slack, ops)`` as the loops take them: with one parameter set the
    inputs flattened to (n, D) and the slack to (K, 1); with one per row everything viewed
    with the broadcast batch dims (:func:`~pyroflows._fast.dispatch.row_view`)."""
    if w.dim() == 2:
        return x.reshape(-1, x.shape[-1]), w, u_hat, bias, slack.unsqueeze(-1), _Shared
    batch = broadcast_batch(x.shape[:-1], w.shape[1:-1], u_hat.shape[1:-1], bias.shape[1:],
                            slack.shape[1:])
    w, u_hat = (row_view(t, len(batch), 1) for t in (w, u_hat))
    bias, slack = (row_view(t, len(batch), 0) for t in (bias, slack))
    return x.expand(*batch, x.shape[-1]), w, u_hat, bias, slack, _PerRow


def _planar_forward(x, w, u_hat, bias, slack, log_det):
    x_shape = x.shape
    x, w, u_hat, bias, slack, ops = _prepared(x, w, u_hat, bias, slack)
    batch_shape = x_shape[:-1] if ops is _Shared else x.shape[:-1]
    num_layers = w.shape[0]
    xs = x.new_empty(num_layers + 1, *x.shape)  # the input of every layer, and the output
    xs[0] = x
    tanh = x.new_empty(num_layers, *x.shape[:-1])
    for k in range(num_layers):
        torch.tanh(ops.project(xs[k], w[k], bias[k]), out=tanh[k])
        ops.spread(xs[k], tanh[k], u_hat[k], out=xs[k + 1])
    tanh_sq = tanh * tanh
    q = 1 - tanh_sq
    d = torch.addcmul(tanh_sq, q, slack)  # 1 + q (slack - 1), as a sum
    ld = torch.log(d).sum(0).view(batch_shape)
    log_det = ld if log_det is None else log_det + ld
    return xs[-1].view(*batch_shape, x.shape[-1]), log_det, xs, tanh, q, d


class _PlanarChain(torch.autograd.Function):
    """The autograd node of :func:`planar_chain`."""

    @staticmethod
    def forward(ctx, x, w, u_hat, bias, slack, log_det):
        ctx.log_det_shape = None if log_det is None else log_det.shape
        y, log_det, xs, tanh, q, d = _planar_forward(x, w, u_hat, bias, slack, log_det)
        ctx.save_for_backward(x, w, u_hat, bias, slack)
        ctx.xs, ctx.tanh, ctx.q, ctx.d = xs, tanh, q, d
        ctx.y_shape = y.shape
        ctx.set_materialize_grads(False)
        return y, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_log_det):
        if grad_y is None and grad_log_det is None:
            return (None,) * 6
        given = ctx.saved_tensors
        x, w, u_hat, bias, slack, ops = _prepared(*given)
        xs, tanh, q = ctx.xs, ctx.tanh, ctx.q
        num_layers = xs.shape[0] - 1
        grads = layer_grads(xs, grad_y)
        if grad_log_det is None:
            from_log_det = torch.zeros_like(tanh)
            grad_slack = torch.zeros_like(given[4])
        else:
            ell = grad_log_det.reshape(1, *tanh.shape[1:])
            d = ctx.d
            # d log(t^2 + q slack) / dt = 2 t (1 - slack) / d
            from_log_det = (2 * ell) * tanh * (1 - slack) / d
            grad_slack = (ell * q / d).sum_to_size(slack.shape).view(given[4].shape)
        gamma = torch.empty_like(tanh)
        for k in range(num_layers - 1, -1, -1):
            torch.mul(ops.project(grads[k + 1], u_hat[k], from_log_det[k]), q[k], out=gamma[k])
            ops.spread(grads[k + 1], gamma[k], w[k], out=grads[k])
        grad_w = ops.reduce(gamma, xs[:-1], w.shape).view(given[1].shape)
        grad_u_hat = ops.reduce(tanh, grads[1:], u_hat.shape).view(given[2].shape)
        grad_bias = gamma.sum_to_size(slack.shape).view(given[3].shape)
        grad_log_det0 = incoming_log_det_grad(ctx, 5, grad_log_det)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0].view(ctx.y_shape)
            if grad_x.shape != given[0].shape:  # x broadcast against the rows
                grad_x = grad_x.sum_to_size(given[0].shape)
        return grad_x, grad_w, grad_u_hat, grad_bias, grad_slack, grad_log_det0
