"""Run a computation over many draws in pieces, halving a piece that runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["in_chunks"]


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or (
        "can't allocate memory" in message
    )


def in_chunks(run: Callable[[int, int], Any], total: int, chunk: int) -> tuple[list, int]:
    """``run(start, n)`` over ``range(total)`` in pieces of at most ``chunk``; a piece that runs
    out of memory (CUDA or host) is retried in halves, down to one draw.

    Returns:
        The results of the pieces, in order, and the piece size that worked last.

    Example:
        >>> from pyroflows.diagnostics._chunks import in_chunks
        >>> in_chunks(lambda start, n: list(range(start, start + n)), total=5, chunk=2)
        ([[0, 1], [2, 3], [4]], 2)
    """
    parts, start = [], 0
    while start < total:
        n = min(chunk, total - start)
        try:
            parts.append(run(start, n))
        except RuntimeError as error:
            if not _is_out_of_memory(error) or n == 1:
                raise
            chunk = max(1, n // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += n
    return parts, chunk
