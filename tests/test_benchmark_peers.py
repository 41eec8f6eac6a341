"""The benchmarks without their peers (zuko, nflows, sbi: the ``[bench]`` extra, not pyroflows'
dependencies): every script's ``--help`` and its smallest run, in a subprocess from the
repository root where the peers cannot be imported (``sys.modules[name] = None``), exit 0; a
default run leaves a missing peer's rows out with one printed note, and a command line that
names a missing peer stops with a usage error naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import peers

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("zuko", "nflows", "sbi")
# runs benchmarks.<module> as ``python -m`` would, with the peers unimportable
WRAPPER = """
import runpy, sys
for name in {peers!r}:
    sys.modules[name] = None
sys.argv = [{module!r}] + sys.argv[1:]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
# every script's --help in one process (one import of torch and Pyro for all six)
HELP = """
import runpy, sys
for name in {peers!r}:
    sys.modules[name] = None
for module in {modules!r}:
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        print(f"EXIT {{module}} {{stop.code}}", flush=True)
"""
SCRIPTS = ("amortized", "conditional_speed", "density", "distill", "speed", "sbi")


def without_peers(module: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = WRAPPER.format(peers=PEERS, module=f"benchmarks.{module}")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_every_script_answers_help_without_its_peers():
    modules = [f"benchmarks.{s}" for s in SCRIPTS]
    code = HELP.format(peers=PEERS, modules=modules)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for module in modules:
        assert f"EXIT {module} 0" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count("usage:") == len(modules)


def _check(done: subprocess.CompletedProcess, note: str) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ModuleNotFoundError" not in done.stderr
    assert note in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("not installed:") == 1  # one note
    return done.stdout


def test_amortized_leaves_zuko_out(tmp_path):
    out = tmp_path / "amortized.md"
    stdout = _check(without_peers("amortized", "--seeds", "0", "--epochs", "1", "--batch", "500",
                                  "--samples", "20", "--chunk", "20", "--out", str(out)),
                    "zuko not installed: its rows are left out")
    table = out.read_text()
    assert "| iaf K=2 | pyro |" in table and "| iaf K=2 | zuko |" not in table
    assert "zuko not installed." in table  # the header's versions
    assert "zuko's gain" not in stdout


def test_conditional_speed_leaves_zuko_out():
    stdout = _check(without_peers("conditional_speed", "--rounds", "1", "--steps", "1"),
                    "zuko not installed: its cases are left out")
    assert stdout.count("pyroflows") == 4 and "pyro " in stdout and "zuko" not in stdout


def test_density_leaves_zuko_and_nflows_out(tmp_path):
    out = tmp_path / "density.md"
    stdout = _check(without_peers("density", "--quick", "--datasets", "U3", "--out", str(out)),
                    "zuko, nflows not installed: their rows are left out")
    table = out.read_text()
    assert "| U3 | ours MAF |" in table and "| U3 | pyro coupling |" in table
    assert "zuko" not in table and "nflows" not in table and "| U3 | ours MAF |" in stdout


def test_density_stops_on_a_missing_peer_asked_for():
    done = without_peers("density", "--quick", "--datasets", "U3", "--models", "ours MAF,zuko MAF")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "zuko not installed (asked for by --models)" in done.stderr
    assert "[bench]" in done.stderr


def test_distill_shows_a_dash_for_the_missing_peers(tmp_path):
    out = tmp_path / "distill.md"
    _check(without_peers("distill", "--dims", "2", "--n-train", "1000", "--n-test", "500",
                         "--epochs", "1", "--patience", "1", "--steps", "10", "--draws", "256",
                         "--rounds", "1", "--out", str(out)),
           "zuko, nflows not installed: their columns show –")
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 13 and cells[9] == cells[10] == cells[12] == "–", cells
    assert cells[11].endswith("x")  # student ÷ teacher


def test_speed_leaves_zuko_and_nflows_out():
    stdout = _check(without_peers("speed", "--sizes", "D=8", "--rounds", "1", "--steps", "1",
                                  "--warmup", "1", "--slow-rounds", "1", "--slow-warmup", "0",
                                  "--samples", "200", "--tabak-steps", "2"),
                    "zuko, nflows not installed: their rows are left out")
    assert "| 1 | maf, D=8 | pyro |" in stdout and "| 5 | maf sampling" in stdout
    assert "| zuko |" not in stdout and "| nflows |" not in stdout


def test_speed_stops_on_a_missing_peer_asked_for():
    done = without_peers("speed", "--libraries", "pyroflows", "zuko")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "zuko not installed (asked for by --libraries)" in done.stderr
    assert "[bench]" in done.stderr


def test_sbi_runs_pyroflows_alone(tmp_path):
    out, jsonl = tmp_path / "sbi.md", tmp_path / "sbi.jsonl"
    _check(without_peers("sbi", "--quick", "--tasks", "two_moons", "--c2st-cells", "none",
                         "--jsonl", str(jsonl), "--out", str(out)),
           "sbi not installed: its rows are left out")
    table = out.read_text()
    assert "sbi not installed" in table and "| two_moons | 1000 | pyroflows |" in table
    assert "| sbi |" not in table and '"method": "sbi"' not in jsonl.read_text()


def test_peers_helper(monkeypatch):
    monkeypatch.setitem(sys.modules, "zuko", None)
    assert not peers.available("zuko") and peers.available("torch")
    assert not peers.available("no_such_package_xyz")
    assert peers.missing(["torch", "zuko", "zuko"]) == ["zuko"]
    assert peers.missing_note(["torch"]) == ""
    assert peers.missing_note(["zuko"]) == (
        "zuko not installed: its rows are left out (pip install -e '.[bench]')")
    assert peers.version("zuko") == "not installed"


def test_with_the_peers_every_row_stays(monkeypatch):
    """With every peer installed (taken as installed here, so that it runs without the
    [bench] extra too), the row selections are the full lists, as before the peers check."""
    from benchmarks import amortized, conditional_speed, density, sbi, speed

    monkeypatch.setattr(peers, "available", lambda name: True)

    assert amortized._rows(None) == amortized.ROWS
    assert conditional_speed.installed_cases() == conditional_speed.CASES
    assert speed.installed(speed.DEFAULT_LIBRARIES) == list(speed.DEFAULT_LIBRARIES)
    assert sbi.installed_methods() == sbi.METHODS
    assert density.select_models(None, density.MODELS, None) == density.MODELS
