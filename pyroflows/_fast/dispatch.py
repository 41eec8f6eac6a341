"""Which layers run on a fused kernel: a layer declares ``fused_kind(inverse)`` (``None``: its
plain operations) and a static ``run_fused(x, layers, kinds, log_det, inverse)`` that runs
consecutive layers of its kind as one call; :func:`run_parts` groups layers into such runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _private

__all__ = ["traced", "run_parts", "run_steps", "keeps_map", "row_view", "broadcast_batch",
           "periodic_rows", "layer_grads", "incoming_log_det_grad"]


def traced() -> bool:
    """Whether a ``torch.func`` transform or the ``torch.compile`` tracer is running: the fused
    kernels (in-place backward passes) then step aside for the plain operations."""
    if torch.compiler.is_compiling():
        return True
    return _private.functorch_active()


def run_parts(parts: Sequence[nn.Module], x: Tensor, inverse: bool, fused: bool = True
              ) -> tuple[Tensor, Tensor | None]:
    """``(image, log-det)`` of ``x`` through ``parts`` (``inverse``: their inverses, last
    first): with ``fused`` (not :func:`traced`), consecutive layers with one ``run_fused`` and a
    ``fused_kind`` run as one call of it; without, every layer runs its ``plain_map``."""
    fused = fused and not traced()
    log_det = None
    run: list = []  # consecutive layers for one call of `runner`
    kinds: list = []
    runner = None
    for part in reversed(parts) if inverse else parts:
        kind = part.fused_kind(inverse) if fused else None
        if kind is not None:
            part_runner = type(part).run_fused
            if run and part_runner is not runner:
                x, log_det = runner(x, run, kinds, log_det, inverse)
                run, kinds = [], []
            runner = part_runner
            run.append(part)
            kinds.append(kind)
            continue
        if run:
            x, log_det = runner(x, run, kinds, log_det, inverse)
            run, kinds = [], []
        if not fused:
            x, ld = part.plain_map(x, inverse)
        elif inverse:
            x, ld = part.inverse_and_log_det(x)
        else:
            x, ld = part.forward_and_log_det(x)
        log_det = ld if log_det is None else log_det + ld
    if run:
        x, log_det = runner(x, run, kinds, log_det, inverse)
    return x, log_det


def run_steps(x: Tensor, step, params: Sequence[Tensor], log_det: Tensor | None,
              reverse: bool = False) -> tuple[Tensor, Tensor]:
    """``x`` through ``step(x, *params_k) -> (x, log-det)`` for every row ``k`` of the stacked
    ``params`` (last first with ``reverse``), the log-dets added to ``log_det`` (or 0)."""
    rows = list(zip(*(p.unbind(0) for p in params), strict=True))
    for row in reversed(rows) if reverse else rows:
        x, ld = step(x, *row)
        log_det = ld if log_det is None else log_det + ld
    return x, log_det


def keeps_map(cls: type, base: type, names: Sequence[str]) -> bool:
    """Whether ``cls`` keeps ``base``'s methods ``names`` (those that define its map), so that a
    kernel written for ``base`` computes its map too."""
    return all(getattr(cls, n) is getattr(base, n) for n in names)


def row_view(t: Tensor, batch_dims: int, event_dims: int) -> Tensor:
    """Layers' parameters stacked (K, *rows, *event) viewed as (K, 1, ..., 1, *rows, *event)
    with ``batch_dims`` dims between K and the event dims: broadcast against a batch of inputs
    (*batch, D) stacked per layer (K, *batch, D); rows () is one set for every input."""
    rows = t.dim() - 1 - event_dims
    return t.view(t.shape[0], *(1,) * (batch_dims - rows), *t.shape[1:])


def broadcast_batch(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes(*shapes)``, written out: that call costs as much as a small
    layer's map. A :class:`RuntimeError` where the shapes do not broadcast."""
    size = max(len(s) for s in shapes)
    out = [1] * size
    for shape in shapes:
        for i, d in enumerate(shape, size - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = d
    return torch.Size(out)


def periodic_rows(row_bias: Tensor, batch_shape: torch.Size) -> Tensor:
    """``row_bias`` (..., H) as (M, H) rows that repeat over the N rows of ``batch_shape``
    flattened (row n gets row ``n % M``): a view where its batch dims are the trailing ones of
    ``batch_shape``, else expanded to all N rows."""
    dims = row_bias.shape[:-1]
    while dims and dims[0] == 1:
        dims = dims[1:]
    if tuple(batch_shape[len(batch_shape) - len(dims):]) == tuple(dims):
        return row_bias.reshape(-1, row_bias.shape[-1])
    return row_bias.expand(*batch_shape, row_bias.shape[-1]).reshape(-1, row_bias.shape[-1])


def layer_grads(xs: Tensor, grad_y: Tensor | None) -> Tensor:
    """The gradients at every layer's input and the output of a chain whose forward pass kept
    ``xs`` (K + 1, ...), for a written-out backward pass to fill from the last: that at the
    output is ``grad_y`` (zero for ``None``), the others are left to the pass."""
    grads = torch.empty_like(xs)
    if grad_y is None:
        grads[-1].zero_()
    else:
        grads[-1] = grad_y.reshape(xs.shape[1:])
    return grads


def incoming_log_det_grad(ctx, index: int, grad_log_det: Tensor | None) -> Tensor | None:
    """A fused node's gradient to the log-det it was given (input ``index``): the output's
    log-det gradient summed to ``ctx.log_det_shape``; ``None`` where not needed."""
    if not ctx.needs_input_grad[index] or grad_log_det is None:
        return None
    return grad_log_det.sum_to_size(ctx.log_det_shape)
