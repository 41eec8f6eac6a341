"""Workers of the data-parallel tests: each is run by ``run_ranks`` in ``world`` processes that
join one gloo process group (CPU), and writes what the test compares into ``out``."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, target, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        target(rank, world, *args)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def run_ranks(target, world: int, *args, timeout: float = 300.0) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes sharing a gloo group
    (``target`` a module-level function, so the processes can import it). As ``torchrun``
    does, a rank that fails ends the others (``mp.spawn`` terminates them and raises its
    error); ranks still running after ``timeout`` seconds are terminated and the test fails
    (a hang, not a result)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        context = mp.spawn(_entry, args=(world, init_file, target, args), nprocs=world,
                           join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the {world} ranks still ran after {timeout:g} s (a hang)")


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


class SlowRows(torch.utils.data.Dataset):
    """An ``ArrayDataset`` that sleeps ``delay`` seconds per batch fetched (a slow disk), so a
    test can kill the fit between two checkpoints."""

    def __init__(self, x, delay: float = 0.0) -> None:
        from pyroflows.density.streaming import ArrayDataset

        self.rows, self.delay = ArrayDataset(x), delay

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __getitems__(self, indices):
        import time

        time.sleep(self.delay)
        return self.rows.batch(indices)


def density_fits(rank: int, world: int, fits: list[tuple], out: str) -> None:
    """For each ``(name, x, x_val, options, fit_options)`` of ``fits``: a DensityEstimator built
    with ``options`` fitted data-parallel; ``x`` (and ``x_val``; a ``(y, context)`` pair or
    rows) every rank's whole data set as an ``ArrayDataset`` (the fit shards it), or with
    ``fit_options["shard"]`` this rank's contiguous shard of the arrays. Writes the model's
    state and history per rank."""
    from pyroflows.density import DensityEstimator
    from pyroflows.density.streaming import ArrayDataset

    for name, x, x_val, options, fit_options in fits:
        fit_options = dict(fit_options)
        if fit_options.pop("shard", False):
            data = x.chunk(world)[rank]
            val = None if x_val is None else x_val.chunk(world)[rank]
        else:
            data = ArrayDataset(*x) if isinstance(x, tuple) else ArrayDataset(x)
            val = None if x_val is None else (
                ArrayDataset(*x_val) if isinstance(x_val, tuple) else ArrayDataset(x_val))
        est = DensityEstimator(**options).fit(data, x_val=val, progress=False, **fit_options)
        torch.save({"state": est._model.state_dict(), "history": est.history_},
                   os.path.join(out, f"{name}-rank{rank}.pt"))


def checkpointed_fit(path: str, x_path: str, out: str | None, delay: float = 0.0,
                     resume: bool = False, max_epochs: int = 6) -> dict:
    """The kill-and-resume test's fit (one process, one thread): a memory-mapped ``.npy`` read
    through ``SlowRows``, a checkpoint after every epoch at ``path`` (``resume``: continue
    from it); writes the model's state and history to ``out``."""
    import numpy as np

    from pyroflows.density import DensityEstimator

    torch.set_num_threads(1)
    x = np.load(x_path, mmap_mode="r")
    est = DensityEstimator("maf", num_layers=2, hidden_dims=(16,), seed=5)
    est.fit(SlowRows(x, delay), max_epochs=max_epochs, batch_size=50, progress=False,
            patience=100, checkpoint=path, resume=path if resume else None)
    result = {"state": est._model.state_dict(), "history": est.history_}
    if out is not None:
        torch.save(result, out)
    return result


class InterruptedRows(torch.utils.data.Dataset):
    """An ``ArrayDataset`` whose ``fetches``-th batch fetch raises ``KeyboardInterrupt``
    (Ctrl-C reaching one rank mid-epoch; ``fetches`` None: never)."""

    def __init__(self, x, fetches: int | None) -> None:
        from pyroflows.density.streaming import ArrayDataset

        self.rows, self.fetches, self.done = ArrayDataset(x), fetches, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __getitems__(self, indices):
        self.done += 1
        if self.done == self.fetches:
            raise KeyboardInterrupt
        return self.rows.batch(indices)


def interrupted_fit(rank: int, world: int, what: str, x, x_val, fetches: int, out: str) -> None:
    """A data-parallel fit (``what``: ``"density"``, a DensityEstimator, or ``"tabak"``)
    interrupted on rank 1 only (the density fit at rank 1's ``fetches``-th batch, the Tabak
    fit at its third check): where the interrupt comes back out of ``fit``, the rank writes
    ``"<what>-rank<rank>.pt"`` to ``out`` and lets it end the process. A rank that swallowed
    it would go on to collectives the others never meet."""
    from pyroflows.density import DensityEstimator
    from pyroflows.density.streaming import ArrayDataset
    from pyroflows.transforms import Tabak
    from pyroflows.transforms.tabak import fit as tabak_fit

    if what == "density":
        est = DensityEstimator("maf", num_layers=1, hidden_dims=(8,), seed=0,
                               dtype=torch.float64)
        try:
            est.fit(InterruptedRows(x, fetches if rank == 1 else None),
                    x_val=ArrayDataset(x_val), max_epochs=50, batch_size=20, patience=100,
                    progress=False)
        except KeyboardInterrupt:
            lp = float(est.log_prob(x_val).mean())
            torch.save({"history": est.history_, "val_log_prob": lp},
                       os.path.join(out, f"density-rank{rank}.pt"))
            raise
        return
    record = tabak_fit.standard_normal_log_prob
    calls = {"n": 0}

    def interrupting(z):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 5:  # two per check (training and held-out rows)
            raise KeyboardInterrupt
        return record(z)

    tabak_fit.standard_normal_log_prob = interrupting
    t = Tabak(x.shape[1], max_steps=40, check_every=4, seed=0)
    try:
        t.fit(x.chunk(world)[rank], x_val=x_val.chunk(world)[rank], progress=False)
    except KeyboardInterrupt:
        torch.save({"calls": calls["n"], "num_steps": t.num_steps},
                   os.path.join(out, f"tabak-rank{rank}.pt"))
        raise
    finally:
        tabak_fit.standard_normal_log_prob = record


class _Poisoned:
    """Batches whose second holds a row of 1e200 from the second pass on (the first is the
    statistics pass): a step skipped (its log-likelihood is -inf) once per epoch."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes > 1 and i == 1:
                batch = batch.clone()
                batch[0] = 1e200
            yield batch


def mismatched_fits(rank: int, world: int, x, out: str) -> None:
    """Data-parallel fits where the ranks' data disagree, each rank's own shard as batches:
    widths, contexts on one rank, a malformed batch on one rank (each a ValueError on every
    rank, no hang), an empty shard with the automatic split, float64 rows on one rank and
    float32 on the other, a skipped step per epoch. Writes each outcome per rank."""
    from pyroflows.density import DensityEstimator

    options = {"flow": "maf", "num_layers": 1, "hidden_dims": (8,), "seed": 0}
    fit = {"max_epochs": 2, "progress": False}
    mine = x[rank * 200:(rank + 1) * 200]
    batches = [mine[i:i + 50] for i in range(0, 200, 50)]
    other = {
        "width": [torch.cat([b, b[:, :1]], 1) for b in batches],
        "context": [(b, b[:, :1]) for b in batches],
        # (an iterable, not a list: a list with a 1-D entry is read as one array, which fails
        # on that rank before any collective, as any error does that a rank meets alone)
        "malformed": _Poisoned(batches[:2] + [batches[2].flatten()] + batches[3:]),
    }
    outcome = {}
    for case, theirs in other.items():
        data = theirs if rank == 1 else batches
        try:
            DensityEstimator(**options).fit(data, x_val=[mine[:20]], **fit)
            outcome[case] = "fitted"
        except ValueError as error:
            outcome[case] = str(error)
    shard = mine if rank == 0 else mine[:0]
    est = DensityEstimator(**options).fit(shard, **fit)
    outcome["empty shard"] = est._model.state_dict()
    rows = mine if rank == 0 else mine.float()
    outcome["dtype"] = str(DensityEstimator(**options).fit(rows, x_val=mine[:20], **fit)
                           ._model.flow.parts[-1].conditioner.flat_parameters.dtype)
    est = DensityEstimator(**options).fit(_Poisoned(batches), x_val=[mine[:20]],
                                          patience=100, **{**fit, "max_epochs": 3})
    outcome["skipped"] = est.history_["skipped_steps"]
    torch.save(outcome, os.path.join(out, f"mismatched-rank{rank}.pt"))
