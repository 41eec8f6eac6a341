"""DensityEstimator.fit data-parallel over 2 gloo processes on the CPU against the one-process
fit: the same global batches and seed give the same parameters and scores up to float rounding
(a Dataset every rank passes, rows alone and with contexts); early stopping decides alike on
every rank; arrays are each rank's own shard, and the ranks still agree exactly; only rank 0
writes the checkpoint. (CPU whatever ``--device`` says: gloo's collectives are the CPU's.)"""

from __future__ import annotations

import pytest
import torch
from distributed_workers import density_fits, mismatched_fits, run_ranks

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
    assert [len(state[1]) for state in checkpoint["rng"]["python"]] == [625, 625]  # (each rank's)


def test_ranks_whose_data_disagree_get_one_answer(tmp_path):
    """Each hung or aborted (gloo's 'collective mismatch') before: widths or contexts that differ
    between the ranks, a malformed batch on one rank (a ValueError there alone), an empty shard
    with the automatic held-out split (an endless loop), float64 rows on one rank and float32
    on the other (two models of different dtypes); and a skipped step was counted once per
    rank."""
    y, _ = _data(400, 3)
    run_ranks(mismatched_fits, 2, y, str(tmp_path), timeout=240)
    a, b = (torch.load(tmp_path / f"mismatched-rank{r}.pt") for r in range(2))
    for case, match in (("width", "batches differ: 2 to 3 columns"),
                        ("context", "-1 to 1 context columns"),
                        ("malformed", "batch 2's rows must be a real 2-D array")):
        assert match in b[case], (case, b[case])  # (rank 1 holds the odd data)
        assert match in a[case] or "another process met bad data" in a[case], (case, a[case])
    for key, value in a["empty shard"].items():
        torch.testing.assert_close(b["empty shard"][key], value, rtol=0, atol=0, msg=key)
    assert a["dtype"] == b["dtype"] == "torch.float64"
    assert a["skipped"] == b["skipped"] == 3
