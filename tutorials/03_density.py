# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Density estimation with MAF, RealNVP and Tabak preconditioning
#
# `pyroflows.density.DensityEstimator` fits a flow to a data matrix: `fit`, `log_prob`, `sample`,
# `save`, `load`. Preconditioning is part of the model, so `log_prob` is always the density of
# your original data. This notebook fits MAF and RealNVP to data with a known density, checks the
# density integrates to one, and shows the small-data case, where a flow must not do worse than
# the Gaussian.
#
# Set `PYROFLOWS_TUTORIAL_FAST=1` for a quick run (the test suite does).

# %%
import os
import tempfile
import time

import matplotlib.pyplot as plt
import torch

import pyroflows as pf

FAST = os.environ.get("PYROFLOWS_TUTORIAL_FAST") == "1"
EPOCHS = 8 if FAST else 200
_ = torch.manual_seed(0)

# %% [markdown]
# ## Data with a known density
# A random 2-D Gaussian mixture: `pf.datasets.gaussian_mixture` returns draws and the mixture, so
# the true held-out log-likelihood is known and every model's gap to it can be measured.

# %%
x, truth = pf.datasets.gaussian_mixture(4000 if FAST else 12000, dim=2, num_components=4,
                                        spread=2.5, seed=3)
n_test = len(x) // 4
x_train, x_test = x[n_test:], x[:n_test]
true_ll = truth.log_prob(x_test).mean().item()
print(f"true held-out log-likelihood: {true_ll:.3f} nats per sample")

# %%
results = {}
for flow in ["maf", "realnvp"]:
    for precondition in ["whiten", "tabak"]:
        est = pf.density.DensityEstimator(
            flow, num_layers=5, hidden_dims=(64, 64), precondition=precondition, seed=0,
            tabak_options={"max_steps": 300 if FAST else 3000},
        )
        est.fit(x_train, max_epochs=EPOCHS, patience=15, progress=False)
        results[f"{flow} + {precondition}"] = est
        print(f"{flow:8s} {precondition:7s} held-out {est.score(x_test):.3f}   "
              f"gap to truth {true_ll - est.score(x_test):.3f}")

# %% [markdown]
# ## The density integrates to one, in the original space
# Every Jacobian is included (standardization, whitening, Tabak, the flow), so a grid integral of
# `exp(log_prob)` over a box holding the data is 1 up to the mass outside the box.

# %%
lo, hi = x.min(0).values - 2, x.max(0).values + 2
n = 200
g0, g1 = torch.linspace(float(lo[0]), float(hi[0]), n), torch.linspace(float(lo[1]), float(hi[1]), n)
gx, gy = torch.meshgrid(g0, g1, indexing="xy")
grid = torch.stack([gx.flatten(), gy.flatten()], -1).to(x.dtype)
cell = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.5 * (len(results) + 1), 3.3))
axes[0].contourf(gx, gy, truth.log_prob(grid).exp().reshape(gx.shape), levels=30)
axes[0].set_title("truth")
for ax, (name, est) in zip(axes[1:], results.items()):
    with torch.no_grad():
        dens = est.log_prob(grid).exp()
    print(f"{name:16s} integral over the box: {dens.sum().item() * cell:.4f}")
    ax.contourf(gx, gy, dens.reshape(gx.shape).cpu(), levels=30)
    ax.set_title(name)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Training history and early stopping
# `history_` records the per-epoch train and validation log-likelihoods; the best state is restored.

# %%
est = results["maf + whiten"]
h = est.history_
plt.plot(h["epoch"], h["train_log_prob"], label="train")
plt.plot(h["epoch"], h["val_log_prob"], label="validation")
plt.axhline(true_ll, color="k", ls="--", label="truth (test)")
plt.xlabel("epoch")
plt.ylabel("log-likelihood per sample")
plt.legend()
plt.show()
print("best epoch:", h["best_epoch"], " stopped by:", h["stopped"])

# %% [markdown]
# ## Small data: never worse than the Gaussian
# With 150 training rows in 6 dimensions a flow easily overfits. With `precondition="whiten"` the
# untrained model *is* the maximum-likelihood full-covariance Gaussian, and early stopping
# considers that state too, so the held-out score cannot fall below the Gaussian's by much more
# than the noise of the validation split.

# %%
x6, truth6 = pf.datasets.gaussian_mixture(2150, dim=6, num_components=3, spread=1.5, seed=7)
small, test6 = x6[:150], x6[150:]
mean, cov = small.mean(0), torch.cov(small.T, correction=0)
gauss = torch.distributions.MultivariateNormal(mean, cov)
print(f"truth    {truth6.log_prob(test6).mean().item():.3f}")
print(f"Gaussian {gauss.log_prob(test6).mean().item():.3f}")
for precondition in ["whiten", "tabak"]:
    est6 = pf.density.DensityEstimator("maf", num_layers=5, hidden_dims=(64, 64),
                                       precondition=precondition, seed=0,
                                       tabak_options={"max_steps": 300 if FAST else 2000})
    est6.fit(small, max_epochs=EPOCHS, patience=20, progress=False)
    print(f"MAF + {precondition:6s} {est6.score(test6):.3f}")

# %% [markdown]
# ## Sampling, saving and loading
# `save` writes atomically (a temporary file, then a rename); `load` rebuilds the same model.

# %%
est = results["realnvp + whiten"]
samples = est.sample(2000, seed=1)
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "density.pt")
    est.save(path)
    again = pf.density.DensityEstimator.load(path)
print("identical log_probs after load:", torch.equal(again.log_prob(x_test), est.log_prob(x_test)))
plt.scatter(x_test[:, 0], x_test[:, 1], s=2, alpha=0.3, label="data")
plt.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.3, label="RealNVP samples")
plt.legend()
plt.show()

# %% [markdown]
# ## Fast sampling: a distilled IAF student (seed section 3.3.4)
# A MAF scores data in one pass but samples in D sequential passes per layer; an IAF samples in
# one. `distill()` trains an IAF student on its own draws to match the fitted MAF by reverse KL,
# $\mathrm{KL}(q\,\|\,p) = \mathbb{E}_q[\log q(x) - \log p(x)]$ (probability density
# distillation, as Parallel WaveNet does), scoring each draw under the MAF's exact density.
# Afterwards `sample` draws from the student, `sample(n, exact=True)` from the MAF, and
# `log_prob` stays the MAF's. The fidelity report says what the speed costs: the KL estimate with
# its standard error, and both models' held-out log-likelihoods.

# %%
DRAWS = 2000 if FAST else 5000


def timed_draws(est, n, exact):
    """n draws and the draws per second (the MAF's with exact=True, else the student's)."""
    start = time.perf_counter()
    draws = est.sample(n, seed=0, exact=exact)
    return draws, n / (time.perf_counter() - start)


def distill_and_report(est, x_held_out, steps):
    est.distill(max_steps=steps, x_val=x_held_out, num_draws=500 if FAST else 8192,
                progress=False)
    fid = est.history_["distill"]["fidelity"]
    print(f"KL(student || MAF) = {fid['kl']:.4f} ± {fid['kl_se']:.4f} nats "
          f"({fid['kl_per_dim']:.4f} per dimension)")
    print(f"held-out log-likelihood: MAF {fid['teacher_log_prob']:.3f}, "
          f"student {fid['student_log_prob']:.3f}")


# %% [markdown]
# ### 2-D: the mixture above

# %%
maf = results["maf + whiten"]
distill_and_report(maf, x_test, steps=100 if FAST else 3000)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharex=True, sharey=True)
for ax, exact, name in zip(axes, [True, False], ["MAF (D passes per layer)", "IAF student"]):
    draws, rate = timed_draws(maf, DRAWS, exact)
    ax.scatter(draws[:, 0].cpu(), draws[:, 1].cpu(), s=1, alpha=0.3)
    ax.set_title(f"{name}\n{rate:,.0f} draws/s")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 32-D: sixteen bananas in a rotated frame
# Pairs $(a, b)$ with $a \sim N(0, 1)$, $b \sim N(a^2 - 1, 0.5^2)$, rotated by a random rotation
# of $\mathbb{R}^{32}$. In the rotated frame the draws look like noise; rotated back, each pair
# is a banana. Here the MAF needs 32 passes per layer to sample, the student one.
# The student has the MAF's shape (the default); at this size it is several times faster and
# not exact: its KL to the MAF is about 0.07 nats per dimension after the default 4000 steps
# (the tutorial runs 3000). A wider student, `distill(hidden_dims=(256, 256))`, matches more
# closely and samples more slowly (`benchmarks/results/distill.md` measures the trade).

# %%
D = 32
gen = torch.Generator().manual_seed(5)
rotation = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]


def bananas(n):
    a = torch.randn(n, D // 2, generator=gen, dtype=torch.float64)
    b = a**2 - 1 + 0.5 * torch.randn(n, D // 2, generator=gen, dtype=torch.float64)
    return (torch.stack([a, b], -1).reshape(n, D) @ rotation.T).float()


x32, x32_test = bananas(2000 if FAST else 20000), bananas(500 if FAST else 5000)
maf32 = pf.density.DensityEstimator("maf", num_layers=5, hidden_dims=(128, 128), seed=0)
maf32.fit(x32, max_epochs=2 if FAST else 60, patience=10, progress=False)
distill_and_report(maf32, x32_test, steps=60 if FAST else 3000)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), sharex=True, sharey=True)
pair = x32_test.double() @ rotation  # back to the banana frame
axes[0].scatter(pair[:, 0], pair[:, 1], s=1, alpha=0.3)
axes[0].set_title("data (first pair)")
for ax, exact, name in zip(axes[1:], [True, False], ["MAF", "IAF student"]):
    draws, rate = timed_draws(maf32, DRAWS, exact)
    pair = draws.double().cpu() @ rotation
    ax.scatter(pair[:, 0], pair[:, 1], s=1, alpha=0.3)
    ax.set_title(f"{name}: {rate:,.0f} draws/s")
plt.tight_layout()
plt.show()
