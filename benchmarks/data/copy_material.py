"""Copy the benchmark material the tests, tutorials and benchmarks read into
``benchmarks/data/``: ``python benchmarks/data/copy_material.py SOURCE``, with ``SOURCE`` the
project's original benchmark folder (holding ``posteriordb/``, ``german_credit_logreg/``,
``rezende/``, ``synthetic/``). The copy is what the repository reads; this script records how
it was made, and is never run by the tests.

Reference draws are stored as float32 (their Monte-Carlo error, about 1e-2 standard deviations,
is far above float32's 1e-7) and thinned to every second draw of each chain, keeping every
chain; the Rezende box draws are copied whole; the German credit table is gzipped text
(``np.loadtxt`` reads ``.gz`` directly). Every ``.npz`` is ``np.savez_compressed``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
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


def main(bench: str) -> None:
    for folder in POSTERIORDB:
        os.makedirs(os.path.join(HERE, "posteriordb", folder), exist_ok=True)
        shutil.copyfile(os.path.join(bench, "posteriordb", folder, "data.json"),
                        os.path.join(HERE, "posteriordb", folder, "data.json"))
        thinned(os.path.join(bench, "posteriordb", folder, "reference_draws.npz"),
                os.path.join(HERE, "posteriordb", folder, "reference_draws.npz"))
    german = os.path.join(HERE, "german_credit_logreg")
    os.makedirs(german, exist_ok=True)
    with open(os.path.join(bench, "german_credit_logreg", "german.data-numeric"), "rb") as f, \
            gzip.GzipFile(os.path.join(german, "german.data-numeric.gz"), "wb", mtime=0) as g:
        shutil.copyfileobj(f, g)
    shutil.copyfile(os.path.join(bench, "german_credit_logreg", "reference_summary.json"),
                    os.path.join(german, "reference_summary.json"))
    thinned(os.path.join(bench, "german_credit_logreg", "reference_draws.npz"),
            os.path.join(german, "reference_draws.npz"))
    synthetic = os.path.join(HERE, "synthetic")
    os.makedirs(synthetic, exist_ok=True)
    shutil.copyfile(os.path.join(bench, "synthetic", "targets.json"),
                    os.path.join(synthetic, "targets.json"))
    for name in ("funnel10", "banana2d_b0.03", "banana2d_b0.1"):
        thinned(os.path.join(bench, "synthetic", f"{name}_exact_draws.npz"),
                os.path.join(synthetic, f"{name}_exact_draws.npz"))
    os.makedirs(os.path.join(HERE, "rezende"), exist_ok=True)
    shutil.copyfile(os.path.join(bench, "rezende", "box_draws.npz"),
                    os.path.join(HERE, "rezende", "box_draws.npz"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/data/copy_material.py SOURCE")
    main(sys.argv[1])
