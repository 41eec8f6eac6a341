"""Test options: ``--device`` (cpu, cuda, cuda:1, ...) and ``--dtype`` (float64, float32).

Every test that builds tensors takes the ``device`` and ``dtype`` fixtures, so
``pytest --device cuda --dtype float32`` reruns the whole suite on a GPU in single precision.
"""

from __future__ import annotations

import os

import pytest
import torch

BENCH_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "data")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for the tests (default cpu)")
    parser.addoption(
        "--dtype", default="float64", choices=["float64", "float32"],
        help="floating dtype for the tests (default float64)",
    )


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the suite's networks and SVI steps are small, and on a
    shared CPU contended threads spin instead of computing (several to ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def blocks_at_any_rows(monkeypatch):
    """MADE's blocked products (``_fast.made``) for products of any number of rows, not only
    from ``_BLOCK_MIN_ROWS`` on: for tests that exercise the blocked kernels at small batches."""
    from pyroflows._fast import made

    monkeypatch.setattr(made, "_BLOCK_MIN_ROWS", 0)


@pytest.fixture
def exact_stl(monkeypatch):
    """Sticking the landing's layer-by-layer solves iterated to exactness
    (``landing.STL_TOL = 0``) instead of the default tolerance: for tests that hold the
    routes of the path gradient against each other to rounding."""
    from pyroflows.guides import landing

    monkeypatch.setattr(landing, "STL_TOL", 0.0)


@pytest.fixture
def fresh_param_store():
    """An empty Pyro param store for the test (emptied again after it), and Pyro's seeds
    (torch, random, numpy) at 0: tests that set up guides use it, so no parameter carries over
    from another test."""
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda was asked for but CUDA is not available", returncode=2)
    return dev


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture(scope="session")
def bench_data() -> str:
    """The repository's ``benchmarks/data`` folder (targets with known answers; its README
    names each file's source and licence)."""
    return BENCH_DATA



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
