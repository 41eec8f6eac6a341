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
# # 5. Devices and dtypes: what moves where
#
# pyroflows follows PyTorch's rule: **device and dtype follow the input and the module**. Nothing
# is created on a default device during a call, and everything a layer needs (parameters, masks,
# permutations, fitted statistics) is a parameter or a registered buffer, so `.to(device)` moves
# it and `state_dict()` saves it. This notebook runs on CUDA when there is a GPU and on the CPU
# otherwise; every cell is the same either way.

# %%
import io
import os

import torch
from torch.distributions import Independent, Normal, TransformedDistribution

import pyroflows as pf

FAST = os.environ.get("PYROFLOWS_TUTORIAL_FAST") == "1"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("running on", device)

# %% [markdown]
# ## Moving a flow
# Buffers (MADE masks, permutation indices) move with the parameters.

# %%
flow = pf.flows.build("maf", 4, num_layers=3, hidden_dims=(32, 32))
print(sorted({name.split(".")[-1] for name, _ in flow.named_buffers()}))
flow = flow.to(device)
print({str(t.device) for t in [*flow.parameters(), *flow.buffers()]})

# %% [markdown]
# ## The base distribution is yours to place
# `TransformedDistribution` does not move its base: build it from tensors on the right device.

# %%
zeros = torch.zeros(4, device=device)
base = Independent(Normal(zeros, torch.ones_like(zeros)), 1)
q = TransformedDistribution(base, list(flow.parts))
x = q.sample((8,))
print(x.device, q.log_prob(x).shape)

# %% [markdown]
# ## float64
# `.double()` (or `.to(torch.float64)`) converts parameters and floating buffers; integer buffers
# such as permutation indices keep their dtype. Inputs must then be float64 as well.

# %%
flow64 = pf.flows.build("realnvp", 4, num_layers=2).to(device=device, dtype=torch.float64)
x64 = torch.randn(3, 4, device=device, dtype=torch.float64)
y64 = flow64(x64)
print(y64.dtype, flow64.log_abs_det_jacobian(x64, y64).dtype)

# %% [markdown]
# ## Saving on one device, loading on another
# Save the `state_dict`; load it with `map_location` into a freshly built flow anywhere.

# %%
buf = io.BytesIO()
torch.save(flow.state_dict(), buf)
buf.seek(0)
cpu_flow = pf.flows.build("maf", 4, num_layers=3, hidden_dims=(32, 32))
cpu_flow.load_state_dict(torch.load(buf, map_location="cpu"))
x_cpu = torch.randn(5, 4)
with torch.no_grad():
    same = torch.allclose(cpu_flow(x_cpu), flow(x_cpu.to(device)).cpu(), atol=1e-5)
print("identical after the move:", same)

# %% [markdown]
# ## Validation costs a sync on CUDA
# Each layer checks that its input is finite (a clear `ValueError` instead of NaNs later). On CUDA
# that check waits for the GPU; in a tuned training loop over data you have already checked, turn
# it off for the loop only.

# %%
opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
data = torch.randn(4096, 4, device=device) @ torch.randn(4, 4, device=device)
steps = 20 if FAST else 500
with pf.validation(False):
    for _ in range(steps):
        batch = data[torch.randint(len(data), (256,), device=device)]
        loss = -q.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
print("final loss", loss.item())

# %% [markdown]
# ## The test suite on a GPU
# The same conformance suite runs on CUDA with `pytest --device cuda --dtype float32`;
# `scripts/gpu_check.sh` runs it in both dtypes plus the speed benchmark.
