"""Probability density distillation (seed 3.3.4): the IAF student's density against autograd
Jacobians, its one fused sampling pass, the reverse-KL fit against teachers with a closed-form
density, the fidelity report against closed-form Gaussian KL divergences, the invariance of
the objective under the preconditioning, the kept best state, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from density_data import as_tensor, gaussian_data, mixture_2d

import pyroflows as pf
from pyroflows.density import DensityEstimator
from pyroflows.density import distill as dd
from pyroflows.testing import randomize_parameters_, tolerances
from pyroflows.transforms import autoregressive

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

TINY = {"num_layers": 2, "hidden_dims": (16, 16)}


def _gen(device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _gaussian_teacher(device, dtype, precondition: str = "whiten") -> tuple:
    """A teacher that is exactly the ML Gaussian of its training rows (no epochs: the whitened
    pipeline starts there), with that Gaussian's mean and covariance computed by numpy."""
    x, _, _ = gaussian_data(400, seed=1)
    est = DensityEstimator("maf", precondition=precondition, dtype=dtype, seed=0, **TINY)
    est.fit(as_tensor(x, device, dtype), x_val=as_tensor(x[:50], device, dtype), max_epochs=0,
            progress=False)
    return est._model, x.mean(0), np.cov(x.T, bias=True)


def _gaussian_kl(m0, c0, m1, c1) -> float:
    """KL(N(m0, c0) || N(m1, c1)) in closed form."""
    d = len(m0)
    inv = np.linalg.inv(c1)
    diff = m1 - m0
    return 0.5 * (np.trace(inv @ c0) + diff @ inv @ diff - d
                  + np.linalg.slogdet(c1)[1] - np.linalg.slogdet(c0)[1])


# ---- the student -----------------------------------------------------------------------------
@pytest.mark.parametrize("context_dim", [None, 2])
def test_student_density_matches_autograd_jacobian(context_dim, device, dtype):
    student = dd.Student(3, num_layers=3, hidden_dims=(8, 8), context_dim=context_dim)
    student = student.to(device=device, dtype=dtype)
    randomize_parameters_(student, scale=0.3, seed=1)
    eps = torch.randn(4, 3, device=device, dtype=dtype)
    ctx = None if context_dim is None else torch.randn(4, 2, device=device, dtype=dtype)
    u, log_q = student.rsample_and_log_prob(eps, ctx)
    for i in range(4):
        c = None if ctx is None else ctx[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda e, c=c: student.sample(e[None], c)[0], eps[i])
        expected = (-0.5 * eps[i].pow(2).sum() - 1.5 * math.log(2 * math.pi)
                    - torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(log_q[i], expected, **tolerances(dtype))
    # scoring other points: the D-pass inverse gives the same density at the student's draws
    torch.testing.assert_close(student.log_prob(u.detach(), ctx), log_q.detach(),
                               **tolerances(dtype))
    assert u.device.type == device.type and u.dtype == dtype


def test_student_samples_in_one_fused_pass(monkeypatch, device, dtype):
    student = dd.Student(4, num_layers=3, hidden_dims=(8, 8)).to(device=device, dtype=dtype)
    calls = []
    original = autoregressive.affine_chain

    def spy(x, layers, kinds, log_det=None):
        calls.append([parallel for parallel, _ in kinds])
        return original(x, layers, kinds, log_det)

    monkeypatch.setattr(autoregressive, "affine_chain", spy)
    with torch.no_grad():
        student.sample(torch.randn(5, 4, device=device, dtype=dtype))
    assert calls == [[True, True, True]]  # one kernel call, every layer its parallel map


def test_student_context_errors(device, dtype):
    plain = dd.Student(2, **TINY).to(device=device, dtype=dtype)
    conditional = dd.Student(2, context_dim=3, **TINY).to(device=device, dtype=dtype)
    eps = torch.randn(5, 2, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="not conditional"):
        plain.sample(eps, torch.zeros(5, 3, device=device, dtype=dtype))
    with pytest.raises(ValueError, match="conditional: pass context"):
        conditional.sample(eps)


# ---- the fidelity report against closed forms ------------------------------------------------
def test_fidelity_kl_is_the_closed_form_gaussian_kl(device, dtype):
    model, mean, cov = _gaussian_teacher(device, dtype)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)  # IAF layers: the identity
    # a different Gaussian in the preconditioned space: mean m_s, Cholesky factor l_s
    m_s = np.array([0.3, -0.2, 0.1])
    l_s = np.array([[1.2, 0.0, 0.0], [0.3, 0.8, 0.0], [-0.2, 0.1, 1.1]])
    rows = np.random.default_rng(0).standard_normal((20000, 3)) @ l_s.T + m_s
    student.start_at(as_tensor(rows, device, dtype))
    m_s, c_s = rows.mean(0), np.cov(rows.T, bias=True)  # what start_at set, exactly
    # the standardization x = loc + scale * u puts the student at N(loc + scale m_s, S c_s S)
    stage = model.stages[0]
    loc, scale = (stage.loc.cpu().double().numpy(), stage.scale.cpu().double().numpy())
    m_x, c_x = loc + scale * m_s, np.diag(scale) @ c_s @ np.diag(scale)
    report = dd.fidelity(model, student, num_draws=20000, generator=_gen(device))
    kl = _gaussian_kl(m_x, c_x, mean, cov)
    assert kl > 0.05
    assert abs(report["kl"] - kl) < 4 * report["kl_se"] + 1e-3
    assert report["kl_per_dim"] == pytest.approx(report["kl"] / 3)
    # held-out rows drawn from the teacher: teacher minus student estimates KL(p || q)
    assert report["heldout"] == "teacher draws"
    reverse = _gaussian_kl(mean, cov, m_x, c_x)
    assert abs(report["log_prob_gap"] - reverse) < 4 * report["log_prob_gap_se"] + 1e-3
    # held-out rows given: the means of each model's exact log density of them
    x_val = np.random.default_rng(1).multivariate_normal(mean, cov, size=300)
    report = dd.fidelity(model, student, num_draws=100, x_val=as_tensor(x_val, device, dtype),
                         generator=_gen(device))
    from scipy.stats import multivariate_normal

    assert report["heldout"] == "x_val" and report["heldout_rows"] == 300
    expected_q = multivariate_normal(m_x, c_x).logpdf(x_val).mean()
    expected_p = multivariate_normal(mean, cov).logpdf(x_val).mean()
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert report["student_log_prob"] == pytest.approx(expected_q, abs=tol)
    assert report["teacher_log_prob"] == pytest.approx(expected_p, abs=tol)


def test_objective_is_the_kl_of_the_data_densities(device, dtype):
    """KL is invariant under the preconditioning: the objective in the preconditioned space
    (what distill minimizes) equals, draw by draw, the log-ratio of the densities of x (the
    teacher's log_prob with its nonlinear Tabak stage and the student's change of variables)."""
    x, _ = mixture_2d(600, seed=0)
    est = DensityEstimator("maf", precondition="tabak", refine="tabak", dtype=dtype, seed=0,
                           tabak_options={"max_steps": 30}, **TINY)
    est.fit(as_tensor(x, device, dtype), max_epochs=2, progress=False)
    model = est._model
    student = dd.Student(2, **TINY).to(device=device, dtype=dtype)
    randomize_parameters_(student, scale=0.1, seed=2)
    with torch.no_grad():
        u, log_q = student.rsample_and_log_prob(torch.randn(200, 2, device=device, dtype=dtype))
        gap_u = log_q - dd.teacher_log_prob(model)(u, None)
        x_draws, log_det = dd._stage_forward(model, u)
        gap_x = (log_q - log_det) - model.log_prob(x_draws)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float64 else {"rtol": 1e-3,
                                                                         "atol": 2e-3}
    torch.testing.assert_close(gap_x, gap_u, **tol)
    torch.testing.assert_close(dd.sample(model, student, torch.zeros(1, 2, device=device,
                                                                     dtype=dtype)),
                               dd._stage_forward(model, student.sample(
                                   torch.zeros(1, 2, device=device, dtype=dtype)))[0], **tol)


# ---- distillation against known teachers -----------------------------------------------------
def test_distillation_recovers_a_gaussian_teacher(device, dtype):
    model, mean, cov = _gaussian_teacher(device, dtype)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)
    # start far off: a wide, shifted Gaussian
    student.start_at(torch.randn(5000, 3, device=device, dtype=dtype) * 2.0 + 1.0)
    with dd.frozen(model):
        record = dd.distill(student, dd.teacher_log_prob(model), max_steps=300, lr=1e-2,
                            generator=_gen(device))
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    assert record["initial_val_kl"] > 1.0 and record["best_val_kl"] < 0.05
    assert record["stopped"] == "max_steps" and record["skipped_steps"] == 0
    with torch.no_grad():
        draws = dd.sample(model, student, torch.randn(20000, 3, device=device, dtype=dtype,
                                                      generator=_gen(device, 3)))
    draws = draws.double().cpu().numpy()
    sd = np.sqrt(np.diag(cov))
    assert np.abs((draws.mean(0) - mean) / sd).max() < 0.05
    corr = np.corrcoef(draws.T) - cov / np.outer(sd, sd)
    assert np.abs(corr).max() < 0.03
    assert np.abs(draws.std(0) / sd - 1).max() < 0.05


def test_distillation_matches_a_trained_maf_teacher(device, dtype):
    x, _ = mixture_2d(1500, seed=0)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **TINY)
    est.fit(as_tensor(x, device, dtype), max_epochs=15, progress=False)
    model = est._model
    student = dd.Student(2, num_layers=3, hidden_dims=(32, 32)).to(device=device, dtype=dtype)
    with torch.no_grad():
        teacher_draws = model.sample(torch.randn(4096, 2, device=device, dtype=dtype))
    student.start_at(model.precondition(teacher_draws)[0])
    start = dd.fidelity(model, student, num_draws=4000, generator=_gen(device, 1))
    with dd.frozen(model):
        dd.distill(student, dd.teacher_log_prob(model), max_steps=400, lr=3e-3,
                   generator=_gen(device))
    end = dd.fidelity(model, student, num_draws=4000, generator=_gen(device, 1))
    assert start["kl"] > 0.1  # the teacher is far from its Gaussian start
    assert end["kl"] < 0.02
    assert abs(end["log_prob_gap"]) < 0.02


# ---- the loop keeps the best state -----------------------------------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_distillation_keeps_the_best_state(exc, device, dtype):
    model, _, _ = _gaussian_teacher(device, dtype)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)
    student.start_at(torch.randn(3000, 3, device=device, dtype=dtype) * 1.5)
    teacher = dd.teacher_log_prob(model)
    calls = []

    def log_prob(u, context):
        calls.append(1)
        if len(calls) == 1 + 4 * 10 + 4 + 3:  # validation + 40 steps + 4 validations + 3 steps
            raise exc("stop")
        return teacher(u, context)

    with dd.frozen(model):
        if exc is KeyboardInterrupt:
            with pytest.warns(UserWarning, match="interrupted"):
                record = dd.distill(student, log_prob, max_steps=100, lr=5e-3, eval_every=10,
                                    num_val_draws=256, generator=_gen(device, 7))
            assert record["stopped"] == "interrupted"
        else:
            with pytest.raises(RuntimeError, match="stop"):
                dd.distill(student, log_prob, max_steps=100, lr=5e-3, eval_every=10,
                           num_val_draws=256, generator=_gen(device, 7))
    if exc is KeyboardInterrupt:
        assert record["step"] == [0, 10, 20, 30, 40]
        # the validation draws are the generator's first: the kept state scores the best
        eps = torch.randn(256, 3, generator=_gen(device, 7), device=device, dtype=dtype)
        with torch.no_grad():
            u, log_q = student.rsample_and_log_prob(eps)
            kl = float((log_q - teacher(u, None)).mean())
        assert kl == pytest.approx(min(record["val_kl"]), abs=1e-4)
        assert record["best_val_kl"] == min(record["val_kl"])


def test_convergence_rule_stops_when_the_kl_stops_improving(device, dtype):
    """A student started at the Gaussian teacher's ML Gaussian has nothing to gain: the run stops
    at the first validation where the best estimate gained less than tol * D over the window
    (recomputed from the record), keeping the best state; tol = 0 runs every step."""
    model, _, _ = _gaussian_teacher(device, dtype)
    teacher = dd.teacher_log_prob(model)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)
    dd.start(model, student, generator=_gen(device, 2))
    tol, window, every = 5e-3, 45, 10  # the window rounds up to 5 validations
    with dd.frozen(model):
        record = dd.distill(student, teacher, max_steps=400, lr=1e-3, eval_every=every,
                            num_val_draws=256, tol=tol, window=window, generator=_gen(device))
    assert record["stopped"] == "converged" and record["initial_val_kl"] < 0.05
    best = np.minimum.accumulate(record["val_kl"])
    lag = 5
    first = next(i for i in range(lag, len(best)) if best[i - lag] - best[i] < tol * 3)
    assert record["step"] == [every * i for i in range(first + 1)]
    # the kept state is the best validated one: its estimate on the validation draws
    eps = torch.randn(256, 3, generator=_gen(device), device=device, dtype=dtype)
    with torch.no_grad():
        u, log_q = student.rsample_and_log_prob(eps)
        kl = float((log_q - teacher(u, None)).mean())
    assert kl == pytest.approx(record["best_val_kl"], abs=1e-4)
    with dd.frozen(model):
        record = dd.distill(student, teacher, max_steps=30, eval_every=every, tol=0.0,
                            window=every, num_val_draws=64, generator=_gen(device))
    assert record["stopped"] == "max_steps" and record["step"] == [0, 10, 20, 30]


def test_non_finite_steps_are_skipped(device, dtype):
    model, _, _ = _gaussian_teacher(device, dtype)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)
    teacher = dd.teacher_log_prob(model)
    calls = []

    def log_prob(u, context):
        calls.append(1)
        out = teacher(u, context)
        return out * float("nan") if len(calls) in (2, 4) else out  # steps 1 and 3

    with dd.frozen(model):
        record = dd.distill(student, log_prob, max_steps=5, eval_every=100, num_val_draws=64,
                            generator=_gen(device))
    assert record["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_bad_arguments(device, dtype):
    model, _, _ = _gaussian_teacher(device, dtype)
    student = dd.Student(3, **TINY).to(device=device, dtype=dtype)
    teacher = dd.teacher_log_prob(model)
    for bad, match in (({"max_steps": -1}, "max_steps must be a whole number >= 0"),
                       ({"max_steps": 2.5}, "max_steps must be a whole number"),
                       ({"batch_size": 0}, "batch_size must be"),
                       ({"num_val_draws": 1}, "num_val_draws must be"),
                       ({"eval_every": 0}, "eval_every must be"),
                       ({"window": 0}, "window must be"),
                       ({"lr": 0.0}, "finite lr > 0"),
                       ({"lr": float("inf")}, "finite lr > 0"),  # (every step was skipped)
                       ({"tol": -1e-3}, "finite tol >= 0"),
                       ({"tol": float("nan")}, "finite tol >= 0")):
        with pytest.raises(ValueError, match=match):
            dd.distill(student, teacher, **bad)
    with pytest.raises(ValueError, match="contexts"):
        dd.distill(student, teacher, contexts=torch.zeros(4, 2, device=device, dtype=dtype))
    with pytest.raises(ValueError, match="num_draws"):
        dd.fidelity(model, student, num_draws=1)
    with pytest.raises(ValueError, match="num_layers must be a whole number"):
        dd.Student(3, num_layers=2.5, hidden_dims=(8,))  # (was 2)


def test_student_of_a_conditional_teacher_shape(device, dtype):
    """A conditional student maps (eps, context) rows in one pass, each row its own context."""
    student = dd.Student(2, context_dim=3, **TINY).to(device=device, dtype=dtype)
    randomize_parameters_(student, scale=0.3, seed=4)
    eps = torch.randn(6, 2, device=device, dtype=dtype)
    ctx = torch.randn(6, 3, device=device, dtype=dtype)
    u = student.sample(eps, ctx)
    for i in range(6):
        torch.testing.assert_close(student.sample(eps[i : i + 1], ctx[i : i + 1])[0], u[i],
                                   **tolerances(dtype))
    assert pf.flows.ConditionalFlowStack is type(student.flow)


# ---- the estimator's API ---------------------------------------------------------------------
def _fitted(device, dtype, **fit) -> tuple[DensityEstimator, torch.Tensor]:
    x, _ = mixture_2d(1200, seed=0)
    x = as_tensor(x, device, dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **TINY)
    return est.fit(x, max_epochs=10, progress=False, **fit), x


def test_estimator_samples_from_the_student_and_scores_with_the_teacher(device, dtype):
    est, x = _fitted(device, dtype)
    before = est.log_prob(x[:50])
    assert est.distill(max_steps=250, lr=3e-3, num_draws=2000, progress=False) is est
    torch.testing.assert_close(est.log_prob(x[:50]), before)  # the teacher's density
    model, student = est._model, est.student_
    assert isinstance(student, dd.Student) and student.num_layers == est.num_layers
    z = torch.randn(300, 1, 2, generator=_gen(device, 11), device=device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(est.sample(300, seed=11),
                                   dd.sample(model, student, z[:, 0]), **tolerances(dtype))
        torch.testing.assert_close(est.sample(300, seed=11, exact=True), model.sample(z[:, 0]),
                                   **tolerances(dtype))
    record = est.history_["distill"]
    assert record["best_val_kl"] <= record["initial_val_kl"]
    report = record["fidelity"]
    assert report["kl"] < 0.05 and report["heldout"] == "teacher draws"
    assert abs(report["log_prob_gap"]) < 0.05
    # bounds: rejection over the student's draws
    low = float(x[:, 0].median())
    draws = est.sample(100, seed=2, bounds=([low, -math.inf], [math.inf, math.inf]))
    assert draws.shape == (100, 2) and bool((draws[:, 0] >= low).all())
    # held-out rows
    est.distill(max_steps=5, num_draws=100, x_val=x[:40], progress=False)
    assert est.history_["distill"]["fidelity"]["heldout_rows"] == 40
    assert est.history_["distill"]["fidelity"]["teacher_log_prob"] == pytest.approx(
        est.score(x[:40]), abs=1e-5)


def test_student_survives_save_and_load(tmp_path, device, dtype):
    est, x = _fitted(device, dtype)
    est.save(tmp_path / "teacher.pt")
    est.distill(num_layers=1, hidden_dims=(8,), max_steps=20, num_draws=100, progress=False)
    est.save(tmp_path / "student.pt")
    loaded = DensityEstimator.load(tmp_path / "student.pt", device=device)
    assert loaded.student_ is not None and loaded.student_.num_layers == 1
    assert loaded.history_["distill"]["fidelity"] == est.history_["distill"]["fidelity"]
    torch.testing.assert_close(loaded.sample(50, seed=3), est.sample(50, seed=3))
    torch.testing.assert_close(loaded.sample(50, seed=3, exact=True),
                               est.sample(50, seed=3, exact=True))
    assert DensityEstimator.load(tmp_path / "teacher.pt").student_ is None
    # a file without the entry (as every file before it) loads without a student
    payload = torch.load(tmp_path / "student.pt", weights_only=True)
    del payload["student"]
    torch.save(payload, tmp_path / "older.pt")
    assert DensityEstimator.load(tmp_path / "older.pt").student_ is None
    payload["student"] = {"config": {**est.student_.config(), "dim": 5},
                          "state_dict": {}}
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged.*student"):
        DensityEstimator.load(tmp_path / "damaged.pt")


def test_student_moves_with_the_estimator_and_a_new_fit_drops_it(device, dtype):
    est, x = _fitted(device, dtype)
    est.distill(max_steps=5, num_draws=100, progress=False)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    est.to(dtype=other)
    assert {p.dtype for p in est.student_.parameters()} == {other}
    assert est.sample(3).dtype == other
    est.fit(x.to(other), max_epochs=1, progress=False)
    assert est.student_ is None and "distill" not in est.history_


def test_conditional_estimator_gets_a_conditional_student(device, dtype):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(800, 1, generator=gen, dtype=torch.float64)
    y = torch.cat([2 * c, c**2], 1) + 0.3 * torch.randn(800, 2, generator=gen,
                                                         dtype=torch.float64)
    c, y = c.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **TINY)
    est.fit(y, context=c, max_epochs=10, progress=False)
    with pytest.raises(ValueError, match="context"):
        est.distill(max_steps=5, progress=False)
    with pytest.raises(ValueError, match="pass context_val= of shape"):
        est.distill(context=c, max_steps=5, x_val=y[:10], progress=False)
    est.distill(context=c, max_steps=400, lr=3e-3, num_draws=1000, x_val=y[:100],
                context_val=c[:100], progress=False)
    assert est.student_.context_dim == 1
    report = est.history_["distill"]["fidelity"]
    assert report["kl"] < 0.1 and abs(report["log_prob_gap"]) < 0.1
    at = torch.tensor([1.0], device=device, dtype=dtype)
    draws = est.sample(4000, seed=0, context=at)
    exact = est.sample(4000, seed=1, context=at, exact=True)
    assert draws.shape == (4000, 2)
    # the student's conditional moments are the teacher's at a context one sd off the mean
    torch.testing.assert_close(draws.double().mean(0), exact.double().mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(draws.double().std(0), exact.double().std(0), atol=0.15, rtol=0)


def test_estimator_distill_bad_arguments(device, dtype):
    with pytest.raises(ValueError, match="not fitted"):
        DensityEstimator().distill()
    est, x = _fitted(device, dtype)
    for bad in ({"num_layers": 0}, {"hidden_dims": ()}, {"hidden_dims": (2.5,)}):
        with pytest.raises(ValueError, match="num_layers and hidden_dims"):
            est.distill(progress=False, **bad)
    with pytest.raises(ValueError, match="without a context"):
        est.distill(context=x[:, :1], progress=False)
    with pytest.raises(ValueError, match="max_steps must be a whole number >= 0"):
        est.distill(max_steps=-1, progress=False)
    with pytest.raises(ValueError, match="need a finite lr > 0"):
        est.distill(lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="x_val has 3 columns"):
        est.distill(x_val=torch.zeros(4, 3, device=device, dtype=dtype), progress=False)
    with pytest.raises(ValueError, match="x_val has no rows"):  # (after the training, before)
        est.distill(x_val=torch.zeros(0, 2, device=device, dtype=dtype), progress=False)
    assert est.student_ is None
