"""Workers of the data-parallel tests: each is run by ``run_ranks`` in ``world`` processes that
join one gloo process group (CPU), and writes what the test compares into ``out``."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, target, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        target(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(target, world: int, *args) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes sharing a gloo group
    (``target`` a module-level function, so the processes can import it)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_entry, args=(world, init_file, target, args), nprocs=world, join=True)


def tabak_fits(rank: int, world: int, fits: list[tuple], out: str) -> None:
    """Fit a Tabak transform to this rank's contiguous shard of ``x`` (and of ``x_val``) for
    each ``(name, x, x_val, options)`` of ``fits``."""
    from pyroflows.transforms import Tabak

    for name, x, x_val, options in fits:
        shard = x.chunk(world)[rank]
        shard_val = None if x_val is None else x_val.chunk(world)[rank]
        t = Tabak(x.shape[1], **options).fit(shard, x_val=shard_val, progress=False)
        torch.save({"state": t.state_dict(), "history": t.history, "best_step": t.best_step},
                   os.path.join(out, f"{name}-rank{rank}.pt"))
