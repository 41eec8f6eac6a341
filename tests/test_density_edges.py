"""DensityEstimator at its edges: Ctrl-C in every phase of a fit, failed moves, the messages of
bad input, and the files' mode and leftovers (issue 19, items 10, 12, 13, 14)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from density_data import SMALL, gaussian_data

from pyroflows.density import DensityEstimator, training
from pyroflows.transforms import Tabak
from pyroflows.transforms.tabak.fit import DualAscent

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

TABAK = {"max_steps": 40, "check_every": 10, "patience": 100}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x, _, _ = gaussian_data(400, seed=50)
    return x[:300], x[300:]


def _ctrl_c_on_call(monkeypatch, owner, name: str, call: int) -> dict:
    """Make ``owner.name`` raise ``KeyboardInterrupt`` on its ``call``-th call (as Ctrl-C does
    in the middle of that step); returns the calls counted, also those after it."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, step)
    return calls


def _count_calls(monkeypatch, owner, name: str) -> dict:
    return _ctrl_c_on_call(monkeypatch, owner, name, call=0)


def _usable(est: DensityEstimator, x_val: np.ndarray, tmp_path) -> None:
    """The estimator scores its validation rows as its history says, and saves and loads."""
    score = est.score(x_val)
    assert np.isfinite(score)
    assert score == pytest.approx(est.history_["final_val_log_prob"], abs=1e-9)
    est.save(tmp_path / "interrupted.pt")
    loaded = DensityEstimator.load(tmp_path / "interrupted.pt")
    assert torch.equal(loaded.log_prob(x_val), est.log_prob(x_val))


def test_ctrl_c_in_training_keeps_the_best_epoch_and_runs_nothing_after(data, monkeypatch,
                                                                        tmp_path):
    """precondition="auto" with a refiner: Ctrl-C in the first flow's third epoch returns
    within that step, with the best epoch so far; no refiner and no second candidate run."""
    x, x_val = data
    steps = _ctrl_c_on_call(monkeypatch, training, "training_step", call=2 * 5 + 3)
    tabak_fits = _count_calls(monkeypatch, Tabak, "fit")
    est = DensityEstimator("maf", precondition="auto", refine="tabak", seed=0,
                           tabak_options=TABAK, **SMALL)
    with pytest.warns(UserWarning, match="fit interrupted"):
        est.fit(x, x_val=x_val, batch_size=64, max_epochs=50, progress=False)
    assert steps["n"] == 2 * 5 + 3 and tabak_fits["n"] == 0
    history = est.history_
    assert history["stopped"] == "interrupted"
    assert history["interrupted_in"] == "whiten: flow" and est.precondition_ == "whiten"
    assert history["epoch"] == [0, 1, 2] and history["refine_steps"] == 0
    assert history["best_val_log_prob"] == max(history["val_log_prob"])
    _usable(est, x_val, tmp_path)


def test_ctrl_c_in_the_refiner_keeps_the_trained_flow(data, monkeypatch, tmp_path):
    """Ctrl-C in the refiner's fifth Tabak step: the fit returns at once with the trained flow
    and the refiner's steps so far (none, or those Tabak keeps)."""
    x, x_val = data
    steps = _ctrl_c_on_call(monkeypatch, DualAscent, "ascent_step", call=5)
    est = DensityEstimator("maf", refine="tabak", seed=0, tabak_options=TABAK, **SMALL)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(x, x_val=x_val, batch_size=64, max_epochs=3, progress=False)
    assert steps["n"] == 5
    history = est.history_
    assert history["stopped"] == "interrupted" and history["interrupted_in"] == "whiten: refine"
    assert history["epoch"] == [0, 1, 2, 3] and history["refine_steps"] <= 4
    _usable(est, x_val, tmp_path)


def test_ctrl_c_in_the_tabak_preconditioner_keeps_its_steps_and_trains_no_flow(
        data, monkeypatch, tmp_path):
    """Ctrl-C in the Tabak stage's 25th step (checks every 10): the stage keeps its best
    complete check so far, the estimator is fitted with that stage and the untrained flow (the
    ML Gaussian of the Gaussianized rows), and no flow step runs."""
    x, x_val = data
    _ctrl_c_on_call(monkeypatch, DualAscent, "ascent_step", call=25)
    steps = _count_calls(monkeypatch, training, "training_step")
    est = DensityEstimator("maf", precondition="tabak", seed=0, tabak_options=TABAK, **SMALL)
    with pytest.warns(UserWarning) as warned:
        est.fit(x, x_val=x_val, max_epochs=50, progress=False)
    said = " | ".join(str(w.message) for w in warned)
    assert "Tabak.fit interrupted" in said and "the flow is untrained" in said
    assert steps["n"] == 0
    assert est.history_["stopped"] == "interrupted" and est.history_["epoch"] == [0]
    assert est.history_["interrupted_in"] == "tabak: precondition"
    stage = est._model.stages[0]
    assert bool(stage.fitted) and stage.history["step"] == [0, 10, 20]
    assert stage.num_steps in (0, 10, 20)
    _usable(est, x_val, tmp_path)


def test_ctrl_c_in_the_second_candidates_preconditioner_keeps_the_first(data, monkeypatch,
                                                                         tmp_path):
    """precondition="auto": Ctrl-C in the Tabak stage of the second candidate keeps the first,
    fully trained, and trains no second flow."""
    x, x_val = data
    steps = _count_calls(monkeypatch, training, "training_step")
    _ctrl_c_on_call(monkeypatch, DualAscent, "ascent_step", call=3)
    est = DensityEstimator("maf", precondition="auto", seed=0, tabak_options=TABAK, **SMALL)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(x, x_val=x_val, batch_size=64, max_epochs=2, progress=False)
    assert steps["n"] == 2 * 5  # the first candidate's two epochs only
    assert est.history_["stopped"] == "interrupted"
    assert est.history_["interrupted_in"] == "tabak: precondition"
    assert est.precondition_ in ("whiten", "tabak")
    _usable(est, x_val, tmp_path)


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_a_move_to_a_device_this_machine_lacks_changes_nothing(device, data, tmp_path):
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    before = est.log_prob(x_val)
    with pytest.raises(ValueError, match=rf"to: .*'{device}'.*(not a torch device|not "
                                         "available on this machine)"):
        est.to(device)
    assert est.device is None and est.dtype is None
    assert torch.equal(est.log_prob(x_val), before)
    est.save(tmp_path / "kept.pt")
    assert torch.equal(DensityEstimator.load(tmp_path / "kept.pt").log_prob(x_val), before)


def test_a_file_saved_for_a_device_this_machine_lacks_says_so_and_loads_elsewhere(data,
                                                                                 tmp_path):
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    est.device = torch.device("cuda", 99)  # as a save made on a machine with 100 GPUs holds
    est.save(tmp_path / "gpu.pt")
    with pytest.raises(ValueError, match=r"gpu.pt on its saved device \(pass device= to load "
                                         r"elsewhere\): device 'cuda:99' is not available on "
                                         "this machine"):
        DensityEstimator.load(tmp_path / "gpu.pt")
    loaded = DensityEstimator.load(tmp_path / "gpu.pt", device="cpu")
    assert loaded.device == torch.device("cpu")
    assert torch.equal(loaded.log_prob(x_val), est.log_prob(x_val))


def test_a_move_that_fails_part_way_is_undone(data, monkeypatch):
    """The preconditioning stage fails to move (as out of memory would) after the flow has
    been cast to float32: the estimator is back in float64 with its exact parameters."""
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    before = est.log_prob(x_val)
    state = {k: v.clone() for k, v in est._model.state_dict().items()}
    stage = est._model.stages[0]
    real_apply = type(stage)._apply

    def failing_apply(module, fn, *args, **kwargs):
        if fn(torch.zeros((), dtype=torch.float64)).dtype != torch.float64:
            raise RuntimeError("out of memory (simulated)")
        return real_apply(module, fn, *args, **kwargs)

    monkeypatch.setattr(stage, "_apply", failing_apply.__get__(stage))
    with pytest.raises(RuntimeError, match="simulated"):
        est.to(dtype=torch.float32)
    assert est.dtype is None
    after = est._model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(est.log_prob(x_val), before)


def test_bad_data_gets_a_message_that_says_what_is_wrong(data):
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL)
    # Columns near 1e30 whose spread float32 cannot hold: not "constant", and float64 fits.
    huge = 1e30 + 1e20 * x[:, :2]
    with pytest.raises(ValueError, match=r"columns \[0, 1\] vary in the data as given "
                                         r"\(torch.float64\) but not in torch.float32"):
        est.fit(huge, max_epochs=1, progress=False)
    assert np.isfinite(DensityEstimator("maf", dtype=torch.float64, seed=0, **SMALL)
                       .fit(huge, max_epochs=1, progress=False).score(huge))
    constant = x.copy()
    constant[:, 1] = 7.0
    with pytest.raises(ValueError, match=r"columns \[1\] are constant \(every row holds the "
                                         r"value 7\)"):
        est.fit(constant, max_epochs=1, progress=False)
    # a column that varies only in a row the split holds out (the fit's first draw of its
    # seeded generator is the split's permutation): constant in the training rows
    held_out = int(torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[0])
    constant[held_out, 1] = 8.0
    with pytest.raises(ValueError, match=r"columns \[1\] are constant in the \d+ training "
                                         r"rows: they vary only in the \d+ rows held out"):
        est.fit(constant, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="x_val has no rows: pass held-out rows, or "
                                         "x_val=None"):
        est.fit(x, x_val=x_val[:0], progress=False)
    # Too few rows: D + 1 training rows at least (D = 3).
    with pytest.raises(ValueError, match=r"x has 2 rows, 1 of them held out .* at least "
                                         r"D \+ 1 = 4 training rows"):
        est.fit(x[:2], progress=False)
    with pytest.raises(ValueError, match=r"x has 3 rows: .* D \+ 1 = 4 training rows"):
        est.fit(x[:3], x_val=x_val, progress=False)
    assert np.isfinite(est.fit(x[:4], x_val=x_val, max_epochs=1, progress=False).score(x_val))


def test_half_precision_is_fitted_in_float32_with_a_warning(data):
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL)
    with pytest.warns(UserWarning, match=r"x is torch.float16: fitting in float32"):
        est.fit(torch.as_tensor(x, dtype=torch.float16), max_epochs=1, progress=False)
    assert est._model_device_dtype()[1] == torch.float32
    assert torch.isfinite(est.log_prob(torch.as_tensor(x_val, dtype=torch.float16))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dtype= chosen: no warning, and that dtype is used
        est = DensityEstimator("maf", dtype=torch.float64, seed=0, **SMALL)
        est.fit(torch.as_tensor(x, dtype=torch.float16), max_epochs=1, progress=False)
    assert est._model_device_dtype()[1] == torch.float64


def test_score_of_no_rows_and_fractional_draws_are_errors(data):
    x, x_val = data
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="x has no rows: the mean log-likelihood of no rows"):
        est.score(x_val[:0])
    for n in (2.7, 2.0, "3"):
        with pytest.raises(ValueError, match=rf"n must be a whole number of draws, got {n!r}"):
            est.sample(n)
    assert est.sample(np.int64(3)).shape == (3, 3) and est.sample(0).shape == (0, 3)


@pytest.fixture(scope="module")
def fitted(data) -> DensityEstimator:
    return DensityEstimator("maf", seed=0, **SMALL).fit(data[0], max_epochs=0, progress=False)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_saved_files_get_the_mode_the_umask_gives(umask, mode, fitted, tmp_path):
    """As ``open(path, "w")`` creates files: 0o666 less the umask; a file saved over keeps
    its own mode."""
    old = os.umask(umask)
    try:
        fitted.save(tmp_path / "model.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "model.pt").st_mode) == mode
        os.chmod(tmp_path / "model.pt", 0o604)
        fitted.save(tmp_path / "model.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "model.pt").st_mode) == 0o604
    finally:
        os.umask(old)


def test_stale_temporaries_of_killed_saves_are_removed_on_the_next_save(fitted, tmp_path):
    """A save killed mid-write leaves ``.model.pt.<pid>.<token>.tmp``: the next save of
    model.pt removes those of processes that no longer run (and any untouched for an hour),
    and keeps a running save's and other targets' files."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead, alive = ended.pid, os.getppid()
    names = {
        "dead": f".model.pt.{dead}.0123abcd.tmp",
        "old": f".model.pt.{alive}.4567cdef.tmp",
        "running": f".model.pt.{alive}.89abcdef.tmp",
        "other target": f".other.pt.{dead}.0123abcd.tmp",
        "not a temporary": f".model.pt.{dead}.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half a file")
    hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / names["old"], (hours_ago, hours_ago))
    fitted.save(tmp_path / "model.pt")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model.pt", names["running"], names["other target"],
                    names["not a temporary"]}
    assert DensityEstimator.load(tmp_path / "model.pt").dim_ == 3
