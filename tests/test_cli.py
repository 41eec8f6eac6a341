"""The command line: --help, --version, and a short real demo run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import pyroflows
from pyroflows import cli
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


def test_demo_runs_and_writes_plots(capsys, caplog, tmp_path):
    """A short real run. Its output has no progress bars (not a terminal), no Pyro INFO lines
    and no warnings; the printed KL and gaps to the true densities are consistent."""
    out_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "150", "--epochs", "3", "--draws", "500", "--quick",
                 "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert captured.err == "", captured.err  # tqdm writes to stderr: nothing there off a terminal
    assert "INFO" not in text and "max_plate_nesting" not in text and "Warning" not in text
    assert not [r for r in caplog.records if r.name.startswith("pyro")]
    rows = re.findall(r"^\s+(Auto\w+.*?)\s+(-?\d+\.\d+) ± (\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)",
                      text, flags=re.M)
    assert len(rows) == 3, text
    for _, elbo, _, kl, khat in rows:
        # ELBO <= log Z up to Monte Carlo error, so the printed KL is (almost) non-negative
        assert float(kl) > -0.05 and abs(float(elbo) + float(kl) - 1.877502) < 1e-3
        assert float(khat) < 5  # PSIS' k-hat may be negative: light-tailed weights
    gaps = dict(re.findall(r"^\s+(full-covariance Gaussian \(ML\)|MAF x5 \(whitened\)|"
                           r"MAF x5, Tabak-preconditioned)\s+-?\d+\.\d+\s+(-?\d+\.\d+) ±",
                           text, flags=re.M))
    assert len(gaps) == 3, text
    for name, gap in gaps.items():  # a KL divergence, up to Monte Carlo error
        assert float(gap) > -0.05, (name, gap)
    for name in ("u1_guides.png", "elbo_traces.png", "student_t_density.png"):
        path = out_dir / name
        assert path.exists() and os.path.getsize(path) > 10_000, name
        assert str(path) in text


def test_the_demo_quiets_pyro_and_arviz_only_while_it_runs():
    import logging
    import warnings

    logger = logging.getLogger("pyro")
    level, filters = logger.level, list(warnings.filters)
    with cli._quiet():
        assert not logger.isEnabledFor(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:  # keeps the demo's filters
            warnings.warn_explicit("ArviZ is changing", FutureWarning, "x.py", 1,
                                   module="arviz.data")
            warnings.warn_explicit("yours", FutureWarning, "y.py", 1, module="mine")
        assert [str(w.message) for w in caught] == ["yours"]
    assert logger.level == level and warnings.filters == filters


def _unwritable_folder(tmp_path) -> str:
    """A folder no file can be created in: a read-only one, or where the tests run as root
    (which permissions do not stop) one of the kernel's (/sys)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder) if not os.access(folder, os.W_OK) else "/sys/pyroflows-demo"


BAD_ARGUMENTS = [
    ("an existing file", r"--out .*taken\.png is an existing file, not a folder"),
    ("a folder under a file", r"--out .*taken\.png/plots: cannot write there \(Not a directory"),
    ("an unwritable folder", r"--out .*: cannot write there \((Permission denied|Operation not)"),
    ("tpu", r"--device: 'tpu' is not a torch device \(e\.g\. 'cpu', 'cuda'"),
    ("cuda:99", r"--device: device 'cuda:99' is not available on this machine"),
    ("no steps", r"--steps and --epochs must be positive"),
    ("one draw", r"--draws must be at least 2, got 1"),  # (PSIS failed after all the fits)
    ("a negative seed", r"--seed must be in \[0, 2\*\*32\), got -1"),
    ("a seed of 2**64", r"--seed must be in \[0, 2\*\*32\), got 18446744073709551616"),
]


@pytest.mark.parametrize("case,match", BAD_ARGUMENTS, ids=[case for case, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_status_2_before_any_work(case, match, tmp_path,
                                                                 monkeypatch, capsys):
    """Each bad argument of ``pyroflows demo`` ends it at once, before anything is fitted, with
    argparse's exit status 2 and one line on stderr that names the argument."""
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"a plot")
    args = {"an existing file": ["--out", str(taken)],
            "a folder under a file": ["--out", str(taken / "plots")],
            "an unwritable folder": ["--out", _unwritable_folder(tmp_path)],
            "tpu": ["--device", "tpu"], "cuda:99": ["--device", "cuda:99"],
            "no steps": ["--steps", "0"], "one draw": ["--draws", "1"],
            "a negative seed": ["--seed", "-1"], "a seed of 2**64": ["--seed", str(2**64)]}[case]
    if case not in ("an existing file", "a folder under a file", "an unwritable folder"):
        args += ["--out", str(tmp_path / "plots")]

    def no_work(*_):
        raise AssertionError("the demo started working before its arguments were checked")

    monkeypatch.setattr(cli, "_fit_guides", no_work)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *args])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"pyroflows demo: error: " + match + r"[^\n]*\n", captured.err), \
        captured.err
    assert taken.read_bytes() == b"a plot"


def test_a_bad_argument_from_the_shell_gets_no_traceback(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    out = _run("demo", "--out", str(taken))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"pyroflows demo: error: --out {taken} is an existing file, not a " \
        "folder\n"
