"""The data-parallel SVI recipe (``examples/ddp_svi.py``) under ``torchrun`` with 2 gloo
processes on the CPU, against the same script in one process on all the rows: with the same
draws on every rank, the same guide parameters up to float rounding."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "ddp_svi.py")
ARGS = ["--rows", "600", "--steps", "15", "--particles", "4", "--same-draws", "--no-laplace"]


def _script():
    spec = importlib.util.spec_from_file_location("ddp_svi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_take_the_one_process_steps(tmp_path):
    one = _script().main(ARGS)
    out = tmp_path / "guide.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         SCRIPT, *ARGS, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    assert one.keys() == two.keys() and len(one) > 2
    moved = 0
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-8, atol=1e-10, msg=name)
        moved += int(name.startswith("flow"))
    assert moved  # the flow's parameters are among those compared
    assert "posterior median" in done.stdout and done.stdout.count("posterior median") == 1
