"""DensityEstimator: exact densities (Gaussian start, grid integrals, known targets), the fit loop
(early stopping, interrupts), save/load, devices and dtypes, and bad input."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn

import pyroflows as pf
from pyroflows.density import _WHITEN_KINDS, DensityEstimator, _Standardize, _Whiten
from pyroflows.testing import check_transform, randomize_parameters_, tolerances
from pyroflows.transforms import TriangularAffine

SMALL = {"num_layers": 2, "hidden_dims": (16, 16)}


pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)


def _gaussian_data(n: int, seed: int):
    """Rows of N(mean, cov) with a scaled, shifted, correlated covariance, in float64 numpy."""
    rng = np.random.default_rng(seed)
    mean = np.array([5.0, -2.0, 0.5])
    a = np.array([[3.0, 0.0, 0.0], [1.2, 0.5, 0.0], [-0.4, 0.3, 0.8]])
    return rng.standard_normal((n, 3)) @ a.T + mean, mean, a @ a.T


def _mixture_2d(n: int, seed: int):
    """A two-component 2-D Gaussian mixture far from N(0, I) (scales 3 and 0.5, shifted), and its
    exact log-density."""
    means = np.array([[2.0, -3.0], [8.0, -1.0]])
    covs = [np.array([[2.0, 0.6], [0.6, 0.3]]), np.array([[1.0, -0.3], [-0.3, 0.25]])]
    weights = np.array([0.4, 0.6])
    rng = np.random.default_rng(seed)
    comp = rng.choice(2, size=n, p=weights)
    x = np.empty((n, 2))
    for k in range(2):
        idx = comp == k
        x[idx] = rng.multivariate_normal(means[k], covs[k], size=int(idx.sum()))

    def log_prob(points: np.ndarray) -> np.ndarray:
        parts = [
            np.log(w) + multivariate_normal(m, c).logpdf(points)
            for w, m, c in zip(weights, means, covs, strict=True)
        ]
        return np.logaddexp(*parts)

    return x, log_prob


def _t(x: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.as_tensor(x, device=device, dtype=dtype)


# ---- the model starts at the maximum-likelihood Gaussian ---------------------------------------
@pytest.mark.parametrize("flow", ["maf", "realnvp"])
@pytest.mark.parametrize("precondition", ["whiten", "standardize"])
def test_untrained_model_is_the_ml_gaussian(flow, precondition, device, dtype):
    x, _, _ = _gaussian_data(300, seed=1)
    x_val, _, _ = _gaussian_data(50, seed=2)
    est = DensityEstimator(flow, precondition=precondition, dtype=dtype, seed=0, **SMALL)
    est.fit(_t(x, device, dtype), x_val=_t(x_val, device, dtype), max_epochs=0, progress=False)
    # The truth, computed independently: ML mean and covariance (divisor n) of the training rows.
    cov = np.cov(x.T, bias=True)
    if precondition == "standardize":
        cov = np.diag(np.diag(cov))
    reference = multivariate_normal(x.mean(0), cov)
    x_test, _, _ = _gaussian_data(200, seed=3)
    got = est.log_prob(_t(x_test, device, dtype))
    assert got.device.type == device.type and got.dtype == dtype
    expected = _t(reference.logpdf(x_test), device, dtype)
    torch.testing.assert_close(got, expected, **tolerances(dtype))
    assert est.history_["initial_val_log_prob"] == pytest.approx(
        reference.logpdf(x_val).mean(), rel=1e-5 if dtype == torch.float64 else 1e-3
    )


# ---- exact density checks --------------------------------------------------------------------
@pytest.mark.parametrize(
    "flow, precondition, refine",
    [("maf", "whiten", None), ("realnvp", "whiten", None), ("maf", "standardize", None),
     ("maf", None, None), ("realnvp", "tabak", None), ("maf", "whiten", "tabak"),
     ("maf", "cholesky", None),
     ("realnvp", "tabak", "tabak")],
)
def test_density_integrates_to_one_and_matches_its_samples(
    flow, precondition, refine, device, dtype, tmp_path
):
    """In 2-D the fitted density, with every preconditioning Jacobian and the refiner's,
    integrates to 1 on a grid, and sample() draws from that same density; save/load reproduces
    it exactly."""
    x, _ = _mixture_2d(600, seed=4)
    if precondition is None:  # the raw flow starts at N(0, I): give it data it can reach
        x = (x - x.mean(0)) / x.std(0)
    est = DensityEstimator(
        flow, precondition=precondition, refine=refine, dtype=dtype, seed=1,
        # A short plain Tabak fit, so the neural flow on top has something left to learn.
        tabak_options={"max_steps": 40, "check_every": 10, "num_candidates": 1}, **SMALL,
    )
    est.fit(_t(x, device, dtype), max_epochs=15, batch_size=128, lr=3e-3, progress=False)
    assert est.history_["best_epoch"] > 0, "training never improved on the initial model"
    if refine:  # a short fit leaves structure in the latent codes: the refiner must act
        assert est.history_["refine_steps"] > 0

    lo, hi = x.min(0) - 3 * x.std(0), x.max(0) + 3 * x.std(0)
    n = 400
    g0 = torch.linspace(lo[0], hi[0], n, device=device, dtype=torch.float64)
    g1 = torch.linspace(lo[1], hi[1], n, device=device, dtype=torch.float64)
    grid = torch.cartesian_prod(g0, g1)
    cell = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
    density = est.log_prob(grid.to(dtype)).double().exp()
    total = float(density.sum()) * cell
    assert total == pytest.approx(1.0, abs=0.02), f"the density integrates to {total}"

    # The mass of a half-plane by quadrature against the share of draws in it (4 std errors).
    split = float(np.median(x[:, 0]))
    mass = float(density[grid[:, 0] > split].sum()) * cell / total
    draws = est.sample(4000, seed=0)
    assert draws.shape == (4000, 2) and draws.dtype == dtype
    share = float((draws[:, 0] > split).double().mean())
    assert abs(share - mass) < 4 * math.sqrt(mass * (1 - mass) / 4000) + 0.01

    path = tmp_path / "model.pt"
    est.save(path)
    loaded = DensityEstimator.load(path, device=device)
    assert torch.equal(loaded.log_prob(grid[:500].to(dtype)), est.log_prob(grid[:500].to(dtype)))
    assert torch.equal(loaded.sample(5, seed=3), est.sample(5, seed=3))


def test_recovers_a_known_mixture(device, dtype):
    """Data from a 2-D Gaussian mixture: the held-out KL estimate mean(log p - log q) is small,
    and far below that of the best single Gaussian (where training starts)."""
    x, log_p = _mixture_2d(3000, seed=5)
    x_test, _ = _mixture_2d(3000, seed=6)
    est = DensityEstimator("maf", num_layers=4, hidden_dims=(32, 32), dtype=dtype, seed=0)
    est.fit(_t(x, device, dtype), max_epochs=40, batch_size=256, lr=3e-3, patience=8,
            progress=False)
    truth = log_p(x_test)
    gap = float(np.mean(truth - est.log_prob(_t(x_test, device, dtype)).cpu().double().numpy()))
    gaussian = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_test)
    gaussian_gap = float(np.mean(truth - gaussian))
    assert gaussian_gap > 0.3
    assert -0.05 < gap < 0.08, f"KL(p || q) estimate {gap:.3f} nats"


def test_known_gaussian_is_recovered(device, dtype):
    x, mean, cov = _gaussian_data(2000, seed=7)
    x_test, _, _ = _gaussian_data(4000, seed=8)
    est = DensityEstimator("realnvp", dtype=dtype, seed=0, **SMALL)
    est.fit(x, max_epochs=10, progress=False)  # numpy input
    truth = multivariate_normal(mean, cov).logpdf(x_test)
    gap = float(np.mean(truth - est.log_prob(x_test).cpu().double().numpy()))
    assert abs(gap) < 0.03, f"KL(p || q) estimate {gap:.3f} nats"


def test_small_data_never_below_the_gaussian(device, dtype):
    """Few rows, a big network: the held-out log-likelihood is at least the ML Gaussian's (the
    Gaussian computed independently here), because training starts there and early stopping
    keeps the best state."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((8, 8)) * 0.5 + np.eye(8)
    x = rng.standard_t(df=4, size=(60, 8)) @ a.T
    x_val = rng.standard_t(df=4, size=(40, 8)) @ a.T
    est = DensityEstimator("maf", num_layers=3, hidden_dims=(128, 128), dtype=dtype, seed=0)
    est.fit(_t(x, device, dtype), x_val=_t(x_val, device, dtype), max_epochs=30, lr=1e-2,
            patience=5, progress=False)
    gaussian = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_val).mean()
    slack = 1e-6 if dtype == torch.float64 else 1e-3
    assert est.score(_t(x_val, device, dtype)) >= gaussian - slack


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
@pytest.mark.parametrize("precondition", ["whiten", None])
def test_training_objective_is_the_layer_by_layer_density(flow, precondition, device, dtype):
    """The training objective (the stack's fused inverse, through FlowDistribution) equals the
    layer-by-layer path, log N(z; 0, I) + log|det dz/du| with z = model.latent(u), and that
    log-det equals autograd's Jacobian of the layer-by-layer map; values and gradients."""
    x, _, _ = _gaussian_data(64, seed=5)
    est = DensityEstimator(flow, precondition=precondition, dtype=dtype, seed=0, **SMALL)
    est.fit(_t(x, device, dtype), max_epochs=0, progress=False)
    model = est._model
    assert isinstance(model.flow, pf.flows.FlowStack) and model.flow._fused
    randomize_parameters_(model.flow, scale=0.1, seed=1)
    u = model.precondition(_t(x[:8], device, dtype))[0]
    fused = model.flow_log_prob(u)
    z, log_det = model.latent(u)
    normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    layered = normal.log_prob(z).sum(-1) + log_det
    tol = tolerances(dtype)
    torch.testing.assert_close(fused, layered, **tol)
    grads = [torch.autograd.grad(v.sum(), list(model.flow.parameters())) for v in
             (model.flow_log_prob(u), normal.log_prob(model.latent(u)[0]).sum(-1)
              + model.latent(u)[1])]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
    u64 = u[:3].double()
    model.double()
    for row in u64:
        jac = torch.autograd.functional.jacobian(lambda v: model.latent(v)[0], row[None])
        expected = torch.linalg.slogdet(jac.reshape(3, 3))[1]
        got = float(model.latent(row[None])[1].detach())
        assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


# ---- the refining Tabak transform and the automatic choice --------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refiner_keeps_no_steps_on_gaussian_codes(seed, device, dtype, tmp_path):
    """Gaussian data, no flow epochs: the codes are the whitened data, N(0, I) in truth, so no
    refining step can help; the refiner's default rule ("significant": a gain must exceed one
    standard error of the per-row differences on the validation codes) keeps none. A
    tabak_options selection overrides the rule and survives save/load."""
    x, _, _ = _gaussian_data(360, seed=seed)
    x_train, x_val = _t(x[:300], device, dtype), _t(x[300:], device, dtype)
    est = DensityEstimator("maf", refine="tabak", dtype=dtype, seed=seed, **SMALL,
                           tabak_options={"max_steps": 300, "patience": 4})
    est.fit(x_train, x_val=x_val, max_epochs=0, progress=False)
    assert est._model.refine[0].selection == "significant"
    assert est.history_["refine_steps"] == 0
    est = DensityEstimator("maf", refine="tabak", dtype=dtype, seed=seed, **SMALL,
                           tabak_options={"selection": "one_se", "max_steps": 50})
    est.fit(x_train, x_val=x_val, max_epochs=0, progress=False)
    est.save(tmp_path / "m.pt")
    assert DensityEstimator.load(tmp_path / "m.pt")._model.refine[0].selection == "one_se"


def test_refined_density_matches_autograd_jacobian_and_never_loses_on_validation(device, dtype):
    """log_prob with a refiner is log N(z; 0, I) + log|det dz/dx| of the whole composed map
    x -> u -> flow latent -> refiner's Gaussian z, the determinant taken here by autograd; the
    refined model scores the validation split at the recorded value, never below the flow's
    own best (zero steps, the flow alone, is among the refiner's choices)."""
    x, _ = _mixture_2d(700, seed=20)
    x_train, x_val = _t(x[:500], device, dtype), _t(x[500:], device, dtype)
    est = DensityEstimator("maf", refine="tabak", dtype=dtype, seed=2, **SMALL,
                           tabak_options={"max_steps": 60, "check_every": 10})
    est.fit(x_train, x_val=x_val, max_epochs=6, lr=3e-3, progress=False)
    h, model = est.history_, est._model
    assert h["refine_steps"] > 0 and len(model.refine) == 1
    assert h["final_val_log_prob"] >= h["best_val_log_prob"] - 1e-5
    tol = {"rel": 1e-9, "abs": 1e-9} if dtype == torch.float64 else {"rel": 1e-4, "abs": 1e-4}
    assert est.score(x_val) == pytest.approx(h["final_val_log_prob"], **tol)

    def composed(point: torch.Tensor) -> torch.Tensor:
        u = model.precondition(point)[0]
        z = model.latent(u)[0]
        for part in reversed(list(model.refine)):
            z = part.inv(z)
        return z

    points = x_val[:6].double()
    model.double()
    try:
        for point in points:
            jac = torch.autograd.functional.jacobian(composed, point.unsqueeze(0)).reshape(2, 2)
            z = composed(point.unsqueeze(0))[0]
            expected = (-0.5 * z.square().sum() - math.log(2 * math.pi)
                        + torch.linalg.slogdet(jac)[1])
            got = model.log_prob(point.unsqueeze(0))[0]
            torch.testing.assert_close(got, expected.detach(), rtol=1e-7, atol=1e-7)
    finally:
        model.to(dtype)


def test_auto_keeps_the_better_candidate_and_reloads_it(device, dtype, tmp_path):
    """precondition="auto" fits flow-first and Tabak-first models and keeps the one with the
    higher validation log-likelihood: the kept model's score on the validation rows, recomputed
    here, is the larger of the two recorded; save/load rebuilds that pipeline."""
    x, _ = _mixture_2d(500, seed=21)
    x_train, x_val = _t(x[:400], device, dtype), _t(x[400:], device, dtype)
    est = DensityEstimator("realnvp", precondition="auto", refine="tabak", dtype=dtype, seed=3,
                           **SMALL, tabak_options={"max_steps": 60, "check_every": 10})
    est.fit(x_train, x_val=x_val, max_epochs=4, lr=3e-3, progress=False)
    cands = est.history_["candidates"]
    assert set(cands) == {"tabak", "whiten"}
    chosen = max(cands, key=cands.get)
    assert est.precondition_ == est.history_["precondition"] == chosen
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert est.score(x_val) == pytest.approx(cands[chosen], abs=tol)
    # The flow-first candidate is the very fit precondition="whiten" makes with the same seed.
    plain = DensityEstimator("realnvp", precondition="whiten", refine="tabak", dtype=dtype,
                             seed=3, **SMALL, tabak_options={"max_steps": 60, "check_every": 10})
    plain.fit(x_train, x_val=x_val, max_epochs=4, lr=3e-3, progress=False)
    assert plain.history_["final_val_log_prob"] == pytest.approx(cands["whiten"], abs=tol)
    has_tabak_stage = any(type(s).__name__ == "Tabak" for s in est._model.stages)
    assert has_tabak_stage == (chosen == "tabak")
    est.save(tmp_path / "auto.pt")
    loaded = DensityEstimator.load(tmp_path / "auto.pt", device=device)
    assert loaded.precondition == "auto" and loaded.precondition_ == chosen
    assert torch.equal(loaded.log_prob(x_val), est.log_prob(x_val))
    with pytest.raises(ValueError, match="refine"):
        DensityEstimator(refine="flow")


def test_auto_keeps_the_finished_candidate_when_the_next_one_fails(device, dtype, monkeypatch):
    """A failure while fitting auto's second candidate (Tabak first) propagates, and the
    estimator holds the finished flow-first model, scoring what it scored on validation."""
    x, _ = _mixture_2d(300, seed=5)
    x_train, x_val = _t(x[:240], device, dtype), _t(x[240:], device, dtype)
    est = DensityEstimator("maf", precondition="auto", dtype=dtype, seed=1, **SMALL)
    real_fit_one = DensityEstimator._fit_one

    def fit_one(self, precondition, *args, **kwargs):
        model = real_fit_one(self, precondition, *args, **kwargs)
        if precondition == "tabak":
            raise RuntimeError("simulated failure in the second candidate")
        return model

    monkeypatch.setattr(DensityEstimator, "_fit_one", fit_one)
    with pytest.raises(RuntimeError, match="simulated"):
        est.fit(x_train, x_val=x_val, max_epochs=2, progress=False)
    assert est.precondition_ == "whiten"
    assert not any(type(s).__name__ == "Tabak" for s in est._model.stages)
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert est.score(x_val) == pytest.approx(est.history_["candidates"]["whiten"], abs=tol)


# ---- the fit loop ---------------------------------------------------------------------------
def _overfitting_setup(device, dtype):
    x, _ = _mixture_2d(240, seed=10)
    x_train, x_val = _t(x[:40], device, dtype), _t(x[40:], device, dtype)
    est = DensityEstimator("maf", num_layers=3, hidden_dims=(64, 64), dtype=dtype, seed=0)
    return est, x_train, x_val


@pytest.mark.parametrize("averaging_epochs", [1.0, 0.0])
def test_early_stopping_restores_the_best_state(averaging_epochs, device, dtype):
    est, x_train, x_val = _overfitting_setup(device, dtype)
    est.fit(x_train, x_val=x_val, max_epochs=400, batch_size=16, lr=1e-2, patience=5,
            averaging_epochs=averaging_epochs, progress=False)
    h = est.history_
    assert h["stopped"] == "early_stopping"
    assert h["epoch"][-1] == h["best_epoch"] + 6 and h["best_epoch"] > 0
    assert h["best_val_log_prob"] == max(h["val_log_prob"])
    assert h["val_log_prob"][-1] < h["best_val_log_prob"]
    # The restored model scores the validation rows at the best epoch's value, not the last's.
    assert est.score(x_val) == pytest.approx(h["best_val_log_prob"], abs=1e-4)
    assert set(h) >= {"train_log_prob", "initial_val_log_prob", "seconds", "num_train"}
    assert len(h["train_log_prob"]) == len(h["epoch"]) == len(h["val_log_prob"])


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_fit_keeps_the_best_state(exc, device, dtype, monkeypatch):
    est, x_train, x_val = _overfitting_setup(device, dtype)
    original = DensityEstimator._run_epoch
    calls = []

    def run_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise exc("stop")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DensityEstimator, "_run_epoch", run_epoch)
    if exc is KeyboardInterrupt:
        with pytest.warns(UserWarning, match="interrupted"):
            assert est.fit(x_train, x_val=x_val, lr=1e-2, progress=False) is est
        assert est.history_["stopped"] == "interrupted"
    else:
        with pytest.raises(RuntimeError, match="stop"):
            est.fit(x_train, x_val=x_val, lr=1e-2, progress=False)
        assert est.history_["stopped"] == "error"
    h = est.history_
    assert h["epoch"] == [0, 1, 2, 3, 4, 5]
    assert est.score(x_val) == pytest.approx(max(h["val_log_prob"]), abs=1e-4)


def _state(model, optimizer, average):
    """Copies of everything a training step may change."""
    return ([p.detach().clone() for p in model.flow.parameters()],
            [{k: v.clone() for k, v in optimizer.state[p].items()}
             for p in model.flow.parameters()],
            [a.clone() for a in average.average])


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_with_a_non_finite_loss_or_gradient_changes_nothing(fused, device, dtype):
    """fit's step skips a minibatch whose loss or gradient is not finite: the parameters,
    Adam's moments and step count and the moving average stay exactly as they were (with the
    fused Adam the skip is decided on the device; with another Adam on the host), and a
    finite step after it moves them all."""
    from pyroflows.density import _training_state, _training_step

    x, _, _ = _gaussian_data(64, seed=21)
    x = _t(x, device, dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=0,
                                                                    progress=False)
    model = est._model
    optimizer, params, average = _training_state(model, lr=1e-2, weight_decay=0.0, rate=0.1)
    if not fused:
        optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-2)
    assert bool(optimizer.defaults.get("fused")) == fused
    u = model.precondition(x)[0]

    def step(rows):
        with pf.validation(False):  # as fit runs its steps
            return _training_step(model, rows, optimizer, params, average)

    lp, skipped = step(u)  # Adam's state exists
    assert not skipped and lp.shape == (64,) and not lp.requires_grad
    before = _state(model, optimizer, average)

    bad_rows = u.clone()
    bad_rows[5] = torch.finfo(dtype).max  # overflows: a non-finite loss
    _, skipped = step(bad_rows)
    assert skipped
    hook = params[-1].register_hook(lambda g: g * float("inf"))  # finite loss, inf gradient
    try:
        lp, skipped = step(u)
    finally:
        hook.remove()
    assert skipped and torch.isfinite(lp).all()
    for got, want in zip(_state(model, optimizer, average), before, strict=True):
        for a, b in zip(got, want, strict=True):
            if isinstance(a, dict):
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a)
            else:
                assert torch.equal(a, b)
    assert not hasattr(optimizer, "found_inf")

    _, skipped = step(u)
    assert not skipped
    after = _state(model, optimizer, average)
    assert all(not torch.equal(a, b) for a, b in zip(after[0], before[0], strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(after[2], before[2], strict=True))
    assert all(int(s["step"]) == 2 for s in after[1])


def test_an_epoch_counts_its_skipped_steps_and_scores_the_kept_rows(device, dtype):
    """An epoch with overflowing rows in two of its minibatches: those two steps are counted
    as skipped, the parameters stay finite, and the epoch's training score is the mean over
    the kept minibatches' rows (here with the steps' learning rate 0, so every kept row is
    scored by the initial model: the mean of its log-likelihoods, computed directly)."""
    from pyroflows.density import _training_state

    x, _, _ = _gaussian_data(80, seed=22)
    x = _t(x, device, dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=0,
                                                                    progress=False)
    model = est._model
    u, ld = model.precondition(x)
    u = u.clone()
    u[[3, 41]] = torch.finfo(dtype).max  # overflows: a non-finite loss
    optimizer, params, average = _training_state(model, lr=0.0, weight_decay=0.0, rate=0.1)
    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(5))
    batches = perm.split(16)
    bad = [b for b in batches if bool(((b == 3) | (b == 41)).any())]
    kept = torch.cat([b for b in batches if not bool(((b == 3) | (b == 41)).any())])
    history = {"skipped_steps": 0}
    with pf.validation(False):  # as fit runs its epochs
        score = est._run_epoch(model, u, ld, optimizer, params, 16, gen, history, average)
    assert history["skipped_steps"] == len(bad)
    assert all(torch.isfinite(p).all() for p in model.flow.parameters())
    with torch.no_grad(), pf.validation(False):
        want = (model.flow_log_prob(u[kept.to(u.device)]) + ld[kept.to(u.device)]).mean()
    assert score == pytest.approx(float(want), rel=1e-5)


def test_failed_refit_keeps_the_previous_model(device, dtype):
    x, _, _ = _gaussian_data(200, seed=11)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=2,
                                                                    progress=False)
    before = est.log_prob(x[:10])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(bad, progress=False)
    assert torch.equal(est.log_prob(x[:10]), before)


def test_progress_bar_and_seed(device, dtype, capsys):
    x, _, _ = _gaussian_data(300, seed=12)
    runs = [
        DensityEstimator("realnvp", dtype=dtype, seed=3, **SMALL).fit(
            _t(x, device, dtype), max_epochs=3, progress=progress
        )
        for progress in (True, False)
    ]
    assert "val=" in capsys.readouterr().err  # tqdm writes to stderr
    assert runs[0].history_["val_log_prob"] == runs[1].history_["val_log_prob"]
    assert torch.equal(runs[0].sample(3, seed=1), runs[1].sample(3, seed=1))


# ---- devices, dtypes, input types ------------------------------------------------------------
def test_dtype_and_device_follow_input_or_arguments(device, dtype):
    x, _, _ = _gaussian_data(100, seed=13)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    assert est.log_prob(x).dtype == torch.get_default_dtype()  # numpy input: the default dtype
    est = DensityEstimator("maf", seed=0, **SMALL).fit(
        _t(x, device, dtype), max_epochs=1, progress=False
    )
    lp = est.log_prob(x)  # numpy input to a fitted model: converted to its device and dtype
    assert lp.dtype == dtype and lp.device.type == device.type
    assert est.log_prob(x[0]).shape == ()  # one point
    assert est.sample(3).device.type == device.type
    other = torch.float32 if dtype == torch.float64 else torch.float64
    moved = est.to("cpu", dtype=other)
    assert moved is est and est.log_prob(x).dtype == other
    torch.testing.assert_close(est.log_prob(x).to(dtype).cpu(), lp.cpu(), rtol=1e-4, atol=1e-4)


def test_save_is_atomic_and_overwrites(device, dtype, tmp_path):
    x, _, _ = _gaussian_data(100, seed=14)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=2,
                                                                    progress=False)
    path = tmp_path / "est.pt"
    path.write_bytes(b"old")
    est.save(str(path))
    assert os.listdir(tmp_path) == ["est.pt"]  # no temporary file left behind
    loaded = DensityEstimator.load(path)
    assert torch.equal(loaded.log_prob(x), est.log_prob(x).cpu())
    assert loaded.history_ == est.history_ and loaded.get_params() == est.get_params()
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickling error type varies
        DensityEstimator.load(tmp_path / "junk.pt")


def _tanh_factory() -> nn.Module:
    """A module-level activation factory: saved by import name, loaded only when trusted."""
    return nn.Tanh()


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_every_option_kind_survives_save_and_load(flow, device, dtype, tmp_path):
    """Options of every kind a user can pass (tuples, numpy arrays and scalars, tensors, classes,
    functools.partial) come back equal after save/load, and the rebuilt network really uses
    them: the activation is not in the state dict, so a lost option would change log_prob."""
    x, _, _ = _gaussian_data(120, seed=16)
    order_key = "order" if flow == "maf" else "mask"
    order = np.array([2, 0, 1]) if flow == "maf" else torch.tensor([True, False, True])
    flow_options = {
        "activation": functools.partial(nn.LeakyReLU, 0.1),
        order_key: order,
        "log_scale_bound": np.float64(3.0),
        "permutation": "random",
        "affine": True,
    }
    tabak_options = {"width": (0.05, 0.3), "max_steps": np.int64(30), "check_every": 10}
    est = DensityEstimator(flow, precondition="tabak", dtype=dtype, seed=0, **SMALL,
                           flow_options=flow_options, tabak_options=tabak_options)
    est.fit(_t(x, device, dtype), max_epochs=2, progress=False)
    path = tmp_path / "options.pt"
    est.save(path)
    loaded = DensityEstimator.load(path, device=device)
    assert torch.equal(loaded.log_prob(x), est.log_prob(x))
    got = loaded.get_params()
    act = got["flow_options"]["activation"]
    assert isinstance(act, functools.partial) and act.func is nn.LeakyReLU and act.args == (0.1,)
    np.testing.assert_array_equal(np.asarray(got["flow_options"][order_key]), np.asarray(order))
    assert got["flow_options"]["log_scale_bound"] == 3.0
    assert got["tabak_options"] == {"width": (0.05, 0.3), "max_steps": 30, "check_every": 10}
    slopes = {m.negative_slope for m in loaded._model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1} and not any(isinstance(m, nn.ReLU) for m in loaded._model.modules())

    # A module-level function outside torch/pyro/pyroflows loads only when its package is
    # trusted.
    est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL,
                           flow_options={"activation": _tanh_factory})
    est.fit(_t(x, device, dtype), max_epochs=1, progress=False)
    est.save(path)
    with pytest.raises(ValueError, match="trusted_modules"):
        DensityEstimator.load(path)
    package = _tanh_factory.__module__.split(".")[0]
    loaded = DensityEstimator.load(path, device=device, trusted_modules=(package,))
    assert loaded.get_params()["flow_options"]["activation"] is _tanh_factory
    assert torch.equal(loaded.log_prob(x), est.log_prob(x))


def test_options_that_cannot_be_saved_are_rejected_up_front(tmp_path):
    for kwargs, match in [
        ({"flow_options": {"activation": lambda: nn.Tanh()}}, "lambda"),
        ({"flow_options": {"activation": nn.Tanh()}}, "module instance"),
        ({"flow_options": {"num_layers": 3}}, "DensityEstimator argument"),
        ({"flow_options": {"hidden_dims": (8,)}}, "DensityEstimator argument"),
        ({"flow_options": {"mask": [True, False]}}, "unknown option 'mask'"),  # MAF: 'order'
        ({"tabak_options": {"widht": 0.1}}, "unknown option 'widht'"),
    ]:
        with pytest.raises(ValueError, match=match):
            DensityEstimator("maf", **kwargs)
    # A crafted file naming an arbitrary function is refused, not imported and called.
    x, _, _ = _gaussian_data(60, seed=17)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=0, progress=False)
    est.save(tmp_path / "ok.pt")
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["params"]["flow_options"] = {
        "activation": {"__pyroflows_option__": "callable", "name": "os:getcwd"}}
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match="only nn.Module classes"):
        DensityEstimator.load(tmp_path / "crafted.pt")
    # Files of format version 1 (plain options only) still load.
    payload["version"], payload["params"]["flow_options"] = 1, {"permutation": "reverse"}
    torch.save(payload, tmp_path / "v1.pt")
    assert torch.equal(DensityEstimator.load(tmp_path / "v1.pt").log_prob(x), est.log_prob(x))


# ---- the estimator's default log-scale bound ------------------------------------------------
def _bounds(est) -> set[float]:
    return {m.log_scale_bound for m in est._model.modules() if hasattr(m, "log_scale_bound")}


def _max_layer_log_det(est, x) -> float:
    """The largest |log det| of any one flow layer at the preconditioned rows ``x``."""
    u, _ = est._model.precondition(x)
    worst = 0.0
    for layer in est._model.flow.parts:
        u, ld = layer.inverse_and_log_det(u)
        if hasattr(layer, "log_scale_bound"):
            worst = max(worst, float(ld.abs().max()))
    return worst


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_default_log_scale_bound_and_explicit_override(flow, device, dtype):
    """Without flow_options every layer gets the estimator's bound 2 (not the layers' 5), so
    with far-from-identity parameters no layer's |log det| exceeds D * 2 (each of the D log
    scales is b tanh(s / b)); an explicit log_scale_bound wins, and then the same parameters
    do exceed D * 2 (so the first check can fail). get_params keeps what the user passed."""
    x, _, _ = _gaussian_data(200, seed=18)
    xt = _t(x, device, dtype)
    fitted = {}
    for options in (None, {"log_scale_bound": 5.0}):
        est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL, flow_options=options)
        est.fit(xt, max_epochs=0, progress=False)
        randomize_parameters_(est._model.flow, scale=3.0, seed=1)
        fitted[5.0 if options else 2.0] = est
        assert est.get_params()["flow_options"] == (options or {})
    assert _bounds(fitted[2.0]) == {2.0} and _bounds(fitted[5.0]) == {5.0}
    far = xt * 4.0
    with torch.no_grad():
        assert _max_layer_log_det(fitted[2.0], far) <= 3 * 2.0 + 1e-4
        assert _max_layer_log_det(fitted[5.0], far) > 3 * 2.0


def test_saved_files_keep_their_log_scale_bound(device, dtype, tmp_path, monkeypatch):
    """A file written before the estimator had a default bound (format version 2, default
    flow_options {}) was built with the layers' bound 5 and must load with it, reproducing its
    log_prob, not silently become a bound-2 model; a current file keeps the defaults it was
    built with even if the module's default changes later; explicit options still win."""
    x, _, _ = _gaussian_data(200, seed=19)
    xt = _t(x, device, dtype)
    old = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL,
                           flow_options={"log_scale_bound": 5.0})
    old.fit(xt, max_epochs=0, progress=False)
    randomize_parameters_(old._model.flow, scale=3.0, seed=2)
    old.save(tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    # What version 2 wrote for DensityEstimator("maf") with these weights.
    del payload["flow_defaults"]
    payload["version"], payload["params"]["flow_options"] = 2, {}
    torch.save(payload, tmp_path / "v2.pt")
    loaded = DensityEstimator.load(tmp_path / "v2.pt", device=device)
    assert _bounds(loaded) == {5.0} and loaded.get_params()["flow_options"] == {}
    assert torch.equal(loaded.log_prob(xt * 4.0), old.log_prob(xt * 4.0))
    # The same weights under the current default are another model (the check above can fail).
    payload["version"], payload["flow_defaults"] = 3, {"log_scale_bound": 2.0}
    torch.save(payload, tmp_path / "v3.pt")
    assert not torch.equal(DensityEstimator.load(tmp_path / "v3.pt", device=device)
                           .log_prob(xt * 4.0), old.log_prob(xt * 4.0))
    # A current default-bound file keeps bound 2 if the default moves; options still win.
    new = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(xt, max_epochs=0,
                                                                    progress=False)
    randomize_parameters_(new._model.flow, scale=3.0, seed=3)
    new.save(tmp_path / "default.pt")
    monkeypatch.setattr(pf.density, "_FLOW_DEFAULTS", {"log_scale_bound": 4.0})
    loaded = DensityEstimator.load(tmp_path / "default.pt", device=device)
    assert _bounds(loaded) == {2.0}
    assert torch.equal(loaded.log_prob(xt * 4.0), new.log_prob(xt * 4.0))
    assert _bounds(DensityEstimator.load(tmp_path / "new.pt", device=device)) == {5.0}


@pytest.mark.parametrize("flow,precondition", [("maf", "standardize"), ("realnvp", "whiten")])
def test_files_with_per_layer_conditioners_load(flow, precondition, device, dtype, tmp_path,
                                                monkeypatch):
    """A file saved before the flow's networks shared one parameter tensor (written here by
    the estimator with the stacking switched off: keys ``flow.{i}.conditioner.flat_parameters``,
    shifted by one behind the whitening layer) loads into the stacked flow with the same
    log_prob; saved again, the file holds the stacked tensor once and loads back."""
    x, _, _ = _gaussian_data(200, seed=21)
    xt = _t(x, device, dtype)
    with monkeypatch.context() as m:
        m.setitem(pf.flows.FAMILIES, flow, dataclasses.replace(
            pf.flows.FAMILIES[flow], stacked_conditioners=False))
        old = DensityEstimator(flow, dtype=dtype, seed=0, precondition=precondition, **SMALL)
        old.fit(xt, max_epochs=0, progress=False)
    randomize_parameters_(old._model.flow, scale=0.5, seed=2)
    old.save(tmp_path / "old.pt")
    keys = torch.load(tmp_path / "old.pt", weights_only=True)["state_dict"]
    first = 1 if isinstance(old._model.flow[0], TriangularAffine) else 0
    assert f"flow.{first}.conditioner.flat_parameters" in keys
    loaded = DensityEstimator.load(tmp_path / "old.pt", device=device)
    assert len(list(loaded._model.flow.parameters())) == len(list(old._model.flow.parameters())) - 1
    torch.testing.assert_close(loaded.log_prob(xt), old.log_prob(xt), **tolerances(dtype))
    loaded.save(tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)["state_dict"]
    banks = [v for k, v in state.items() if k.endswith("stacked.flat_parameters")]
    assert len(banks) == 2 and banks[0].untyped_storage().data_ptr() == \
        banks[1].untyped_storage().data_ptr()  # one tensor under both layers' keys
    again = DensityEstimator.load(tmp_path / "new.pt", device=device)
    assert torch.equal(again.log_prob(xt), loaded.log_prob(xt))


# ---- bad input ------------------------------------------------------------------------------
def test_bad_input_raises_value_errors(device, dtype):
    x, _, _ = _gaussian_data(50, seed=15)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL)
    for call in (lambda: est.log_prob(x), lambda: est.sample(3), lambda: est.score(x),
                 lambda: est.save("never.pt")):
        with pytest.raises(ValueError, match="not fitted"):
            call()
    bad = x.copy()
    bad[[4, 9], 0] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"NaN or infinite .* 2 row\(s\), e.g. rows \[4, 9\]"):
        est.fit(bad, progress=False)
    with pytest.raises(ValueError, match="at least 2 rows"):
        est.fit(x[:1], progress=False)
    with pytest.raises(ValueError, match="2-D"):
        est.fit(x[None], progress=False)
    with pytest.raises(ValueError, match="numeric"):
        est.fit(np.array([["a", "b"], ["c", "d"]]), progress=False)
    with pytest.raises(ValueError, match="x_val has 2 columns, expected 3"):
        est.fit(x, x_val=x[:5, :2], progress=False)
    est.fit(_t(x, device, dtype), max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="4 columns, expected 3"):
        est.log_prob(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        est.log_prob(bad)
    for kwargs in ({"flow": "iaf"}, {"precondition": "pca"}, {"num_layers": 0},
                   {"hidden_dims": ()}, {"dtype": torch.int64}):
        with pytest.raises(ValueError):
            DensityEstimator(**kwargs)
    with pytest.raises(ValueError, match="max_epochs"):
        est.fit(x, max_epochs=-1)
    with pytest.raises(ValueError, match="averaging_epochs"):
        est.fit(x, averaging_epochs=-1.0)


# ---- the preconditioning layers are exact flow layers -----------------------------------------
def _fitted_standardize():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(50, 4, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 20.0]) + 3
    return _Standardize(4).fit(data)


def _random_cholesky():
    t = TriangularAffine(4)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen)
    t.set_scale_tril_(torch.linalg.cholesky(a @ a.T + 0.5 * torch.eye(4)))
    return t


def _fitted_whiten():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 20.0])
    return _Whiten(4).fit(torch.randn(50, 4, generator=gen) @ a.T + 3)


@pytest.mark.parametrize("factory", [_fitted_standardize, _random_cholesky, _fitted_whiten])
def test_preconditioning_layers_conformance(factory, device, dtype):
    check_transform(factory, dim=4, device=device, dtype=dtype)


def test_lazy_module_access():
    assert pf.density.DensityEstimator is DensityEstimator


# ---- the kinds of precondition="whiten" --------------------------------------------------------
def test_fixed_whitening_stage_whitens_its_training_rows(device, dtype):
    """_Whiten fitted to rows of a correlated Gaussian maps them to rows with mean 0 and the
    identity as their ML covariance (checked with numpy), and its log-det is log|det| of the
    Cholesky factor of numpy's ML covariance."""
    x, _, _ = _gaussian_data(400, seed=30)
    stage = _Whiten(3).to(device=device, dtype=dtype).fit(_t(x, device, dtype))
    u, log_det = stage.inverse_and_log_det(_t(x, device, dtype))
    u = u.cpu().double().numpy()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(u.mean(0), 0.0, atol=tol)
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(3), atol=tol)
    expected = 0.5 * np.linalg.slogdet(np.cov(x.T, bias=True))[1]
    np.testing.assert_allclose(log_det.cpu().double().numpy(), expected, rtol=tol)


@pytest.mark.parametrize("kind", _WHITEN_KINDS)
@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_whiten_kinds_start_at_the_ml_gaussian_and_match_autograd(kind, flow, device, dtype,
                                                                  monkeypatch):
    """Every kind of "whiten" pipeline starts at the ML full-covariance Gaussian (scipy's,
    computed here), and with the flow's parameters moved off the identity its log_prob is
    log N(z; 0, I) + log|det dz/dx| of the composed map x -> z, the determinant by autograd."""
    monkeypatch.setattr(pf.density, "_WHITEN", kind)
    x, _, _ = _gaussian_data(300, seed=31)
    x_val = _t(_gaussian_data(50, seed=34)[0], device, dtype)
    est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL)
    est.fit(_t(x, device, dtype), x_val=x_val, max_epochs=0, progress=False)
    model = est._model
    assert est._whiten == kind
    assert any(isinstance(s, _Whiten) for s in model.stages) == kind.startswith("fixed")
    assert isinstance(model.flow[0], TriangularAffine) == (kind != "fixed")
    x_test, _, _ = _gaussian_data(100, seed=32)
    reference = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_test)
    torch.testing.assert_close(est.log_prob(_t(x_test, device, dtype)),
                               _t(reference, device, dtype), **tolerances(dtype))

    if kind == pf.density._CHOLESKY:  # what the public precondition="cholesky" builds
        public = DensityEstimator(flow, precondition="cholesky", dtype=dtype, seed=0, **SMALL)
        public.fit(_t(x, device, dtype), x_val=x_val, max_epochs=0, progress=False)
        assert [type(s) for s in public._model.stages] == [type(s) for s in model.stages]
        assert torch.equal(public.log_prob(_t(x_test, device, dtype)),
                           est.log_prob(_t(x_test, device, dtype)))
    randomize_parameters_(model.flow, scale=0.3, seed=4)
    model.double()

    def composed(point: torch.Tensor) -> torch.Tensor:
        return model.latent(model.precondition(point)[0])[0]

    try:
        points = _t(x_test[:5], device, torch.float64)
        got = model.log_prob(points)
        for point, value in zip(points, got, strict=True):
            jac = torch.autograd.functional.jacobian(composed, point[None]).reshape(3, 3)
            z = composed(point[None])[0]
            expected = (-0.5 * z.square().sum() - 1.5 * math.log(2 * math.pi)
                        + torch.linalg.slogdet(jac)[1])
            torch.testing.assert_close(value, expected.detach(), rtol=1e-9, atol=1e-9)
        # The parameters moved: the density is no longer the Gaussian (the check above can fail).
        assert not torch.allclose(got, _t(reference[:5], device, torch.float64), atol=1e-3)
    finally:
        model.to(dtype)


def test_whiten_kind_is_saved_and_old_files_load_as_learned(device, dtype, tmp_path,
                                                            monkeypatch):
    """A file written before the kind was saved (format version 3) holds the learned-base
    pipeline and loads as it, with the same log_prob; a current file keeps its kind when the
    module's default changes."""
    x, _, _ = _gaussian_data(200, seed=33)
    xt = _t(x, device, dtype)
    with monkeypatch.context() as m:
        m.setattr(pf.density, "_WHITEN", "learned")
        old = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(xt, max_epochs=0,
                                                                        progress=False)
    randomize_parameters_(old._model.flow, scale=0.5, seed=5)
    old.save(tmp_path / "learned.pt")
    payload = torch.load(tmp_path / "learned.pt", weights_only=True)
    del payload["whiten"]  # what version 3 wrote
    payload["version"] = 3
    torch.save(payload, tmp_path / "v3.pt")
    for kind in _WHITEN_KINDS:
        monkeypatch.setattr(pf.density, "_WHITEN", kind)
        loaded = DensityEstimator.load(tmp_path / "v3.pt", device=device)
        assert loaded._whiten == "learned"
        assert torch.equal(loaded.log_prob(xt), old.log_prob(xt))
    for kind in _WHITEN_KINDS:
        monkeypatch.setattr(pf.density, "_WHITEN", kind)
        est = DensityEstimator("realnvp", dtype=dtype, seed=0, **SMALL).fit(
            xt, max_epochs=0, progress=False)
        randomize_parameters_(est._model.flow, scale=0.5, seed=6)
        est.save(tmp_path / f"{kind}.pt")
        other = next(k for k in _WHITEN_KINDS if k != kind)
        monkeypatch.setattr(pf.density, "_WHITEN", other)
        loaded = DensityEstimator.load(tmp_path / f"{kind}.pt", device=device)
        assert loaded._whiten == kind
        assert torch.equal(loaded.log_prob(xt), est.log_prob(xt))


def test_a_snapshot_clones_a_shared_bank_once():
    """The best-state snapshot of a fit holds one copy of a bank that every layer's key lists
    (not one per key), with the values of the state dict."""
    from pyroflows.density import _snapshot
    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,))
    state = flow.state_dict()
    snap = _snapshot(flow)
    assert snap.keys() == state.keys()
    bank_keys = [k for k in snap if k.endswith("stacked.flat_parameters")]
    assert len(bank_keys) == 3
    assert len({snap[k].data_ptr() for k in bank_keys}) == 1
    assert snap[bank_keys[0]].data_ptr() != state[bank_keys[0]].data_ptr()
    for k in snap:
        assert torch.equal(snap[k], state[k])


def test_the_fit_uses_adams_fused_kernel_with_the_same_update(device, dtype):
    """DensityEstimator's optimizer is torch's fused Adam where this torch has it for the
    device (one kernel a step): the same update as the default Adam, to rounding."""
    from pyroflows.density import _adam
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen, dtype=torch.float64).to(device, dtype)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64).to(device, dtype)
             for _ in range(3)]
    results = []
    for make in (_adam, lambda ps, **kw: torch.optim.Adam(ps, **kw)):
        p = torch.nn.Parameter(start.clone())
        opt = make([p], lr=0.1, weight_decay=0.01)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append((p.detach(), opt.defaults.get("fused")))
    (fused_p, fused_flag), (plain_p, _) = results
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert fused_flag or (device.type == "cpu" and version < (2, 4))  # CPU's came with 2.4
    torch.testing.assert_close(fused_p, plain_p, **tolerances(dtype))
