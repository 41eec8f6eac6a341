"""``torch.distributed`` in one place: whether a fit runs data-parallel, and the sums and
extremes over rows of which every rank holds a shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_data_parallel", "Rows"]


def is_data_parallel(flag: bool | None = None) -> bool:
    """Whether a fit runs data-parallel: ``flag`` if given (``True`` needs an initialized
    process group), else whether ``torch.distributed`` is initialized with more than one
    process (``torchrun``, ``torch.multiprocessing.spawn``)."""
    ready = dist.is_available() and dist.is_initialized()
    if flag is None:
        return ready and dist.get_world_size() > 1
    if flag and not ready:
        raise ValueError("distributed=True needs torch.distributed initialized first "
                         "(torch.distributed.init_process_group, as torchrun sets up)")
    return bool(flag)


class Rows:
    r"""Reductions over the rows of a data set, each rank holding its shard (``parallel``) or
    all of it: sums, means, extremes, the total count and this rank's first row in the
    concatenation of the shards in rank order. Without ``parallel`` every method is the plain
    local reduction, so the single-process code is the same code.

    Arguments:
        parallel: whether the rows are sharded over the default process group.
        count: the number of rows this rank holds.
        device: where the collectives' tensors live (CPU for gloo, CUDA for NCCL).
    """

    def __init__(self, parallel: bool, count: int, device: torch.device | str = "cpu") -> None:
        self.parallel = bool(parallel)
        self.local = int(count)
        self.device = torch.device(device)
        if self.parallel:
            counts = torch.tensor([self.local], dtype=torch.int64, device=self.device)
            gathered = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, counts)
            sizes = [int(c) for c in gathered]
            self.rank = dist.get_rank()
            self.total = sum(sizes)
            self.offset = sum(sizes[: self.rank])
            self.smallest = min(sizes)
        else:
            self.rank, self.total, self.offset, self.smallest = 0, self.local, 0, self.local

    def _reduced(self, t: Tensor, op: str) -> Tensor:
        """``t`` reduced elementwise over the ranks by ``dist.ReduceOp.<op>`` (a new tensor),
        or ``t`` itself when not parallel (where torch may have no ``torch.distributed``)."""
        if not self.parallel:
            return t
        t = t.clone()
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    def sum(self, t: Tensor) -> Tensor:
        """``t``, a local sum over rows, summed over the ranks."""
        return self._reduced(t, "SUM")

    def mean(self, t: Tensor, dim: int = -1) -> Tensor:
        """The mean of ``t`` over all ranks' rows along ``dim`` (the rows' dim)."""
        if not self.parallel:
            return t.mean(dim)
        return self.sum(t.sum(dim)) / self.total

    def max(self, t: Tensor) -> Tensor:
        """The elementwise maximum of ``t`` over the ranks."""
        return self._reduced(t, "MAX")

    def min(self, t: Tensor) -> Tensor:
        """The elementwise minimum of ``t`` over the ranks."""
        return self._reduced(t, "MIN")

    def gather(self, t: Tensor, index: Tensor) -> Tensor:
        """``t.gather(-1, index)`` with ``index`` into the concatenated rows (the last dim of
        ``t`` holds this rank's rows): each rank fills the entries its shard holds."""
        if not self.parallel:
            return t.gather(-1, index)
        local = index - self.offset
        mine = (local >= 0) & (local < self.local)
        values = t.gather(-1, local.clamp(0, max(self.local - 1, 0)))
        return self.sum(torch.where(mine, values, torch.zeros_like(values)))

    def gather_all(self, t: Tensor) -> list[Tensor]:
        """``t`` (of one shape on every rank) from each rank, in rank order: ``[t]`` when not
        parallel."""
        if not self.parallel:
            return [t]
        t = t.to(self.device)
        gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
        return gathered

    def broadcast_seed(self, seed: int | None) -> int | None:
        """``seed`` if given, else (parallel) one random seed drawn by rank 0 for every rank."""
        if seed is not None or not self.parallel:
            return seed
        drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=self.device)
        dist.broadcast(drawn, src=0)
        return int(drawn)
