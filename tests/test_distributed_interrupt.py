"""Ctrl-C reaching one rank of a data-parallel fit: the ranks cannot agree on where they
stopped without the collectives the interrupted rank has left, so ``fit`` keeps the best state
on that rank (as in one process) and lets the interrupt end it; the launcher (here
``mp.spawn``, as ``torchrun``) then ends the others. No rank hangs."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from distributed_workers import interrupted_fit, run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.stack([z[:, 0], z[:, 1] + 0.5 * z[:, 0] ** 2], -1)


@pytest.mark.parametrize("what", ["density", "tabak"])
def test_an_interrupt_on_one_rank_ends_the_fit_on_every_rank(tmp_path, what):
    x, x_val = _rows(400, 0), _rows(100, 1)
    # rank 1's 65th batch of 10 rows: 20 in the statistics' pass, 20 an epoch (400 rows in
    # global batches of 20), so 5 batches into the third epoch
    # rank 1 ends by the interrupt; rank 0, in an all-reduce, by gloo's "connection closed (or
    # reset) by peer", whichever the launcher reports first
    with pytest.raises(mp.ProcessRaisedException, match="KeyboardInterrupt|by peer"):
        run_ranks(interrupted_fit, 2, what, x, x_val, 65, str(tmp_path), timeout=120)
    saved = torch.load(tmp_path / f"{what}-rank1.pt")
    assert not (tmp_path / f"{what}-rank0.pt").exists()  # rank 0 was ended, not interrupted
    if what == "density":
        history = saved["history"]
        assert history["stopped"] == "interrupted" and history["epoch"] == [0, 1, 2]
        # the best state is in place: its held-out score is the best epoch's
        assert saved["val_log_prob"] == pytest.approx(history["best_val_log_prob"], abs=1e-9)
    else:
        assert saved["calls"] == 5 and saved["num_steps"] == 0  # the transform as it was
