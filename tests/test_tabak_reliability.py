"""Tabak at the edges (issue 19): repeated rows (the collapse is detected and stopped, and
dequantization offered), a Ctrl-C during the fit, a dtype move of a fitted transform, data
beyond the dtype's resolution."""

from __future__ import annotations

import warnings

import pytest
import torch

from pyroflows.density import pipeline
from pyroflows.transforms.tabak import Tabak, dequantize
from pyroflows.transforms.tabak import fit as tabak_fit


def _repeated_rows(dtype=torch.float32):
    """The issue's data: 20 distinct rows of a 2-D standard normal sample, each 15 times."""
    base = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return base.repeat_interleave(15, 0).to(dtype)


def _skewed(n, dim, dtype=torch.float64, seed=0):
    g = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (torch.sinh(0.6 * g) + 0.3 * g.square()).to(dtype)


def _log_det_autograd(t, x):
    """log|det d t.inv / dx| row by row from autograd's Jacobian (the independent truth)."""
    rows = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: t.inv(v.unsqueeze(0))[0], row.clone())
        rows.append(torch.linalg.slogdet(jac.double())[1])
    return torch.stack(rows)


# ---- repeated rows: the collapse --------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_repeated_rows_stop_at_the_last_good_step_and_say_why(seed):
    x = _repeated_rows()
    with pytest.warns(UserWarning, match=r"collapsing.*dequantize"):
        t = Tabak(2, max_steps=2000, patience=1000, seed=seed).fit(x, progress=False)
    assert t.history["stopped"] == "collapse" and "resolution" in t.history["reason"]
    assert 0 < t.num_steps == t.best_step < 2000
    assert t.best_step < t.history["step"][-1]  # the collapsing check is not kept
    with torch.no_grad():
        z, log_det = t.inv(x), t.log_abs_det_jacobian(t.inv(x), x)
    assert z.abs().max() < 5  # sane codes
    # The map the density is read from holds to float32: an exact inverse on the training rows,
    # its log-det that of autograd's Jacobian.
    torch.testing.assert_close(t(z.clone()), x, atol=1e-4, rtol=0)
    rows = x[::15][:8]
    with torch.no_grad():
        ld = -t.log_abs_det_jacobian(t.inv(rows), rows)
    torch.testing.assert_close(ld.double(), _log_det_autograd(t, rows), atol=1e-2, rtol=0)
    assert torch.isfinite(log_det).all()
    # The density does not hang on float32's rounding: the same transform evaluated in float64
    # gives the same log-likelihood on the training rows (a collapsed map does not: its codes
    # are rounding noise).
    lp32 = t.log_prob(x).double()
    lp64 = t.to(torch.float64).log_prob(x.double())
    assert (lp32 - lp64).abs().max() < 0.05  # a collapsed fit: thousands of nats


def test_dequantized_repeated_rows_fit_without_collapse():
    x = _repeated_rows()
    y = dequantize(x, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Tabak(2, max_steps=600, patience=1000, seed=0).fit(y, progress=False)
    assert t.history["stopped"] == "max_steps" and t.num_steps > 0
    assert torch.isfinite(t.log_prob(y)).all()


def test_dequantize_adds_noise_of_each_columns_resolution():
    x = torch.tensor([[0.0, 10.0], [0.5, 10.0], [0.5, 13.0], [2.0, 16.0]], dtype=torch.float64)
    x = x.repeat(500, 1)
    y = dequantize(x, generator=torch.Generator().manual_seed(1))
    assert y.dtype == x.dtype and y.shape == x.shape
    noise = y - x
    h = torch.tensor([0.5, 3.0], dtype=torch.float64)  # the smallest positive gaps
    assert (noise.abs() <= h / 2).all()
    # uniform on [-h/2, h/2]: its mean 0 and variance h^2 / 12
    torch.testing.assert_close(noise.mean(0), torch.zeros(2, dtype=torch.float64),
                               atol=0.05 * float(h.max()), rtol=0)
    torch.testing.assert_close(noise.var(0), h**2 / 12, rtol=0.1, atol=0)
    y2 = dequantize(x, resolution=[1.0, 0.25], generator=torch.Generator().manual_seed(1))
    assert ((y2 - x).abs() <= torch.tensor([0.5, 0.125], dtype=torch.float64)).all()
    torch.testing.assert_close(dequantize(x, generator=torch.Generator().manual_seed(1)), y)
    with pytest.raises(ValueError, match=r"column\(s\) \[1\].*resolution="):
        dequantize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="positive"):
        dequantize(x, resolution=0.0)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        dequantize(torch.arange(4))


# ---- Ctrl-C -----------------------------------------------------------------------------------
def _interrupt_on_step(monkeypatch, k):
    """Make the k-th ascent step of the next fit raise KeyboardInterrupt (as a Ctrl-C would)."""
    calls = {"n": 0}
    original = tabak_fit.DualAscent.ascent_step

    def step(self, *args):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(tabak_fit.DualAscent, "ascent_step", step)
    return calls


def test_interrupt_keeps_the_best_state_so_far(monkeypatch):
    x = _skewed(500, 3)
    options = dict(check_every=10, patience=100, seed=4)
    calls = _interrupt_on_step(monkeypatch, 57)
    t = Tabak(3, max_steps=1000, **options)
    with pytest.warns(UserWarning, match="interrupted"):
        assert t.fit(x, progress=False) is t
    assert calls["n"] == 57  # stopped within the step
    assert bool(t.fitted) and t.history["stopped"] == "interrupted"
    assert pipeline.interrupted(t)
    assert t.history["step"] == [0, 10, 20, 30, 40, 50]
    assert len(t.history["train_log_prob"]) == len(t.history["val_log_prob"]) == 6
    monkeypatch.undo()
    # The kept state is that of an uninterrupted fit over the same checks (same seed, same
    # draws): the best of the checks done.
    ref = Tabak(3, max_steps=50, **options).fit(x, progress=False)
    assert t.best_step == ref.best_step > 0
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(t.state_dict()[name], value, msg=name)
    z = t.inv(x)
    torch.testing.assert_close(t(z.clone()), x)
    assert torch.isfinite(t.log_prob(x)).all()


def test_interrupt_before_the_first_check_keeps_the_whitening(monkeypatch):
    x = _skewed(300, 2)
    _interrupt_on_step(monkeypatch, 3)
    with pytest.warns(UserWarning, match="interrupted"):
        t = Tabak(2, max_steps=100, check_every=10, seed=0).fit(x, progress=False)
    assert bool(t.fitted) and t.num_steps == 0 and t.history["stopped"] == "interrupted"
    # The whitening alone (of the 90% training split): an affine map to mean 0, covariance I.
    z = t.inv(x)
    assert t.log_abs_det_jacobian(z, x).std() < 1e-12
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=x.dtype), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(2, dtype=x.dtype), atol=0.15, rtol=0)


def test_stopped_names_how_an_ordinary_fit_ended():
    x = _skewed(300, 2)
    t = Tabak(2, max_steps=40, check_every=10, seed=0).fit(x, progress=False)
    assert t.history["stopped"] == "max_steps"
    t = Tabak(2, max_steps=5000, check_every=5, patience=1, seed=0).fit(x, progress=False)
    assert t.history["stopped"] == "early_stopping" and t.history["step"][-1] < 5000


# ---- dtype moves ------------------------------------------------------------------------------
def test_float32_fit_moved_to_float64_inverts_at_float64_precision():
    x = _skewed(500, 3, dtype=torch.float32, seed=2)
    t = Tabak(3, max_steps=300, seed=0).fit(x, progress=False)
    state32 = {k: v.clone() for k, v in t.state_dict().items()}
    t64 = t.to(torch.float64)
    x64 = x.double()
    frames = t64.frames
    eye = torch.eye(3, dtype=torch.float64).expand_as(frames)
    torch.testing.assert_close(frames.mT @ frames, eye, atol=1e-14, rtol=0)
    torch.testing.assert_close(frames, state32["frames"].double(), atol=1e-6, rtol=0)
    z = t64.inv(x64)
    torch.testing.assert_close(t64(z.clone()), x64, atol=1e-12, rtol=1e-12)
    # The same through load_state_dict of the float32 fit into a float64 transform.
    loaded = Tabak(3).to(torch.float64)
    loaded.load_state_dict(state32)
    assert loaded.frames.dtype == torch.float64
    torch.testing.assert_close(loaded(loaded.inv(x64).clone()), x64, atol=1e-12, rtol=1e-12)


# ---- data beyond the dtype's resolution -------------------------------------------------------
def test_columns_below_resolution_are_not_called_constant():
    gen = torch.Generator().manual_seed(0)
    x = 1e30 + 1e23 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    assert (x.float() != x.float()[:1]).any(0).all()  # they vary in float32, too
    with pytest.raises(ValueError, match=r"resolution at their size \(about 1e\+30\).*float64"):
        Tabak(2, max_steps=10).fit(x.float(), progress=False)
    t = Tabak(2, max_steps=10, seed=0).fit(x, progress=False)  # float64 resolves them
    assert torch.isfinite(t.log_prob(x)).all()
    const = x.float().clone()
    const[:, 1] = 3.0
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] are constant"):
        Tabak(2, max_steps=10).fit(const, progress=False)
