"""Checkpoints of DensityEstimator.fit: a training process killed with SIGKILL after its first
checkpoint, resumed, reaches the uninterrupted fit's parameters and history; an in-memory fit
resumed from its checkpoint does too; resuming refuses (ValueError) a missing, foreign,
pickled-code or another fit's file, and runs none of its code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from density_data import SMALL, gaussian_data
from distributed_workers import checkpointed_fit

from pyroflows.density import DensityEstimator
from pyroflows.density.training import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

TESTS = os.path.dirname(os.path.abspath(__file__))


def _same_fit(a: dict, b: dict) -> None:
    for key in ("epoch", "val_log_prob", "train_log_prob", "best_epoch", "skipped_steps"):
        assert a["history"][key] == pytest.approx(b["history"][key], rel=1e-12, nan_ok=True), key
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 2))
    np.save(tmp_path / "rows.npy", np.stack([z[:, 0], z[:, 1] + 0.5 * z[:, 0] ** 2], 1))
    path = str(tmp_path / "fit.ckpt")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from distributed_workers import checkpointed_fit; "
            "checkpointed_fit(sys.argv[2], sys.argv[3], None, delay=0.05)")
    process = subprocess.Popen([sys.executable, "-c", code, TESTS, path,
                                str(tmp_path / "rows.npy")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(path):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint in 240 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(path)["epoch"]
    assert 1 <= killed_at < 6  # killed mid-fit, not after it
    resumed = checkpointed_fit(path, str(tmp_path / "rows.npy"), None, resume=True)
    assert read_checkpoint(path)["epoch"] == 6
    whole = checkpointed_fit(str(tmp_path / "whole.ckpt"), str(tmp_path / "rows.npy"), None)
    assert resumed["history"]["epoch"] == list(range(7))
    _same_fit(whole, resumed)


def test_in_memory_fit_resumes_to_the_uninterrupted_result(tmp_path, device, dtype):
    """An array fit stopped after 2 epochs (its last checkpoint) and resumed to 4 takes the
    4-epoch fit's steps; conditional, so the context's buffers travel too."""
    x, _, _ = gaussian_data(300, seed=0)
    c = x[:, :1] + np.random.default_rng(1).standard_normal((300, 1))
    options = {"device": device, "dtype": dtype, "seed": 3, **SMALL}
    fit = {"batch_size": 64, "progress": False, "patience": 50, "context": c}
    path = tmp_path / "fit.ckpt"
    DensityEstimator(**options).fit(x, max_epochs=2, checkpoint=path, **fit)
    assert read_checkpoint(path)["epoch"] == 2
    resumed = DensityEstimator(**options).fit(x, max_epochs=4, checkpoint=path, resume=path,
                                              **fit)
    whole = DensityEstimator(**options).fit(x, max_epochs=4, **fit)
    assert read_checkpoint(path)["epoch"] == 4
    _same_fit({"history": whole.history_, "state": whole._model.state_dict()},
              {"history": resumed.history_, "state": resumed._model.state_dict()})
    # a finished fit resumed takes no more steps
    again = DensityEstimator(**options).fit(x, max_epochs=4, resume=path, **fit)
    _same_fit({"history": whole.history_, "state": whole._model.state_dict()},
              {"history": again.history_, "state": again._model.state_dict()})


class Trap:
    """Unpickling it would write a file: a checkpoint loaded with code would show it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_what_is_not_this_fits_checkpoint(tmp_path):
    x, _, _ = gaussian_data(200, seed=2)
    fit = {"max_epochs": 1, "progress": False}
    est = DensityEstimator(seed=0, **SMALL)
    with pytest.raises(ValueError, match="no checkpoint at"):
        est.fit(x, resume=tmp_path / "missing.ckpt", **fit)
    marker = tmp_path / "ran"
    torch.save({"format": "pyroflows.DensityEstimator.checkpoint", "trap": Trap(str(marker))},
               tmp_path / "trap.ckpt")
    with pytest.raises(ValueError, match="were not unpickled"):
        est.fit(x, resume=tmp_path / "trap.ckpt", **fit)
    assert not marker.exists()
    est.fit(x, **fit).save(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a DensityEstimator fit's checkpoint"):
        est.fit(x, resume=tmp_path / "model.pt", **fit)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        est.fit(x, resume=tmp_path / "empty.ckpt", **fit)
    est.fit(x, checkpoint=tmp_path / "fit.ckpt", batch_size=32, **fit)
    with pytest.raises(ValueError, match="batch_size: 32 in the checkpoint, 64 now"):
        est.fit(x, resume=tmp_path / "fit.ckpt", batch_size=64, **fit)
    # other data of the same shape, other training or estimator options: each named
    same = {"resume": tmp_path / "fit.ckpt", "batch_size": 32, **fit}
    with pytest.raises(ValueError, match=r"the training rows \(their moments differ\)"):
        est.fit(x + 1.0, **same)
    with pytest.raises(ValueError, match="lr: .* in the checkpoint, 0.5 now"):
        est.fit(x, lr=0.5, **same)
    with pytest.raises(ValueError, match="weight_decay: 0.0 in the checkpoint, 0.1 now"):
        est.fit(x, weight_decay=0.1, **same)
    with pytest.raises(ValueError, match="flow_options: .*Tanh"):
        DensityEstimator(seed=0, flow_options={"activation": torch.nn.Tanh}, **SMALL).fit(
            x, **same)
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 now"):
        DensityEstimator(seed=1, **SMALL).fit(x, x_val=x[:20], **same)
    good = torch.load(tmp_path / "fit.ckpt", weights_only=True)
    for key, value in (("signature", [1]), ("best_state", None), ("clip", "abc")):
        torch.save({**good, key: value}, tmp_path / "tampered.ckpt")  # (AttributeError before)
        with pytest.raises(ValueError, match="tampered.ckpt is damaged"):
            est.fit(x, **{**same, "resume": tmp_path / "tampered.ckpt"})
    est.fit(x, **same)  # the same fit resumes
    seedless = DensityEstimator(**SMALL)  # another held-out split at every call
    seedless.fit(x, checkpoint=tmp_path / "seedless.ckpt", batch_size=32, **fit)
    with pytest.raises(ValueError, match="pass the same seed= to fit and to resume"):
        seedless.fit(x, **{**same, "resume": tmp_path / "seedless.ckpt"})
    with pytest.raises(ValueError, match="checkpoint: the folder .*missing does not exist"):
        est.fit(x, checkpoint=tmp_path / "missing" / "fit.ckpt", **fit)  # (after an epoch)
    with pytest.raises(ValueError, match="checkpoint_every"):
        est.fit(x, checkpoint=tmp_path / "fit.ckpt", checkpoint_every=0, **fit)
    with pytest.raises(ValueError, match="choose precondition"):
        DensityEstimator(precondition="auto", **SMALL).fit(x, checkpoint=tmp_path / "a", **fit)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refused_resume_keeps_the_fitted_model(tmp_path, streamed):
    """The checkpoint is checked before the estimator lets go of its model: a streamed fit
    replaced it with an untrained one, then refused."""
    from pyroflows.density.streaming import ArrayDataset

    x, _, _ = gaussian_data(200, seed=2)
    data = ArrayDataset(x) if streamed else x
    fit = {"max_epochs": 1, "progress": False, "batch_size": 32}
    DensityEstimator(seed=0, **SMALL).fit(data, checkpoint=tmp_path / "other.ckpt", **fit)
    est = DensityEstimator(seed=0, **SMALL).fit(ArrayDataset(x + 1.0) if streamed else x + 1.0,
                                                **fit)
    before, history = est.log_prob(x[:5]), est.history_
    with pytest.raises(ValueError, match="the checkpoint of another fit"):
        est.fit(ArrayDataset(x + 1.0) if streamed else x + 1.0, resume=tmp_path / "other.ckpt",
                **fit)
    assert torch.equal(est.log_prob(x[:5]), before) and est.history_ is history
