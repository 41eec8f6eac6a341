"""keep_best's final choice (pyroflows.guides.best.choose): a state replaces the start only
where it beats it by more than BEST_MARGIN_SE standard errors of the paired log-weight
differences on common draws; with a learned Student t base, the common draws are the base's."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.guides import best

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_param_store")


def _choose(log_weights: dict[str, torch.Tensor]) -> str:
    """Run ``best.choose`` over fake states whose log weights are given."""
    p = torch.nn.Parameter(torch.zeros(()))
    states = {name: {"p": torch.tensor(float(i))} for i, name in enumerate(log_weights)}
    loaded = {}

    def params():
        return [("p", p)]

    def weights():
        name = next(n for n, s in states.items() if float(s["p"]) == float(p.detach()))
        loaded["last"] = name
        return log_weights[name]

    kept, scores = best.choose(list(states.items()), params, weights)
    assert float(p.detach()) == float(states[kept]["p"])  # the kept state is the one left loaded
    assert scores == {n: pytest.approx(float(w.mean())) for n, w in log_weights.items()}
    return kept


def test_an_exact_start_is_kept_against_a_state_better_by_chance():
    g = torch.Generator().manual_seed(0)
    exact = torch.zeros(256, dtype=torch.float64)  # an exact start: every log weight 0
    noise = 0.17 * torch.randn(256, generator=g, dtype=torch.float64)
    lucky = noise - noise.mean() + 0.005  # truly worse states can score this by chance
    assert _choose({"start": exact, "best tracked": lucky, "last": lucky - 0.01}) == "start"
    better = noise - noise.mean() + 0.1  # 0.1 nats better: 9 standard errors
    assert _choose({"start": exact, "best tracked": better - 0.05, "last": better}) == "last"
    assert _choose({"start": exact - math.inf, "last": lucky}) == "last"  # a failed start


def test_keep_best_with_a_student_t_base(device, dtype):
    """States scored on draws of their own base (common random numbers): with the base's
    degrees of freedom at 2.2, the kept state's score is its ELBO, within Monte Carlo error of
    vi_report's on fresh draws (scored on normal draws instead, it is off by far more)."""
    def model():
        pyro.sample("x", dist.StudentT(2.2, torch.zeros(2, device=device, dtype=dtype), 1.0)
                    .to_event(1))

    pyro.set_rng_seed(0)
    guide = pf.guides.AutoIAF(model, base="studentt", hidden_dims=(8,))
    guide()
    with torch.no_grad():
        guide.base.log_excess_df.fill_(math.log(0.2))
    info = guide.keep_best(num_draws=4000)
    assert all(math.isfinite(v) for v in info["elbo"].values()), info
    report = pf.diagnostics.vi_report(model, guide, num_samples=4000)
    assert abs(info["elbo"][info["kept"]] - report.elbo) < 4 * report.elbo_se + 0.01, (
        info, report.elbo, report.elbo_se)
