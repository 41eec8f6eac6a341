"""DensityEstimator.fit data-parallel over 2 gloo processes on the CPU against the one-process
fit: the same global batches and seed give the same parameters and scores up to float rounding
(a Dataset every rank passes, rows alone and with contexts); early stopping decides alike on
every rank; arrays are each rank's own shard, and the ranks still agree exactly; only rank 0
writes the checkpoint. (CPU whatever ``--device`` says: gloo's collectives are the CPU's.)"""

from __future__ import annotations

import pytest
import torch
from distributed_workers import density_fits, run_ranks

from pyroflows.density import DensityEstimator
from pyroflows.density.streaming import ArrayDataset
from pyroflows.density.training import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

OPTIONS = {"flow": "maf", "num_layers": 2, "hidden_dims": (16,), "seed": 0,
           "dtype": torch.float64}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Curved 2-D rows and a 1-D context that shifts them."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.stack([z[:, 0] + z[:, 2], z[:, 1] + 0.5 * z[:, 0] ** 2], -1)
    return y, z[:, 2:]


def test_two_ranks_take_the_one_process_steps(tmp_path):
    y, c = _data(500, 0)
    y_val, c_val = _data(100, 1)
    rows = {"max_epochs": 2, "batch_size": 64, "lr": 5e-3}
    # patience 0 with a large step size: early stopping must decide alike on every rank
    stopping = {"max_epochs": 5, "batch_size": 100, "lr": 0.1, "patience": 0}
    fits = [
        ("rows", y, y_val, OPTIONS, {**rows, "checkpoint": str(tmp_path / "rows.ckpt")}),
        ("context", (y, c), (y_val, c_val), OPTIONS, rows),
        ("stopping", y, None, OPTIONS, stopping),
        ("shard", y, y_val, OPTIONS, {**rows, "shard": True}),
    ]
    run_ranks(density_fits, 2, fits, str(tmp_path))
    one = {
        "rows": DensityEstimator(**OPTIONS).fit(ArrayDataset(y), x_val=ArrayDataset(y_val),
                                                progress=False, **rows),
        "context": DensityEstimator(**OPTIONS).fit(ArrayDataset(y, c),
                                                   x_val=ArrayDataset(y_val, c_val),
                                                   progress=False, **rows),
        "stopping": DensityEstimator(**OPTIONS).fit(ArrayDataset(y), progress=False, **stopping),
    }
    assert one["stopping"].history_["stopped"] == "early_stopping"
    assert one["rows"].history_["best_val_log_prob"] > one["rows"].history_[
        "initial_val_log_prob"] + 0.05  # the fit moved: the comparison is not of starts
    for name, est in one.items():
        for rank in range(2):
            saved = torch.load(tmp_path / f"{name}-rank{rank}.pt")
            history = saved["history"]
            assert history["processes"] == 2
            assert history["best_epoch"] == est.history_["best_epoch"], (name, rank)
            assert history["stopped"] == est.history_["stopped"], (name, rank)
            assert history["num_train"] == est.history_["num_train"]
            torch.testing.assert_close(torch.tensor(history["val_log_prob"]),
                                       torch.tensor(est.history_["val_log_prob"]),
                                       rtol=1e-10, atol=1e-10)
            for key, value in est._model.state_dict().items():
                torch.testing.assert_close(saved["state"][key], value, rtol=1e-9, atol=1e-9,
                                           msg=f"{name}, rank {rank}: {key}")
    a, b = (torch.load(tmp_path / f"shard-rank{r}.pt") for r in range(2))
    assert a["history"]["num_train"] == 500  # both shards' rows
    assert a["history"]["val_log_prob"] == b["history"]["val_log_prob"]
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=0, atol=0, msg=key)
    # rank 0 alone wrote the checkpoint, after the last epoch, with rank 0's final state
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["rows.ckpt"]
    checkpoint = read_checkpoint(tmp_path / "rows.ckpt")
    assert checkpoint["epoch"] == 2 and checkpoint["signature"]["processes"] == 2
    assert len(checkpoint["rng"]["torch"]) == 2
