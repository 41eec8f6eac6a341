"""Copy the benchmark material the tests, tutorials and benchmarks read into
``benchmarks/data/``: ``python benchmarks/data/copy_material.py SOURCE``, with ``SOURCE`` the
project's original benchmark folder (holding ``posteriordb/``, ``german_credit_logreg/``,
``rezende/``, ``synthetic/``, ``sbi/``). The copy is what the repository reads; this script
records how it was made, and is never run by the tests. Names after ``SOURCE`` copy only those
parts (``python benchmarks/data/copy_material.py SOURCE sbi``), leaving the other files as
they are (a ``.npz`` written again differs in its zip timestamps).

Reference draws are stored as float32 (their Monte-Carlo error, about 1e-2 standard deviations,
is far above float32's 1e-7) and thinned to every second draw of each chain, keeping every
chain; the Rezende box draws are copied whole; the German credit table is gzipped text
(``np.loadtxt`` reads ``.gz`` directly). Every ``.npz`` is ``np.savez_compressed``.

The two simulation-based inference tasks (sbibm's ``two_moons`` and ``gaussian_linear``, one
folder per observation holding ``observation.csv``, ``observation_seed.csv``,
``true_parameters.csv`` and ``reference_posterior_samples.csv.bz2``) become one file per task,
``sbi/<task>.npz``: ``observations`` (5, x dim), ``true_parameters`` (5, theta dim),
``observation_seeds`` (5,), ``reference_draws`` (5, 10000, theta dim), all draws kept. The
CSV files hold float32 values written out (each number is its float32's shortest decimal
form, which the copy checks), so the float32 arrays hold them without loss.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SBI_TASKS = ("two_moons", "gaussian_linear")
SBI_OBSERVATIONS = (1, 2, 3, 4, 5)
PARTS = ("posteriordb", "german_credit_logreg", "synthetic", "rezende", "sbi")
POSTERIORDB = ("eight_schools-eight_schools_noncentered", "eight_schools-eight_schools_centered",
               "kidiq-kidscore_interaction", "arK-arK", "low_dim_gauss_mix-low_dim_gauss_mix")


def thinned(src: str, dst: str) -> None:
    """``src``'s arrays with ``draws`` (chains, draws, params) or (draws, params) thinned by 2
    along the draws and stored as float32; other arrays as they are."""
    data = np.load(src)
    out = {}
    for key in data.files:
        value = data[key]
        if key == "draws":
            value = (value[:, ::2] if value.ndim == 3 else value[::2]).astype(np.float32)
        out[key] = value
    np.savez_compressed(dst, **out)


def _csv_row(path: str) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=1)


def sbi_task(bench: str, task: str, dst: str) -> None:
    """One sbibm task's observations 1-5 in one ``.npz`` (see the module docstring)."""
    out: dict[str, list] = {"observations": [], "true_parameters": [], "observation_seeds": [],
                            "reference_draws": []}
    for k in SBI_OBSERVATIONS:
        folder = os.path.join(bench, "sbi", task, f"num_observation_{k}")
        out["observations"].append(_csv_row(os.path.join(folder, "observation.csv")))
        out["true_parameters"].append(_csv_row(os.path.join(folder, "true_parameters.csv")))
        seed, number = _csv_row(os.path.join(folder, "observation_seed.csv"))
        if int(number) != k:
            raise ValueError(f"{folder}: observation_seed.csv is for observation {number}")
        out["observation_seeds"].append(int(seed))
        out["reference_draws"].append(np.loadtxt(
            os.path.join(folder, "reference_posterior_samples.csv.bz2"), delimiter=",",
            skiprows=1))
    arrays = {key: np.asarray(value, dtype=np.int64 if key == "observation_seeds"
                              else np.float64) for key, value in out.items()}
    for key in ("observations", "true_parameters", "reference_draws"):
        single = arrays[key].astype(np.float32)
        # Each number in the file is its float32's shortest decimal form: nothing is lost.
        shortest = np.array([float(str(v)) for v in single.ravel()])
        if not np.array_equal(shortest, arrays[key].ravel()):
            raise ValueError(f"{task}: {key} is not float32 values written out")
        arrays[key] = single
    np.savez_compressed(dst, **arrays)


def main(bench: str, parts: tuple[str, ...] = PARTS) -> None:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; the parts are {PARTS}")
    if "sbi" in parts:
        os.makedirs(os.path.join(HERE, "sbi"), exist_ok=True)
        for task in SBI_TASKS:
            sbi_task(bench, task, os.path.join(HERE, "sbi", f"{task}.npz"))
    if "posteriordb" in parts:
        for folder in POSTERIORDB:
            os.makedirs(os.path.join(HERE, "posteriordb", folder), exist_ok=True)
            shutil.copyfile(os.path.join(bench, "posteriordb", folder, "data.json"),
                            os.path.join(HERE, "posteriordb", folder, "data.json"))
            thinned(os.path.join(bench, "posteriordb", folder, "reference_draws.npz"),
                    os.path.join(HERE, "posteriordb", folder, "reference_draws.npz"))
    if "german_credit_logreg" in parts:
        german = os.path.join(HERE, "german_credit_logreg")
        os.makedirs(german, exist_ok=True)
        with open(os.path.join(bench, "german_credit_logreg", "german.data-numeric"), "rb") as f, \
                gzip.GzipFile(os.path.join(german, "german.data-numeric.gz"), "wb", mtime=0) as g:
            shutil.copyfileobj(f, g)
        shutil.copyfile(os.path.join(bench, "german_credit_logreg", "reference_summary.json"),
                        os.path.join(german, "reference_summary.json"))
        thinned(os.path.join(bench, "german_credit_logreg", "reference_draws.npz"),
                os.path.join(german, "reference_draws.npz"))
    if "synthetic" in parts:
        synthetic = os.path.join(HERE, "synthetic")
        os.makedirs(synthetic, exist_ok=True)
        shutil.copyfile(os.path.join(bench, "synthetic", "targets.json"),
                        os.path.join(synthetic, "targets.json"))
        for name in ("funnel10", "banana2d_b0.03", "banana2d_b0.1"):
            thinned(os.path.join(bench, "synthetic", f"{name}_exact_draws.npz"),
                    os.path.join(synthetic, f"{name}_exact_draws.npz"))
    if "rezende" in parts:
        os.makedirs(os.path.join(HERE, "rezende"), exist_ok=True)
        shutil.copyfile(os.path.join(bench, "rezende", "box_draws.npz"),
                        os.path.join(HERE, "rezende", "box_draws.npz"))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python benchmarks/data/copy_material.py SOURCE [PART ...] ({PARTS})")
    main(sys.argv[1], tuple(sys.argv[2:]) or PARTS)
