"""The data-parallel density recipe (``examples/ddp_density.py``) under ``torchrun`` with 2
gloo processes on the CPU: two epochs, killed (the run ends), resumed from its checkpoint to a
third, against the same script in one process for three epochs on the same memory-mapped file:
the same model up to float rounding, saved by rank 0 alone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyroflows as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "ddp_density.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("ddp_density", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_two_processes_resumed_match_one_process(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((700, 3))
    z[:, 1] += 0.5 * z[:, 0] ** 2
    data = tmp_path / "rows.npy"
    np.save(data, z)  # float64: the fit's dtype follows the file's
    common = ["--data", str(data), "--batch-size", "64", "--layers", "2", "--hidden", "16"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = _script().main([*common, "--epochs", "3", "--out", str(tmp_path / "one.pt"),
                          "--checkpoint", str(tmp_path / "one.ckpt")])
    assert one.history_["processes"] == 1
    assert next(one._model.parameters()).dtype == torch.float64
    two_args = [*common, "--out", str(tmp_path / "two.pt"), "--checkpoint",
                str(tmp_path / "two.ckpt")]
    first = _torchrun(*two_args, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    rates = pf.DensityEstimator.load(tmp_path / "two.pt").history_["rows_per_second"]
    second = _torchrun(*two_args, "--epochs", "3", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("2 process(es)") == 1  # rank 0 alone reports and saves
    two = pf.DensityEstimator.load(tmp_path / "two.pt")
    assert two.history_["processes"] == 2 and two.history_["epoch"][-1] == 3
    assert two.history_["rows_per_second"][:2] == rates  # epochs 1-2 from the checkpoint
    assert two.history_["best_val_log_prob"] > two.history_["initial_val_log_prob"] + 0.01
    torch.testing.assert_close(torch.tensor(two.history_["val_log_prob"]),
                               torch.tensor(one.history_["val_log_prob"]), rtol=1e-9, atol=1e-9)
    for key, value in one._model.state_dict().items():
        torch.testing.assert_close(two._model.state_dict()[key], value, rtol=1e-8, atol=1e-9,
                                   msg=key)
