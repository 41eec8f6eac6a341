"""Fixed permutations of the coordinates, as flow layers of their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._fast import keeps_map
from .._random import generator
from .base import FlowTransform

__all__ = ["Permute", "permute"]


class Permute(FlowTransform):
    r"""A fixed permutation of the coordinates, :math:`y_i = x_{\pi(i)}`, with
    :math:`\log|\det J| = 0`; the permutation and its inverse are buffers, ``sign`` its parity.

    Arguments:
        permutation: :math:`\pi`, a sequence or integer tensor holding ``0, ..., D-1`` once
            each. See also :meth:`reverse` and :meth:`random`.

    Example:
        >>> import torch, pyroflows as pf
        >>> t = pf.transforms.Permute.reverse(3)
        >>> t(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[3., 2., 1.]])
    """

    def __init__(self, permutation: Sequence[int] | Tensor) -> None:
        perm = torch.as_tensor(permutation).detach().to("cpu").flatten()
        dim = perm.numel()
        if dim < 1 or perm.is_floating_point() or not torch.equal(
            perm.sort().values, torch.arange(dim, dtype=perm.dtype)
        ):
            raise ValueError(f"Permute: expected a permutation of 0..D-1, got {permutation!r}")
        super().__init__(dim)
        perm = perm.long()
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    @classmethod
    def reverse(cls, dim: int) -> Permute:
        """The order reversal :math:`\\pi(i) = D - 1 - i`."""
        return cls(torch.arange(int(dim) - 1, -1, -1))

    @classmethod
    def random(cls, dim: int, seed: int | None = None) -> Permute:
        """A uniformly random permutation, reproducible with ``seed``."""
        return cls(torch.randperm(int(dim), generator=generator(seed)))

    @property
    def sign(self) -> int:
        # parity = (-1)^(D - number of cycles)
        perm = self.permutation.tolist()
        seen = [False] * len(perm)
        cycles = 0
        for i in range(len(perm)):
            if not seen[i]:
                cycles += 1
                j = i
                while not seen[j]:
                    seen[j] = True
                    j = perm[j]
        return 1 if (len(perm) - cycles) % 2 == 0 else -1

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(-1, self.permutation), x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y.index_select(-1, self.inverse_permutation), y.new_zeros(y.shape[:-1])

    def has_score_step(self) -> bool:
        """True, unless a subclass redefines the map."""
        return keeps_map(type(self), Permute, ("forward_and_log_det", "inverse_and_log_det"))

    def score_step(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        # J = P, P[i, pi(i)] = 1, orthogonal: J^{-T} g = P g, permuted as x is
        return self.forward_and_log_det(x)[0], g.index_select(-1, self.permutation)


def permute(dim: int, permutation: Sequence[int] | Tensor | None = None, seed=None) -> Permute:
    """Build a :class:`Permute` layer: ``permutation`` if given, else a random one."""
    if permutation is None:
        return Permute.random(dim, seed=seed)
    t = Permute(permutation)
    if t.dim != int(dim):
        raise ValueError(f"permute: permutation has {t.dim} entries, expected dim={dim}")
    return t
