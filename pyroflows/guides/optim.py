"""The documented step sizes of a flow guide, for Pyro's and torch's optimizers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .autoguide import AutoFlowGuide, family_of

__all__ = ["default_lr", "optim_args"]


def default_lr(flow: str | AutoFlowGuide | None = None) -> tuple[float, float]:
    """The documented Adam step sizes ``(lr, flow_lr)`` of a flow guide: ``lr`` for the affine
    layer (and any parameter that is not a flow layer's), ``flow_lr`` for the flow layers, from
    the ``lr`` of the family (a name, or a guide's ``flow_name``; see
    :class:`~pyroflows.flows.Family`); custom flows get the network families' ``flow_lr``.

    Example:
        >>> default_lr("planar"), default_lr("iaf")
        ((0.05, 0.01), (0.05, 0.003))
    """
    name = flow.flow_name if isinstance(flow, AutoFlowGuide) else flow
    return family_of(name).lr


def optim_args(flow: str | AutoFlowGuide | None = None, lr: float | None = None,
               flow_lr: float | None = None, **kwargs: Any) -> Callable[[str], dict]:
    """Per-parameter arguments for a :mod:`pyro.optim` optimizer: ``lr`` for the affine layer of
    a flow guide (and any parameter that is not a flow layer's), ``flow_lr`` for the flow layers;
    both default to :func:`default_lr` of ``flow`` (a family name or the guide; any other
    guide, such as ``AutoNormal``, has no flow layers and gets ``lr`` everywhere).

    The affine layer is a Gaussian and tolerates a large step; the flow layers' networks start
    at the identity and are safer with a small one. Decay both over the run, e.g. with
    ``pyro.optim.ClippedAdam(optim_args(guide, lrd=0.02 ** (1 / num_steps)))`` (50-fold, the
    schedule ``benchmarks/vi.py`` measures); ``kwargs`` are passed to the optimizer.

    Example:
        >>> import pyro
        >>> optimizer = pyro.optim.Adam(optim_args("iaf"))
        >>> optim_args("iaf")("AutoIAF.flow.0.conditioner.flat_parameters")["lr"]
        0.003
        >>> optim_args("iaf")("AutoIAF.affine.packed")["lr"]
        0.05
    """
    default, default_flow = default_lr(flow)
    lr = default if lr is None else lr
    flow_lr = default_flow if flow_lr is None else flow_lr

    def args(name: str) -> dict:
        in_flow = ".flow." in f".{name}"
        return {"lr": flow_lr if in_flow else lr, **kwargs}

    return args
