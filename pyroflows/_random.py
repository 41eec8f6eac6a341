"""Random generators that follow a seed, or torch's global generator where none is given."""

from __future__ import annotations

import torch

__all__ = ["generator"]


def generator(seed: int | None = None, device: torch.device | str | None = None
              ) -> torch.Generator:
    """A generator on ``device`` (default CPU) seeded with ``seed``; without one, with a draw of
    torch's global CPU generator, so that ``torch.manual_seed`` governs it as it does
    PyTorch's and Pyro's own sampling (never the operating system's entropy)."""
    gen = torch.Generator() if device is None else torch.Generator(device=device)
    return gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, (1,))))
