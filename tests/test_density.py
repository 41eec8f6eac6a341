"""DensityEstimator: exact densities (the Gaussian start, grid integrals, known targets,
autograd Jacobians), the preconditioning pipelines and the refiner, the fit loop (early stopping,
interrupts, skipped steps), sampling, devices and dtypes, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from density_data import SMALL, as_tensor, gaussian_data, log_scale_bounds, mixture_2d
from scipy.stats import multivariate_normal

import pyroflows as pf
from pyroflows.density import DensityEstimator, pipeline, training
from pyroflows.testing import check_transform, randomize_parameters_, tolerances
from pyroflows.transforms import TriangularAffine

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)


# ---- the model starts at the maximum-likelihood Gaussian -------------------------------------
@pytest.mark.parametrize("flow", ["maf", "realnvp", "nsf"])
@pytest.mark.parametrize("precondition", ["whiten", "standardize"])
def test_untrained_model_is_the_ml_gaussian(flow, precondition, device, dtype):
    x, _, _ = gaussian_data(300, seed=1)
    x_val, _, _ = gaussian_data(50, seed=2)
    est = DensityEstimator(flow, precondition=precondition, dtype=dtype, seed=0, **SMALL)
    est.fit(as_tensor(x, device, dtype), x_val=as_tensor(x_val, device, dtype), max_epochs=0,
            progress=False)
    # The truth, computed independently: ML mean and covariance (divisor n) of the training rows.
    cov = np.cov(x.T, bias=True)
    if precondition == "standardize":
        cov = np.diag(np.diag(cov))
    reference = multivariate_normal(x.mean(0), cov)
    x_test, _, _ = gaussian_data(200, seed=3)
    got = est.log_prob(as_tensor(x_test, device, dtype))
    assert got.device.type == device.type and got.dtype == dtype
    expected = as_tensor(reference.logpdf(x_test), device, dtype)
    torch.testing.assert_close(got, expected, **tolerances(dtype))
    assert est.history_["initial_val_log_prob"] == pytest.approx(
        reference.logpdf(x_val).mean(), rel=1e-5 if dtype == torch.float64 else 1e-3
    )


# ---- exact densities -------------------------------------------------------------------------
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
    x, _ = mixture_2d(600, seed=4)
    if precondition is None:  # the raw flow starts at N(0, I): give it data it can reach
        x = (x - x.mean(0)) / x.std(0)
    est = DensityEstimator(
        flow, precondition=precondition, refine=refine, dtype=dtype, seed=1,
        # A short plain Tabak fit, so the neural flow on top has something left to learn.
        tabak_options={"max_steps": 40, "check_every": 10, "num_candidates": 1}, **SMALL,
    )
    est.fit(as_tensor(x, device, dtype), max_epochs=15, batch_size=128, lr=3e-3, progress=False)
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
    x, log_p = mixture_2d(3000, seed=5)
    x_test, _ = mixture_2d(3000, seed=6)
    est = DensityEstimator("maf", num_layers=4, hidden_dims=(32, 32), dtype=dtype, seed=0)
    est.fit(as_tensor(x, device, dtype), max_epochs=40, batch_size=256, lr=3e-3, patience=8,
            progress=False)
    truth = log_p(x_test)
    lq = est.log_prob(as_tensor(x_test, device, dtype)).cpu().double().numpy()
    gap = float(np.mean(truth - lq))
    gaussian = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_test)
    gaussian_gap = float(np.mean(truth - gaussian))
    assert gaussian_gap > 0.3
    assert -0.05 < gap < 0.08, f"KL(p || q) estimate {gap:.3f} nats"


def test_known_gaussian_is_recovered(device, dtype):
    x, mean, cov = gaussian_data(2000, seed=7)
    x_test, _, _ = gaussian_data(4000, seed=8)
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
    est.fit(as_tensor(x, device, dtype), x_val=as_tensor(x_val, device, dtype), max_epochs=30,
            lr=1e-2, patience=5, progress=False)
    gaussian = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_val).mean()
    slack = 1e-6 if dtype == torch.float64 else 1e-3
    assert est.score(as_tensor(x_val, device, dtype)) >= gaussian - slack


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
@pytest.mark.parametrize("precondition", ["whiten", None])
def test_training_objective_is_the_layer_by_layer_density(flow, precondition, device, dtype):
    """The training objective (the stack's fused inverse, through FlowDistribution) equals the
    layer-by-layer path, log N(z; 0, I) + log|det dz/du| with z = model.latent(u), and that
    log-det equals autograd's Jacobian of the layer-by-layer map; values and gradients."""
    x, _, _ = gaussian_data(64, seed=5)
    est = DensityEstimator(flow, precondition=precondition, dtype=dtype, seed=0, **SMALL)
    est.fit(as_tensor(x, device, dtype), max_epochs=0, progress=False)
    model = est._model
    assert isinstance(model.flow, pf.flows.FlowStack) and model.flow.all_flow_transforms
    randomize_parameters_(model.flow, scale=0.1, seed=1)
    u = model.precondition(as_tensor(x[:8], device, dtype))[0]
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


# ---- the preconditioning pipelines -----------------------------------------------------------
def _fitted_standardize():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(50, 4, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 20.0]) + 3
    return pipeline.Standardize(4).fit(data)


def _random_cholesky():
    t = TriangularAffine(4)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen)
    t.set_scale_tril_(torch.linalg.cholesky(a @ a.T + 0.5 * torch.eye(4)))
    return t


def _fitted_whiten():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 20.0])
    return pipeline.Whiten(4).fit(torch.randn(50, 4, generator=gen) @ a.T + 3)


@pytest.mark.parametrize("factory", [_fitted_standardize, _random_cholesky, _fitted_whiten])
def test_preconditioning_layers_conformance(factory, device, dtype):
    check_transform(factory, dim=4, device=device, dtype=dtype)


def test_fixed_whitening_stage_whitens_its_training_rows(device, dtype):
    """_Whiten fitted to rows of a correlated Gaussian maps them to rows with mean 0 and the
    identity as their ML covariance (checked with numpy), and its log-det is log|det| of the
    Cholesky factor of numpy's ML covariance."""
    x, _, _ = gaussian_data(400, seed=30)
    stage = pipeline.Whiten(3).to(device=device, dtype=dtype).fit(as_tensor(x, device, dtype))
    u, log_det = stage.inverse_and_log_det(as_tensor(x, device, dtype))
    u = u.cpu().double().numpy()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(u.mean(0), 0.0, atol=tol)
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(3), atol=tol)
    expected = 0.5 * np.linalg.slogdet(np.cov(x.T, bias=True))[1]
    np.testing.assert_allclose(log_det.cpu().double().numpy(), expected, rtol=tol)


@pytest.mark.parametrize("kind", pipeline.WHITEN_KINDS)
@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_whiten_kinds_start_at_the_ml_gaussian_and_match_autograd(kind, flow, device, dtype,
                                                                  monkeypatch):
    """Every kind of "whiten" pipeline starts at the ML full-covariance Gaussian (scipy's,
    computed here), and with the flow's parameters moved off the identity its log_prob is
    log N(z; 0, I) + log|det dz/dx| of the composed map x -> z, the determinant by autograd."""
    monkeypatch.setattr(pipeline, "WHITEN", kind)
    x, _, _ = gaussian_data(300, seed=31)
    x_val = as_tensor(gaussian_data(50, seed=34)[0], device, dtype)
    est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL)
    est.fit(as_tensor(x, device, dtype), x_val=x_val, max_epochs=0, progress=False)
    model = est._model
    assert est._whiten == kind
    assert any(isinstance(s, pipeline.Whiten) for s in model.stages) == kind.startswith("fixed")
    assert isinstance(model.flow[0], TriangularAffine) == (kind != "fixed")
    x_test, _, _ = gaussian_data(100, seed=32)
    reference = multivariate_normal(x.mean(0), np.cov(x.T, bias=True)).logpdf(x_test)
    torch.testing.assert_close(est.log_prob(as_tensor(x_test, device, dtype)),
                               as_tensor(reference, device, dtype), **tolerances(dtype))

    if kind == pipeline.CHOLESKY:  # what the public precondition="cholesky" builds
        public = DensityEstimator(flow, precondition="cholesky", dtype=dtype, seed=0, **SMALL)
        public.fit(as_tensor(x, device, dtype), x_val=x_val, max_epochs=0, progress=False)
        assert [type(s) for s in public._model.stages] == [type(s) for s in model.stages]
        assert torch.equal(public.log_prob(as_tensor(x_test, device, dtype)),
                           est.log_prob(as_tensor(x_test, device, dtype)))
    randomize_parameters_(model.flow, scale=0.3, seed=4)
    model.double()

    def composed(point: torch.Tensor) -> torch.Tensor:
        return model.latent(model.precondition(point)[0])[0]

    try:
        points = as_tensor(x_test[:5], device, torch.float64)
        got = model.log_prob(points)
        for point, value in zip(points, got, strict=True):
            jac = torch.autograd.functional.jacobian(composed, point[None]).reshape(3, 3)
            z = composed(point[None])[0]
            expected = (-0.5 * z.square().sum() - 1.5 * math.log(2 * math.pi)
                        + torch.linalg.slogdet(jac)[1])
            torch.testing.assert_close(value, expected.detach(), rtol=1e-9, atol=1e-9)
        # The parameters moved: the density is no longer the Gaussian (the check above can fail).
        assert not torch.allclose(got, as_tensor(reference[:5], device, torch.float64), atol=1e-3)
    finally:
        model.to(dtype)


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
    x, _, _ = gaussian_data(200, seed=18)
    xt = as_tensor(x, device, dtype)
    fitted = {}
    for options in (None, {"log_scale_bound": 5.0}):
        est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL, flow_options=options)
        est.fit(xt, max_epochs=0, progress=False)
        randomize_parameters_(est._model.flow, scale=3.0, seed=1)
        fitted[5.0 if options else 2.0] = est
        assert est.get_params()["flow_options"] == (options or {})
    assert log_scale_bounds(fitted[2.0]) == {2.0} and log_scale_bounds(fitted[5.0]) == {5.0}
    far = xt * 4.0
    with torch.no_grad():
        assert _max_layer_log_det(fitted[2.0], far) <= 3 * 2.0 + 1e-4
        assert _max_layer_log_det(fitted[5.0], far) > 3 * 2.0


# ---- the refining Tabak transform and the automatic choice -----------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refiner_keeps_no_steps_on_gaussian_codes(seed, device, dtype, tmp_path):
    """Gaussian data, no flow epochs: the codes are the whitened data, N(0, I) in truth, so no
    refining step can help; the refiner's default rule ("significant": a gain must exceed one
    standard error of the per-row differences on the validation codes) keeps none. A
    tabak_options selection overrides the rule and survives save/load."""
    x, _, _ = gaussian_data(360, seed=seed)
    x_train, x_val = as_tensor(x[:300], device, dtype), as_tensor(x[300:], device, dtype)
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
    x, _ = mixture_2d(700, seed=20)
    x_train, x_val = as_tensor(x[:500], device, dtype), as_tensor(x[500:], device, dtype)
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
    x, _ = mixture_2d(500, seed=21)
    x_train, x_val = as_tensor(x[:400], device, dtype), as_tensor(x[400:], device, dtype)
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
    x, _ = mixture_2d(300, seed=5)
    x_train, x_val = as_tensor(x[:240], device, dtype), as_tensor(x[240:], device, dtype)
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


# ---- the fit loop ----------------------------------------------------------------------------
def _overfitting_setup(device, dtype):
    x, _ = mixture_2d(240, seed=10)
    x_train, x_val = as_tensor(x[:40], device, dtype), as_tensor(x[40:], device, dtype)
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
    original = training.run_epoch
    calls = []

    def run_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise exc("stop")
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", run_epoch)
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
    x, _, _ = gaussian_data(64, seed=21)
    x = as_tensor(x, device, dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=0,
                                                                    progress=False)
    model = est._model
    optimizer, params, average = training.training_state(model, lr=1e-2, weight_decay=0.0, rate=0.1)
    if not fused:
        optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-2)
    assert bool(optimizer.defaults.get("fused")) == fused
    u = model.precondition(x)[0]

    def step(rows):
        with pf.validation(False):  # as fit runs its steps
            return training.training_step(model, rows, optimizer, params, average)

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
    x, _, _ = gaussian_data(80, seed=22)
    x = as_tensor(x, device, dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=0,
                                                                    progress=False)
    model = est._model
    u, ld = model.precondition(x)
    u = u.clone()
    u[[3, 41]] = torch.finfo(dtype).max  # overflows: a non-finite loss
    optimizer, params, average = training.training_state(model, lr=0.0, weight_decay=0.0, rate=0.1)
    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(5))
    batches = perm.split(16)
    bad = [b for b in batches if bool(((b == 3) | (b == 41)).any())]
    kept = torch.cat([b for b in batches if not bool(((b == 3) | (b == 41)).any())])
    history = {"skipped_steps": 0}
    with pf.validation(False):  # as fit runs its epochs
        score = training.run_epoch(model, u, ld, optimizer, params, 16, gen, history, average)
    assert history["skipped_steps"] == len(bad)
    assert all(torch.isfinite(p).all() for p in model.flow.parameters())
    with torch.no_grad(), pf.validation(False):
        want = (model.flow_log_prob(u[kept.to(u.device)]) + ld[kept.to(u.device)]).mean()
    assert score == pytest.approx(float(want), rel=1e-5)


def test_the_moving_average_steps_toward_the_parameters_unless_skipped():
    """The validated parameters are theta_bar <- theta_bar + r (theta - theta_bar) after every
    step; a skipped step leaves them as they were."""
    p = torch.zeros(2)
    average = training.ParameterAverage([p], rate=0.5)
    p += 1.0
    average.update(torch.tensor(False))
    assert average.average[0].tolist() == [0.5, 0.5]
    p += 1.0
    average.update(torch.tensor(True))
    assert average.average[0].tolist() == [0.5, 0.5]
    average.update(torch.tensor(False))
    assert average.average[0].tolist() == [1.25, 1.25]


def test_the_fit_uses_adams_fused_kernel_with_the_same_update(device, dtype):
    """DensityEstimator's optimizer is torch's fused Adam where this torch has it for the
    device (one kernel a step): the same update as the default Adam, to rounding."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen, dtype=torch.float64).to(device, dtype)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64).to(device, dtype)
             for _ in range(3)]
    results = []
    for make in (training.adam, lambda ps, **kw: torch.optim.Adam(ps, **kw)):
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


def test_a_snapshot_clones_each_stored_tensor_once():
    """The best-state snapshot of a fit holds one copy of a bank that every layer's key lists
    (not one per key), with the values of the state dict; keys holding the same tensor share
    one clone, two different views of one storage (other offset or stride) stay distinct and
    keep their own values, and the snapshot does not follow later edits of the module."""
    flow = pf.flows.build("maf", 3, num_layers=3, hidden_dims=(8,))
    state = flow.state_dict()
    snap = training.snapshot(flow)
    assert snap.keys() == state.keys()
    bank_keys = [k for k in snap if k.endswith("stacked.flat_parameters")]
    assert len(bank_keys) == 3
    assert len({snap[k].data_ptr() for k in bank_keys}) == 1
    assert snap[bank_keys[0]].data_ptr() != state[bank_keys[0]].data_ptr()
    for k in snap:
        assert torch.equal(snap[k], state[k])

    module = torch.nn.Module()
    base = torch.arange(12.0)
    module.register_buffer("a", base.view(3, 4))
    module.register_buffer("a_again", base.view(3, 4))
    module.register_buffer("row", base[4:8])
    module.register_buffer("col", base.view(3, 4)[:, 1])
    module.register_buffer("empty1", torch.zeros(0))
    module.register_buffer("empty2", torch.zeros(0, dtype=torch.float64))
    snap = training.snapshot(module)
    assert snap["a"] is snap["a_again"]
    assert snap["row"] is not snap["a"] and snap["col"] is not snap["a"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(snap[key], value)
        assert snap[key].dtype == value.dtype
    base.add_(100.0)
    assert float(snap["a"][0, 0]) == 0.0 and float(snap["col"][2]) == 9.0
    assert math.isclose(float(snap["row"][0]), 4.0)


def test_failed_refit_keeps_the_previous_model(device, dtype):
    x, _, _ = gaussian_data(200, seed=11)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=2,
                                                                    progress=False)
    before = est.log_prob(x[:10])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(bad, progress=False)
    assert torch.equal(est.log_prob(x[:10]), before)


def test_progress_bar_and_seed(device, dtype, capsys):
    x, _, _ = gaussian_data(300, seed=12)
    runs = [
        DensityEstimator("realnvp", dtype=dtype, seed=3, **SMALL).fit(
            as_tensor(x, device, dtype), max_epochs=3, progress=progress
        )
        for progress in (True, False)
    ]
    assert "val=" in capsys.readouterr().err  # tqdm writes to stderr
    assert runs[0].history_["val_log_prob"] == runs[1].history_["val_log_prob"]
    assert torch.equal(runs[0].sample(3, seed=1), runs[1].sample(3, seed=1))
    # the estimator's seed makes sample's sequence reproducible, each call continuing it
    first = [run.sample(3) for run in runs]
    second = [run.sample(3) for run in runs]
    assert torch.equal(first[0], first[1]) and torch.equal(second[0], second[1])
    assert not torch.equal(first[0], second[0])


def test_sample_follows_the_seed_or_torchs_generator(tmp_path, device, dtype):
    """With the estimator's seed: one sequence per fitted or loaded model (a loaded copy
    starts it again); without: torch's global generator, as PyTorch's own sampling."""
    x = as_tensor(gaussian_data(200, seed=5)[0], device, dtype)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    est.save(tmp_path / "est.pt")
    first = est.sample(4)
    loaded = DensityEstimator.load(tmp_path / "est.pt", device=device)
    assert torch.equal(loaded.sample(4), first)
    est.fit(x, max_epochs=1, progress=False)  # a new model: the sequence starts again
    assert torch.equal(est.sample(4), first)
    est.seed = None
    torch.manual_seed(7)
    a = est.sample(4)
    torch.manual_seed(7)
    assert torch.equal(est.sample(4), a) and not torch.equal(est.sample(4), a)
    # a fit without a seed follows torch's generator too (split, initialization, order)
    fits = []
    for _ in range(2):
        torch.manual_seed(3)
        fits.append(DensityEstimator("maf", **SMALL).fit(x, max_epochs=1, progress=False))
    assert torch.equal(fits[0].log_prob(x), fits[1].log_prob(x))


# ---- devices, dtypes, input types ------------------------------------------------------------
def test_dtype_and_device_follow_input_or_arguments(device, dtype):
    x, _, _ = gaussian_data(100, seed=13)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    assert est.log_prob(x).dtype == torch.get_default_dtype()  # numpy input: the default dtype
    est = DensityEstimator("maf", seed=0, **SMALL).fit(
        as_tensor(x, device, dtype), max_epochs=1, progress=False
    )
    lp = est.log_prob(x)  # numpy input to a fitted model: converted to its device and dtype
    assert lp.dtype == dtype and lp.device.type == device.type
    assert est.log_prob(x[0]).shape == ()  # one point
    assert est.sample(3).device.type == device.type
    other = torch.float32 if dtype == torch.float64 else torch.float64
    moved = est.to("cpu", dtype=other)
    assert moved is est and est.log_prob(x).dtype == other
    torch.testing.assert_close(est.log_prob(x).to(dtype).cpu(), lp.cpu(), rtol=1e-4, atol=1e-4)
    assert est.to(dtype).log_prob(x).dtype == dtype  # a dtype alone, as Module.to takes it
    with pytest.raises(ValueError, match="meta device holds no values"):
        est.to("meta")
    assert torch.isfinite(est.log_prob(x)).all()  # nothing moved


def test_lazy_module_access():
    assert pf.density.DensityEstimator is DensityEstimator


def test_bad_input_raises_value_errors(device, dtype):
    x, _, _ = gaussian_data(50, seed=15)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL)
    for call in (lambda: est.log_prob(x), lambda: est.sample(3), lambda: est.score(x),
                 lambda: est.save("never.pt")):
        with pytest.raises(ValueError, match="not fitted"):
            call()
    bad = x.copy()
    bad[[4, 9], 0] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"NaN or infinite .* 2 row\(s\), e.g. rows \[4, 9\]"):
        est.fit(bad, progress=False)
    with pytest.raises(ValueError, match=r"at least D \+ 1 = 4 training rows"):
        est.fit(x[:1], progress=False)
    with pytest.raises(ValueError, match="2-D"):
        est.fit(x[None], progress=False)
    with pytest.raises(ValueError, match="numeric"):
        est.fit(np.array([["a", "b"], ["c", "d"]]), progress=False)
    for flags in (x > 0, torch.as_tensor(x > 0)):  # (fitted as 0/1 before; streamed refused)
        with pytest.raises(ValueError, match="x is boolean: convert it to numbers first"):
            est.fit(flags, progress=False)
    with pytest.raises(ValueError, match="x_val has 2 columns, expected 3"):
        est.fit(x, x_val=x[:5, :2], progress=False)
    est.fit(as_tensor(x, device, dtype), max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="4 columns, expected 3"):
        est.log_prob(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        est.log_prob(bad)
    for kwargs in ({"flow": "iaf"}, {"precondition": "pca"}, {"num_layers": 0},
                   {"hidden_dims": ()}, {"dtype": torch.int64}, {"num_layers": 2.5},
                   {"hidden_dims": 16}, {"hidden_dims": (8, 2.5)}, {"seed": 1.7}):
        with pytest.raises(ValueError):
            DensityEstimator(**kwargs)
    assert DensityEstimator(num_layers=np.int64(3)).num_layers == 3
    with pytest.raises(ValueError, match="max_epochs"):
        est.fit(x, max_epochs=-1)
    for name, value in (("max_epochs", 2.5), ("batch_size", 16.5), ("patience", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            est.fit(x, **{name: value})
    with pytest.raises(ValueError, match="averaging_epochs"):
        est.fit(x, averaging_epochs=-1.0)
