"""DensityEstimator.fit on streamed data (Dataset, DataLoader, lists of batches): the streaming
pass's statistics against the ML Gaussian and the ML linear-Gaussian regression of the rows
(the untrained model's density), a memory-mapped file read a batch at a time and never whole,
rows per second in the history, training that improves, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from density_data import SMALL, gaussian_data
from scipy.stats import multivariate_normal
from torch.utils.data import DataLoader, TensorDataset

from pyroflows.density import DensityEstimator
from pyroflows.density.streaming import ArrayDataset, is_stream

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)


def batches(x: np.ndarray, size: int, *parts: np.ndarray) -> list:
    """``x`` (with ``parts``: (x, part) pairs) cut into batches of ``size`` rows."""
    cut = range(0, x.shape[0], size)
    if not parts:
        return [torch.as_tensor(x[i:i + size]) for i in cut]
    return [(torch.as_tensor(x[i:i + size]), torch.as_tensor(parts[0][i:i + size])) for i in cut]


def tol(dtype: torch.dtype, float64: float, float32: float) -> float:
    return float64 if dtype == torch.float64 else float32


@pytest.mark.parametrize("precondition", ["whiten", "cholesky", "standardize"])
def test_untrained_streamed_model_is_the_ml_gaussian(precondition, device, dtype):
    """One streaming pass over batches of 37 rows gives the stages and the base start the
    in-memory fit takes from all the rows at once: untrained, the model is the ML Gaussian
    of the training rows (diagonal for "standardize"), computed here by numpy and scipy."""
    x, _, _ = gaussian_data(700, seed=0)
    x_val, _, _ = gaussian_data(60, seed=1)
    est = DensityEstimator("maf", precondition=precondition, device=device, dtype=dtype, seed=0,
                           **SMALL)
    est.fit(batches(x, 37), x_val=batches(x_val, 25), max_epochs=0, progress=False)
    mean, cov = x.mean(0), np.cov(x.T, bias=True)
    if precondition == "standardize":
        cov = np.diag(np.diag(cov))
    expected = multivariate_normal(mean, cov).logpdf(x_val)
    got = est.log_prob(x_val).cpu().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=tol(dtype, 1e-9, 1e-4),
                               atol=tol(dtype, 1e-9, 1e-3))
    assert est.history_["num_train"] == 700 and est.history_["num_val"] == 60
    assert np.isnan(est.history_["train_log_prob"][0])  # no pass to score the untrained model


def test_untrained_streamed_conditional_model_is_the_ml_regression(device, dtype):
    """(y, context) pairs: "whiten" starts at N(a + B c, S), the least-squares regression with
    an intercept and its residuals' ML covariance (numpy's lstsq here)."""
    rng = np.random.default_rng(3)
    c = 2.0 * rng.standard_normal((500, 2)) + 1.0
    y = c @ np.array([[1.0, -0.5], [0.3, 2.0]]).T + np.array([0.5, -1.0]) \
        + 0.5 * rng.standard_normal((500, 2))
    est = DensityEstimator("maf", device=device, dtype=dtype, seed=0, **SMALL)
    est.fit(ArrayDataset(y[:450], c[:450]), x_val=ArrayDataset(y[450:], c[450:]), max_epochs=0,
            progress=False)
    design = np.hstack([np.ones((450, 1)), c[:450]])
    coef = np.linalg.lstsq(design, y[:450], rcond=None)[0]
    residual = y[:450] - design @ coef
    cov = residual.T @ residual / 450
    mean = np.hstack([np.ones((50, 1)), c[450:]]) @ coef
    expected = [multivariate_normal(m, cov).logpdf(v) for m, v in zip(mean, y[450:], strict=True)]
    got = est.log_prob(y[450:], context=c[450:]).cpu().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=tol(dtype, 1e-8, 1e-4),
                               atol=tol(dtype, 1e-8, 1e-3))


class CountingRows(torch.utils.data.Dataset):
    """An ``ArrayDataset`` that records the size of every fetch it serves."""

    def __init__(self, x) -> None:
        self.rows, self.fetches = ArrayDataset(x), []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        self.fetches.append(1)
        return self.rows[i]

    def __getitems__(self, indices):
        self.fetches.append(len(indices))
        return self.rows.batch(indices)


def test_memory_mapped_file_is_read_a_batch_at_a_time(tmp_path, dtype):
    """A memory-mapped .npy of 3,000 rows, batches of 64: every fetch is at most a batch, each
    pass reads every training row once (the statistics' pass, then each epoch: 3 passes),
    and the fit learns (the held-out score improves on the untrained ML Gaussian)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3300, 2))
    data = np.stack([z[:, 0], z[:, 1] + 0.8 * z[:, 0] ** 2], 1)
    path = tmp_path / "rows.npy"
    np.save(path, data[:3000])
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    rows = CountingRows(mapped)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL)
    est.fit(rows, x_val=data[3000:], batch_size=64, max_epochs=2, lr=3e-3, progress=False)
    assert max(rows.fetches) <= 64
    assert sum(rows.fetches) == 3 * 3000
    history = est.history_
    assert history["best_val_log_prob"] > history["initial_val_log_prob"] + 0.05
    assert len(history["rows_per_second"]) == 2 and min(history["rows_per_second"]) > 0


def test_dataloader_and_held_out_share_of_a_dataset(dtype):
    """A shuffling DataLoader (x_val a DataLoader too) trains; a Dataset without x_val holds
    out val_fraction of its rows; both fits are reproducible from the seed."""
    x, _, _ = gaussian_data(600, seed=2)
    t = torch.as_tensor(x, dtype=dtype)

    def fit_loader():
        torch.manual_seed(1)  # the DataLoader's shuffling draws from torch's generator
        loader = DataLoader(TensorDataset(t[:500]), batch_size=50, shuffle=True)
        val = DataLoader(TensorDataset(t[500:]), batch_size=100)
        est = DensityEstimator("maf", seed=0, **SMALL)
        # TensorDataset items are 1-tuples, collated into [x]: read as the rows x (they were
        # refused as "a sequence of 1 parts")
        return est.fit(loader, x_val=val, max_epochs=2, progress=False)

    a, b = fit_loader(), fit_loader()
    assert a.history_["val_log_prob"] == b.history_["val_log_prob"]
    assert a.history_["num_train"] == 500
    held = DensityEstimator("maf", seed=0, **SMALL).fit(ArrayDataset(t), val_fraction=0.2,
                                                        max_epochs=1, progress=False)
    assert held.history_["num_train"] == 480 and held.history_["num_val"] == 120
    same = DensityEstimator("maf", seed=0, **SMALL).fit(TensorDataset(t), val_fraction=0.2,
                                                        max_epochs=1, progress=False)
    assert same.history_["val_log_prob"] == held.history_["val_log_prob"]
    assert is_stream([(b,) for b in t.split(100)])  # (a list(DataLoader(TensorDataset(t))))
    loader = DataLoader(ArrayDataset(t[:500]), batch_size=100, shuffle=True)
    fitted = DensityEstimator("maf", seed=0, **SMALL).fit(
        loader, x_val=DataLoader(ArrayDataset(t[500:]), batch_size=50), max_epochs=1,
        progress=False)
    assert fitted.history_["num_train"] == 500 and fitted.history_["num_val"] == 100


def test_what_counts_as_streamed():
    x = np.zeros((4, 2))
    assert not is_stream(x) and not is_stream(torch.zeros(4, 2)) and not is_stream(x.tolist())
    assert is_stream(ArrayDataset(x)) and is_stream([torch.zeros(4, 2), torch.zeros(3, 2)])
    assert is_stream(DataLoader(ArrayDataset(x), batch_size=2))


def test_bad_streamed_input_is_a_clear_error():
    x, _, _ = gaussian_data(200, seed=4)
    good = batches(x, 50)
    est = DensityEstimator("maf", seed=0, **SMALL)
    with pytest.raises(ValueError, match="needs the rows in memory"):
        DensityEstimator("maf", precondition="tabak", **SMALL).fit(good, x_val=good)
    with pytest.raises(ValueError, match="needs the rows in memory"):
        DensityEstimator("maf", refine="tabak", **SMALL).fit(good, x_val=good)
    with pytest.raises(ValueError, match="contexts travel with the rows"):
        est.fit(good, x_val=good, context=x)
    with pytest.raises(ValueError, match="needs x_val"):
        est.fit(good)
    with pytest.raises(ValueError, match="one-shot iterator"):
        est.fit(iter(good), x_val=good)
    bad = [b.clone() for b in good]
    bad[2][3, 1] = float("nan")
    with pytest.raises(ValueError, match="batch 2 has NaN or infinite rows"):
        est.fit(bad, x_val=good, progress=False)
    with pytest.raises(ValueError, match="batch 1's rows have 2 columns, expected 3"):
        est.fit([good[0], good[1][:, :2]], x_val=good, progress=False)
    constant = x.copy()
    constant[:, 1] = 4.0
    with pytest.raises(ValueError, match=r"columns \[1\] are constant"):
        est.fit(batches(constant, 50), x_val=good, progress=False)
    with pytest.raises(ValueError, match="at least D \\+ 1"):
        est.fit([good[0][:3]], x_val=good, progress=False)
    with pytest.raises(ValueError, match="x_val: batch 0's rows have 2 columns"):
        est.fit(good, x_val=[good[0][:, :2]], progress=False)
    with pytest.raises(ValueError, match="init_process_group"):
        est.fit(x, distributed=True)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_epoch_order_is_a_permutation_computed_a_batch_at_a_time(n):
    """The streamed epoch's order (a Feistel permutation, cycle-walked): every row once, any
    batch of positions alone gives the same rows as the whole, seeds give different orders."""
    from pyroflows.density.streaming import Permutation

    pi = Permutation(n, torch.Generator().manual_seed(0))
    whole = pi(torch.arange(n))
    assert sorted(whole.tolist()) == list(range(n))
    parts = torch.cat([pi(torch.arange(a, min(a + 5, n))) for a in range(0, n, 5)])
    assert torch.equal(parts, whole)
    if n >= 64:
        other = Permutation(n, torch.Generator().manual_seed(1))(torch.arange(n))
        assert (other != whole).float().mean() > 0.9


def test_epoch_orders_look_uniform():
    """Over 2000 seeds, where position 0 and position 1 land (n = 10): each value about 200
    times (a chi-square test at the 0.1% level), and the two values correlated as in a
    uniformly random permutation."""
    from scipy import stats

    from pyroflows.density.streaming import Permutation

    firsts, seconds = [], []
    for seed in range(2000):
        v = Permutation(10, torch.Generator().manual_seed(seed))(torch.arange(2)).tolist()
        firsts.append(v[0])
        seconds.append(v[1])
    for drawn in (firsts, seconds):
        counts = np.bincount(drawn, minlength=10)
        assert stats.chisquare(counts).pvalue > 1e-3, counts
    # a uniform permutation's two values correlate at -1 / (n - 1); standard error ~ 0.022
    assert abs(np.corrcoef(firsts, seconds)[0, 1] + 1 / 9) < 0.07


def test_a_loaders_own_batches_set_the_epoch(device, dtype):
    """The moving average's horizon counts the source's own batches: with a DataLoader of 50
    rows, batch_size (which does not batch it) used to change the fit."""
    x, _, _ = gaussian_data(600, seed=5)
    x = torch.as_tensor(x, dtype=dtype)

    def fit(**options):
        torch.manual_seed(0)
        loader = DataLoader(ArrayDataset(x[:500]), batch_size=50, shuffle=True)
        return DensityEstimator(seed=0, device=device, **SMALL).fit(
            loader, x_val=[x[500:]], max_epochs=2, progress=False, **options)

    a, b = fit(), fit(batch_size=50)
    assert a.history_["val_log_prob"] == b.history_["val_log_prob"]
    assert a.history_["batch_size"] is None  # (the loader's own batches)


class _Changing:
    """Batches whose third turns NaN after the first pass (an augmentation, a rewritten file)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            yield batch * float("nan") if self.passes > 1 and i == 2 else batch


def test_a_bad_batch_in_a_later_pass_gets_the_fits_message(device, dtype):
    """It reached the flow's log_prob, whose support check printed the whole batch."""
    x, _, _ = gaussian_data(300, seed=6)
    x = torch.as_tensor(x, dtype=dtype)
    est = DensityEstimator(seed=0, device=device, **SMALL)
    with pytest.raises(ValueError, match=r"^x: batch 2 has NaN or infinite rows"):
        est.fit(_Changing(list(x[:250].split(50))), x_val=[x[250:]], max_epochs=2,
                progress=False)
    assert est.history_["stopped"] == "error" and torch.isfinite(est.log_prob(x[:5])).all()


class _Interrupting:
    """Batches that raise KeyboardInterrupt (a Ctrl-C) at the second batch of the first pass."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1:
                raise KeyboardInterrupt
            yield batch


def test_ctrl_c_in_the_first_pass_leaves_the_estimator_as_it_was(device, dtype):
    """No model exists yet in the statistics pass: the interrupt goes through (README's table)."""
    x, _, _ = gaussian_data(300, seed=7)
    x = torch.as_tensor(x, dtype=dtype)
    est = DensityEstimator(seed=0, device=device, **SMALL).fit(x, max_epochs=1, progress=False)
    before, history = est.log_prob(x[:5]), est.history_
    with pytest.raises(KeyboardInterrupt):
        est.fit(_Interrupting(list(x.split(50))), x_val=[x[:50]], max_epochs=1, progress=False)
    assert torch.equal(est.log_prob(x[:5]), before) and est.history_ is history
