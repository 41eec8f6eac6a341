"""DensityEstimator with a context, p(y | x): the untrained model against the ML linear-Gaussian
regression, a known conditional Gaussian and a known heteroscedastic density recovered, each
p(y | x) integrating to one and matching autograd Jacobians, per-context sampling moments,
bounded (rejection) sampling against quadrature, broadcasting, early stopping, files, devices
and dtypes, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from density_data import SMALL, as_tensor

from pyroflows.density import DensityEstimator, pipeline
from pyroflows.density.streaming import ArrayDataset
from pyroflows.density.training import default_batch_size, default_lr
from pyroflows.testing import check_conditional_transform

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

A = np.array([[1.0, -0.5], [0.3, 2.0]])  # y = A x + b + NOISE * e
B = np.array([0.5, -1.0])
NOISE = 0.5


def linear_gaussian(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)``: x ~ N(0, I) * 2 + 1 (C = 2), y | x ~ N(A x + b, NOISE^2 I) (D = 2)."""
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.standard_normal((n, 2)) + 1.0
    return x @ A.T + B + NOISE * rng.standard_normal((n, 2)), x


def linear_gaussian_log_prob(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    mean = x @ A.T + B
    return (-0.5 * ((y - mean) / NOISE) ** 2 - math.log(NOISE) - 0.5 * math.log(2 * math.pi)).sum(1)


def wiggle(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)``, D = C = 1: y | x ~ N(sin 2x, (0.1 + 0.2 |x|)^2), x ~ U(-2, 2)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 1))
    return np.sin(2 * x) + (0.1 + 0.2 * np.abs(x)) * rng.standard_normal((n, 1)), x


def wiggle_log_prob(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    scale = 0.1 + 0.2 * np.abs(x[:, 0])
    return -0.5 * ((y[:, 0] - np.sin(2 * x[:, 0])) / scale) ** 2 - np.log(scale) - 0.5 * math.log(
        2 * math.pi)


def tol(dtype: torch.dtype, float64: float, float32: float) -> float:
    return float64 if dtype == torch.float64 else float32


# ---- the start and the fit against known conditional densities -------------------------------
def test_untrained_model_is_the_ml_linear_gaussian_regression(device, dtype):
    """precondition="whiten" starts at N(m + W x, L L^T), the maximum-likelihood linear-Gaussian
    conditional: computed independently here by least squares with an intercept and the
    residuals' ML covariance."""
    y, x = linear_gaussian(400, seed=1)
    y_val, x_val = linear_gaussian(50, seed=2)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(
        as_tensor(y, device, dtype), context=as_tensor(x, device, dtype), max_epochs=0,
        y_val=as_tensor(y_val, device, dtype), context_val=as_tensor(x_val, device, dtype),
        progress=False)
    design = np.hstack([x, np.ones((len(x), 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ coef
    cov = residual.T @ residual / len(y)
    y_test, x_test = linear_gaussian(200, seed=3)
    diff = y_test - np.hstack([x_test, np.ones((200, 1))]) @ coef
    expected = (-0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
                - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])
    got = est.log_prob(as_tensor(y_test, device, dtype), context=as_tensor(x_test, device, dtype))
    assert got.device.type == device.type and got.dtype == dtype and got.shape == (200,)
    np.testing.assert_allclose(got.double().cpu().numpy(), expected,
                               atol=tol(dtype, 1e-8, 2e-3))


@pytest.mark.parametrize("flow, precondition", [("maf", "standardize"), ("realnvp", "whiten"),
                                               ("nsf", "whiten")])
def test_recovers_a_conditional_gaussian(flow, precondition, device, dtype, tmp_path):
    """y = A x + b + noise: the held-out log-likelihood within 0.05 nats of the true p(y | x)'s;
    draws for each context row have the fitted density's mean and covariance (by quadrature),
    and those are near the true A x + b and NOISE^2 I; save/load
    reproduces log_probs and seeded draws exactly; .to moves the context standardization."""
    y, x = linear_gaussian(2000, seed=4)
    est = DensityEstimator(flow, precondition=precondition, dtype=dtype, seed=0, num_layers=2,
                           hidden_dims=(32,))
    est.fit(as_tensor(y, device, dtype), context=as_tensor(x, device, dtype), max_epochs=40,
            batch_size=128, lr=3e-3, progress=False)
    assert est.context_dim_ == 2 and est.dim_ == 2
    y_test, x_test = linear_gaussian(2000, seed=5)
    yt, xt = as_tensor(y_test, device, dtype), as_tensor(x_test, device, dtype)
    truth = float(linear_gaussian_log_prob(y_test, x_test).mean())
    assert est.score(yt, context=xt) == pytest.approx(truth, abs=0.05)

    points = np.array([[1.0, 1.0], [0.0, 2.5], [2.0, -0.5]])  # within 1 sd of x's mean
    contexts = as_tensor(points, device, dtype)
    draws = est.sample(4000, context=contexts, seed=1)
    assert draws.shape == (4000, 3, 2) and draws.dtype == dtype
    se = NOISE / math.sqrt(4000)
    truth_mean = points @ A.T + B
    for row in range(3):
        # the fitted density's moments by quadrature: the draws must have them (sampling), and
        # they must be near the truth's (fitting)
        axis = torch.linspace(-3.5, 3.5, 281, dtype=torch.float64)
        grid = torch.cartesian_prod(axis, axis) + torch.as_tensor(truth_mean[row])
        weight = est.log_prob(grid.to(device, dtype), context=contexts[row]).double().cpu().exp()
        weight = weight / weight.sum()
        mean = weight @ grid
        cov = (weight[:, None] * (grid - mean)).T @ (grid - mean)
        got = draws[:, row].double().cpu()
        np.testing.assert_allclose(got.mean(0).numpy(), mean.numpy(), atol=4 * se)
        np.testing.assert_allclose(np.cov(got.numpy().T), cov.numpy(), atol=0.02)
        np.testing.assert_allclose(mean.numpy(), truth_mean[row], atol=0.08)
        np.testing.assert_allclose(cov.numpy(), NOISE**2 * np.eye(2), atol=0.06)

    path = tmp_path / "conditional.pt"
    est.save(path)
    loaded = DensityEstimator.load(path, device=device)
    assert loaded.context_dim_ == 2
    assert torch.equal(loaded.log_prob(yt, context=xt), est.log_prob(yt, context=xt))
    assert torch.equal(loaded.sample(5, seed=3, context=contexts),
                       est.sample(5, seed=3, context=contexts))

    other = torch.float32 if dtype == torch.float64 else torch.float64
    loaded.to(dtype=other)
    assert loaded._model.context_stage.loc.dtype == other
    moved = loaded.log_prob(yt.to(other), context=xt.to(other))
    assert moved.dtype == other
    torch.testing.assert_close(moved.double(), est.log_prob(yt, context=xt).double(),
                               atol=1e-3, rtol=1e-4)


def test_recovers_a_heteroscedastic_nonlinear_conditional(device, dtype):
    """y | x ~ N(sin 2x, (0.1 + 0.2|x|)^2): mean and spread both change with x, which no
    linear-Gaussian start fits; the trained flow's held-out log-likelihood is within 0.06 nats
    of the truth's, and much above the untrained start's."""
    y, x = wiggle(3000, seed=6)
    est = DensityEstimator("maf", dtype=dtype, seed=0, num_layers=3, hidden_dims=(32, 32))
    est.fit(as_tensor(y, device, dtype), context=as_tensor(x, device, dtype), max_epochs=40,
            progress=False)
    y_test, x_test = wiggle(2000, seed=7)
    truth = float(wiggle_log_prob(y_test, x_test).mean())
    got = est.score(as_tensor(y_test, device, dtype), context=as_tensor(x_test, device, dtype))
    assert got == pytest.approx(truth, abs=0.06)
    assert est.history_["best_val_log_prob"] > est.history_["initial_val_log_prob"] + 0.3


@pytest.mark.parametrize("precondition, refine", [
    ("whiten", "tabak"), ("standardize", None), ("cholesky", None), ("tabak", None), (None, None),
])
def test_each_conditional_density_integrates_to_one(precondition, refine, device, dtype):
    """Every pipeline, Tabak's included (a fixed map of y alone is an exact change of variables
    for each context), gives a p(y | x) whose integral over y is 1 for every x (quadrature on
    a grid), after a short fit."""
    y, x = wiggle(600, seed=8)
    est = DensityEstimator("maf", precondition=precondition, refine=refine, dtype=dtype, seed=0,
                           **SMALL, tabak_options={"max_steps": 20})
    est.fit(as_tensor(y, device, dtype), context=as_tensor(x, device, dtype), max_epochs=3,
            progress=False)
    grid = torch.linspace(-6, 6, 6001, device=device, dtype=torch.float64)
    for value in (-1.5, 0.2, 1.9):
        context = torch.tensor([value], device=device, dtype=dtype)
        density = est.log_prob(grid[:, None].to(dtype), context=context).double().exp()
        assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=tol(dtype, 2e-3,
                                                                                       5e-3))


@pytest.mark.parametrize("precondition", ["whiten", "tabak"])
def test_conditional_log_prob_is_the_change_of_variables(precondition, device, dtype):
    """log p(y | x) = log N(z; 0, I) + log|det dz/dy| with z the whole pipeline's map of y for
    the context x, the Jacobian by autograd (float64)."""
    y, x = linear_gaussian(500, seed=9)
    est = DensityEstimator("maf", precondition=precondition, dtype=torch.float64, seed=0,
                           **SMALL, tabak_options={"max_steps": 20})
    est.fit(y, context=x, max_epochs=2, progress=False)
    model = est._model

    def to_latent(point: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        u = model.precondition(point)[0]
        return model.latent(u, model.features(context))[0]

    y_test, x_test = linear_gaussian(4, seed=10)
    yt, xt = torch.as_tensor(y_test), torch.as_tensor(x_test)
    got = est.log_prob(yt, context=xt)
    normal = torch.distributions.Normal(0.0, 1.0)
    for row in range(4):
        point, context = yt[row : row + 1], xt[row : row + 1]
        jac = torch.autograd.functional.jacobian(lambda v, c=context: to_latent(v, c), point)
        z = to_latent(point, context)
        expected = normal.log_prob(z).sum() + torch.linalg.slogdet(jac[0, :, 0, :])[1]
        assert float(got[row]) == pytest.approx(float(expected.detach()), abs=1e-8)


# ---- sampling: shapes, broadcasting, bounds --------------------------------------------------
@pytest.fixture(scope="module")
def small_fit():
    """A quickly fitted conditional estimator (float64, D = C = 2) and its data."""
    torch.manual_seed(0)
    y, x = linear_gaussian(300, seed=11)
    est = DensityEstimator("maf", dtype=torch.float64, seed=0, **SMALL)
    return est.fit(y, context=x, max_epochs=2, progress=False), y, x


def test_contexts_broadcast_against_rows(small_fit, device, dtype):
    """One context (C,) for every row, one point (D,) under every context, one of each: the same
    values as the contexts or points repeated row by row; draws (n, B, D) or (n, D)."""
    est, y, x = small_fit
    est.to(device=device, dtype=dtype)
    yt, xt = as_tensor(y[:5], device, dtype), as_tensor(x[:5], device, dtype)
    full = est.log_prob(yt, context=xt[2].expand(5, 2))
    assert torch.equal(est.log_prob(yt, context=xt[2]), full)
    assert torch.equal(est.log_prob(yt[1], context=xt), est.log_prob(yt[1].expand(5, 2),
                                                                     context=xt))
    single = est.log_prob(yt[1], context=xt[1])
    assert single.shape == () and float(single) == float(est.log_prob(yt, context=xt)[1])
    assert est.log_prob(yt[:0], context=xt[:0]).shape == (0,)
    assert est.sample(7, context=xt).shape == (7, 5, 2)
    one = est.sample(7, seed=2, context=xt[3])
    assert one.shape == (7, 2)
    assert torch.equal(one, est.sample(7, seed=2, context=xt[3:4])[:, 0])
    assert est.sample(0, context=xt).shape == (0, 5, 2)
    assert est.score(yt, context=xt) == pytest.approx(float(est.log_prob(yt, xt).mean()))


def test_bounded_sampling_rejects_draws_outside(device, dtype):
    """sample(bounds=...) returns n draws per context inside the box, distributed as the density
    truncated to it: the acceptance rate and the share of kept draws below a cut both match
    quadrature of the fitted p(y | x) (D = 1); one-sided bounds leave a side open."""
    y, x = wiggle(800, seed=12)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(
        as_tensor(y, device, dtype), context=as_tensor(x, device, dtype), max_epochs=5,
        progress=False)
    contexts = torch.tensor([[-1.0], [0.5]], device=device, dtype=dtype)
    low, high, cut = -0.5, 0.8, 0.3
    n = 3000
    draws = est.sample(n, seed=4, context=contexts, bounds=(low, high))
    assert draws.shape == (n, 2, 1) and draws.dtype == dtype
    assert bool(((draws >= low) & (draws <= high)).all())
    rate = est.acceptance_rate_
    assert rate.shape == (2,)
    grid = torch.linspace(-5, 5, 20001, device=device, dtype=torch.float64)
    for row in range(2):
        density = est.log_prob(grid[:, None].to(dtype), context=contexts[row]).double().exp()
        inside = (grid >= low) & (grid <= high)
        mass = float(torch.trapezoid(density * inside, grid))
        below = float(torch.trapezoid(density * inside * (grid <= cut), grid)) / mass
        assert float(rate[row]) == pytest.approx(mass, abs=4 * math.sqrt(mass / n) + 0.01)
        share = float((draws[:, row, 0] <= cut).double().mean())
        assert share == pytest.approx(below, abs=4 * math.sqrt(below * (1 - below) / n) + 0.01)
    open_above = est.sample(500, seed=5, context=contexts[0], bounds=(0.0, math.inf))
    assert open_above.shape == (500, 1) and bool((open_above >= 0).all())
    assert est.acceptance_rate_.shape == ()
    est.sample(5, context=contexts[0])  # (without bounds: the last call's rate was kept)
    assert est.acceptance_rate_ is None


def test_hopeless_bounds_are_an_error(small_fit):
    """A box the density puts (almost) no mass in: a ValueError saying so, not an endless loop."""
    est, _, x = small_fit
    est.to(device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="fall inside the bounds.*min_acceptance"):
        est.sample(100, context=torch.as_tensor(x[0]), bounds=(40.0, 41.0))


# ---- the fit loop with a context -------------------------------------------------------------
def test_early_stopping_keeps_the_best_state_with_a_context(device, dtype, capsys):
    """Given validation rows and their contexts: the estimator ends in the state whose score on
    them is the recorded best, stops early with patience 0, and shows a progress bar."""
    y, x = wiggle(600, seed=13)
    y_val, x_val = wiggle(200, seed=14)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL)
    est.fit(as_tensor(y, device, dtype), context=as_tensor(x, device, dtype),
            y_val=as_tensor(y_val, device, dtype), context_val=as_tensor(x_val, device, dtype),
            max_epochs=200, patience=0, lr=0.05, progress=True)
    history = est.history_
    assert history["stopped"] == "early_stopping" and history["epoch"][-1] < 200
    assert history["num_val"] == 200 and history["num_train"] == 600
    score = est.score(as_tensor(y_val, device, dtype), context=as_tensor(x_val, device, dtype))
    assert score == pytest.approx(history["best_val_log_prob"], abs=tol(dtype, 1e-9, 1e-4))
    assert "fit" in capsys.readouterr().err


def test_default_batch_size_keeps_six_steps_an_epoch():
    """With a context: the largest of 512, 256, 128, 64, 32 that makes at least 6 steps an
    epoch, checked against the rule at every boundary; 256 without a context; lr 3e-3 and
    1e-3."""
    for n in (1, 100, 383, 384, 767, 768, 900, 1535, 1536, 3071, 3072, 9000, 10**6):
        batch = default_batch_size(n, True)
        assert batch in (32, 64, 128, 256, 512)
        assert batch == 32 or n >= 6 * batch  # at least 6 steps an epoch ...
        assert batch == 512 or n < 6 * 2 * batch  # ... with the largest batch that makes them
        assert default_batch_size(n, False) == 256
    assert ([default_batch_size(n, True) for n in (383, 384, 768, 1536, 3071, 3072)]
            == [32, 64, 128, 256, 256, 512])
    assert (default_lr(True), default_lr(False)) == (3e-3, 1e-3)


@pytest.mark.parametrize("conditional", [True, False])
def test_fit_defaults_are_the_documented_settings(conditional):
    """A fit given no batch_size or lr takes the same steps as one given the documented values
    (with a context: 900 training rows, batch 128, lr 3e-3; without: 256, 1e-3), and records
    them in the history; the conditional defaults differ from the unconditional ones."""
    y, x = linear_gaussian(1000, seed=16)
    context = x if conditional else None
    expected = (128, 3e-3) if conditional else (256, 1e-3)
    fits = {}
    for name, options in (("default", {}),
                          ("explicit", dict(batch_size=expected[0], lr=expected[1])),
                          ("other", dict(batch_size=256 if conditional else 128,
                                         lr=1e-3 if conditional else 3e-3))):
        est = DensityEstimator("maf", dtype=torch.float64, seed=0, **SMALL)
        est.fit(y, context=context, max_epochs=2, patience=5, progress=False, **options)
        fits[name] = est.log_prob(y[:50], context=None if context is None else x[:50])
        if name == "default":
            assert (est.history_["batch_size"], est.history_["lr"]) == expected
            assert est.history_["num_train"] == 900
    assert torch.equal(fits["default"], fits["explicit"])
    assert not torch.allclose(fits["default"], fits["other"])


def test_streamed_conditional_fit_takes_the_conditional_step_size():
    """The step size rule lives in the trainers' shared setup: a streamed fit of (y, context)
    pairs given no lr uses 3e-3 (and batch 256), one of y alone 1e-3."""
    y, x = linear_gaussian(400, seed=17)
    pairs = DensityEstimator("maf", seed=0, **SMALL).fit(
        ArrayDataset(y, x), max_epochs=1, progress=False)
    alone = DensityEstimator("maf", seed=0, **SMALL).fit(ArrayDataset(y), max_epochs=1,
                                                          progress=False)
    assert pairs.history_["lr"] == 3e-3 and alone.history_["lr"] == 1e-3
    assert pairs.history_["batch_size"] == alone.history_["batch_size"] == 256


# ---- files --------------------------------------------------------------------------------
def test_unconditional_files_of_format_4_still_load(tmp_path):
    """A file written before the context (format version 4: no "context_dim", no such
    constructor argument) loads as the density of the rows alone."""
    y, _ = linear_gaussian(100, seed=15)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(y, max_epochs=1, progress=False)
    est.save(tmp_path / "now.pt")
    payload = torch.load(tmp_path / "now.pt", weights_only=True)
    payload["version"] = 4
    del payload["context_dim"], payload["params"]["context_dim"]
    torch.save(payload, tmp_path / "v4.pt")
    loaded = DensityEstimator.load(tmp_path / "v4.pt")
    assert loaded.context_dim_ is None
    assert torch.equal(loaded.log_prob(y), est.log_prob(y))


# ---- bad input -----------------------------------------------------------------------------
def test_bad_contexts_are_value_errors(small_fit):
    est, y, x = small_fit
    est.to(device="cpu", dtype=torch.float64)
    nan = x.copy()
    nan[3, 1] = np.nan
    constant = x.copy()
    constant[:, 1] = 2.0
    fresh = DensityEstimator("maf", seed=0, **SMALL)
    fit_cases = [
        (dict(context=x[:-1]), "context has 299 rows but x has 300"),
        (dict(context=x[:, 0]), r"2-D array .*reshape\(-1, 1\)"),
        (dict(context=nan), "context has NaN or infinite values"),
        (dict(context=constant), r"context's columns \[1\] are constant"),
        (dict(context=np.stack([x[:, 0], 1e8 + 1e-3 * x[:, 1]], 1).astype(np.float64)),
         r"context's columns \[1\] vary in the data as given .* not in torch.float32"),
        (dict(context=x, y_val=y[:5]), "needs context_val"),
        (dict(context=x, context_val=x[:5]), "context_val is given but x_val"),
        (dict(context_val=x[:5]), "context_val is given but context is not"),
        (dict(context=x, x_val=y[:5], y_val=y[:5], context_val=x[:5]), "x_val or y_val"),
        (dict(context=x, y_val=y[:5], context_val=x[:5, :1]), "context_val has 1 columns"),
        (dict(context=x, y_val=y[:5], context_val=np.full((5, 2), np.inf)), "infinite"),
    ]
    for kwargs, match in fit_cases:
        with pytest.raises(ValueError, match=match):
            fresh.fit(y, max_epochs=0, progress=False, **kwargs)
    with pytest.raises(ValueError, match="built with context_dim=3: pass context="):
        DensityEstimator("maf", context_dim=3).fit(y, max_epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"context has 2 columns, expected 3 \(context_dim\)"):
        DensityEstimator("maf", context_dim=3).fit(y, context=x, max_epochs=0, progress=False)
    with pytest.raises(ValueError, match="context_dim must be a positive integer"):
        DensityEstimator("maf", context_dim=0)

    call_cases = [
        (lambda: est.log_prob(y), "pass context="),
        (lambda: est.sample(3), "pass context="),
        (lambda: est.log_prob(y, context=x[:10]), "context has 10 rows but x has 300"),
        (lambda: est.log_prob(y, context=x[:, :1]), "context has 1 columns, expected 2"),
        (lambda: est.log_prob(y[:4], context=nan[:4]), "NaN or infinite"),
        (lambda: est.sample(3, context=x[None]), r"shape \(2,\) or \(n, 2\)"),
        (lambda: est.sample(3, context=x[0], bounds=(1.0, 0.0)), "low < high"),
        (lambda: est.sample(3, context=x[0], bounds=(0.0,)), "a pair"),
        (lambda: est.sample(3, context=x[0], bounds=(np.zeros(3), 1.0)), r"shape \(2,\)"),
        (lambda: est.sample(3, context=x[0], bounds=(0, 1), min_acceptance=0), "min_acceptance"),
    ]
    for call, match in call_cases:
        with pytest.raises(ValueError, match=match):
            call()
    plain = DensityEstimator("maf", seed=0, **SMALL).fit(y, max_epochs=0, progress=False)
    for call in (lambda: plain.log_prob(y, context=x), lambda: plain.sample(3, context=x[0])):
        with pytest.raises(ValueError, match="fitted without a context"):
            call()
    fresh = DensityEstimator("maf", seed=0, **SMALL)
    for options, match in (({"lr": 0.0}, "lr > 0"), ({"lr": -1e-3}, "lr > 0"),
                           ({"batch_size": 0}, "batch_size >= 1")):
        with pytest.raises(ValueError, match=match):
            fresh.fit(y, context=x, progress=False, **options)


def test_context_shift_passes_the_conditional_conformance_suite(device, dtype):
    """The whiten pipeline's u = v + W h layer: shapes, round trips, log-det (0) against autograd,
    gradients, save/load, no stale cache across contexts, a bad context."""
    check_conditional_transform(lambda: pipeline.ContextShift(3, 2), 3, 2, device=device,
                                dtype=dtype)
