"""The command line: --help, --version, and a short real demo run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyroflows
from pyroflows.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyroflows", *args], capture_output=True,
                          text=True, timeout=300)


def test_help_and_version():
    out = _run("demo", "--help")
    assert out.returncode == 0
    for option in ("--device", "--out", "--steps"):
        assert option in out.stdout
    out = _run("--version")
    assert out.returncode == 0 and pyroflows.__version__ in out.stdout


def test_demo_runs_and_writes_plots(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "150", "--epochs", "3", "--draws", "500", "--quick",
                 "--no-progress", "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^\s+(Auto\w+.*?)\s+(-?\d+\.\d+) ± (\d+\.\d+)\s+(-?\d+\.\d+)\s+(\d+\.\d+)",
                      text, flags=re.M)
    assert len(rows) == 3, text
    for _, elbo, _, kl, khat in rows:
        # ELBO <= log Z up to Monte Carlo error, so the printed KL is (almost) non-negative
        assert float(kl) > -0.05 and abs(float(elbo) + float(kl) - 1.877502) < 1e-3
        assert float(khat) < 5
    lls = dict(re.findall(r"^\s+(full-covariance Gaussian \(ML\)|MAF x5 \(whitened\))\s+"
                          r"(-?\d+\.\d+) ±", text, flags=re.M))
    assert float(lls["MAF x5 (whitened)"]) > float(lls["full-covariance Gaussian (ML)"])
    for name in ("u1_guides.png", "elbo_traces.png", "two_moons_density.png"):
        path = out_dir / name
        assert path.exists() and os.path.getsize(path) > 10_000, name
        assert str(path) in text
