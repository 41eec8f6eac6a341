"""Fit a DensityEstimator data-parallel under ``torchrun``, streaming a memory-mapped file.

Every process (rank) opens the same ``.npy`` memory-mapped and passes it as an
``ArrayDataset``: ``fit`` shares each global batch of ``--batch-size`` rows out among the ranks
(rank r reads every N-th row of it, a batch at a time; the file is never loaded whole),
all-reduces the gradients, so every rank takes the one-process step, and all-reduces the
validation sums, so early stopping and the best state are decided alike on every rank. Only
rank 0 shows progress (with rows per second), writes the checkpoints and saves the model.

Run it on one machine with 2 processes on the CPU (gloo), or one per GPU (NCCL)::

    torchrun --nproc_per_node=2 examples/ddp_density.py --data rows.npy --out density.pt
    python examples/ddp_density.py --data rows.npy --out density.pt   # one process, same fit

Without ``--data`` it writes a demo file of curved 8-D rows first (``--demo-rows`` of them,
``demo_rows_<n>.npy``, reused by later runs of the same size).
The global batch (default 2048) is shared out among the ranks: on CPU cores a rank's share
should be a thousand rows or more, or each step's fixed costs (every rank's optimizer step,
the all-reduce) take the gain (``benchmarks/results/scale.md``). A killed run continues from
its checkpoint with ``--resume`` (same data, options and number of processes) to the result of
an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

import pyroflows as pf
from pyroflows.density.streaming import ArrayDataset


def demo_rows(path: str, n: int = 50_000, dim: int = 8, seed: int = 0) -> None:
    """Curved, correlated rows written to ``path`` a chunk at a time."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 10_000):
        z = rng.standard_normal((min(10_000, n - start), dim))
        z[:, 1::2] += 0.5 * z[:, 0::2] ** 2
        out[start:start + z.shape[0]] = z
    out.flush()


def main(argv: list[str] | None = None) -> pf.DensityEstimator:
    """Parse ``argv`` (default: the command line), fit, save on rank 0; return the estimator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a .npy of rows (n, D); default: a demo file")
    parser.add_argument("--demo-rows", type=int, default=50_000, help="rows of the demo file")
    parser.add_argument("--out", default="density.pt", help="where rank 0 saves the model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2048, help="the global batch")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--checkpoint", default="density.ckpt")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args(argv)

    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = "cpu"
    if parallel:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        torch.set_num_threads(1)  # one core per process
    rank = dist.get_rank() if parallel else 0
    if args.data is None:  # (named by its size: another --demo-rows is another file)
        args.data = f"demo_rows_{args.demo_rows}.npy"
        if rank == 0 and not os.path.exists(args.data):
            demo_rows(args.data, args.demo_rows)
        if parallel:
            dist.barrier()  # the file is written before anyone reads it
    rows = np.load(args.data, mmap_mode="r")  # every rank maps the whole file
    est = pf.DensityEstimator("maf", num_layers=args.layers, hidden_dims=tuple(args.hidden),
                              seed=0, device=device)
    est.fit(ArrayDataset(rows), max_epochs=args.epochs, batch_size=args.batch_size,
            checkpoint=args.checkpoint, resume=args.checkpoint if args.resume else None,
            progress=rank == 0)
    if rank == 0:
        history = est.history_
        print(f"{history['processes']} process(es): best validation log-likelihood "
              f"{history['best_val_log_prob']:.4f} at epoch {history['best_epoch']}, "
              f"{np.median(history['rows_per_second']):.0f} rows/s")
        est.save(args.out)
    if parallel:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    return est


if __name__ == "__main__":
    main()
