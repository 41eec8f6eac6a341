"""The command line: --help, --version, and a short real demo run."""

from __future__ import annotations

import re
import subprocess
import sys

import pyroflows
from pyroflows.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyroflows", *args], capture_output=True,
                          text=True, timeout=300)


def test_help_and_version():
    out = _run("--help")
    assert out.returncode == 0 and "demo" in out.stdout
    out = _run("--version")
    assert out.returncode == 0 and pyroflows.__version__ in out.stdout


def test_demo_kl_falls(capsys):
    assert main(["demo", "--steps", "300", "--layers", "8"]) == 0
    text = capsys.readouterr().out
    kls = [float(m) for m in re.findall(r"^\s*\d+\s+(-?\d+\.\d+)\s", text, flags=re.M)]
    assert len(kls) >= 5
    assert kls[-1] < 0.5 * kls[0]
    final = float(re.search(r"Final KL\(q \|\| p\) = (-?\d+\.\d+)", text).group(1))
    assert 0 <= final < 1.5
