"""Amortized flow guides: a VAE on synthetic binary images whose guide draws its local latent
from a conditional planar, radial or IAF flow of the encoder's output, with SVI (vectorized
particles), IWAE, a subsampled plate, Predictive, devices and save/load; and a linear-Gaussian
model whose per-datapoint posterior and evidence are known in closed form."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from torch import nn

import pyroflows as pf

PIXELS, LATENT, HIDDEN, N = 16, 2, 8, 48


def _images(device, dtype) -> torch.Tensor:
    """N binary 4x4 images: three prototypes (a bar, a column, a corner) with 5% flips."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.zeros(3, 4, 4)
    protos[0, 1, :] = 1
    protos[1, :, 2] = 1
    protos[2, :2, :2] = 1
    x = protos[torch.arange(N) % 3].reshape(N, PIXELS)
    flips = torch.rand(N, PIXELS, generator=gen) < 0.05
    return torch.where(flips, 1 - x, x).to(device, dtype)


class VAE(nn.Module):
    """A decoder p(x | z) with a standard normal prior on a local z (Kingma & Welling)."""

    def __init__(self, subsample_size: int | None = None) -> None:
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, 32), nn.Tanh(), nn.Linear(32, PIXELS))
        self.subsample_size = subsample_size

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0], subsample_size=self.subsample_size,
                        device=x.device) as rows:
            zero = x.new_zeros(LATENT)
            z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x[rows])


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(PIXELS, 32), nn.Tanh(), nn.Linear(32, HIDDEN), nn.Tanh())


def _guide(flow: str, subsample_size: int | None = None) -> pf.guides.AmortizedFlowGuide:
    return pf.guides.AmortizedFlowGuide(_encoder(), LATENT, flow, context_dim=HIDDEN,
                                        num_layers=2 if flow == "iaf" else 4,
                                        hidden_dims=(16,), subsample_size=subsample_size)


def _elbo(model, guide, x, num_particles: int = 200) -> float:
    """The ELBO (nats, all rows) by many vectorized particles."""
    with torch.no_grad():
        loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True).loss(
            model, guide, x)
    return -loss


FLOWS = ["planar", "radial", "iaf"]


@pytest.mark.parametrize("flow", FLOWS)
def test_vae_trains_with_vectorized_particles(flow, device, dtype, fresh_param_store,
                                              one_thread):
    x = _images(device, dtype)
    vae = VAE(subsample_size=16).to(device, dtype)
    guide = _guide(flow, subsample_size=16).to(device, dtype)
    vae.subsample_size = guide.subsample_size = None
    before = _elbo(vae.model, guide, x)
    vae.subsample_size = guide.subsample_size = 16
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 2e-2}),
              Trace_ELBO(num_particles=4, vectorize_particles=True))
    for _ in range(150):
        assert math.isfinite(svi.step(x))
    vae.subsample_size = guide.subsample_size = None
    after = _elbo(vae.model, guide, x)
    assert after > before + 0.5 * N, (before, after)  # at least half a nat per image
    # the guide's parameters are in the param store under its name, and were trained
    names = set(pyro.get_param_store().keys())
    assert {f"amortized_flow_guide$$${n}" for n, _ in guide.named_parameters()} <= names


@pytest.mark.parametrize("flow", FLOWS)
def test_iwae_bound_is_at_least_the_elbo(flow, device, dtype, fresh_param_store, one_thread):
    x = _images(device, dtype)
    vae = VAE().to(device, dtype)
    guide = _guide(flow).to(device, dtype)
    iwae = RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True)
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 2e-2}), iwae)
    for _ in range(20):
        assert math.isfinite(svi.step(x))
    with torch.no_grad():
        bound = -RenyiELBO(alpha=0, num_particles=64, vectorize_particles=True).loss(
            vae.model, guide, x)
        elbos = [_elbo(vae.model, guide, x, 64) for _ in range(4)]
    elbo = sum(elbos) / len(elbos)
    noise = 3 * (max(elbos) - min(elbos)) + 0.5
    assert bound >= elbo - noise, (bound, elbos)


def test_predictive_draws_the_latent_per_row(device, dtype, fresh_param_store):
    x = _images(device, dtype)
    vae = VAE().to(device, dtype)
    guide = _guide("planar").to(device, dtype)
    z = Predictive(vae.model, guide=guide, num_samples=5)(x)["z"]
    assert z.shape == (5, N, LATENT) and z.device.type == device.type and z.dtype == dtype
    vae.subsample_size = guide.subsample_size = 8
    out = Predictive(vae.model, guide=guide, num_samples=3, return_sites=["z", "x"])(x)
    assert out["z"].shape == (3, 8, LATENT)


def test_guide_and_plain_pyro_idiom_agree(device, dtype, fresh_param_store):
    """The builder draws what the hand-written guide of its docstring draws: the same flow
    and encoder, the same random numbers."""
    x = _images(device, dtype)
    guide = _guide("radial").to(device, dtype)
    cflow, encoder = guide.flow, guide.encoder
    q = pf.distributions.ConditionalFlowDistribution(cflow)

    def plain_guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", cflow)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", q.condition(encoder(x)))

    pyro.set_rng_seed(3)
    tr1 = pyro.poutine.trace(guide).get_trace(x)
    pyro.set_rng_seed(3)
    tr2 = pyro.poutine.trace(plain_guide).get_trace(x)
    torch.testing.assert_close(tr1.nodes["z"]["value"], tr2.nodes["z"]["value"])
    tr1.compute_log_prob()
    tr2.compute_log_prob()
    torch.testing.assert_close(tr1.nodes["z"]["log_prob"], tr2.nodes["z"]["log_prob"])


def test_save_and_load_reproduce_log_prob_exactly(tmp_path, device, dtype, fresh_param_store):
    x = _images(device, dtype)
    vae = VAE().to(device, dtype)
    guide = _guide("iaf").to(device, dtype)
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    with torch.no_grad():
        q = guide.get_posterior(x)
        z = q.sample((3,))
        expected = q.log_prob(z.clone())
    # state_dict into a guide built with other random weights
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    torch.manual_seed(123)
    other = _guide("iaf").to(device, dtype)
    with torch.no_grad():
        assert not torch.equal(other.get_posterior(x).log_prob(z), expected)
        other.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
        torch.testing.assert_close(other.get_posterior(x).log_prob(z), expected, rtol=0, atol=0)
    # Pyro's param store: saved, cleared, loaded into a third guide at its next pyro.module
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    torch.manual_seed(456)
    third = _guide("iaf").to(device, dtype)
    pyro.get_param_store().load(tmp_path / "params.pt", map_location=device)
    pyro.module(third.name, third, update_module_params=True)
    with torch.no_grad():
        torch.testing.assert_close(third.get_posterior(x).log_prob(z), expected, rtol=0, atol=0)


def test_guide_arguments():
    with pytest.raises(TypeError, match="encoder must be"):
        pf.guides.AmortizedFlowGuide(lambda x: x, 2, context_dim=3)
    with pytest.raises(TypeError, match="flow must be"):
        pf.guides.AmortizedFlowGuide(_encoder(), 2, pf.flows.build("maf", 2), context_dim=3)
    with pytest.raises(ValueError, match="unknown flow family"):
        pf.guides.AmortizedFlowGuide(_encoder(), 2, "nope", context_dim=3)
    plain = pf.guides.AmortizedFlowGuide(_encoder(), 2, "planar", context_dim=HIDDEN,
                                         num_layers=3, gaussian=False)
    (stack,) = plain.flow.sequence
    assert len(stack.sequence) == 1 and stack.sequence[0].num_layers == 3  # one network
    per_layer = pf.guides.AmortizedFlowGuide(_encoder(), 2, "planar", context_dim=HIDDEN,
                                             num_layers=3, gaussian=False,
                                             shared_network=False)
    assert len(per_layer.flow.sequence[0].sequence) == 3
    assert "latent_dim=2" in repr(plain)


# A linear-Gaussian VAE with a known decoder: z ~ N(0, I_2), x | z ~ N(A z + b, s^2 I_3); each
# datapoint's posterior is N(m(x), S) with S = (I + A^T A / s^2)^-1 (correlated) and
# m(x) = S A^T (x - b) / s^2, and log p(x) = log N(x; b, A A^T + s^2 I).
A = [[2.0, 1.5], [1.0, 1.2], [0.5, -0.3]]
BIAS, NOISE = [0.3, -0.2, 0.1], 0.5


def _linear_gaussian_model(x: torch.Tensor) -> None:
    a, b = x.new_tensor(A), x.new_tensor(BIAS)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ a.T + b, NOISE).to_event(1), obs=x)


def test_amortized_iaf_reaches_the_exact_posterior(device, dtype, fresh_param_store,
                                                   one_thread):
    a = torch.tensor(A, device=device, dtype=dtype)
    b = torch.tensor(BIAS, device=device, dtype=dtype)
    z_true = torch.randn(64, 2, device=device, dtype=dtype)
    x = z_true @ a.T + b + NOISE * torch.randn(64, 3, device=device, dtype=dtype)
    precision = torch.eye(2, device=device, dtype=dtype) + a.T @ a / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = (x - b) @ a @ cov / NOISE**2  # (N, 2); cov symmetric
    exact = dist.MultivariateNormal(mean, covariance_matrix=cov)
    evidence = dist.MultivariateNormal(b, a @ a.T + NOISE**2 * torch.eye(3, device=device,
                                                                        dtype=dtype))
    log_px = evidence.log_prob(x)
    # the best diagonal Gaussian's KL to a Gaussian of this precision, per datapoint
    mean_field_kl = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert mean_field_kl > 0.2

    encoder = nn.Linear(3, HIDDEN)
    guide = pf.guides.AmortizedFlowGuide(encoder, 2, "iaf", context_dim=HIDDEN, num_layers=2,
                                         hidden_dims=(16,)).to(device, dtype)
    svi = SVI(_linear_gaussian_model, guide, pyro.optim.ClippedAdam({"lr": 2e-2, "lrd": 0.998}),
              Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(600):
        svi.step(x)
    with torch.no_grad():
        q = guide.get_posterior(x)
        z = q.sample((2000,))
        kl = (q.log_prob(z) - exact.log_prob(z)).mean(0)  # per datapoint, (N,)
        elbo = _elbo(_linear_gaussian_model, guide, x, 2000) / x.shape[0]
    # measured: KL 0.012 (float64), 0.020 (float32) nats per datapoint; mean-field 0.67
    assert kl.mean() < 0.06 and kl.mean() < 0.1 * mean_field_kl, (kl.mean(), mean_field_kl)
    assert abs(log_px.mean() - kl.mean() - elbo) < 0.02  # ELBO = log p(x) - KL
    assert 0 < log_px.mean() - elbo < 0.06


# ---- sticking the landing (AmortizedPosterior) ------------------------------------------------

@pytest.mark.parametrize("flow", ["planar", "radial", "iaf", "maf", "realnvp"])
def test_sticking_the_landing_term_is_the_fixed_parameters_density(flow, device, dtype,
                                                                   fresh_param_store,
                                                                   exact_stl):
    """For a draw of its own (2 particles over 5 rows), the posterior's entropy term has the
    value of log q(z | x) and, in z, the gradient of log q with the conditioned parameters
    held fixed (autograd through the flow's inverse, conditioned on a detached context); the
    encoder's and the flow's parameters get gradient only through the path z; a value it did
    not draw gets Pyro's parts."""
    from pyroflows.guides import AmortizedPosterior

    guide = pf.guides.AmortizedFlowGuide(_encoder(), 3, flow, context_dim=HIDDEN,
                                         num_layers=2, hidden_dims=(16,),
                                         stick_the_landing=True)
    pf.testing.randomize_parameters_(guide.flow, scale=0.3, seed=1)
    guide = guide.to(device, dtype)
    x = _images(device, dtype)[:5]
    q = guide.get_posterior(x)
    assert isinstance(q, AmortizedPosterior) and q.stick_the_landing
    q = q.expand((2, 5))  # as the vectorized particles' plate does
    assert q.stick_the_landing
    z = q.rsample()
    parts = q.score_parts(z)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts.entropy_term, q.log_prob(z), **tol)
    params = list(guide.parameters())
    (grad_z, *grad_params) = torch.autograd.grad(parts.entropy_term.sum(), [z, *params],
                                                 retain_graph=True)
    with torch.no_grad():
        fixed = guide.get_posterior(x)  # the same parameters, without their graph
    leaf = z.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(fixed.log_prob(leaf).sum(), leaf)
    tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grad_z, want, **tol)
    through_path = torch.autograd.grad((z * want).sum(), params, retain_graph=True)
    for got, path in zip(grad_params, through_path, strict=True):
        torch.testing.assert_close(got, path, **tol)
    other = z.detach().clone().requires_grad_(True)
    plain = q.score_parts(other)
    assert plain.entropy_term is not None
    torch.testing.assert_close(plain.entropy_term, q.log_prob(other), **tol)
    assert plain.entropy_term.grad_fn is not None  # the parameters' score included
    plain_grads = torch.autograd.grad(plain.entropy_term.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in plain_grads)


def _exact_amortized_guide(device, dtype, stick_the_landing: bool):
    """A linear-Gaussian model whose posterior is diagonal, N(W (x - b), diag(v)), and a
    guide that is exactly it: an identity encoder, the Gaussian head set to (W, v), IAF
    layers at the identity (zero conditioner outputs)."""
    a = torch.tensor([[2.0, 0.0], [0.0, 1.5], [0.0, 0.0]], device=device, dtype=dtype)
    b = torch.tensor(BIAS, device=device, dtype=dtype)
    var = 1 / (1 + (a * a).sum(0) / NOISE**2)  # A^T A is diagonal
    weight = var[:, None] * a.T / NOISE**2

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ a.T + b, NOISE).to_event(1), obs=x)

    guide = pf.guides.AmortizedFlowGuide(nn.Identity(), 2, "iaf", context_dim=3, num_layers=2,
                                         hidden_dims=(8,), stick_the_landing=stick_the_landing)
    guide = guide.to(device, dtype)
    with torch.no_grad():
        head = guide.flow.parts[0].head
        head.weight.zero_()
        head.weight[:2] = weight
        head.bias[:2] = -weight @ b
        s = var.sqrt()
        head.bias[2:] = s + torch.log(-torch.expm1(-s))  # softplus^-1
        for module in guide.flow.modules():
            if isinstance(module, pf.nn.MADE):  # zero outputs: the identity
                module.flat_parameters.zero_()
    return model, guide


def test_sticking_the_landing_is_exact_at_the_posterior(device, dtype, fresh_param_store):
    """Where q(z | x) is the posterior, every draw's sticking-the-landing gradient is zero
    under Pyro's Trace_ELBO (vectorized particles), where the standard gradient is not."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    grads = {}
    for stl in (False, True):
        model, guide = _exact_amortized_guide(device, dtype, stl)
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True).differentiable_loss(
            model, guide, x)
        params = [p for p in guide.parameters() if p.requires_grad]
        grads[stl] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    tiny = 1e-10 if dtype == torch.float64 else 1e-4
    assert grads[True].abs().max() < tiny
    assert grads[False].abs().max() > 100 * tiny


@pytest.mark.parametrize("elbo_stl", [None, True, False])
def test_flow_elbo_sticks_the_landing_of_amortized_guides(elbo_stl, device, dtype,
                                                         fresh_param_store):
    """FlowELBO makes the choice for amortized posteriors as for autoguides: ``None`` follows
    the guide's ``stick_the_landing``, ``True`` / ``False`` overrides it; at the exact
    posterior the sticking-the-landing gradient is zero and the standard one is not."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tiny = 1e-10 if dtype == torch.float64 else 1e-4
    for guide_stl in (False, True):
        model, guide = _exact_amortized_guide(device, dtype, guide_stl)
        elbo = pf.guides.FlowELBO(stick_the_landing=elbo_stl, num_particles=4,
                                  vectorize_particles=True)
        loss = elbo.differentiable_loss(model, guide, x)
        params = [p for p in guide.parameters() if p.requires_grad]
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        sticks = guide_stl if elbo_stl is None else elbo_stl
        assert (grad.abs().max() < tiny) == sticks, (guide_stl, elbo_stl)
        assert grad.abs().max() > 100 * tiny or sticks


def test_flow_elbo_refuses_forced_landing_without_a_flow_guide(fresh_param_store):
    """``FlowELBO(stick_the_landing=True)`` on a guide with no pyroflows posterior is an error
    that names the guides it needs."""
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    elbo = pf.guides.FlowELBO(stick_the_landing=True)
    with pytest.raises(ValueError, match="AmortizedFlowGuide"):
        elbo.loss_and_grads(model, guide)


def test_sticking_the_landing_is_unbiased(fresh_param_store):
    """Away from the posterior, the sticking-the-landing gradient has the standard gradient's
    expectation (20000 particles of 3 rows, float64)."""
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def mean_grad(stl, seed):
        pyro.clear_param_store()
        model, guide = _exact_amortized_guide(torch.device("cpu"), torch.float64, stl)
        pf.testing.randomize_parameters_(guide.flow, scale=0.2, seed=5)
        pyro.set_rng_seed(seed)
        loss = Trace_ELBO(num_particles=20000, vectorize_particles=True).differentiable_loss(
            model, guide, x)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(guide.parameters()))])

    g_std, g_stl = mean_grad(False, 0), mean_grad(True, 0)
    noise = (mean_grad(False, 1) - g_std).norm()
    assert noise > 0
    assert (g_stl - g_std).norm() < 2 * noise


def test_the_plain_idiom_sticks_the_landing_with_amortized_posterior(device, dtype,
                                                                    fresh_param_store):
    """``ConditionalFlowDistribution(cflow, distribution_class=AmortizedPosterior)``: the
    distributions it gives stick the landing (their entropy term's gradient in the flow's
    parameters is the path's alone); the default class keeps Pyro's parts; anything but a
    FlowDistribution class is refused."""
    from pyroflows.distributions import ConditionalFlowDistribution, FlowDistribution
    from pyroflows.guides import AmortizedPosterior

    cflow = pf.flows.build("radial", 3, num_layers=3, context_dim=HIDDEN).to(device, dtype)
    pf.testing.randomize_parameters_(cflow, scale=0.3, seed=2)
    h = _draws_like(device, dtype)
    for cls in (AmortizedPosterior, FlowDistribution):
        q = ConditionalFlowDistribution(cflow, distribution_class=cls).condition(h)
        assert type(q) is cls
        z = q.rsample((2,))
        entropy = q.score_parts(z).entropy_term
        params = list(cflow.parameters())
        got = torch.autograd.grad(entropy.sum(), params, retain_graph=True)
        with torch.no_grad():
            fixed = ConditionalFlowDistribution(cflow).condition(h)
        leaf = z.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(fixed.log_prob(leaf).sum(), leaf)
        path = torch.autograd.grad((z * score).sum(), params)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, path,
                                                                              strict=True))
        assert same == (cls is AmortizedPosterior)
    with pytest.raises(TypeError, match="distribution_class"):
        ConditionalFlowDistribution(cflow, distribution_class=dist.Normal)


def _draws_like(device, dtype) -> torch.Tensor:
    return torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64).to(device, dtype)


def test_amortized_iaf_sticks_the_landing_from_its_draws_linearizations(monkeypatch, device,
                                                                       dtype,
                                                                       fresh_param_store):
    """An amortized IAF guide's sticking-the-landing term goes layer by layer (no whole
    Jacobian) from the linearizations its draw kept (no IAF layer linearized again): the same
    loss and gradients as with every layer linearized afresh."""
    from pyroflows.guides import landing
    from pyroflows.transforms import IAF

    x = _images(device, dtype)[:12]
    vae = VAE().to(device, dtype)
    calls, jacobians = [], []
    real_linearize, real_jacobian = IAF.linearize, landing._jacobian_score
    monkeypatch.setattr(IAF, "linearize",
                        lambda self, u: calls.append(1) or real_linearize(self, u))
    monkeypatch.setattr(landing, "_jacobian_score",
                        lambda *args: jacobians.append(1) or real_jacobian(*args))
    results = []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(landing, "kept_linearizations", lambda posterior, value: [])
        calls.clear()
        torch.manual_seed(0)
        guide = _guide("iaf").to(device, dtype)
        pf.testing.randomize_parameters_(guide.flow, scale=0.2, seed=3)
        pyro.set_rng_seed(1)
        loss = Trace_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(
            vae.model, guide, x)
        results.append((loss.detach(), torch.autograd.grad(loss, list(guide.parameters()))))
        assert len(calls) == (0 if keep else 2)
    assert not jacobians
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, **tol)
