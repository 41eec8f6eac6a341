"""Train a flow guide data-parallel with PyTorch's DistributedDataParallel.

Each process (rank) holds a shard of the data rows; its model scores the shard inside a
``pyro.plate`` whose ``subsample`` is the shard's row numbers, so Pyro scales the shard's
log-likelihood by ``num_rows / shard_rows`` and each rank's loss is an unbiased estimate of
the whole data's negative ELBO. Pyro's ``ELBO(...)(model, guide)`` is an ``nn.Module`` whose
forward is that loss (``pyro.infer.elbo.ELBOModule``); wrapped in ``DistributedDataParallel``,
its backward all-reduces (averages) the gradients, so every rank takes the same optimizer step
and the guide's parameters stay identical on every rank (DDP starts them from rank 0's).

Run it on one machine with 2 processes on the CPU (gloo), or one per GPU (NCCL)::

    torchrun --nproc_per_node=2 examples/ddp_svi.py --steps 1000
    python examples/ddp_svi.py --steps 1000          # the same, in one process

Draws: each rank draws its own particles (seed + rank), so N ranks average N times as many
draws per step. ``--same-draws`` gives every rank the same seed instead: then the ranks' mean
gradient is the one-process gradient on all rows with those draws, and N processes take the
one-process steps up to float rounding (``tests/test_distributed_svi.py`` checks it).

The Laplace start (``laplace_init``) is found on rank 0's shard, whose likelihood the plate
scales to the whole data's: an approximation of the whole data's start, which DDP copies to
every rank. ``--no-laplace`` starts from the prior's median instead.
"""

from __future__ import annotations

import argparse
import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

import pyroflows as pf


def logistic_regression(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
                        num_rows: int) -> None:
    """Bayesian logistic regression: w ~ N(0, I), b ~ N(0, 1), y_i ~ Bernoulli(sigmoid(x_i w +
    b)) for the rows ``rows`` (global row numbers) of ``num_rows``."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", num_rows, subsample=rows):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)  # w: (..., 1, D)


def make_data(num_rows: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The same synthetic rows on every rank: features N(0, I), true w = (1, -1, 0.5, ...)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_rows, dim, generator=g, dtype=dtype)
    w = torch.tensor([(-1.0) ** i / (1 + i // 2) for i in range(dim)], dtype=dtype)
    y = torch.bernoulli(torch.sigmoid(x @ w + 0.3), generator=g)
    return x, y


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-draws", action="store_true")
    parser.add_argument("--no-laplace", action="store_true")
    parser.add_argument("--out", default=None, help="rank 0 saves the guide's state_dict here")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                          if torch.cuda.is_available() else "cpu")
    pyro.set_rng_seed(args.seed + (0 if args.same_draws else rank))
    pyro.clear_param_store()

    x, y = make_data(args.rows, args.dim, torch.float64)
    rows = torch.arange(args.rows).chunk(world)[rank]  # this rank's shard
    data = (x[rows].to(device), y[rows].to(device), rows.to(device), args.rows)

    guide = pf.guides.AutoIAF(logistic_regression, laplace_init=not args.no_laplace)
    guide(*data)  # set up the guide on this rank's shard (its flow, its start)
    elbo = pf.guides.FlowELBO(num_particles=args.particles, vectorize_particles=True,
                              max_plate_nesting=1)
    loss_module = elbo(logistic_regression, guide)  # an nn.Module: forward() is the loss
    if distributed:
        loss_module = DistributedDataParallel(loss_module)  # copies rank 0's parameters
    optimizer = torch.optim.Adam(guide.param_groups())  # the family's step sizes

    for step in range(args.steps):
        optimizer.zero_grad()
        loss = loss_module(*data)
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:5d}  loss (rank 0's estimate) {loss.item():.2f}")

    state = {k: v.detach().cpu() for k, v in guide.state_dict().items()}
    if rank == 0:
        median = guide.median(*data)
        print("posterior median w:", [round(v, 3) for v in median["w"].tolist()],
              " b:", round(float(median["b"]), 3))
        if args.out:
            torch.save(state, args.out)
    if distributed:
        torch_dist.barrier()  # no rank tears the group down while another still uses it
        torch_dist.destroy_process_group()
    return state


if __name__ == "__main__":
    main()
