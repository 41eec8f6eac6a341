"""Tabak's fit data-parallel over 2 gloo processes on the CPU (each rank a shard of the rows)
against the one-process fit of all the rows: the same steps up to float rounding. (CPU
whatever ``--device`` says: gloo's collectives are the CPU's.)"""

from __future__ import annotations

import pytest
import torch
from distributed_workers import run_ranks, tabak_fits

from pyroflows.transforms import Tabak

OPTIONS = {"max_steps": 60, "check_every": 20, "seed": 3, "num_rotations": 2}


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return torch.stack([z[:, 0], z[:, 1] + 0.5 * z[:, 0] ** 2, torch.sinh(z[:, 2])], -1)


def test_two_ranks_take_the_one_process_steps(tmp_path):
    """Given held-out shards: both ranks keep the one-process fit's steps, parameters and
    checks. Holding out rows of their own shards (with the seed given, and with one drawn on
    rank 0): the ranks agree exactly."""
    x, x_val = _data(400, 0), _data(100, 1)
    one = Tabak(3, **OPTIONS).fit(x, x_val=x_val, progress=False)
    assert one.num_steps > 10  # the data makes the fit take steps
    fits = [("given", x, x_val, OPTIONS), ("own", _data(500, 2), None, OPTIONS),
            ("drawn", _data(500, 2), None, {**OPTIONS, "seed": None})]
    run_ranks(tabak_fits, 2, fits, str(tmp_path))
    for rank in range(2):
        saved = torch.load(tmp_path / f"given-rank{rank}.pt")
        assert saved["best_step"] == one.best_step
        for name, value in one.state_dict().items():
            torch.testing.assert_close(saved["state"][name], value, rtol=1e-9, atol=1e-9,
                                       msg=f"rank {rank}: {name}")
        for key in ("train_log_prob", "val_log_prob"):
            torch.testing.assert_close(torch.tensor(saved["history"][key]),
                                       torch.tensor(one.history[key]), rtol=1e-10, atol=1e-10)
    for case in ("own", "drawn"):
        a, b = (torch.load(tmp_path / f"{case}-rank{r}.pt") for r in range(2))
        assert a["best_step"] == b["best_step"] and a["history"] == b["history"]
        for name, value in a["state"].items():
            torch.testing.assert_close(b["state"][name], value, rtol=0, atol=0, msg=name)
    assert torch.load(tmp_path / "own-rank0.pt")["best_step"] > 0  # (seeded: it took steps)


def test_distributed_true_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        Tabak(3, max_steps=5).fit(_data(50, 0), progress=False, distributed=True)
